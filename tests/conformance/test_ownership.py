"""homicro only: ownership by identity (docs/PROTOCOL.md, "Ownership").

A record remembers who wrote it: an anonymous client by its address. Two
strangers on one machine connect from 127.0.0.2 and 127.0.0.3; a third
party from 127.0.0.1 is the loopback admin on the HTTP API. A stranger's
update, deregistration and heartbeat are refused with `not_owner` and the
record stays as it was; the owner and the admin may change it.
"""

import json
import os
import subprocess
import urllib.request

import pytest

from harness import TIMEOUT, V311, V5, VERSIONS, homicro_bin

RECORD = {"host": "10.0.0.5", "port": 8080, "ttl": "60s"}
FORGED = {**RECORD, "meta": {"forged": True}, "health": {"tcp": True, "interval": "1s"}}
OWNER, STRANGER = "127.0.0.2", "127.0.0.3"


def retained(homicro, name):
    c = homicro.client(f"probe-{name}", version=V311)
    c.subscribe(f"homicro/services/{name}", 1)
    c.subscribe("homicro/registry", 1)
    got = c.get_until("homicro/registry")
    c.stop()
    return got[0].json() if len(got) == 2 else None


def owned_record(homicro, name="web", version=V311):
    owner = homicro.client(f"owner-{name}", version=version, bind=OWNER)
    assert owner.publish(f"homicro/services/{name}", json.dumps(RECORD), qos=1, retain=True) == 0
    assert retained(homicro, name) == RECORD
    return owner


def stranger(homicro, name, version):
    s = homicro.client(f"stranger-{name}", version=version, bind=STRANGER)
    s.subscribe(f"homicro/errors/{name}", 1)
    return s


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("what", ["update", "deregister", "heartbeat"])
def test_a_strangers_change_is_refused_and_the_record_kept(homicro, version, what):
    owner = owned_record(homicro)
    s = stranger(homicro, "web", version)
    topic, payload = {
        "update": ("homicro/services/web", json.dumps(FORGED)),
        "deregister": ("homicro/services/web", ""),
        "heartbeat": ("homicro/heartbeat/web", json.dumps({"host": "10.0.0.5", "port": 8080})),
    }[what]
    code = s.publish(topic, payload, qos=1, retain=what != "heartbeat")
    error = s.get().json()
    assert (error["name"], error["error"]) == ("web", "not_owner")
    assert OWNER in error["detail"] and STRANGER in error["detail"], error
    assert error["owner"] == {"host": "10.0.0.5", "port": 8080}
    if version == V5:
        assert code == 0x87  # Not authorized
    assert retained(homicro, "web") == RECORD
    assert owner.connected() and s.connected()
    # The owner still changes its own record.
    updated = {**RECORD, "version": "1.1.0"}
    assert owner.publish("homicro/services/web", json.dumps(updated), qos=1, retain=True) == 0
    assert retained(homicro, "web") == updated


def test_the_owner_deregisters_its_own_record(homicro):
    owner = owned_record(homicro)
    assert owner.publish("homicro/services/web", "", qos=1, retain=True) == 0
    assert retained(homicro, "web") is None


def test_mosquitto_pub_from_another_address_cannot_deregister(homicro):
    owned_record(homicro)
    s = stranger(homicro, "web", V5)
    out = subprocess.run(["mosquitto_pub", "-p", str(homicro.port), "-A", STRANGER,
                          "-V", "mqttv5", "-q", "1", "-r", "-n", "-t", "homicro/services/web"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert "Not authorized" in out.stderr + out.stdout, out
    assert s.get().json()["error"] == "not_owner"
    assert retained(homicro, "web") == RECORD


def http(homicro, method, path, body=None, source=None):
    """curl, from `source` when given; (status, JSON body)."""
    args = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", method,
            f"http://127.0.0.1:{homicro.port}{path}"]
    if source:
        args += ["--interface", source]
    if body is not None:
        args += ["-H", "content-type: application/json", "--data", json.dumps(body)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    text, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(text) if text else None


def test_http_self_register_over_a_strangers_record_is_refused(homicro):
    owned_record(homicro)
    status, body = http(homicro, "PUT", "/self-register", {"name": "web", "port": 8080},
                        source=STRANGER)
    assert (status, body["error"]) == (403, "not_owner"), body
    assert retained(homicro, "web") == RECORD


def test_the_loopback_admin_deregisters_anyones_record(homicro):
    owned_record(homicro)
    status, body = http(homicro, "DELETE", "/register/web")
    assert (status, body["event"]) == (200, "deregistered"), body
    assert retained(homicro, "web") is None


def test_homicro_deregister_falls_back_to_the_admin_path(homicro):
    owned_record(homicro)
    out = subprocess.run([homicro_bin(), "deregister", "web", "--broker",
                          f"mqtt://127.0.0.1:{homicro.port}"],
                         capture_output=True, text=True, timeout=3 * TIMEOUT,
                         env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 0, out
    assert "deregistered web (as admin" in out.stdout, out
    assert retained(homicro, "web") is None


def test_a_record_with_a_duplicate_key_is_refused_over_http(homicro):
    owned_record(homicro)
    args = ["curl", "-s", "-w", "\n%{http_code}", "-X", "PUT",
            f"http://127.0.0.1:{homicro.port}/register", "--data",
            '{"name":"web","host":"10.0.0.5","port":8080,"host":"6.6.6.6"}']
    out = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    text, status = out.stdout.rsplit("\n", 1)
    body = json.loads(text)
    assert (int(status), body["error"]) == (400, "invalid"), body
    assert "duplicate key `host`" in body["detail"], body
    assert retained(homicro, "web") == RECORD


def test_x_forwarded_for_is_never_believed_from_an_untrusted_peer(homicro):
    owned_record(homicro)
    # A stranger claiming to be forwarded for the owner (or for loopback).
    for claim in (OWNER, "127.0.0.1"):
        args = ["curl", "-s", "-w", "\n%{http_code}", "--interface", STRANGER, "-X", "PUT",
                "-H", f"X-Forwarded-For: {claim}", f"http://127.0.0.1:{homicro.port}/self-register",
                "--data", json.dumps({"name": "web", "port": 8080})]
        out = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=True)
        text, status = out.stdout.rsplit("\n", 1)
        assert (int(status), json.loads(text)["error"]) == (403, "not_owner"), out.stdout
    assert retained(homicro, "web") == RECORD


def test_behind_a_trusted_proxy_the_forwarded_client_is_no_admin(tmp_path):
    import harness
    b = harness.start_homicro(str(tmp_path), '[auth]\ntrusted_proxies = ["127.0.0.1"]\n')
    try:
        owned_record(b)
        forwarded = ["-H", "X-Forwarded-For: 10.9.9.9"]
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", "DELETE", *forwarded,
                              f"http://127.0.0.1:{b.port}/register/web"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        text, status = out.stdout.rsplit("\n", 1)
        body = json.loads(text)
        assert (int(status), body["error"]) == (403, "forbidden"), body
        assert "10.9.9.9" in body["detail"]
        assert retained(b, "web") == RECORD
        # The proxy's own requests (no header) are still loopback's.
        status, body = http(b, "DELETE", "/register/web")
        assert status == 200, body
    finally:
        b.stop()


def test_a_remote_record_naming_loopback_is_never_probed_there(tmp_path):
    """A client that is not on this machine registers host 127.0.0.1 with
    a health check aimed at a loopback-only admin endpoint: the record is
    kept, but the registry never connects to it. The same record written
    from this machine is probed."""
    import http.server
    import socket
    import threading
    import harness
    from test_tls import this_machines_address
    ip = this_machines_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    hits = []

    class Admin(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    admin = http.server.HTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    port = admin.server_address[1]
    b = harness.start_homicro(str(tmp_path), listen="0.0.0.0:0")
    try:
        check = {"http": "/admin/delete?all=1", "interval": "1s", "failures": 100}
        rec = json.dumps({"host": "127.0.0.1", "port": port, "health": check})
        remote = harness.Client(b.port, client_id="remote", version=V5, host=ip)
        b.clients.append(remote)
        remote.connect()
        remote.subscribe("homicro/health/+", 1)
        assert remote.publish("homicro/services/sneaky", rec, qos=1, retain=True) == 0
        status = remote.get_until("homicro/health/sneaky")[-1].json()
        assert status["status"] == "failing" and "not probed" in status["detail"], status
        assert hits == []
        local = b.client("local", version=V5)
        assert local.publish("homicro/services/local", rec, qos=1, retain=True) == 0
        assert remote.get_until("homicro/health/local")[-1].json()["status"] == "passing"
        assert hits, "the local record is probed"
    finally:
        b.stop()
        admin.shutdown()
