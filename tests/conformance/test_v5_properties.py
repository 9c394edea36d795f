"""MQTT 5 PUBLISH and will properties, end to end; 3.1.1 subscribers beside them."""

import time

import mqtt_raw as R
from harness import V311, publish_props

USER = [("a", "1"), ("b", "two"), ("a", "3")]  # order and repeated keys kept
CORRELATION = b"\x00\x01corr\xff"


def rich_props():
    return publish_props(UserProperty=list(USER), ContentType="application/json",
                         PayloadFormatIndicator=1, ResponseTopic="props/reply",
                         CorrelationData=CORRELATION, MessageExpiryInterval=60)


def assert_rich(m):
    assert m.prop("UserProperty") == USER
    assert m.prop("ContentType") == "application/json"
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ResponseTopic") == "props/reply"
    assert m.prop("CorrelationData") == CORRELATION
    assert 55 <= m.prop("MessageExpiryInterval") <= 60


def test_publish_properties_arrive_intact_to_a_v5_subscriber(broker):
    sub = broker.client("props-sub")
    sub.subscribe("props/#", 1)
    pub = broker.client("props-pub")
    for qos in (0, 1, 2):
        pub.publish(f"props/q{qos}", b'{"n":1}', qos=qos, properties=rich_props())
    for m in sub.get_n(3):
        assert m.payload == b'{"n":1}'
        assert_rich(m)


def test_v311_subscriber_gets_v5_publishes_without_properties_and_stays_connected(broker):
    old = broker.client("props-v311", version=V311)
    old.subscribe("props/#", 2)
    pub = broker.client("props-pub")
    for qos in (0, 1, 2):
        pub.publish(f"props/q{qos}", f"p{qos}", qos=qos, properties=rich_props())
    got = old.get_n(3)
    assert sorted(m.payload for m in got) == [b"p0", b"p1", b"p2"]
    assert all(m.props == {} for m in got)
    # still connected: a later publish arrives on the same connection
    pub.publish("props/after", "after", qos=1)
    assert old.get().payload == b"after"
    assert old.connected() and old.disconnects.empty()


def test_request_response_round_trip_with_response_topic_and_correlation_data(broker):
    watcher = broker.client("rr-watcher", version=V311)  # a 3.1.1 bystander
    watcher.subscribe("rr/#", 1)
    responder = broker.client("rr-responder")
    responder.subscribe("rr/request", 1)
    requester = broker.client("rr-requester")
    requester.subscribe("rr/reply/requester", 1)

    requester.publish("rr/request", "what time is it", qos=1, properties=publish_props(
        ResponseTopic="rr/reply/requester", CorrelationData=b"req-42"))
    request = responder.get()
    assert request.payload == b"what time is it"
    assert request.prop("ResponseTopic") == "rr/reply/requester"
    responder.publish(request.prop("ResponseTopic"), "noon", qos=1,
                      properties=publish_props(CorrelationData=request.prop("CorrelationData")))

    reply = requester.get()
    assert (reply.topic, reply.payload, reply.prop("CorrelationData")) == \
        ("rr/reply/requester", b"noon", b"req-42")
    seen = [(m.topic, m.payload) for m in watcher.get_n(2)]
    assert seen == [("rr/request", b"what time is it"), ("rr/reply/requester", b"noon")]
    assert watcher.connected()


def test_retained_message_expiry_interval_counts_down(broker):
    pub = broker.client("exp-pub")
    pub.publish("exp/ten", "soon gone", qos=1, retain=True,
                properties=publish_props(MessageExpiryInterval=10))
    time.sleep(2)  # the countdown is the subject
    late = broker.client("exp-late")
    late.subscribe("exp/ten", 1)
    m = late.get()
    assert m.retain and m.payload == b"soon gone"
    assert 1 <= m.prop("MessageExpiryInterval") <= 9


def test_expired_retained_message_is_not_delivered(broker):
    pub = broker.client("exp-pub")
    pub.publish("exp/one", "gone", qos=1, retain=True,
                properties=publish_props(MessageExpiryInterval=1))
    pub.publish("exp/marker", "still here", qos=1, retain=True)
    time.sleep(2.5)  # longer than the expiry
    late = broker.client("exp-late")
    late.subscribe("exp/one", 1)  # its retained message, if any, comes first
    late.subscribe("exp/marker", 1)
    assert late.get().topic == "exp/marker"


def test_will_properties_arrive_intact(broker):
    sub = broker.client("will-props-sub")
    sub.subscribe("wp/#", 1)
    c = broker.raw(R.V5)
    c.connect("will-props", will={
        "topic": "wp/gone", "payload": b"bye", "qos": 1,
        "props": {"UserProperty": USER, "ContentType": "application/json",
                  "PayloadFormatIndicator": 1, "ResponseTopic": "props/reply",
                  "CorrelationData": CORRELATION, "MessageExpiryInterval": 60}})
    c.close()
    m = sub.get()
    assert (m.topic, m.payload) == ("wp/gone", b"bye")
    assert_rich(m)
