"""Acknowledged means durable: what homicro acknowledged (a QoS 1 PUBACK for
a record or a retained message) is back after `kill -9`, SIGTERM or a torn
journal tail; a failing disk gets no false acknowledgement, and writing
resumes by itself once the disk recovers.

The crash moments are random; the seed is printed, and
HOMICRO_CRASH_SEED=N replays a run. The disk tests mount a small tmpfs
(they need root, as CI runs; elsewhere they are skipped, saying why).
"""

import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest

import mqtt_raw as R
from harness import TIMEOUT, V5, V311, start_homicro

SEED = int(os.environ.get("HOMICRO_CRASH_SEED", random.randrange(1 << 32)))
print(f"crash tests: HOMICRO_CRASH_SEED={SEED}")


class Writer:
    """A paho client publishing records and retained messages at QoS 1 as
    fast as it may, and noting which ones were acknowledged as a success."""

    LIMIT = 60000  # packet ids stay unique (paho's wrap at 65535)

    def __init__(self, port, k, version):
        self.k = k
        self.sent = []       # (mid, topic, payload), in order
        self.ok = {}         # mid -> acknowledged as a success
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"writer-{k}",
                             protocol=version)
        self.c.max_queued_messages_set(200)
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _on_publish(self, c, u, mid, rc, p):
        with self.lock:
            self.ok[mid] = not (hasattr(rc, "is_failure") and rc.is_failure)

    def run(self):
        i = 0
        while not self.stop.is_set() and i < self.LIMIT:
            # Records and retained messages; every fourth rewrites an earlier
            # topic, so the last acknowledged value is what must come back.
            j = i // 4 if i % 4 == 3 else i
            if i % 2 == 0:
                topic = f"homicro/services/w{self.k}-{j}"
                payload = json.dumps({"host": f"10.{self.k}.{j % 250}.1", "port": 80 + i,
                                      "meta": {"i": str(i)}}, separators=(",", ":")).encode()
            else:
                topic = f"crash/w{self.k}/{j}"
                payload = f"value {i} of writer {self.k}".encode()
            try:
                info = self.c.publish(topic, payload, qos=1, retain=True)
            except (ValueError, RuntimeError):
                return
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                time.sleep(0.001)  # paho's queue is full: let acks drain
                continue
            self.sent.append((info.mid, topic, payload))
            i += 1

    def acked(self):
        """topic -> the payloads acknowledged, in order."""
        with self.lock:
            ok = dict(self.ok)
        out = {}
        for mid, topic, payload in self.sent:
            if ok.get(mid):
                out.setdefault(topic, []).append(payload)
        return out

    def later(self, topic, acked_payload):
        """Payloads sent for `topic` from the last acknowledged one on (any
        of the later ones may have reached the disk without its ack)."""
        sent = [p for (_, t, p) in self.sent if t == topic]
        return sent[sent.index(acked_payload):]


def stored(port):
    """Every retained message (records included), read back."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reader", protocol=V5)
    got, done = {}, threading.Event()

    def on_message(c, u, m):
        if m.topic == "sync/reader":
            done.set()
        elif m.retain:
            got[m.topic] = m.payload

    subacked = threading.Event()
    c.on_message = on_message
    c.on_subscribe = lambda *a: subacked.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe([("#", 1)])
    assert subacked.wait(TIMEOUT)
    # Retained copies come first: once this arrives, all of them have.
    c.publish("sync/reader", b"x", qos=1)
    assert done.wait(TIMEOUT), "no sync message"
    c.disconnect()
    c.loop_stop()
    return got


def crash(tmp, rng, stop):
    """Runs four writers (MQTT 5 and 3.1.1), stops serve with `stop` at a
    random moment, restarts it; the writers and what came back."""
    b = start_homicro(tmp)
    writers = [Writer(b.port, k, V5 if k % 2 else V311) for k in range(4)]
    for w in writers:
        w.thread.start()
    moment = rng.uniform(0.05, 1.2)
    time.sleep(moment)  # the moment of the crash is the point of the test
    code = stop(b)
    for w in writers:
        w.stop.set()
    for w in writers:
        w.thread.join(TIMEOUT)
        w.c.loop_stop()
    acked = sum(len(v) for w in writers for v in w.acked().values())
    print(f"stopped at {moment:.3f}s with {acked} acknowledged")
    assert acked > 0, "nothing was acknowledged before the crash"
    b2 = start_homicro(tmp)
    try:
        return writers, stored(b2.port), code, b2.stderr()
    finally:
        b2.stop()


def check(writers, got):
    for w in writers:
        for topic, payloads in w.acked().items():
            assert topic in got, f"{topic} was acknowledged ({payloads[-1]!r}) and is gone"
            assert got[topic] in w.later(topic, payloads[-1]), \
                f"{topic}: {got[topic]!r}, acknowledged {payloads[-1]!r}"


def kill(b):
    b.proc.kill()
    return b.proc.wait()


@pytest.mark.parametrize("moment", range(10))
def test_sigkill_loses_nothing_acknowledged(tmp_path, moment):
    rng = random.Random(SEED * 100 + moment)
    print(f"HOMICRO_CRASH_SEED={SEED} moment {moment}")
    writers, got, _, _ = crash(str(tmp_path), rng, kill)
    check(writers, got)


def test_sigterm_loses_nothing_acknowledged_and_exits_0(tmp_path):
    rng = random.Random(SEED * 100 + 50)
    print(f"HOMICRO_CRASH_SEED={SEED}")

    def term(b):
        b.proc.send_signal(signal.SIGTERM)
        return b.proc.wait(TIMEOUT)

    writers, got, code, _ = crash(str(tmp_path), rng, term)
    assert code == 0
    check(writers, got)


def test_a_torn_tail_loses_only_the_entry_being_written(tmp_path):
    rng = random.Random(SEED * 100 + 60)
    print(f"HOMICRO_CRASH_SEED={SEED}")
    state = tmp_path / "state"

    def kill_mid_write(b):
        code = kill(b)
        # The process died inside a write: the newest journal ends in half
        # a frame (a header promising 200 bytes, 10 of them there). That
        # entry was never synced, so never acknowledged.
        newest = max(state.glob("journal.*"), key=lambda p: int(p.suffix[1:]))
        with open(newest, "ab") as f:
            f.write((200).to_bytes(4, "little") + b"\0" * 14)
        return code

    writers, got, _, log = crash(str(tmp_path), rng, kill_mid_write)
    check(writers, got)
    assert "cut off" in log and "lost_entries=1" in log, log


# -- a failing disk ------------------------------------------------------

def health(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT) as r:
        return json.loads(r.read())


def http(method, port, path, body):
    """(status, JSON body) of a request from loopback (the admin)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def until(pred, what):
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)  # polling /health: there is no event to wait on


@pytest.fixture
def small_disk(tmp_path):
    """tmp/state on a 1 MiB tmpfs: filled and freed by the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], check=True)
    yield state
    subprocess.run(["umount", "-l", str(state)], check=False)


def fill(state):
    """Fills the disk; the file to remove to free it."""
    filler = state / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def published(info, seconds):
    """Whether paho saw its acknowledgement within `seconds`."""
    try:
        info.wait_for_publish(seconds)
    except (ValueError, RuntimeError):
        return False
    return info.is_published()


DURING = b"during " * 2000


def test_a_full_disk_gets_no_false_acknowledgement_and_recovers(tmp_path, small_disk):
    b = start_homicro(str(tmp_path))
    try:
        v5 = b.client("full-v5", version=V5)
        v4 = b.client("full-v4", version=V311)
        watcher = b.client("full-watcher", version=V5)
        watcher.subscribe("disk/#", 1)
        assert v5.publish("disk/a", b"before", qos=1, retain=True) == 0
        assert v5.publish("homicro/services/disk-web", b'{"host":"10.9.0.1"}',
                          qos=1, retain=True) == 0
        filler = fill(small_disk)
        # MQTT 5: refused with 0x80; the message is live all the same. (It
        # is larger than a page: the journal's last page may have room.)
        assert v5.publish("disk/b", DURING, qos=1, retain=True) == 0x80
        assert v5.publish("homicro/services/disk-nas", b'{"host":"10.9.0.2"}',
                          qos=1, retain=True) == 0x80
        # QoS 2: PUBREC 0x80 (read raw: paho releases it all the same).
        raw = b.raw(R.V5)
        raw.connect("full-raw")
        raw.send(R.publish("disk/q2", b"two", qos=2, retain=True, packet_id=7, version=R.V5))
        rec = raw.expect(R.PUBREC)
        assert rec.fields["reason"] == 0x80, rec
        # HTTP: 503 unavailable, never 2xx.
        code, body = http("PUT", b.port, "/register", {"name": "disk-http", "host": "10.9.0.3"})
        assert code == 503 and body["error"] == "unavailable", (code, body)
        assert "not written to disk" in body["detail"], body
        # 3.1.1: no PUBACK at all (the client sends it again on reconnect).
        info = v4.publish_nowait("disk/c", b"during v4", qos=1, retain=True)
        assert not published(info, 1.0), "a 3.1.1 publish was acknowledged on a full disk"
        got = {m.topic: m.payload for m in watcher.get_n(4)}
        assert got["disk/q2"] == b"two", got
        assert got["disk/b"] == DURING and got["disk/c"] == b"during v4", got
        h = health(b.port)
        assert h["storage"] == "failing" and h["state"] == "degraded", h
        assert "No space left on device" in h["storage_detail"], h
        assert "the disk failed" in b.stderr()
        # Serving goes on: the other topics, and reading.
        assert v5.publish("plain/topic", b"x", qos=1) == 0
        filler.unlink()
        until(lambda: health(b.port)["storage"] == "ok", "storage ok after freeing the disk")
        assert health(b.port)["state"] == "online"
        assert "the disk works again" in b.stderr()
        assert v5.publish("disk/d", b"after", qos=1, retain=True) == 0
        code, _ = http("PUT", b.port, "/register", {"name": "disk-http2", "host": "10.9.0.4"})
        assert code == 201
    finally:
        b.stop()  # kill -9
    b2 = start_homicro(str(tmp_path))
    try:
        got = stored(b2.port)
        for topic, want in [("disk/a", b"before"), ("disk/b", DURING),
                            ("disk/c", b"during v4"), ("disk/d", b"after")]:
            assert got.get(topic) == want, (topic, got)
        for name in ["disk-web", "disk-nas", "disk-http", "disk-http2"]:
            assert f"homicro/services/{name}" in got, (name, got)
        assert got.get("disk/q2") == b"two"
    finally:
        b2.stop()


def test_a_read_only_state_dir_gets_no_false_acknowledgement_and_recovers(tmp_path, small_disk):
    b = start_homicro(str(tmp_path))
    try:
        assert b.client("ro-v5", version=V5).publish("ro/a", b"before", qos=1, retain=True) == 0
    finally:
        b.stop()
    # Read-only from the start (a filesystem remounted read-only after an
    # error, say): what is there is served, nothing new is acknowledged.
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    b = start_homicro(str(tmp_path))
    try:
        v5 = b.client("ro-v5", version=V5)
        h = health(b.port)
        assert h["storage"] == "failing", h
        assert "Read-only file system" in h["storage_detail"], h
        assert v5.publish("ro/b", DURING, qos=1, retain=True) == 0x80
        assert stored(b.port).get("ro/a") == b"before"
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        until(lambda: health(b.port)["storage"] == "ok", "storage ok after remounting rw")
        assert v5.publish("ro/c", b"after", qos=1, retain=True) == 0
    finally:
        b.stop()
    b2 = start_homicro(str(tmp_path))
    try:
        got = stored(b2.port)
        assert [got.get(t) for t in ("ro/a", "ro/b", "ro/c")] == [b"before", DURING, b"after"]
    finally:
        b2.stop()


def test_sigterm_on_a_full_disk_exits_1_and_says_what_was_not_written(tmp_path, small_disk):
    b = start_homicro(str(tmp_path))
    try:
        v5 = b.client("term-v5", version=V5)
        fill(small_disk)
        assert v5.publish("term/lost", DURING, qos=1, retain=True) == 0x80
        v5.stop()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(TIMEOUT) == 1
        b.pump.join(TIMEOUT)
        log = b.stderr()
        assert "the final write failed" in log, log
        assert "1 change(s) not written (to term/lost)" in log, log
    finally:
        b.stop()
