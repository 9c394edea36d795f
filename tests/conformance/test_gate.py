"""homicro only: the registry is the gate (docs/PROTOCOL.md, "The gate").

Only the registry publishes homicro/registry, events/, errors/ (and
health/), and only homicro's Home Assistant bridge ha/; a record is
judged before the broker stores or forwards it.
Absence is shown with a marker: a valid registration published after the
refused publish reaches the watcher after anything the refused one would
have caused.
"""

import json

import pytest

from harness import V311, V5, VERSIONS

ORIGINAL = {"host": "10.0.0.1", "port": 631}
MARKER = {"host": "10.0.0.9", "port": 9999}


def watcher(homicro, filt, version=V311, name="gate-watcher"):
    w = homicro.client(name, version=version)
    w.subscribe(filt, 1)
    return w


def register(client, name, record):
    return client.publish(f"homicro/services/{name}", json.dumps(record), qos=1, retain=True)


def retained(homicro, topic):
    """The retained payload on `topic`, or None (homicro/registry's retained
    state comes after it, so its arrival first means "none")."""
    c = homicro.client("retained-probe", version=V311)
    c.subscribe(topic, 1)
    c.subscribe("homicro/registry", 1)
    got = c.get_until("homicro/registry")
    c.stop()
    if topic == "homicro/registry":
        return got[0].payload
    assert len(got) <= 2 and all(m.retain for m in got)
    return got[0].payload if len(got) == 2 else None


def registry_online(homicro):
    return json.loads(retained(homicro, "homicro/registry"))["state"] == "online"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("topic", ["homicro/registry", "homicro/events/x",
                                   "homicro/errors/x", "homicro/health/x",
                                   "homicro/ha/x/state"])
def test_client_publish_to_a_registry_topic_is_refused(homicro, topic, version):
    w = watcher(homicro, "homicro/#")
    w.get_until("homicro/registry")  # its retained state, before anything else
    forger = homicro.client("forger", version=version)
    forged = json.dumps({"state": "offline", "name": "x", "error": "owned", "event": "expired"})
    code = forger.publish(topic, forged, qos=1, retain=True)
    if version == V5:
        assert code == 0x87  # Not authorized
    register(homicro.client("marker"), "marker", MARKER)
    got = w.get_until("homicro/services/marker")
    assert [m for m in got if m.payload == forged.encode()] == []
    if topic != "homicro/registry":
        assert retained(homicro, topic) is None
    assert registry_online(homicro)
    assert forger.connected()


@pytest.mark.parametrize("version", VERSIONS)
def test_valid_record_reaches_watchers_with_its_payload(homicro, version):
    w = watcher(homicro, "homicro/services/+", version=version)
    owner = homicro.client("owner", version=version)
    assert register(owner, "printer", ORIGINAL) == 0
    m = w.get()
    assert (m.topic, m.json()) == ("homicro/services/printer", ORIGINAL)
    assert json.loads(retained(homicro, "homicro/services/printer")) == ORIGINAL


def refused(homicro, name, payload, version):
    """Publishes `payload` to homicro/services/NAME as a second client that
    listens on homicro/errors/NAME; returns (PUBACK code, error object)."""
    other = homicro.client(f"other-{name}", version=version)
    other.subscribe(f"homicro/errors/{name}", 1)
    code = other.publish(f"homicro/services/{name}", payload, qos=1, retain=True)
    return code, other.get().json()


@pytest.mark.parametrize("version", VERSIONS)
def test_duplicate_record_is_never_seen_and_its_publisher_gets_an_error(homicro, version):
    owner = homicro.client("owner", version=V311)
    register(owner, "printer", ORIGINAL)
    w = watcher(homicro, "homicro/services/+", version=version)
    assert w.get().json() == ORIGINAL  # retained
    impostor = json.dumps({"host": "10.0.0.2", "port": 631})

    code, error = refused(homicro, "printer", impostor, version)
    assert (error["name"], error["error"]) == ("printer", "owned")
    if version == V5:
        assert code >= 0x80
    register(owner, "marker", MARKER)
    got = w.get_until("homicro/services/marker")
    assert [m.json() for m in got[:-1]] in ([], [ORIGINAL])  # a restore is harmless
    assert json.loads(retained(homicro, "homicro/services/printer")) == ORIGINAL


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("payload", ["not json", '{"host": 5}',
                                     '{"host":"10.0.0.5","port":80,"host":"6.6.6.6"}'])
def test_invalid_record_is_never_seen_and_its_publisher_gets_an_error(homicro, version, payload):
    owner = homicro.client("owner", version=V311)
    register(owner, "printer", ORIGINAL)
    w = watcher(homicro, "homicro/services/+", version=version)
    assert w.get().json() == ORIGINAL

    for name in ("printer", "fresh"):  # a registered name and a free one
        code, error = refused(homicro, name, payload, version)
        assert (error["name"], error["error"]) == (name, "invalid")
        if version == V5:
            assert code >= 0x80
    register(owner, "marker", MARKER)
    got = w.get_until("homicro/services/marker")
    assert [m for m in got if m.payload == payload.encode()] == []
    assert json.loads(retained(homicro, "homicro/services/printer")) == ORIGINAL
    assert retained(homicro, "homicro/services/fresh") in (None, b"")
