"""MQTT 5 subscription options: No Local, Retain As Published, Retain Handling.

Absence is shown with a marker: a live message published after the
SUBACK arrives after any retained message the subscription would get, and
after any earlier message to the same client at the same QoS.
"""

import pytest

from harness import V311, sub_opts


def test_no_local_subscriber_does_not_get_its_own_publishes_but_gets_others(broker):
    me = broker.client("nl-me")
    me.subscribe("nl/#", options=sub_opts(1, noLocal=True))
    other = broker.client("nl-other")
    me.publish("nl/t", "mine", qos=1)
    other.publish("nl/t", "theirs", qos=1)
    assert me.get().payload == b"theirs"
    me.publish("nl/t", "mine again", qos=1)
    other.publish("nl/t", "theirs again", qos=1)
    assert me.get().payload == b"theirs again"


def test_without_no_local_a_subscriber_gets_its_own_publishes(broker):
    me = broker.client("nl-plain")
    me.subscribe("nl/#", 1)
    me.publish("nl/t", "mine", qos=1)
    assert me.get().payload == b"mine"


def test_retain_as_published_keeps_the_retain_flag_on_live_messages(broker):
    rap = broker.client("rap")
    rap.subscribe("rap/#", options=sub_opts(1, retainAsPublished=True))
    plain = broker.client("rap-plain")
    plain.subscribe("rap/#", options=sub_opts(1))
    old = broker.client("rap-v311", version=V311)
    old.subscribe("rap/#", 1)
    pub = broker.client("rap-pub")
    pub.publish("rap/t", "retained", qos=1, retain=True)
    pub.publish("rap/t", "live", qos=1)
    assert [(m.payload, m.retain) for m in rap.get_n(2)] == [(b"retained", True), (b"live", False)]
    # without it, a live forward always has retain 0 (3.1.1 and 5)
    for c in (plain, old):
        assert [(m.payload, m.retain) for m in c.get_n(2)] == [(b"retained", False), (b"live", False)]


def _retained_then_marker(sub, pub, handling):
    """Subscribes twice with Retain Handling `handling`; returns, per
    SUBSCRIBE, whether the retained message came before the marker."""
    seen = []
    for round_ in range(2):
        sub.subscribe("rh/#", options=sub_opts(1, retainHandling=handling))
        pub.publish("rh/marker", f"marker{round_}", qos=1)
        got = sub.get_until("rh/marker")
        assert got[-1].payload == f"marker{round_}".encode()
        assert [m.topic for m in got[:-1]] in ([], ["rh/kept"])
        seen.append(len(got) == 2)
        if len(got) == 2:
            assert got[0].retain and got[0].payload == b"kept"
    return seen


@pytest.mark.parametrize("handling,expected", [
    (0, [True, True]),    # send retained at every subscribe
    (1, [True, False]),   # only if the subscription did not exist
    (2, [False, False]),  # never
])
def test_retain_handling(broker, handling, expected):
    pub = broker.client("rh-pub")
    pub.publish("rh/kept", "kept", qos=1, retain=True)
    sub = broker.client(f"rh-sub-{handling}")
    assert _retained_then_marker(sub, pub, handling) == expected


@pytest.mark.parametrize("version", [V311, 5], ids=["v311", "v5"])
def test_a_sys_subscription_is_granted_and_the_session_carries_on(broker, version):
    """MQTT Explorer and friends subscribe to `$SYS/#` first: granted, and
    the session still works (homicro publishes no `$` topics; Mosquitto
    does, so only what follows is compared)."""
    c = broker.client("sys-watcher", version=version)
    assert c.subscribe("$SYS/#", 0) == [0]
    assert c.subscribe("sys/after", 1) == [1]
    broker.client("sys-pub").publish("sys/after", "still here", qos=1)
    got = [m for m in c.get_until("sys/after") if not m.topic.startswith("$SYS")]
    assert [m.payload for m in got] == [b"still here"]


def _drain(client, wait=0.5):
    got = []
    while True:
        try:
            got.append(client.get(timeout=wait))
        except AssertionError:
            return got


def test_shared_subscription_gives_each_message_to_one_member_in_turn(broker):
    pub = broker.client("sh-pub")
    pub.publish("sh/r", "retained", qos=1, retain=True)
    members = [broker.client(f"sh-{m}") for m in "ab"]
    for m in members:
        m.subscribe("$share/g/sh/#", 1)
    plain = broker.client("sh-plain")
    plain.subscribe("sh/t", 1)
    for n in range(10):
        pub.publish("sh/t", f"m{n}", qos=1)
    # Every message was routed once the plain subscriber has them all.
    assert [m.payload for m in plain.get_n(10)] == [f"m{n}".encode() for n in range(10)]
    got = [[m.payload for m in _drain(c)] for c in members]
    # MQTT 5 (3.3.1.3) sends retained messages "when a new Non-shared
    # Subscription is made": homicro sends none to a shared one; Mosquitto
    # 2 sends them to each member as it subscribes.
    retained = [b"retained"] * 2 if broker.kind == "mosquitto" else []
    live = [p for p in got[0] + got[1] if p != b"retained"]
    assert len(got[0] + got[1]) - len(live) == len(retained)
    # Each live message to exactly one member; both members take turns.
    assert sorted(live) == sorted(f"m{n}".encode() for n in range(10))
    assert got[0] and got[1], got
    pub.publish("sh/r", "", qos=1, retain=True)
