"""The directory's sync message stays out of a `#` subscriber's way.

`homicro list`, `deregister` and `register` learn that a subscription's
retained copies have all arrived by echoing a message to themselves; it goes
to `$homicro/sync/ID`, which neither `#` nor `homicro/#` matches (MQTT
4.7.2), on homicro's bus and on Mosquitto alike. A broker that drops it (a
Mosquitto ACL that does not grant it) costs one timeout and a warning, then
the plain `homicro/sync/ID`."""

import subprocess
import time

import pytest

import harness
from harness import TIMEOUT
from test_cli_clients import Cli


def cli(broker, *args, timeout=TIMEOUT):
    return subprocess.run([harness.homicro_bin(), *args, "--broker",
                           f"mqtt://127.0.0.1:{broker.port}"],
                          capture_output=True, text=True, timeout=timeout)


def subscriber(broker, *filters):
    args = [a for f in filters for a in ("-t", f)]
    s = Cli("mosquitto_sub", "-p", str(broker.port), "-v", "-d", *args)
    s.line_containing("received SUBACK")  # one SUBSCRIBE for them all
    return s


def lines_until_marker(sub):
    out = []
    while True:
        line = sub.line_containing("")
        if line == "homicro/marker end":
            return out
        if not line.startswith("Client ") and not line.startswith("Subscribed"):
            out.append(line)


def test_a_hash_subscriber_sees_no_sync_messages(broker):
    subs = [subscriber(broker, "homicro/#"), subscriber(broker, "#")]
    try:
        p = cli(broker, "list")
        assert p.returncode == 0, p.stderr
        assert "NAME" in p.stdout
        assert cli(broker, "list", "--json").returncode == 0
        p = cli(broker, "deregister", "nobody")
        assert p.returncode == 1 and "nobody is not registered" in p.stderr, p.stderr
        # On Mosquitto there is no registry: register fails after its sync.
        p = cli(broker, "register", "x", "--host", "10.0.0.9", "--port", "1", "--once")
        assert p.returncode == (0 if broker.kind == "homicro" else 1), p.stderr
        assert "warn" not in p.stderr.lower(), p.stderr
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-t", "homicro/marker",
                        "-m", "end"], check=True, timeout=TIMEOUT)
        for s in subs:
            seen = lines_until_marker(s)
            assert not [l for l in seen if "sync" in l], seen
            if broker.kind == "homicro":
                assert any(l.startswith("homicro/events/x ") for l in seen), seen
    finally:
        for s in subs:
            s.stop()


def test_homicro_delivers_a_sync_message_to_its_one_subscriber_only(homicro):
    b = homicro
    # A wildcard over the echo topics is granted and gets nothing, so no
    # client learns another's (and could answer for it).
    s = subscriber(b, "$homicro/sync/+", "$homicro/#", "homicro/marker")
    try:
        assert cli(b, "list").returncode == 0
        subprocess.run(["mosquitto_pub", "-p", str(b.port), "-t", "homicro/marker",
                        "-m", "end"], check=True, timeout=TIMEOUT)
        assert lines_until_marker(s) == []
    finally:
        s.stop()
    # A client's publish to a `$` topic other than its echo is refused, as
    # are a retained echo and one with more than 64 bytes in it.
    c = b.client("dollar-publisher")
    assert c.publish("$homicro/other", b"x", qos=1) == 0x87
    assert c.publish("$homicro/sync/mine", b"x", qos=1, retain=True) == 0x87
    assert c.publish("$homicro/sync/mine", b"x" * 65, qos=1) == 0x87
    assert c.publish("$homicro/sync/mine", b"sync", qos=1) == 0


def test_a_sync_echo_reaches_its_publisher_alone(tmp_path):
    """Not a channel between clients: not through `$share/`, and not for
    two clients an ACL keeps from publishing anything at all."""
    path = tmp_path / "acl"
    path.write_text("topic read homicro/#\n")
    b = harness.start_homicro(
        str(tmp_path), f'[auth]\nacl_file = "{path}"\nallow_anonymous = true\n')
    try:
        spy = b.client("spy")
        for f in ["$share/g/$homicro/sync/+", "$share/g/$homicro/sync/chan", "$homicro/sync/chan"]:
            assert spy.subscribe(f, 1) in ([1], [0x80]), f
        talker = b.client("talker")
        assert talker.subscribe("$homicro/sync/chan", 1) == [1]
        assert talker.publish("$homicro/sync/chan", b"hello", qos=1) == 0
        # the talker gets its own echo: what the sync needs
        assert talker.get().topic == "$homicro/sync/chan"
        assert spy.drain(quiet=0.5) == []
    finally:
        b.stop()


def acl(tmp_path):
    path = tmp_path / "acl"
    path.write_text("topic readwrite homicro/#\n")
    return str(path)


def test_homicro_needs_no_acl_rule_for_the_sync_topic(tmp_path):
    b = harness.start_homicro(
        str(tmp_path), f'[auth]\nacl_file = "{acl(tmp_path)}"\nallow_anonymous = true\n')
    try:
        start = time.monotonic()
        p = cli(b, "list")
        assert p.returncode == 0, p.stderr
        assert time.monotonic() - start < 3, "no fallback wait"
        assert "sync" not in p.stderr, p.stderr
    finally:
        b.stop()


@pytest.mark.slow
def test_mosquitto_without_the_acl_rule_costs_one_timeout_then_the_plain_topic(tmp_path):
    b = harness.start_mosquitto(str(tmp_path), f"acl_file {acl(tmp_path)}\nuser root\n")
    try:
        p = cli(b, "list", timeout=30)
        assert p.returncode == 0, p.stderr
        assert "no answer on $homicro/sync/" in p.stderr, p.stderr
        assert "not grant readwrite on $homicro/sync/#" in p.stderr, p.stderr
        assert "syncing on homicro/sync/ID instead" in p.stderr, p.stderr
    finally:
        b.stop()
    # With the rule, no timeout.
    (tmp_path / "acl").write_text("topic readwrite homicro/#\ntopic readwrite $homicro/sync/#\n")
    b = harness.start_mosquitto(str(tmp_path), f"acl_file {tmp_path / 'acl'}\nuser root\n")
    try:
        start = time.monotonic()
        p = cli(b, "list")
        assert p.returncode == 0 and "sync" not in p.stderr, p.stderr
        assert time.monotonic() - start < 3
    finally:
        b.stop()
