"""MQTT 5 flow control: Receive Maximum, Maximum Packet Size, Topic Aliases."""

import mqtt_raw as R
from harness import connect_props


def test_qos2_publish_past_receive_maximum_is_refused(broker):
    """The spec (3.3.4) says DISCONNECT 0x93 Receive Maximum exceeded; that is
    what newer Mosquitto sends. Mosquitto 2.0.11 instead answers the
    offending PUBLISH with PUBREC 0x97 Quota exceeded and keeps the
    connection. Either way the refused message never reaches anyone. (The
    ones before it may be forwarded on PUBLISH or on PUBREL: both are
    allowed, 4.3.3; Mosquitto waits for the PUBREL.)"""
    watcher = broker.client("rm-watcher")
    watcher.subscribe("rm/#", 1)  # one QoS: delivered in order
    c = broker.raw(R.V5)
    rm = c.connect("flooder").props.get("ReceiveMaximum", 65535)
    assert rm < 65535, "no Receive Maximum announced: nothing bounds a flood"
    for i in range(1, rm + 1):  # QoS 2, never released: all stay in flight
        c.send(R.publish("rm/t", f"m{i}", qos=2, packet_id=i, version=R.V5))
    for i in range(1, rm + 1):
        assert c.expect(R.PUBREC).fields == {"packet_id": i, "reason": 0}
    c.send(R.publish("rm/t", "over", qos=2, packet_id=rm + 1, version=R.V5))
    answer = c.recv()
    accepted = [f"m{i}".encode() for i in range(1, rm + 1)]
    if answer.type == R.DISCONNECT:
        assert answer.fields["reason"] == 0x93
        assert c.recv_until_closed() == []
        broker.client("rm-marker").publish("rm/marker", "marker", qos=1)
        expected = ([b"marker"], accepted + [b"marker"])
    else:
        assert answer.type == R.PUBREC
        assert answer.fields == {"packet_id": rm + 1, "reason": 0x97}
        for i in range(1, rm + 1):
            c.send(R.ack(R.PUBREL, i, R.V5))
            assert c.expect(R.PUBCOMP).fields["packet_id"] == i
        c.send(R.publish("rm/marker", "marker", qos=1, packet_id=1, version=R.V5))
        assert c.expect(R.PUBACK).fields["reason"] == 0
        expected = (accepted + [b"marker"],)
    assert [m.payload for m in watcher.get_until("rm/marker")] in expected


def test_message_larger_than_the_client_maximum_packet_size_is_not_sent(broker):
    small = broker.client("small", properties=connect_props(MaximumPacketSize=256))
    small.subscribe("mps/#", 1)
    pub = broker.client("mps-pub")
    pub.publish("mps/t", b"L" * 1000, qos=1)
    pub.publish("mps/t", b"s" * 100, qos=1)
    pub.publish("mps/t", b"L" * 300, qos=0)
    pub.publish("mps/t", b"end", qos=0)
    assert [m.payload for m in small.get_n(2)] == [b"s" * 100, b"end"]
    assert small.connected()


def test_topic_alias_0_gets_disconnect_malformed_packet_before_close(broker):
    """Topic Alias 0 is forbidden [MQTT-3.3.2-8]; the spec names no reason
    code for it (0x94 is defined for "greater than the maximum"). Mosquitto
    sends DISCONNECT 0x81 Malformed Packet, then closes."""
    c = broker.raw(R.V5)
    c.connect("alias0")
    c.send(R.publish("ta/t", "x", qos=1, version=R.V5, props={"TopicAlias": 0}))
    got = c.recv_until_closed()
    assert [(p.type, p.fields["reason"]) for p in got] == [(R.DISCONNECT, 0x81)]


def test_topic_alias_above_the_maximum_gets_disconnect_0x94_before_close(broker):
    c = broker.raw(R.V5)
    maximum = c.connect("alias-big").props.get("TopicAliasMaximum", 0)
    c.send(R.publish("ta/t", "x", qos=1, version=R.V5, props={"TopicAlias": maximum + 1}))
    got = c.recv_until_closed()
    assert [(p.type, p.fields["reason"]) for p in got] == [(R.DISCONNECT, 0x94)]


def test_unknown_topic_alias_with_empty_topic_gets_disconnect_protocol_error(broker):
    c = broker.raw(R.V5)
    c.connect("alias-unknown")
    c.send(R.publish("", "x", qos=1, version=R.V5, props={"TopicAlias": 1}))
    got = c.recv_until_closed()
    assert [(p.type, p.fields["reason"]) for p in got] == [(R.DISCONNECT, 0x82)]


def test_topic_alias_used_correctly_is_resolved_for_subscribers(broker):
    watcher = broker.client("alias-watcher", version=4)
    watcher.subscribe("ta/#", 1)
    c = broker.raw(R.V5)
    assert c.connect("alias-ok").props.get("TopicAliasMaximum", 0) >= 2
    c.send(R.publish("ta/one", "1", qos=1, packet_id=1, version=R.V5, props={"TopicAlias": 1}))
    c.send(R.publish("", "2", qos=1, packet_id=2, version=R.V5, props={"TopicAlias": 1}))
    c.send(R.publish("ta/two", "3", qos=1, packet_id=3, version=R.V5, props={"TopicAlias": 2}))
    c.send(R.publish("ta/one-again", "4", qos=1, packet_id=4, version=R.V5, props={"TopicAlias": 1}))
    c.send(R.publish("", "5", qos=1, packet_id=5, version=R.V5, props={"TopicAlias": 1}))
    c.send(R.publish("", "6", qos=1, packet_id=6, version=R.V5, props={"TopicAlias": 2}))
    for i in range(1, 7):
        assert c.expect(R.PUBACK).fields == {"packet_id": i, "reason": 0}
    got = [(m.topic, m.payload.decode()) for m in watcher.get_n(6)]
    assert got == [("ta/one", "1"), ("ta/one", "2"), ("ta/two", "3"),
                   ("ta/one-again", "4"), ("ta/one-again", "5"), ("ta/two", "6")]
