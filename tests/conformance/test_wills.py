"""Wills: fired exactly once, on the right connection, after their delay."""

import collections
import time

import pytest

import mqtt_raw as R
from harness import TIMEOUT, VERSIONS

GRACE = 1.0  # how long a will that must not come is given to show up anyway


def will(topic, qos=1, delay=None):
    props = {"WillDelayInterval": delay} if delay is not None else None
    return {"topic": topic, "payload": f"gone:{topic}".encode(), "qos": qos, "props": props}


def watch(broker, filt="will/#"):
    w = broker.client("will-watcher")
    assert w.subscribe(filt, 1) == [1]
    return w


def topics(messages):
    return [m.topic for m in messages]


@pytest.mark.parametrize("n", [100, pytest.param(1000, marks=pytest.mark.slow)])
def test_every_silent_client_will_is_published_exactly_once(broker, n):
    watcher = watch(broker, "will/silent/#")
    clients = [broker.raw() for _ in range(n)]
    for i, c in enumerate(clients):
        c.send(R.connect(f"silent-{i}", keepalive=2, will=will(f"will/silent/{i}")))
    for c in clients:
        assert c.expect(R.CONNACK).fields["reason"] == 0
    # Nobody pings: the server must time every client out (1.5 x keepalive)
    # and publish its will.
    got = collections.Counter()
    deadline = time.monotonic() + 3 + TIMEOUT + n / 100
    while len(got) < n:
        m = watcher.get(timeout=max(deadline - time.monotonic(), 0.01))
        got[m.topic] += 1
    got.update(topics(watcher.drain(GRACE)))
    assert set(got) == {f"will/silent/{i}" for i in range(n)}
    assert [t for t, k in got.items() if k != 1] == []


@pytest.mark.parametrize("version", VERSIONS)
def test_normal_disconnect_publishes_no_will(broker, version):
    watcher = watch(broker)
    c = broker.raw(version)
    c.connect("polite", will=will("will/polite"))
    c.send(R.disconnect(version))
    c.recv_until_closed()
    # The marker comes from a client that dies after `polite` left.
    marker = broker.raw(version)
    marker.connect("marker", will=will("will/marker"))
    marker.close()
    assert topics(watcher.get_until("will/marker")) == ["will/marker"]
    assert watcher.drain(GRACE) == []


def test_v5_disconnect_with_will_message_0x04_publishes_the_will(broker):
    watcher = watch(broker)
    c = broker.raw(R.V5)
    c.connect("leaving", will=will("will/leaving"))
    c.send(R.disconnect(R.V5, reason=0x04))
    m = watcher.get()
    assert (m.topic, m.payload) == ("will/leaving", b"gone:will/leaving")
    assert watcher.drain(GRACE) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_publishes_old_connection_will_once_and_not_the_new_one(broker, version):
    watcher = watch(broker)
    old = broker.raw(version)
    old.connect("twin", will=will("will/old"))
    new = broker.raw(version)
    assert new.connect("twin", will=will("will/new")).fields["reason"] == 0
    old.recv_until_closed()  # the server closed the old connection
    assert topics(watcher.get_until("will/old")) == ["will/old"]
    assert watcher.drain(GRACE) == []  # not twice, and not the new one's
    new.close()  # now the new connection dies: its will, once
    assert topics(watcher.get_until("will/new")) == ["will/new"]
    assert watcher.drain(GRACE) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_takeover_that_resumes_the_session_publishes_no_will(broker, version):
    """Mosquitto's rule (handle_connect.c): on takeover the old will is sent
    only if the old session ends (3.1.1 clean session, v5 session expiry 0,
    or the new CONNECT has clean start). A takeover that resumes the session
    (clean session 0 / CleanStart 0 with an expiry) sends no will."""
    watcher = watch(broker)
    kw = {"clean": False}
    if version == R.V5:
        kw["props"] = {"SessionExpiryInterval": 60}
    old = broker.raw(version)
    old.connect("resumer", will=will("will/old"), **kw)
    new = broker.raw(version)
    ack = new.connect("resumer", will=will("will/new"), **kw)
    assert ack.fields["session_present"]
    old.recv_until_closed()
    new.close()
    assert topics(watcher.get_until("will/new")) == ["will/new"]
    assert watcher.drain(GRACE) == []


def test_will_delay_interval_delays_the_will(broker):
    watcher = watch(broker)
    c = broker.raw(R.V5)
    c.connect("delayed", props={"SessionExpiryInterval": 60}, will=will("will/delayed", delay=2))
    c.close()
    gone = time.monotonic()
    m = watcher.get()
    waited = time.monotonic() - gone
    assert m.topic == "will/delayed"
    assert 1.5 <= waited <= 4.5, f"will came {waited:.2f}s after the connection closed"


def test_will_delay_is_cancelled_when_the_client_resumes_in_time(broker):
    watcher = watch(broker)
    c = broker.raw(R.V5)
    c.connect("comeback", props={"SessionExpiryInterval": 60}, will=will("will/comeback", delay=2))
    c.close()
    again = broker.raw(R.V5)
    ack = again.connect("comeback", clean=False, props={"SessionExpiryInterval": 60})
    assert ack.fields["session_present"]
    time.sleep(2 + GRACE)  # the delay itself is the subject
    assert watcher.drain(GRACE) == []


def test_will_is_sent_when_the_session_expires_before_the_delay(broker):
    watcher = watch(broker)
    c = broker.raw(R.V5)
    c.connect("short", props={"SessionExpiryInterval": 1}, will=will("will/short", delay=30))
    c.close()
    gone = time.monotonic()
    assert watcher.get().topic == "will/short"
    assert time.monotonic() - gone < 4, "the will waited for its delay, not the session's end"


def test_will_is_sent_at_once_when_the_session_ends_with_the_connection(homicro):
    """Session Expiry 0 (absent): the session ends when the connection does,
    so a delayed will goes at once [MQTT-3.1.3-9]. homicro only: Mosquitto
    2.0.11 gets this wrong and waits the full will delay (30 s here)."""
    watcher = watch(homicro)
    c = homicro.raw(R.V5)
    c.connect("short", will=will("will/short", delay=30))
    c.close()
    gone = time.monotonic()
    assert watcher.get().topic == "will/short"
    assert time.monotonic() - gone < 2.5
