"""The hub's reverse proxy, `/svc/QUERY/rest/of/path`, with real servers:
Python http.server instances registered in homicro, curl and requests as
clients, paho over WebSocket through the proxy to homicro's own /mqtt."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests

from harness import TIMEOUT, V5, homicro_bin, start_homicro

HERE = os.path.dirname(os.path.abspath(__file__))


class Upstream:
    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "upstream.py"), name],
                                     stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def register(hub_port, name, **record):
    r = requests.put(f"http://127.0.0.1:{hub_port}/register", timeout=TIMEOUT,
                     json={"name": name, **record})
    assert r.status_code in (200, 201), r.text


@pytest.fixture
def hub(tmp_path):
    b = start_homicro(str(tmp_path), config='proxy_timeout = "1s"\n')
    ups = [Upstream("api-1"), Upstream("api-2")]
    for u in ups:
        register(b.port, u.name, host="127.0.0.1", port=u.port, role="api", version="1.2.0",
                 scheme="http")
    yield b, ups
    for u in ups:
        u.kill()
    b.stop()


def svc(b, path, **kw):
    return requests.get(f"http://127.0.0.1:{b.port}/svc/{path}", timeout=TIMEOUT, **kw)


def test_requests_reach_an_instance_round_robin_with_forwarded_headers(hub):
    b, ups = hub
    seen = set()
    for _ in range(4):
        r = svc(b, "api@^1.2/whoami?x=1&y=2", headers={"X-Forwarded-For": "10.9.9.9"})
        assert r.status_code == 200, r.text
        v = r.json()
        seen.add(v["name"])
        assert v["path"] == "/whoami?x=1&y=2"
        h = v["headers"]
        assert h["x-forwarded-for"] == "10.9.9.9, 127.0.0.1"
        assert h["x-forwarded-proto"] == "http"
        assert h["x-forwarded-prefix"] == "/svc/api@%5E1.2"  # as the client sent it
        assert h["host"] == f"127.0.0.1:{ups[0].port}" or h["host"] == f"127.0.0.1:{ups[1].port}"
        # Hop-by-hop headers the upstream named do not come back.
        assert "x-hop" not in r.headers
    assert seen == {"api-1", "api-2"}
    # By name: that instance only; a bare path is "/".
    for _ in range(3):
        assert svc(b, "api-1/whoami").json()["name"] == "api-1"
    assert svc(b, "api-2").json()["path"] == "/"


def test_a_10_mb_body_streams_through(hub, tmp_path):
    b, _ = hub
    data = os.urandom(10 << 20)
    f = tmp_path / "big"
    f.write_bytes(data)
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "--data-binary", f"@{f}",
                          "-H", "content-type: application/octet-stream",
                          f"http://127.0.0.1:{b.port}/svc/api/upload"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    v = json.loads(out.stdout)
    assert v["length"] == len(data)
    assert v["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_killed_instance_fails_over_then_503(hub):
    b, ups = hub
    ups[0].kill()
    for _ in range(6):
        r = svc(b, "api/whoami")
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "api-2"
    ups[1].kill()
    first = svc(b, "api/whoami")
    assert first.status_code in (502, 503), first.text
    r = svc(b, "api/whoami")
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "unavailable" and "no live instance" in r.json()["detail"]


def test_bad_queries_and_requests_get_clear_errors_and_nothing_else_is_affected(hub):
    b, _ = hub
    r = svc(b, "nope/x")
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text
    r = svc(b, "Bad!Query/x")
    assert r.status_code == 400 and "role@range" in r.json()["detail"], r.text
    r = svc(b, "api@not-a-range/x")
    assert r.status_code == 400 and "semver" in r.json()["detail"], r.text
    r = svc(b, "api/x", headers={"X-Huge": "a" * 100_000})
    assert r.status_code == 431, r.status_code
    r = svc(b, "api-1/slow")
    assert r.status_code == 504 and "did not answer within 1s" in r.json()["detail"], r.text
    # A body that never ends: the instance waits for the rest, the proxy
    # answers 504 after its timeout, and the next request is served.
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10",
         "-H", "content-length: 1000000", "--data-binary", "only a little",
         f"http://127.0.0.1:{b.port}/svc/api-1/upload"],
        capture_output=True, timeout=30)
    assert out.stdout in (b"504", b"000"), out
    assert svc(b, "api/whoami").status_code == 200
    assert requests.get(f"http://127.0.0.1:{b.port}/health", timeout=TIMEOUT).status_code == 200


def test_a_websocket_passes_through(hub):
    b, _ = hub
    # homicro's own MQTT over WebSocket, registered as a service and
    # reached through the proxy.
    register(b.port, "ws", host="127.0.0.1", port=b.port, role="broker", scheme="http")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="through-proxy",
                    protocol=V5, transport="websockets")
    c.ws_set_options(path="/svc/ws/mqtt")
    got = []
    done, ready = threading.Event(), threading.Event()
    c.on_message = lambda c, u, m: (got.append(m.payload), done.set())
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", b.port)
    c.loop_start()
    c.subscribe("proxy/echo", 1)
    assert ready.wait(TIMEOUT)
    c.publish("proxy/echo", b"through the hub", qos=1)
    assert done.wait(TIMEOUT)
    assert got == [b"through the hub"]
    c.disconnect()
    c.loop_stop()


# -- homicro proxy: a local port forward ----------------------------------

class LocalProxy:
    def __init__(self, hub_port, query):
        self.proc = subprocess.Popen(
            [homicro_bin(), "proxy", "--broker", f"mqtt://127.0.0.1:{hub_port}", query],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("proxying 127.0.0.1:"), (line, self.proc.stderr.read(2000))
        self.port = int(line.split()[1].rsplit(":", 1)[1])

    def get(self, path):
        return requests.get(f"http://127.0.0.1:{self.port}{path}", timeout=TIMEOUT,
                            headers={"Connection": "close"})

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def test_homicro_proxy_forwards_each_connection_to_a_live_instance(hub):
    b, ups = hub
    third = Upstream("api-3")
    ups.append(third)  # killed by the fixture
    register(b.port, "api-3", host="127.0.0.1", port=third.port, role="api", version="1.4.0")
    p = LocalProxy(b.port, "api@^1")
    try:
        seen = {p.get("/whoami").json()["name"] for _ in range(6)}
        assert seen == {"api-1", "api-2", "api-3"}
        ups[0].kill()
        # Every connection still works: a refused instance is skipped at
        # once, and the next pick goes elsewhere.
        names = [p.get("/whoami").json()["name"] for _ in range(8)]
        assert set(names) == {"api-2", "api-3"}, names
        # Registrations are followed as they change.
        fourth = Upstream("api-4")
        ups.append(fourth)
        register(b.port, "api-4", host="127.0.0.1", port=fourth.port, role="api",
                 version="1.5.0")
        deadline = time.monotonic() + TIMEOUT
        while "api-4" not in {p.get("/whoami").json()["name"] for _ in range(3)}:
            assert time.monotonic() < deadline, "api-4 never picked"
        # By name.
        q = LocalProxy(b.port, "api-2")
        try:
            assert {q.get("/whoami").json()["name"] for _ in range(3)} == {"api-2"}
        finally:
            q.stop()
    finally:
        p.stop()


def test_homicro_proxy_refuses_a_bad_query_with_exit_2(hub):
    b, _ = hub
    out = subprocess.run([homicro_bin(), "proxy", "--broker", f"mqtt://127.0.0.1:{b.port}",
                          "Not A Query!"], capture_output=True, timeout=TIMEOUT)
    assert out.returncode == 2, out
    assert b"QUERY is a service name or role@range" in out.stderr, out.stderr
