"""Request/response through the hub: callers over HTTP (curl, requests),
MQTT 5 (paho, mosquitto_rr) and MQTT 3.1.1 (paho); instances answering over
MQTT 5, MQTT 3.1.1 and the HTTP long poll (rpc_service.py, real processes
that can be killed mid-call)."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import requests

from harness import TIMEOUT, V5, V311, publish_props, start_homicro

HERE = os.path.dirname(os.path.abspath(__file__))


class Service:
    def __init__(self, port, name, kind, tmp):
        self.name, self.log = name, os.path.join(tmp, f"{name}.log")
        open(self.log, "w").close()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "rpc_service.py"), name, kind, str(port),
             self.log], stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line == b"ready\n", line

    def requests(self):
        with open(self.log) as f:
            return f.read().splitlines()

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def register(hub_port, name, **record):
    r = requests.put(f"http://127.0.0.1:{hub_port}/register", timeout=TIMEOUT,
                     json={"name": name, "host": "127.0.0.1", **record})
    assert r.status_code in (200, 201), r.text


@pytest.fixture
def hub(tmp_path):
    b = start_homicro(str(tmp_path), config='proxy_timeout = "1s"\n')
    services = []

    def start(name, kind, **record):
        register(b.port, name, **record)
        s = Service(b.port, name, kind, str(tmp_path))
        services.append(s)
        return s

    yield b, start
    for s in services:
        s.kill()
    b.stop()


def call(b, query, body=b"", **kw):
    kw.setdefault("timeout", TIMEOUT)
    return requests.post(f"http://127.0.0.1:{b.port}/call/{query}", data=body, **kw)


def test_http_calls_reach_instances_over_mqtt5_mqtt311_and_the_long_poll(hub):
    b, start = hub
    for name, kind in [("echo-5", "v5"), ("echo-3", "v311"), ("echo-p", "poll")]:
        start(name, kind, role="echo", version="1.0.0")
    for name in ["echo-5", "echo-3", "echo-p"]:
        r = call(b, name, b'{"x":1}', headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        # A 3.1.1 answer has no content type.
        assert r.headers.get("content-type") == (None if name == "echo-3" else "application/json")
        assert r.headers["x-homicro-instance"] == name
        v = r.json()
        assert v["name"] == name and v["body"] == '{"x":1}'
        # MQTT 5 and the long poll carry the request's content type; 3.1.1 cannot.
        assert v["content_type"] == (None if name == "echo-3" else "application/json")
        r = call(b, name, b"status:418")
        assert r.status_code == 418 and r.text == "status 418", (name, r.text)
    # By role and range: round-robin over the three.
    seen = {call(b, "echo@^1", b"hi").headers["x-homicro-instance"] for _ in range(6)}
    assert seen == {"echo-5", "echo-3", "echo-p"}
    # curl, as a user would.
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-d", "from curl",
                          f"http://127.0.0.1:{b.port}/call/echo-p"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["body"] == "from curl"


def test_mqtt5_callers_use_the_response_topic_and_correlation_data(hub):
    b, start = hub
    start("echo-3", "v311")
    start("echo-p", "poll")
    c = b.client("caller-5", version=V5)
    c.subscribe("me/replies", 1)
    for target in ["echo-3", "echo-p"]:
        corr = uuid.uuid4().bytes
        rc = c.publish(f"homicro/call/{target}", b"over mqtt 5", qos=1,
                       properties=publish_props(ResponseTopic="me/replies",
                                                CorrelationData=corr,
                                                ContentType="text/plain"))
        assert rc == 0
        m = c.get()
        assert m.topic == "me/replies"
        assert bytes.fromhex(m.props["CorrelationData"]) == corr
        users = dict(m.props["UserProperty"])
        assert users["status"] == "200" and users["instance"] == target
        assert json.loads(m.payload)["body"] == "over mqtt 5"
    # A call's own timeout, as a user property.
    c.publish("homicro/call/echo-3", b"slow", qos=1,
              properties=publish_props(ResponseTopic="me/replies",
                                       UserProperty=[("timeout", "300ms")]))
    m = c.get()
    assert dict(m.props["UserProperty"])["status"] == "504"
    assert "did not answer within 300ms" in m.json()["detail"]


@pytest.mark.skipif(not shutil.which("mosquitto_rr"), reason="mosquitto-clients not installed")
def test_mosquitto_rr_calls_a_service(hub):
    b, start = hub
    start("echo-5", "v5", role="echo", version="2.1.0")
    out = subprocess.run(["mosquitto_rr", "-p", str(b.port), "-t", "homicro/call/echo@2.x",
                          "-e", "rr/replies", "-m", "hello", "-W", "10"],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"name": "echo-5", "body": "hello", "content_type": None}


def test_mqtt311_callers_name_the_reply_topic_in_the_call_topic(hub):
    b, start = hub
    start("echo-5", "v5")
    c = b.client("caller-3", version=V311)
    c.subscribe("me/r/+", 1)
    assert c.publish("homicro/call/echo-5/me/r", b"over 3.1.1", qos=1) == 0
    m = c.get()
    assert m.topic == "me/r/200"
    assert json.loads(m.payload)["body"] == "over 3.1.1"
    c.publish("homicro/call/echo-5/me/r", b"status:503", qos=1)
    m = c.get()
    assert m.topic == "me/r/503" and m.payload == b"status 503"
    # The server's default timeout (1 s here).
    c.publish("homicro/call/echo-5/me/r", b"slow", qos=1)
    m = c.get()
    assert m.topic == "me/r/504" and m.json()["error"] == "unavailable"


def test_timeouts_and_no_instance(hub):
    b, start = hub
    start("echo-p", "poll")
    r = call(b, "echo-p?timeout=400ms", b"slow")
    assert r.status_code == 504 and "did not answer within 400ms" in r.json()["detail"], r.text
    # The late poller's answer to the timed-out call finds nobody: 404.
    register(b.port, "idle", port=9)
    # A debugging `#` subscriber sees everything but takes no requests.
    spy = b.client("spy", version=V5)
    spy.subscribe("#", 0)
    r = call(b, "idle", b"x")
    assert r.status_code == 503 and "takes requests" in r.json()["detail"], r.text
    r = call(b, "nobody", b"x")
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
    # Everything else still works.
    assert call(b, "echo-p", b"after").status_code == 200


@pytest.mark.parametrize("kind", ["v5", "v311", "poll"])
def test_an_instance_dying_mid_call_gets_504_and_the_request_went_once(hub, kind):
    b, start = hub
    s = start("mortal", kind)
    t0 = time.monotonic()
    if kind == "poll":
        # A poller that dies leaves its record: deregistering it ends the call.
        import threading
        def deregister_when_dead():
            s.proc.wait()
            requests.delete(f"http://127.0.0.1:{b.port}/register/mortal", timeout=TIMEOUT)
        threading.Thread(target=deregister_when_dead, daemon=True).start()
    r = call(b, "mortal?timeout=8s", b"die")
    assert r.status_code == 504, r.text
    assert "went away before it answered" in r.json()["detail"], r.text
    assert time.monotonic() - t0 < 5, "the death was noticed well before the timeout"
    assert s.requests() == ["die"]


def test_an_idempotent_service_is_retried_on_the_next_instance(hub):
    b, start = hub
    one = start("idem-1", "v5", role="idem", idempotent=True)
    two = start("idem-2", "v311", role="idem", idempotent=True)
    answers = [call(b, "idem?timeout=8s", b"die:idem-1") for _ in range(3)]
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "idem-2"
    assert one.requests() == ["die:idem-1"]
    assert two.requests().count("die:idem-1") == 3
    m = requests.get(f"http://127.0.0.1:{b.port}/metrics", timeout=TIMEOUT).text
    assert 'homicro_calls_total{outcome="retried"} 1' in m, m


def test_bad_input_gets_clear_errors_and_nothing_else_is_affected(hub):
    b, start = hub
    start("echo-5", "v5")
    base = f"http://127.0.0.1:{b.port}"
    cases = [
        (call(b, "Bad!Query", b"x"), 400, "role@range"),
        (call(b, "echo@nope", b"x"), 400, "semver"),
        (call(b, "echo-5?timeout=soon", b"x"), 400, "is not a duration"),
        (call(b, "echo-5?timeout=0s", b"x"), 400, "more than 0"),
        (call(b, "echo-5", b"x" * ((1 << 20) + 1)), 413, "larger than"),
        (requests.get(f"{base}/call/echo-5", timeout=TIMEOUT), 405, "takes POST"),
        (requests.get(f"{base}/jobs/Bad!Name", timeout=TIMEOUT), 400, "GET /jobs/NAME"),
        (requests.get(f"{base}/jobs/echo-5?wait=1h", timeout=TIMEOUT), 400, "longer than"),
        (requests.post(f"{base}/jobs/{'0' * 32}", data=b"late", timeout=TIMEOUT), 404,
         "timed out, or was answered"),
        (requests.post(f"{base}/jobs/abc", headers={"x-homicro-status": "700"}, timeout=TIMEOUT),
         400, "not the HTTP status code of an answer"),
        (requests.post(f"{base}/jobs/abc", headers={"x-homicro-status": "101"}, timeout=TIMEOUT),
         400, "from 200 to 599"),
        (call(b, "echo-5", b"x", headers={"x-huge": "a" * 100_000}), 431, "head is larger"),
    ]
    for r, status, detail in cases:
        assert r.status_code == status, (r.status_code, r.text)
        if detail:
            assert detail in r.json()["detail"], r.text
    # Over MQTT 5: the hub's request topics are its own, a reply nobody
    # waits for finds no subscriber, a call without a reply topic or with
    # one of homicro's own is refused.
    c = b.client("bad-caller", version=V5)
    assert c.publish("homicro/rpc/echo-5/123", b"sneaky", qos=1) == 0x87
    assert c.publish("homicro/reply/123", b"late", qos=1) == 0x10
    assert c.publish("homicro/call/echo-5", b"x", qos=1) == 0x83
    assert c.publish("homicro/call/echo-5", b"x", qos=1,
                     properties=publish_props(ResponseTopic="homicro/services/echo-5")) == 0x90
    assert c.publish("homicro/call/echo-5", b"x", qos=1,
                     properties=publish_props(ResponseTopic="me/r",
                                              UserProperty=[("timeout", "forever")])) == 0x83
    r = call(b, "echo-5", b"still fine")
    assert r.status_code == 200 and r.json()["body"] == "still fine"


def test_homicro_call_prints_the_answer(hub):
    from harness import homicro_bin
    b, start = hub
    start("echo-p", "poll", role="echo", version="1.1.0")
    broker = ["--broker", f"mqtt://127.0.0.1:{b.port}"]

    def run(*args, stdin=None):
        return subprocess.run([homicro_bin(), "call", *broker, *args], input=stdin,
                              capture_output=True, timeout=30)

    out = run("echo@^1", "hello")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["body"] == "hello"
    out = run("echo-p", "-", stdin=b"from stdin")
    assert json.loads(out.stdout)["body"] == "from stdin"
    out = run("echo-p", "status:418")
    assert out.returncode == 1 and out.stdout == b"status 418", out
    assert b"echo-p answered 418" in out.stderr
    out = run("--timeout", "300ms", "echo-p", "slow")
    assert out.returncode == 1 and b"no reply within" in out.stderr, out
    out = run("Not A Query", "x")
    assert out.returncode == 2 and b"role@range" in out.stderr, out
    out = run("--timeout", "soon", "echo-p")
    assert out.returncode == 2, out


# -- the hub under an ACL -----------------------------------------------------

ACL = """\
topic read homicro/#

user svc
topic readwrite homicro/services/svc-1
topic read homicro/rpc/svc-1/#
topic write homicro/reply/#

user caller
topic write homicro/call/#
topic read homicro/services/#
topic readwrite me/r
topic read me/r/+

user spy
topic read #
"""


@pytest.fixture
def guarded(tmp_path):
    pw, acl = str(tmp_path / "passwd"), str(tmp_path / "acl")
    for i, (user, password) in enumerate({"svc": "s", "caller": "c", "spy": "x"}.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", pw, user,
                        password], check=True)
    with open(acl, "w") as f:
        f.write(ACL)
    b = start_homicro(str(tmp_path), config=(
        f'proxy_timeout = "2s"\n[auth]\npassword_file = "{pw}"\nacl_file = "{acl}"\n'
        'allow_anonymous = true\n'))
    register(b.port, "svc-1")
    yield b
    b.stop()


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto not installed")
def test_the_acl_decides_who_calls_answers_and_where_answers_go(guarded):
    b = guarded
    base = f"http://127.0.0.1:{b.port}"
    # A 3.1.1-form reply topic: the hub writes ME/R/STATUS, which this
    # caller may not write itself, so the call is refused.
    c = b.client("caller-1", version=V5, connect=False)
    c.c.username_pw_set("caller", "c")
    c.connect()
    c.subscribe("me/r/+", 0)
    assert c.publish("homicro/call/svc-1/me/r", b"x", qos=1) == 0x87
    # The long poll answers for svc-1 only with svc-1's rights.
    got = {}

    def poll():
        r = requests.get(f"{base}/jobs/svc-1?wait=5s", auth=("svc", "s"), timeout=TIMEOUT)
        got["job"] = r

    import threading
    t = threading.Thread(target=poll)
    t.start()
    assert requests.get(f"{base}/jobs/svc-1?wait=10ms", auth=("spy", "x"),
                        timeout=TIMEOUT).status_code == 403
    deadline = time.monotonic() + TIMEOUT
    answer = {}

    def caller():
        answer["r"] = requests.post(f"{base}/call/svc-1", data=b"q", auth=("caller", "c"),
                                    timeout=TIMEOUT)

    t2 = threading.Thread(target=caller)
    t2.start()
    t.join(TIMEOUT)
    job = got["job"]
    assert job.status_code == 200, job.text
    call_id = job.headers["x-homicro-call"]
    r = requests.post(f"{base}/jobs/{call_id}", data=b"forged", auth=("spy", "x"),
                      timeout=TIMEOUT)
    assert r.status_code == 403 and "answer for svc-1" in r.json()["detail"], r.text
    r = requests.post(f"{base}/jobs/{call_id}", data=b"real", auth=("svc", "s"),
                      timeout=TIMEOUT)
    assert r.status_code == 204, r.text
    t2.join(TIMEOUT)
    assert answer["r"].status_code == 200 and answer["r"].content == b"real"
    assert time.monotonic() < deadline


def test_a_caller_that_hangs_up_leaves_nothing_behind(hub):
    b, start = hub
    s = start("echo-p", "poll")
    # Long enough for the poller to come back and wait again.
    out = subprocess.run(["curl", "-sS", "-m", "0.5", "-d", "slow",
                          f"http://127.0.0.1:{b.port}/call/echo-p?timeout=20s"],
                         capture_output=True, timeout=30)
    assert out.returncode == 28, out  # curl's own timeout
    deadline = time.monotonic() + TIMEOUT
    while True:
        m = requests.get(f"http://127.0.0.1:{b.port}/metrics", timeout=TIMEOUT).text
        if "homicro_calls_pending 0" in m:
            break
        assert time.monotonic() < deadline, "the call stayed pending after its caller left"
        time.sleep(0.05)
    # The poller took "slow" and never answers it; the next call is served.
    assert call(b, "echo-p", b"after").json()["body"] == "after"
    assert s.requests() == ["slow", "after"]


def test_a_request_queued_for_a_dead_poller_goes_to_the_next_instance(hub):
    """Takes about 30 s: a poller counts as alive for 30 s after its last poll."""
    b, start = hub
    start("api-a", "v5", role="api")
    register(b.port, "api-b", role="api")
    # api-b polls once, briefly, and is never heard of again.
    assert requests.get(f"http://127.0.0.1:{b.port}/jobs/api-b?wait=10ms",
                        timeout=TIMEOUT).status_code == 204
    names = [call(b, "api?timeout=45s", b"hello", timeout=60).headers["x-homicro-instance"]
             for _ in range(2)]
    assert names == ["api-a", "api-a"], names
    m = requests.get(f"http://127.0.0.1:{b.port}/metrics", timeout=TIMEOUT).text
    assert 'homicro_calls_total{outcome="retried"} 1' in m, m
