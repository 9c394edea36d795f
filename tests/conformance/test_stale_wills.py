"""homicro only: a record is guarded by the will of the session that last
wrote or refreshed it with a will that clears it (docs/PROTOCOL.md,
"Freshness").

A service without a `ttl` that restarts registers again on a new
connection; the old connection, half-open, is timed out later and its
will goes out. On homicro's bus that late will clears nothing; the live
connection's will still clears the record, and its `deregistered` event
says `"will": true`. A publish without such a will (mosquitto_pub) leaves
the keeper's will in charge. Against an external broker (Mosquitto, `serve
--broker`) the registry cannot tell a will from a deregistration: there
the late will clears the record, as the documentation says.
"""

import json
import os
import subprocess
import time

import requests

import mqtt_raw as R
from harness import TIMEOUT, V311, Client, homicro_bin, start_mosquitto

LAMP = {"host": "10.0.0.7", "port": 80}
CLEAR = {"topic": "homicro/services/lamp", "payload": b"", "qos": 1, "retain": True}


def metric(port, name):
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).text
    for line in body.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no {name} in /metrics")


def wait_metric(port, name, value):
    deadline = time.monotonic() + TIMEOUT
    while metric(port, name) != value:
        assert time.monotonic() < deadline, f"{name} is {metric(port, name)}, not {value}"
        time.sleep(0.02)  # polling a counter: there is no event to wait on


def lamp_connection(port, client_id):
    """A raw connection whose will clears the lamp, after it registered it."""
    r = R.RawClient(port)
    assert r.connect(client_id, will=CLEAR).fields["reason"] == 0
    r.send(R.publish("homicro/services/lamp", json.dumps(LAMP), qos=1, retain=True))
    assert r.expect(R.PUBACK).fields["packet_id"] == 1
    return r


def retained_lamp(port):
    c = Client(port, client_id="probe", version=V311)
    c.connect()
    c.subscribe("homicro/services/lamp", 1)
    c.subscribe("probe/sync", 1)
    c.publish("probe/sync", b"end", qos=1)
    got = [m.json() for m in c.get_until("probe/sync")[:-1] if m.retain and m.payload]
    c.stop()
    return got[0] if got else None


def watcher(port):
    w = Client(port, client_id="events", version=V311)
    w.connect()
    w.subscribe("homicro/events/lamp", 1)
    return w


def test_a_restarted_services_record_outlives_the_old_connections_will(homicro):
    port = homicro.port
    events = watcher(port)
    old = lamp_connection(port, "lamp-before-restart")
    assert events.get().json()["event"] == "registered"
    new = lamp_connection(port, "lamp-after-restart")
    assert events.get().json() == {"changed": False, "endpoint": "10.0.0.7:80",
                                   "event": "updated", "name": "lamp"}
    # The old connection is lost (closed without DISCONNECT): its will goes
    # out and is judged, and clears nothing.
    wills = metric(port, "homicro_bus_wills_total")
    old.close()
    wait_metric(port, "homicro_stale_wills_total", 1)
    assert metric(port, "homicro_bus_wills_total") == wills + 1
    assert retained_lamp(port) == LAMP
    assert metric(port, "homicro_deregistrations_total") == 0
    # The live connection's will does clear it, and says it was a will.
    new.close()
    assert events.get().json() == {"endpoint": "10.0.0.7:80", "event": "deregistered",
                                   "name": "lamp", "will": True}
    assert retained_lamp(port) is None
    # A deliberate deregistration says no will.
    again = lamp_connection(port, "lamp-again")
    assert events.get().json()["event"] == "registered"
    again.send(R.publish("homicro/services/lamp", b"", qos=1, retain=True, packet_id=2))
    again.expect(R.PUBACK)
    assert events.get().json() == {"endpoint": "10.0.0.7:80", "event": "deregistered",
                                   "name": "lamp"}
    again.send(R.disconnect())
    events.stop()


def test_a_one_shot_publish_leaves_the_keepers_will_in_charge(homicro):
    """`mosquitto_pub -r` of the same record (no will) between: the keeper's
    will still clears the record when the keeper is lost."""
    port = homicro.port
    events = watcher(port)
    keeper = lamp_connection(port, "lamp-keeper")
    assert events.get().json()["event"] == "registered"
    subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-r",
                    "-t", "homicro/services/lamp", "-m", json.dumps(LAMP)],
                   check=True, timeout=TIMEOUT)
    assert events.get().json()["event"] == "updated"
    keeper.close()
    assert events.get().json()["will"] is True
    assert retained_lamp(port) is None
    assert metric(port, "homicro_stale_wills_total") == 0
    events.stop()


def test_against_an_external_broker_the_late_will_still_clears(tmp_path):
    (tmp_path / "m").mkdir()
    m = start_mosquitto(str(tmp_path / "m"))
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [homicro_bin(), "serve", "--broker", f"mqtt://127.0.0.1:{m.port}",
         "--state-dir", str(tmp_path / "s")],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "NO_COLOR": "1"})
    try:
        events = Client(m.port, client_id="events", version=V311)
        events.connect()
        events.subscribe("homicro/registry", 1)
        while True:  # serve is up once it says so
            said = events.get()
            if said.topic == "homicro/registry" and said.json()["state"] == "online":
                break
        events.subscribe("homicro/events/lamp", 1)
        old = lamp_connection(m.port, "lamp-before-restart")
        assert events.get().json()["event"] == "registered"
        lamp_connection(m.port, "lamp-after-restart")
        assert events.get().json()["event"] == "updated"
        old.close()
        ev = events.get().json()
        assert (ev["event"], "will" in ev) == ("deregistered", False), ev
        events.stop()
    finally:
        serve.kill()
        serve.wait()
        m.stop()
    assert "panicked" not in open(tmp_path / "serve.log").read()
