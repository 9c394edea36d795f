"""CONNECT and CONNACK: client identifiers, keepalive, the server's limits."""

import time

import pytest

import mqtt_raw as R

# What Mosquitto 2.0.11 (default configuration) puts in a v5 CONNACK, pinned
# so homicro announces the same limits: Receive Maximum 20
# (max_inflight_messages), Topic Alias Maximum 10 (max_topic_alias), no
# Maximum QoS (= 2), no Retain Available (= 1), no Maximum Packet Size; and
# Server Keep Alive 65535 (max_keepalive) only when the client asked for
# keepalive 0.
MOSQUITTO_CONNACK = {
    60: {"ReceiveMaximum": 20, "TopicAliasMaximum": 10},
    0: {"ReceiveMaximum": 20, "TopicAliasMaximum": 10, "ServerKeepAlive": 65535},
}


@pytest.mark.parametrize("keepalive", [60, 0])
def test_v5_connack_properties_match_the_reference(broker, keepalive):
    c = broker.raw(R.V5)
    ack = c.connect("limits", keepalive=keepalive)
    assert ack.fields["reason"] == 0
    assert ack.props == MOSQUITTO_CONNACK[keepalive]


CONNECTS = {  # the same CONNECT to both brokers
    "v5-keepalive-60": dict(version=R.V5, client_id="same", keepalive=60),
    "v5-keepalive-0": dict(version=R.V5, client_id="same", keepalive=0),
    "v5-keepalive-max": dict(version=R.V5, client_id="same", keepalive=65535),
    "v5-empty-id": dict(version=R.V5, client_id=""),
    "v5-client-limits": dict(version=R.V5, client_id="same", props={
        "ReceiveMaximum": 5, "MaximumPacketSize": 1000, "TopicAliasMaximum": 3,
        "SessionExpiryInterval": 100, "RequestResponseInformation": 1,
        "RequestProblemInformation": 0}),
    "v5-empty-id-resume": dict(version=R.V5, client_id="", clean=False),
    "v311-keepalive-0": dict(version=R.V311, client_id="same", keepalive=0),
    "v311-empty-id-resume": dict(version=R.V311, client_id="", clean=False),
}


def connack(broker, version, client_id, **kw):
    ack = broker.raw(version).connect(client_id, **kw)
    props = dict(ack.props)
    if "AssignedClientIdentifier" in props:  # its value is the broker's own
        props["AssignedClientIdentifier"] = "assigned"
    return ack.fields["reason"], ack.fields["session_present"], props


@pytest.mark.parametrize("name", CONNECTS)
def test_connack_equals_the_reference_brokers_for_the_same_connect(mosquitto, homicro, name):
    """Both brokers side by side: reason code, session present, properties."""
    assert connack(homicro, **CONNECTS[name]) == connack(mosquitto, **CONNECTS[name])


def test_v5_empty_client_id_gets_an_assigned_client_identifier(broker):
    first = broker.raw(R.V5).connect("")
    second = broker.raw(R.V5).connect("")
    assert first.fields["reason"] == second.fields["reason"] == 0
    ids = [a.props.get("AssignedClientIdentifier") for a in (first, second)]
    assert all(ids) and ids[0] != ids[1], ids


def test_v5_assigned_client_identifier_is_not_sent_for_a_given_id(broker):
    ack = broker.raw(R.V5).connect("named")
    assert "AssignedClientIdentifier" not in ack.props


def test_v311_empty_client_id_with_clean_session_0_is_refused_with_code_2(broker):
    c = broker.raw(R.V311)
    ack = c.connect("", clean=False)
    assert (ack.fields["reason"], ack.fields["session_present"]) == (2, False)
    assert c.recv_until_closed() == []


def test_v311_empty_client_id_with_clean_session_1_is_accepted(broker):
    c = broker.raw(R.V311)
    assert c.connect("", clean=True).fields["reason"] == 0
    c.send(R.pingreq())
    assert c.recv().type == R.PINGRESP


def test_keepalive_0_is_accepted_and_never_times_out(broker):
    clients = []
    for version in (R.V311, R.V5):
        c = broker.raw(version)
        assert c.connect(f"forever-{version}", keepalive=0).fields["reason"] == 0
        clients.append(c)
    time.sleep(3.5)  # silence longer than any short keepalive would allow
    for c in clients:
        c.send(R.pingreq())
        assert c.recv().type == R.PINGRESP


def test_max_keepalive_lowers_a_v5_keepalive_and_leaves_a_v311_one(tmp_path):
    """Both brokers told max_keepalive 60: a v5 client asking for 120 or 0 is
    told 60 (Server Keep Alive); a v3.1.1 client asking for 120 is accepted
    and told nothing (it cannot be)."""
    import harness

    (tmp_path / "m").mkdir()
    (tmp_path / "h").mkdir()
    brokers = [
        harness.start_mosquitto(str(tmp_path / "m"), extra="max_keepalive 60\n"),
        harness.start_homicro(str(tmp_path / "h"), config="[embedded]\nmax_keepalive = 60\n"),
    ]
    try:
        for b in brokers:
            for ka in (120, 0):
                ack = b.raw(R.V5).connect(f"ka5-{ka}", keepalive=ka)
                assert ack.fields["reason"] == 0, b.kind
                assert ack.props.get("ServerKeepAlive") == 60, (b.kind, ka, ack.props)
            ack = b.raw(R.V5).connect("ka5-30", keepalive=30)
            assert "ServerKeepAlive" not in ack.props, (b.kind, ack.props)
            ack = b.raw(R.V311).connect("ka4-120", keepalive=120)
            assert ack.fields["reason"] == 0, b.kind
    finally:
        for b in brokers:
            b.stop()
