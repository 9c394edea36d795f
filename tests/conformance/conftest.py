"""Fixtures: a real Mosquitto 2 and `homicro serve`, each on a free port.

`broker` runs a test once per broker (ids `mosquitto` and `homicro`, so
`-k mosquitto` / `-k homicro` picks one); `homicro` is for the registry's
own rules. Mosquitto is the reference: every generic test must pass on it.
"""

import pytest

import harness


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # so that `-k homicro` also picks the homicro-only tests
    for item in items:
        if "homicro" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.homicro)


def _start(kind, tmp_path):
    if kind == "mosquitto":
        return harness.start_mosquitto(str(tmp_path))
    return harness.start_homicro(str(tmp_path))


def _stop(broker):
    broker.stop()
    if broker.kind == "homicro" and "panicked" in broker.stderr():
        pytest.fail("homicro panicked:\n" + broker.stderr()[-4000:])


@pytest.fixture(params=["mosquitto", "homicro"])
def broker(request, tmp_path):
    b = _start(request.param, tmp_path)
    yield b
    _stop(b)


@pytest.fixture
def mosquitto(tmp_path):
    b = _start("mosquitto", tmp_path)
    yield b
    _stop(b)


@pytest.fixture
def homicro(tmp_path):
    b = _start("homicro", tmp_path)
    yield b
    _stop(b)
