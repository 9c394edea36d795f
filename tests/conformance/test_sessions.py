"""Sessions: clean session / clean start, session expiry, offline queueing.

A resumed session's queued messages are sent before anything published
after the resume, so a marker published then shows what was (not) queued.
"""

import time

from harness import V311, V5


def resume_and_mark(broker, client_id, version, **kw):
    """Reconnects (no clean start), re-subscribes, publishes a marker;
    returns (session_present, payloads received up to the marker)."""
    c = broker.client(client_id, version=version, clean=False, connect=False, **kw)
    present, _, _ = c.connect()
    c.subscribe("sess/#", 1)
    broker.client("sess-marker").publish("sess/marker", "marker", qos=1)
    return present, [m.payload for m in c.get_until("sess/marker")]


def persistent(broker, client_id, version, **kw):
    """A session subscribed to sess/# at QoS 1, then disconnected."""
    c = broker.client(client_id, version=version, **kw)
    c.subscribe("sess/#", 1)
    c.disconnect()


def publish_while_offline(broker, *payloads, qos=1):
    pub = broker.client("sess-pub")
    for p in payloads:
        pub.publish("sess/t", p, qos=qos)


def test_v311_persistent_session_queues_qos1_messages_while_offline(broker):
    persistent(broker, "keeper", V311, clean=False)
    publish_while_offline(broker, "one", "two")
    assert resume_and_mark(broker, "keeper", V311) == (True, [b"one", b"two", b"marker"])


def test_v311_clean_session_connect_discards_the_persistent_session(broker):
    persistent(broker, "forgetful", V311, clean=False)
    cleaner = broker.client("forgetful", version=V311, clean=True)
    cleaner.disconnect()
    publish_while_offline(broker, "in between")
    assert resume_and_mark(broker, "forgetful", V311) == (False, [b"marker"])


def test_v5_clean_start_0_without_session_expiry_keeps_no_session(broker):
    c = broker.client("no-expiry", version=V5, clean=False)  # CleanStart 0, no expiry
    c.subscribe("sess/#", 1)
    c.disconnect()
    publish_while_offline(broker, "lost")
    assert resume_and_mark(broker, "no-expiry", V5) == (False, [b"marker"])


def test_v5_session_expiry_keeps_the_session_and_queues_qos1_messages(broker):
    persistent(broker, "expiring", V5, clean=True, session_expiry=99999)
    publish_while_offline(broker, "one", "two")
    got = resume_and_mark(broker, "expiring", V5, session_expiry=99999)
    assert got == (True, [b"one", b"two", b"marker"])


def test_qos0_messages_are_not_queued_for_an_offline_session(broker):
    """Mosquitto's default (queue_qos0_messages false): a QoS 0 message
    published while the client is offline is not kept for it, even on a
    QoS 1 subscription; QoS 1 messages beside it are."""
    persistent(broker, "qos0-offline", V5, clean=True, session_expiry=99999)
    pub = broker.client("sess-pub")
    pub.publish("sess/t", "qos0", qos=0)
    pub.publish("sess/t", "qos1", qos=1)
    got = resume_and_mark(broker, "qos0-offline", V5, session_expiry=99999)
    assert got == (True, [b"qos1", b"marker"])


def test_v5_session_is_gone_after_its_expiry_interval(broker):
    persistent(broker, "short-lived", V5, clean=True, session_expiry=1)
    publish_while_offline(broker, "lost")
    time.sleep(3.5)  # the expiry itself is the subject (Mosquitto checks once a second)
    assert resume_and_mark(broker, "short-lived", V5) == (False, [b"marker"])


def test_an_offline_session_queues_at_most_max_queued_messages(broker):
    """1,500 QoS 1 messages for an absent persistent session: both brokers
    keep the first 1,000 (max_queued_messages) and drop the rest."""
    persistent(broker, "overflow", V311, clean=False)
    publish_while_offline(broker, *[f"m{i}" for i in range(1500)])
    present, got = resume_and_mark(broker, "overflow", V311)
    assert present
    assert got[-1] == b"marker"
    assert got[:-1] == [f"m{i}".encode() for i in range(1000)]
