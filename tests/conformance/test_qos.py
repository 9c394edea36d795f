"""QoS: delivered QoS is min(publish QoS, granted QoS); SUBACK grants what was asked."""

import json

import pytest

from harness import TIMEOUT, V311, V5, VERSIONS


def subscribers(broker, version, filt):
    """One subscriber per granted QoS 0, 1, 2."""
    subs = {}
    for granted in range(3):
        s = broker.client(f"qos-sub-{granted}", version=version)
        assert s.subscribe(filt, granted) == [granted]
        subs[granted] = s
    return subs


@pytest.mark.parametrize("version", VERSIONS)
def test_delivered_qos_is_min_of_publish_and_granted_qos_live(broker, version):
    subs = subscribers(broker, version, "q/#")
    pub = broker.client("qos-pub")
    for p in range(3):
        pub.publish(f"q/{p}", f"p{p}", qos=p)
    for granted, s in subs.items():
        got = {m.topic: (m.qos, m.retain) for m in s.get_n(3)}
        assert got == {f"q/{p}": (min(p, granted), False) for p in range(3)}, f"granted {granted}"


@pytest.mark.parametrize("version", VERSIONS)
def test_delivered_qos_is_min_of_publish_and_granted_qos_retained(broker, version):
    pub = broker.client("qos-pub")
    for p in range(3):
        pub.publish(f"r/{p}", f"p{p}", qos=p, retain=True)
    pub.publish("r/sync", "sync", qos=1)  # the QoS 0 one has been handled too
    subs = subscribers(broker, version, "r/+")
    for granted, s in subs.items():
        got = {m.topic: (m.qos, m.retain) for m in s.get_n(3)}
        assert got == {f"r/{p}": (min(p, granted), True) for p in range(3)}, f"granted {granted}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("filt", [
    pytest.param(f, id=f.replace("homicro/", "prefix/")) for f in
    ["plain/topic", "plain/#", "homicro/services/+", "homicro/services/#", "homicro/#"]])
def test_suback_grants_the_requested_qos(broker, version, filt):
    c = broker.client("granted", version=version)
    for qos in range(3):
        assert c.subscribe(filt, qos) == [qos]


def record(i):
    return json.dumps({"host": "10.0.0.1", "port": 1000 + i})


def publish_records(broker, n):
    """Registers svc-0 .. svc-(n-1) (retained, QoS 1) and waits until every
    one has gone out live, so each is stored."""
    live = broker.client("records-live", version=V311)
    live.subscribe("homicro/services/+", 0)
    pub = broker.client("records-pub", version=V311, connect=False)
    pub.c.max_inflight_messages_set(100)
    pub.connect()
    infos = [pub.publish_nowait(f"homicro/services/svc-{i}", record(i), qos=1, retain=True)
             for i in range(n)]
    for info in infos:
        info.wait_for_publish(TIMEOUT)
    topics = {f"homicro/services/svc-{i}" for i in range(n)}
    assert {m.topic for m in live.get_n(n, timeout=30)} == topics
    return topics


def assert_every_record_retained(broker, topics):
    for version in (V311, V5):
        for qos in (1, 2):
            sub = broker.client(f"records-{version}-{qos}", version=version)
            assert sub.subscribe("homicro/services/#", qos) == [qos]
            got = sub.get_n(len(topics), timeout=30)
            assert sorted(m.topic for m in got) == sorted(topics), f"v{version} QoS {qos}"
            assert all(m.retain and m.qos == 1 for m in got)
            by_topic = {m.topic: m.json() for m in got}
            assert by_topic["homicro/services/svc-7"] == {"host": "10.0.0.1", "port": 1007}
            sub.stop()


def test_qos1_and_qos2_subscribers_to_services_get_every_retained_record(broker):
    """1,000 records: more than rumqttd's cut at 100 in flight, within
    Mosquitto's default per-client queue (max_queued_messages 1000 plus 20
    in flight; beyond that Mosquitto drops, see the next test)."""
    assert_every_record_retained(broker, publish_records(broker, 1000))


def test_qos1_and_qos2_subscribers_to_services_get_2000_retained_records(homicro):
    """homicro only: Mosquitto's default configuration delivers 1,020 of
    them (max_queued_messages 1000 + max_inflight_messages 20) and drops
    the rest; homicro must deliver every record."""
    assert_every_record_retained(homicro, publish_records(homicro, 2000))
