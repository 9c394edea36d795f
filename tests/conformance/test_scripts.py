"""scripts/serve, with a stand-in cargo and binary: a build that has work to
do shows cargo's progress and says so; a binary newer than every source is
still checked by cargo, with its progress shown (a toolchain update rebuilds
everything though no source changed), without the notice; either way
`homicro serve ARGS` runs from CARGO_TARGET_DIR."""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_serve(tmp_path, stale):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "cargo-calls"
    cargo = bin_dir / "cargo"
    cargo.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    cargo.chmod(0o755)
    target = tmp_path / "target"
    (target / "release").mkdir(parents=True)
    homicro = target / "release" / "homicro"
    homicro.write_text('#!/bin/sh\necho "ran homicro $*"\n')
    homicro.chmod(0o755)
    if stale:
        os.utime(homicro, (0, 0))  # older than every source
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CARGO_TARGET_DIR=str(target))
    p = subprocess.run(
        [str(ROOT / "scripts" / "serve"), "--listen", "0.0.0.0:1884"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "ran homicro serve --listen 0.0.0.0:1884\n"
    return calls.read_text().splitlines(), p.stderr


def test_a_build_with_work_to_do_shows_its_progress(tmp_path):
    calls, stderr = run_serve(tmp_path, stale=True)
    assert calls == ["build --release"]
    assert "building homicro" in stderr and "first build takes a few minutes" in stderr


def test_an_up_to_date_binary_is_checked_without_the_notice(tmp_path):
    calls, stderr = run_serve(tmp_path, stale=False)
    assert calls == ["build --release"]
    assert stderr == ""
