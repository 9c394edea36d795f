"""ACLs: one ACL file and one password file, the same answers from homicro
and a real Mosquitto (which publishes arrive, which deliveries are made),
then what homicro adds: SUBACK 0x80 for a filter that can never match, and
registry names that follow the ACL.
"""

import json
import subprocess

import pytest

import harness
from harness import TIMEOUT, V5, V311, homicro_bin

USERS = {"alice": "a-pw", "kitchen": "k-pw", "bob": "b-pw"}

ACL = """\
# anonymous clients
topic read homicro/#
topic read public/#

user alice
topic readwrite #

user kitchen
topic deny homicro/secret/#
topic write homicro/services/kitchen-light
topic readwrite kitchen/#
topic read homicro/#

pattern readwrite devices/%u/#
pattern write clients/%c/#
pattern read marker/#
"""

TOPICS = ["kitchen/temp", "devices/bob/temp", "devices/kitchen/temp", "garage/door",
          "homicro/secret/x", "homicro/other", "public/news", "clients/c-kitchen/x",
          "clients/c-bob/x"]
WHO = [None, "kitchen", "bob"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("acl")
    pw, acl = str(d / "passwd"), str(d / "acl")
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", pw, user,
                        password], check=True)
    with open(acl, "w") as f:
        f.write(ACL)
    return pw, acl


def start(kind, tmp_path, files):
    pw, acl = files
    tmp_path.mkdir(exist_ok=True)
    if kind == "mosquitto":
        extra = f"password_file {pw}\nacl_file {acl}\nallow_anonymous true\nuser root\n"
        return harness.start_mosquitto(str(tmp_path), extra)
    config = f'[auth]\npassword_file = "{pw}"\nacl_file = "{acl}"\nallow_anonymous = true\n'
    return harness.start_homicro(str(tmp_path), config)


@pytest.fixture
def b(tmp_path, files):
    """homicro with the password and ACL files."""
    broker = start("homicro", tmp_path, files)
    yield broker
    broker.stop()


def client(broker, user, name, version=V5):
    c = harness.Client(broker.port, client_id=name, version=version)
    if user:
        c.c.username_pw_set(user, USERS[user])
    broker.clients.append(c)
    c.connect()
    return c


def observe(broker):
    """(PUBACK code of each publish, which publishes reached alice, which
    of alice's publishes each client received)."""
    alice = client(broker, "alice", "c-alice")
    alice.subscribe("#", 1)
    acks, sent = {}, {}
    for who in WHO:
        c = client(broker, who, f"c-{who or 'anon'}")
        for t in TOPICS:
            payload = f"from-{who}-{t}"
            acks[(who, t)] = c.publish(t, payload, qos=1)
            sent[payload] = (who, t)
        c.stop()
    alice.publish("marker/end", "end", qos=1)
    got = alice.get_until("marker/end")
    arrived = sorted(sent[m.payload.decode()] for m in got if m.payload.decode() in sent)
    received = {}
    for who in WHO:
        c = client(broker, who, f"r-{who or 'anon'}")
        c.subscribe("#", 1)
        c.subscribe("marker/#", 1)  # alice's end marker
        for t in TOPICS:
            alice.publish(t, f"to-{who}-{t}", qos=1)
        alice.publish("marker/end", "end", qos=1)
        msgs = [m for m in c.get_until("marker/end") if m.payload.decode().startswith("to-")]
        received[who] = sorted(m.topic for m in msgs)
        c.stop()
    return acks, arrived, received


def test_the_same_acl_gives_the_same_answers_as_mosquitto(tmp_path, files):
    results = {}
    for kind in ("mosquitto", "homicro"):
        b = start(kind, tmp_path / kind, files)
        try:
            results[kind] = observe(b)
        finally:
            b.stop()
    (m_acks, m_arrived, m_received), (h_acks, h_arrived, h_received) = (
        results["mosquitto"], results["homicro"])
    assert h_arrived == m_arrived
    assert h_received == m_received
    assert h_acks == m_acks
    # And what that means, spelled out for a few:
    assert ("kitchen", "kitchen/temp") in h_arrived
    assert ("kitchen", "garage/door") not in h_arrived
    assert ("bob", "devices/bob/temp") in h_arrived
    assert ("bob", "devices/kitchen/temp") not in h_arrived
    assert ("kitchen", "clients/c-kitchen/x") in h_arrived  # %c
    assert "homicro/secret/x" not in h_received["kitchen"]  # deny before read
    assert h_received[None] == ["homicro/other", "homicro/secret/x", "public/news"]


@pytest.mark.parametrize("version", [V5, V311])
def test_a_denied_publish_is_acknowledged_0x87_in_v5_and_dropped(b, version):
    k = client(b, "kitchen", "k", version=version)
    code = k.publish("garage/door", "open", qos=1)
    assert code == (0x87 if version == V5 else 0)
    assert k.connected()


def test_a_subscription_that_can_never_deliver_gets_0x80(b):
    k = client(b, "kitchen", "k")
    assert k.subscribe("garage/#", 1) == [0x80]
    assert k.subscribe("kitchen/+", 1) == [1]
    assert k.subscribe("#", 1) == [1]  # may match kitchen/...: granted, filtered
    anon = client(b, None, "a", version=V311)
    assert anon.subscribe("devices/#", 1) == [0x80]


def test_registry_names_follow_the_acl(b):
    k = client(b, "kitchen", "k")
    k.subscribe("homicro/errors/+", 1)
    rec = json.dumps({"host": "10.0.0.7", "port": 80, "ttl": 60})
    assert k.publish("homicro/services/kitchen-light", rec, qos=1, retain=True) == 0
    # A heartbeat for a name it may register is allowed; another name is not.
    beat = json.dumps({"host": "10.0.0.7", "port": 80})
    assert k.publish("homicro/heartbeat/kitchen-light", beat, qos=1) == 0
    assert k.publish("homicro/services/garage", rec, qos=1, retain=True) == 0x87
    assert k.publish("homicro/heartbeat/garage", beat, qos=1) == 0x87
    probe = client(b, "alice", "probe")
    probe.subscribe("homicro/services/+", 1)
    probe.subscribe("homicro/registry", 1)
    got = probe.get_until("homicro/registry")
    names = sorted(m.topic for m in got if m.topic.startswith("homicro/services/"))
    assert names == ["homicro/services/kitchen-light"], got
    # Over HTTP, the same rule for the same user.
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-u", "kitchen:k-pw", "-X", "PUT",
         f"http://127.0.0.1:{b.port}/self-register", "--data",
         json.dumps({"name": "garage", "port": 80})],
        capture_output=True, text=True, timeout=TIMEOUT, check=True)
    body, status = out.stdout.rsplit("\n", 1)
    assert (int(status), json.loads(body)["error"]) == (403, "not_authorized"), out.stdout


def test_a_will_on_a_denied_topic_is_not_published(b):
    watcher = client(b, "alice", "w")
    watcher.subscribe("#", 1)
    def with_will(name, topic):
        c = harness.Client(b.port, client_id=name, version=V5, keepalive=1,
                           will=dict(topic=topic, payload="dead", qos=1))
        c.c.username_pw_set("kitchen", USERS["kitchen"])
        b.clients.append(c)
        c.connect()
        return c
    for c in (with_will("dying", "garage/door"), with_will("dying2", "kitchen/will")):
        c.c._sock.close()  # vanish without DISCONNECT: the will goes out
    got = watcher.get_until("kitchen/will", timeout=10)
    assert [m.topic for m in got if m.payload == b"dead"] == ["kitchen/will"], got
