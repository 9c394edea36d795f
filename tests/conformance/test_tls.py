"""TLS on the one port: MQTT (3.1.1 and 5), WebSocket and HTTP inside TLS,
told apart from plaintext by the first byte; certificates the clients must
refuse; broken handshakes; `require`; a certificate reloaded on SIGHUP.
"""

import json
import os
import signal
import socket
import ssl
import subprocess
import time

import pytest

import certs
import harness
from harness import TIMEOUT, V5, V311


def this_machines_address():
    """A non-loopback address of this machine (a connection to it from
    here comes from it, not from loopback), or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca_dir, srv = os.path.join(d, "ca"), os.path.join(d, "srv")
    os.makedirs(srv)
    ca_pem, _ = certs.ca(ca_dir)
    ips = ["127.0.0.1"] + ([this_machines_address()] if this_machines_address() else [])
    good = certs.server(srv, ca_dir, ips=ips)
    return {
        "ca": ca_pem,
        "good": good,
        "expired": certs.server(srv, ca_dir, name="expired", ips=ips, expired=True),
        "self": certs.server(srv, ca_dir, name="self", ips=ips, self_signed=True),
        "dir": d,
    }


def serve(tmp_path, cert, require=False, listen="127.0.0.1:0", extra=""):
    config = (f'[tls]\ncert = "{cert[0]}"\nkey = "{cert[1]}"\nrequire = {str(require).lower()}\n'
              f"{extra}")
    b = harness.start_homicro(str(tmp_path), config, listen=listen)
    return b


def tls_client(b, ca, version=V5, name="tls", host="127.0.0.1", **kw):
    c = harness.Client(b.port, client_id=name, version=version, host=host, **kw)
    c.c.tls_set(ca_certs=ca)
    b.clients.append(c)
    c.connect()
    return c


@pytest.mark.parametrize("version", [V5, V311])
def test_paho_over_tls_and_a_plain_client_on_the_same_port(tmp_path, pki, version):
    b = serve(tmp_path, pki["good"])
    try:
        secure = tls_client(b, pki["ca"], version=version)
        secure.subscribe("tls/#", 1)
        plain = b.client("plain", version=V311)
        assert plain.publish("tls/x", "across", qos=1) == 0
        m = secure.get()
        assert (m.topic, m.payload) == ("tls/x", b"across")
        rec = json.dumps({"host": "10.0.0.5", "port": 443})
        assert secure.publish("homicro/services/secure", rec, qos=1, retain=True) == 0
    finally:
        b.stop()


def test_mosquitto_clients_and_curl_with_the_ca(tmp_path, pki):
    b = serve(tmp_path, pki["good"])
    try:
        sub = subprocess.Popen(["mosquitto_sub", "--cafile", pki["ca"], "-h", "127.0.0.1",
                                "-p", str(b.port), "-t", "homicro/services/+", "-C", "1",
                                "-V", "mqttv311"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        rec = json.dumps({"host": "10.0.0.9", "port": 80})
        subprocess.run(["mosquitto_pub", "--cafile", pki["ca"], "-h", "127.0.0.1", "-p",
                        str(b.port), "-t", "homicro/services/tlsweb", "-r", "-q", "1",
                        "-m", rec], check=True, timeout=TIMEOUT)
        out, _ = sub.communicate(timeout=TIMEOUT)
        assert json.loads(out) == {"host": "10.0.0.9", "port": 80}
        got = subprocess.run(["curl", "-s", "--cacert", pki["ca"],
                              f"https://127.0.0.1:{b.port}/discover/tlsweb"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        assert json.loads(got.stdout) == {"host": "10.0.0.9", "port": 80}
    finally:
        b.stop()


def test_websocket_inside_tls(tmp_path, pki):
    b = serve(tmp_path, pki["good"])
    try:
        c = harness.Client(b.port, client_id="wss", version=V5, transport="websockets")
        c.c.ws_set_options(path="/mqtt")
        c.c.tls_set(ca_certs=pki["ca"])
        b.clients.append(c)
        c.connect()
        c.subscribe("homicro/registry", 1)
        assert c.get().json()["state"] == "online"
    finally:
        b.stop()


@pytest.mark.parametrize("which", ["expired", "self"])
def test_clients_refuse_an_expired_or_self_signed_certificate(tmp_path, pki, which):
    b = serve(tmp_path, pki[which])
    try:
        pub = subprocess.run(["mosquitto_pub", "--cafile", pki["ca"], "-h", "127.0.0.1", "-p",
                              str(b.port), "-t", "x", "-m", "x"], capture_output=True,
                             text=True, timeout=TIMEOUT)
        assert pub.returncode != 0
        curl = subprocess.run(["curl", "-s", "--cacert", pki["ca"],
                               f"https://127.0.0.1:{b.port}/health"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert curl.returncode == 60, curl  # peer certificate cannot be authenticated
        with pytest.raises(Exception):
            tls_client(b, pki["ca"], name=f"refuses-{which}")
        # The server is fine: plaintext still works.
        assert b.client("still", version=V311).connected()
    finally:
        b.stop()


def test_garbage_and_half_handshakes_are_closed_and_harm_no_one(tmp_path, pki):
    b = serve(tmp_path, pki["good"], extra='[embedded]\nconnect_timeout = "1s"\n')
    try:
        watcher = tls_client(b, pki["ca"], name="watcher")
        watcher.subscribe("alive/#", 1)
        socks = []
        for payload in [b"\x16", b"\x16\x03\x01\x00\x05hello", b"\x16" + os.urandom(300)]:
            s = socket.create_connection(("127.0.0.1", b.port))
            s.sendall(payload)
            socks.append(s)
        t0 = time.monotonic()
        for s in socks:
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, socket.timeout):
                pass
            s.close()
        assert time.monotonic() - t0 < 4, "closed at the 1 s deadline, or at once"
        # A random byte stream with the TLS first byte, many times over.
        for i in range(50):
            with socket.create_connection(("127.0.0.1", b.port)) as s:
                s.sendall(b"\x16" + os.urandom(i * 7 + 1))
        plain = b.client("plain", version=V311)
        assert plain.publish("alive/x", "yes", qos=1) == 0
        assert watcher.get().payload == b"yes"
        assert watcher.connected()
    finally:
        b.stop()


def test_require_refuses_plaintext_except_from_loopback(tmp_path, pki):
    ip = this_machines_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    b = serve(tmp_path, pki["good"], require=True, listen="0.0.0.0:0")
    try:
        assert b.client("local-plain", version=V311).connected()  # loopback
        with pytest.raises(Exception):
            c = harness.Client(b.port, client_id="remote-plain", version=V311, host=ip)
            b.clients.append(c)
            c.connect()
        curl = subprocess.run(["curl", "-s", f"http://{ip}:{b.port}/health"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert curl.returncode != 0 and curl.stdout == ""
        secure = tls_client(b, pki["ca"], name="remote-tls", host=ip)
        assert secure.connected()
    finally:
        b.stop()


def test_sighup_reloads_the_certificate(tmp_path, pki):
    d = str(tmp_path / "reload")
    os.makedirs(d)
    cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
    for src, dst in zip(pki["self"], (cert, key)):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    b = serve(tmp_path, (cert, key))
    try:
        with pytest.raises(Exception):
            tls_client(b, pki["ca"], name="before")
        for src, dst in zip(pki["good"], (cert, key)):
            with open(src, "rb") as f, open(dst, "wb") as g:
                g.write(f.read())
        b.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while "TLS certificate reloaded" not in b.stderr():
            assert time.monotonic() < deadline, b.stderr()[-2000:]
            time.sleep(0.05)
        assert tls_client(b, pki["ca"], name="after").connected()
    finally:
        b.stop()


def test_a_client_certificate_names_its_user(tmp_path, pki):
    d = pki["dir"]
    other_ca_dir = os.path.join(d, "other-ca")
    certs.ca(other_ca_dir, name="stranger-ca")
    kitchen = certs.client(d, os.path.join(d, "ca"), "kitchen-1")
    forged = certs.client(d, other_ca_dir, "alice")
    pw = os.path.join(d, "passwd")
    subprocess.run(["mosquitto_passwd", "-c", "-b", pw, "alice", "a-pw"], check=True)
    extra = f'client_ca = "{pki["ca"]}"\n[auth]\npassword_file = "{pw}"\n'
    b = harness.start_homicro(
        str(tmp_path),
        f'[tls]\ncert = "{pki["good"][0]}"\nkey = "{pki["good"][1]}"\n{extra}',
        user="alice", password="a-pw")
    try:
        base = ["--cafile", pki["ca"], "-h", "127.0.0.1", "-p", str(b.port), "-V", "mqttv5"]
        rec = json.dumps({"host": "10.0.0.21", "port": 80})
        ok = subprocess.run(["mosquitto_pub", *base, "--cert", kitchen[0], "--key", kitchen[1],
                             "-t", "homicro/services/kitchen-light", "-r", "-q", "1", "-m", rec],
                            capture_output=True, text=True, timeout=TIMEOUT)
        assert ok.returncode == 0, ok  # no password: the certificate is kitchen-1
        # The record is kitchen-1's: alice (no admin) may not change it.
        c = harness.Client(b.port, client_id="alice2", version=V5)
        c.c.tls_set(ca_certs=pki["ca"])
        c.c.username_pw_set("alice", "a-pw")
        b.clients.append(c)
        c.connect()
        c.subscribe("homicro/errors/kitchen-light", 1)
        c.publish("homicro/services/kitchen-light", "", qos=1, retain=True)
        err = c.get().json()
        assert err["error"] == "not_owner" and "user kitchen-1" in err["detail"], err
        # No certificate and no password: refused (no anonymous clients).
        bare = subprocess.run(["mosquitto_pub", *base, "-t", "x", "-m", "x"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert bare.returncode != 0
        # A certificate from a CA the server does not take: no handshake.
        bad = subprocess.run(["mosquitto_pub", *base, "--cert", forged[0], "--key", forged[1],
                              "-t", "x", "-m", "x"], capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert bad.returncode != 0
        # HTTPS with the certificate, no Basic credentials.
        got = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--cacert", pki["ca"],
                              "--cert", kitchen[0], "--key", kitchen[1],
                              f"https://127.0.0.1:{b.port}/discover"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        body, status = got.stdout.rsplit("\n", 1)
        assert status == "200" and "kitchen-light" in json.loads(body), got.stdout
    finally:
        b.stop()
