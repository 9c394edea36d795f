"""homicro only: the registry's services in Home Assistant, through its MQTT
discovery (`[home_assistant] discovery = true`; docs/PROTOCOL.md, "Home
Assistant").

A paho client stands in for Home Assistant: it subscribes to the discovery
prefix and homicro's topics and keeps what it hears, as Home Assistant
would. Every discovery config it gets is checked against Home Assistant's
documented schema of an MQTT binary sensor, written out below from:

- https://www.home-assistant.io/integrations/binary_sensor.mqtt/
  (configuration variables; `device` keys; `availability_template`,
  `payload_on`/`payload_off` defaults `ON`/`OFF`)
- https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery
  (the discovery topic `<prefix>/<component>/[<node_id>/]<object_id>/config`,
  node and object ids of `[a-zA-Z0-9_-]`; the `origin` map; the key
  abbreviations, which homicro does not use)
- https://www.home-assistant.io/integrations/binary_sensor/#device-class
  (the device classes, as BinarySensorDeviceClass in Home Assistant's core)

A config with an unknown key, a key of the wrong type, or an abbreviation
fails the test.
"""

import json
import os
import queue
import re
import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest
import requests

import mqtt_raw as R
from harness import (TIMEOUT, V311, V5, Client, free_port, homicro_bin, mosquitto_bin,
                     start_homicro, start_mosquitto, wait_for_port)

# -- Home Assistant's schema ---------------------------------------------------

TEMPLATE = str
ENTITY_KEYS = {
    # binary_sensor.mqtt, "Configuration Variables"
    "availability": list,
    "availability_mode": str,
    "availability_template": TEMPLATE,
    "availability_topic": str,
    "device": dict,
    "device_class": (str, type(None)),
    "enabled_by_default": bool,
    "encoding": str,
    "entity_category": str,
    "entity_picture": str,
    "expire_after": int,
    "force_update": bool,
    "icon": str,
    "json_attributes_template": TEMPLATE,
    "json_attributes_topic": str,
    "name": (str, type(None)),
    "object_id": str,
    "default_entity_id": str,  # object_id's successor (2025.10)
    "off_delay": int,
    "payload_available": str,
    "payload_not_available": str,
    "payload_off": str,
    "payload_on": str,
    "platform": str,  # only in device discovery payloads
    "qos": int,
    "state_topic": str,
    "unique_id": str,
    "value_template": TEMPLATE,
    # mqtt, "Discovery messages": who made it
    "origin": dict,
}
DEVICE_KEYS = {
    "configuration_url": str,
    "connections": list,
    "hw_version": str,
    "identifiers": (list, str),
    "manufacturer": str,
    "model": str,
    "model_id": str,
    "name": str,
    "serial_number": str,
    "suggested_area": str,
    "sw_version": str,
    "via_device": str,
}
ORIGIN_KEYS = {"name": str, "sw_version": str, "support_url": str}
AVAILABILITY_KEYS = {"topic": str, "payload_available": str, "payload_not_available": str,
                     "value_template": TEMPLATE}
AVAILABILITY_MODES = {"all", "any", "latest"}
DEVICE_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
    "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving",
    "occupancy", "opening", "plug", "power", "presence", "problem", "running", "safety",
    "smoke", "sound", "tamper", "update", "vibration", "window",
}
# A few of the documented abbreviations: homicro writes full names.
ABBREVIATIONS = {"~", "avty", "avty_t", "avty_tpl", "dev", "dev_cla", "json_attr_t", "o",
                 "pl_avail", "pl_not_avail", "pl_off", "pl_on", "stat_t", "uniq_id", "val_tpl",
                 "cu", "ids", "mf", "mdl", "sw", "name_"}
ID = re.compile(r"[a-zA-Z0-9_-]+")
DISCOVERY_PREFIX = "homeassistant"  # Home Assistant's default, and homicro's
CONFIG_TOPIC = re.compile(DISCOVERY_PREFIX + r"/(?P<component>[^/]+)/(?:(?P<node>[^/]+)/)?"
                          r"(?P<object>[^/]+)/config")


def typed(where, key, value, want):
    wanted = want if isinstance(want, tuple) else (want,)
    # bool is an int in Python, not in Home Assistant's schema.
    ok = any(isinstance(value, w) and not (w is int and isinstance(value, bool)) for w in wanted)
    assert ok, f"{where}{key}: {value!r} is not {want}"


def check_keys(where, obj, schema):
    assert isinstance(obj, dict), f"{where}: {obj!r} is not a JSON object"
    for key, value in obj.items():
        assert key not in ABBREVIATIONS, f"{where}{key}: an abbreviation; use the full name"
        assert key in schema, f"{where}{key}: not a key of Home Assistant's schema"
        typed(where, key, value, schema[key])


def topic_name(where, t):
    assert isinstance(t, str) and t and not set("+#\0") & set(t), f"{where}: bad topic {t!r}"


def check_config(topic, payload):
    """A discovery config as Home Assistant would take it: the config, parsed."""
    m = CONFIG_TOPIC.fullmatch(topic)
    assert m and m["component"] == "binary_sensor", topic
    for part in ("node", "object"):
        assert m[part] is None or ID.fullmatch(m[part]), f"{topic}: {part} id {m[part]!r}"
    c = json.loads(payload)
    check_keys("", c, ENTITY_KEYS)
    assert "state_topic" in c, "state_topic is required"
    topic_name("state_topic", c["state_topic"])
    assert "platform" not in c, "platform is for device discovery payloads only"
    assert c.get("device_class") in DEVICE_CLASSES and c["device_class"] == "connectivity"
    assert 0 <= c.get("qos", 0) <= 2
    assert not ("availability" in c and "availability_topic" in c), "one form of availability"
    for item in c.get("availability", []):
        check_keys("availability.", item, AVAILABILITY_KEYS)
        assert "topic" in item
    assert c.get("availability_mode", "latest") in AVAILABILITY_MODES
    for key in ("availability_topic", "json_attributes_topic"):
        if key in c:
            topic_name(key, c[key])
    # the device: only with a unique_id, identified, and named
    d = c.get("device")
    if d is not None:
        assert "unique_id" in c, "a device needs the entity's unique_id"
        check_keys("device.", d, DEVICE_KEYS)
        assert d.get("identifiers") or d.get("connections"), "a device needs an identifier"
        if isinstance(d.get("identifiers"), list):
            assert all(isinstance(i, str) for i in d["identifiers"])
        assert "name" in d, "Home Assistant wants every device named"
        url = d.get("configuration_url")
        assert url is None or re.match(r"(https?|homeassistant)://.", url), url
    if "origin" in c:
        check_keys("origin.", c["origin"], ORIGIN_KEYS)
        assert "name" in c["origin"]
    # what homicro promises on top of the schema
    assert c["availability_topic"] == "homicro/registry"
    assert c["availability_template"] == "{{ value_json.state }}"
    assert (c["payload_available"], c["payload_not_available"]) == ("online", "offline")
    assert (c.get("payload_on", "ON"), c.get("payload_off", "OFF")) == ("ON", "OFF")
    assert c["unique_id"] == f"homicro_{m['object']}"
    assert d["identifiers"] == [c["unique_id"]]
    return c


# -- a stand-in for Home Assistant ----------------------------------------------

def config_topic(name):
    return f"homeassistant/binary_sensor/homicro/{name}/config"


def state_topic(name):
    return f"homicro/ha/{name}/state"


def attributes_topic(name):
    return f"homicro/ha/{name}/attributes"


class HomeAssistant:
    """Hears what Home Assistant would: the latest payload on each topic,
    every config checked as it comes."""

    def __init__(self, port, client_id="home-assistant"):
        self.c = Client(port, client_id=client_id, version=V311)
        self.c.connect()
        for f in ("homeassistant/#", "homicro/ha/#", "homicro/registry"):
            self.c.subscribe(f, 1)
        self.latest, self.retained, self.configs = {}, {}, 0

    def _take(self, m):
        if CONFIG_TOPIC.fullmatch(m.topic) and m.payload:
            check_config(m.topic, m.payload)
            self.configs += 1
        self.latest[m.topic] = m.payload
        self.retained[m.topic] = m.retain

    def wait(self, topic, want=lambda p: True, timeout=TIMEOUT):
        """The payload on `topic` once `want` holds for it."""
        deadline = time.monotonic() + timeout
        while not (topic in self.latest and want(self.latest[topic])):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{topic}: {self.latest.get(topic)!r} after {timeout}s")
            try:
                self._take(self.c.messages.get(timeout=left))
            except queue.Empty:
                pass
        return self.latest[topic]

    def attributes(self, name, status):
        a = self.wait(attributes_topic(name), lambda p: p and json.loads(p)["status"] == status)
        return json.loads(a)

    def stop(self):
        self.c.stop()


def retained_now(port, filters):
    """Every retained message under `filters` now: {topic: payload}."""
    c = Client(port, client_id="retained-probe", version=V311)
    c.connect()
    for f in filters:
        c.subscribe(f, 1)
    c.subscribe("probe/sync", 1)
    c.publish("probe/sync", b"end", qos=1)
    got = {m.topic: m.payload for m in c.get_until("probe/sync")[:-1] if m.retain}
    c.stop()
    return got


def wait_log(b, text, timeout=TIMEOUT):
    """Waits for `text` in serve's log."""
    deadline = time.monotonic() + timeout
    while text not in b.stderr():
        assert time.monotonic() < deadline, f"no {text!r} in the log after {timeout}s"
        time.sleep(0.02)  # polling a file: there is no event to wait on


CONFIG = """\
[home_assistant]
discovery = true
forget_after = "{forget}"
"""


def register_over_mqtt(port, name, record, version=V311):
    c = Client(port, client_id=f"svc-{name}", version=version)
    c.connect()
    c.subscribe(f"homicro/events/{name}", 1)
    assert c.publish(f"homicro/services/{name}", json.dumps(record), qos=1, retain=True) == 0
    assert c.get().json()["event"] == "registered"
    return c


# -- the tests -------------------------------------------------------------------

def test_a_service_lives_and_goes_in_home_assistant(tmp_path):
    b = start_homicro(str(tmp_path), config=CONFIG.format(forget="1h"))
    ha = HomeAssistant(b.port)
    try:
        # Registered over HTTP: config and state ON appear, retained.
        r = requests.put(f"http://127.0.0.1:{b.port}/self-register", timeout=TIMEOUT,
                         json={"name": "web", "port": 8080, "version": "1.2.0", "scheme": "http"})
        assert r.status_code == 201, r.text
        assert ha.wait(state_topic("web")) == b"ON"
        c = check_config(config_topic("web"), ha.wait(config_topic("web")))
        assert c["device"] == {
            # derived from --listen; the dashboard's search starts as the name
            "configuration_url": f"http://127.0.0.1:{b.port}/#web",
            "identifiers": ["homicro_web"], "manufacturer": "homicro", "model": "web",
            "name": "web", "sw_version": "1.2.0"}
        assert (c["state_topic"], c["json_attributes_topic"]) == (
            state_topic("web"), attributes_topic("web"))
        assert ha.attributes("web", "registered") == {
            "endpoint": "127.0.0.1:8080", "role": "web", "scheme": "http",
            "status": "registered", "version": "1.2.0"}
        assert ha.wait("homicro/registry", lambda p: json.loads(p)["state"] == "online")
        held = retained_now(b.port, ["homeassistant/#", "homicro/ha/#"])
        assert held[state_topic("web")] == b"ON" and config_topic("web") in held

        # A failing health check (nobody listens on that port): OFF.
        dead = free_port()
        sick = register_over_mqtt(b.port, "sick", {
            "host": "127.0.0.1", "port": dead,
            "health": {"tcp": True, "interval": "1s", "failures": 1}})
        assert ha.wait(config_topic("sick"))
        assert ha.wait(state_topic("sick"), lambda p: p == b"OFF") == b"OFF"
        a = ha.attributes("sick", "unhealthy")
        assert f"tcp 127.0.0.1:{dead}" in a["detail"] and "since" in a and "forget_at" in a
        assert config_topic("sick") in retained_now(b.port, ["homeassistant/#"]), \
            "kept, off, until forget_after"

        # A ttl that runs out: OFF.
        brief = register_over_mqtt(b.port, "brief", {"host": "10.0.0.7", "port": 80, "ttl": 1})
        assert ha.wait(state_topic("brief")) == b"ON"
        assert ha.wait(state_topic("brief"), lambda p: p == b"OFF") == b"OFF"
        assert ha.attributes("brief", "expired")["endpoint"] == "10.0.0.7:80"

        # Its client lost (the socket closed without DISCONNECT): its will
        # clears the record, and the entity turns OFF (`lost`), kept.
        lamp = b.raw()
        clear = {"topic": "homicro/services/lamp", "payload": b"", "qos": 1, "retain": True}
        assert lamp.connect("lamp", will=clear).fields["reason"] == 0
        lamp.send(R.publish("homicro/services/lamp", json.dumps({"host": "10.0.0.8"}),
                            qos=1, retain=True))
        lamp.expect(R.PUBACK)
        assert ha.wait(state_topic("lamp")) == b"ON"
        lamp.close()
        assert ha.wait(state_topic("lamp"), lambda p: p == b"OFF") == b"OFF"
        assert ha.attributes("lamp", "lost")["endpoint"] == "10.0.0.8"
        assert config_topic("lamp") in retained_now(b.port, ["homeassistant/#"])

        # Only homicro writes homicro/ha/: a forged state is refused.
        forger = Client(b.port, client_id="forger", version=V5)
        forger.connect()
        assert forger.publish(state_topic("brief"), b"ON", qos=1, retain=True) == 0x87
        forger.stop()
        assert retained_now(b.port, [state_topic("brief")])[state_topic("brief")] == b"OFF"

        # Deregistered (an empty retained record): the config goes at once.
        owner = Client(b.port, client_id="owner", version=V311)
        owner.connect()
        owner.publish("homicro/services/web", b"", qos=1, retain=True)
        owner.stop()
        assert ha.wait(config_topic("web"), lambda p: p == b"") == b""
        assert ha.retained.get(config_topic("web")) is False, "a live clear"
        assert ha.wait(state_topic("web"), lambda p: p == b"") == b""
        assert ha.wait(attributes_topic("web"), lambda p: p == b"") == b""
        held = retained_now(b.port, ["homeassistant/#", "homicro/ha/#"])
        assert not [t for t in held if "/web/" in t], held
        assert {config_topic("sick"), config_topic("brief")} <= set(held)

        # serve stopped: Home Assistant marks every entity unavailable.
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(TIMEOUT) == 0
        assert json.loads(ha.wait("homicro/registry",
                                  lambda p: json.loads(p)["state"] == "offline"))
        assert ha.configs >= 3, "every config was checked against the schema"
        sick.stop()
        brief.stop()
    finally:
        ha.stop()
        b.stop()
    assert "panicked" not in b.stderr()


def test_a_restart_keeps_entities_and_forgets_what_fell_due(tmp_path):
    """The configs, states and attributes are retained on the bus (and so in
    the journal): a restarted serve reads them back, keeps a registered
    service's entity as it was, and removes a gone service once
    forget_after has passed since it went (here 3 s, counted across the
    restart: whether that falls before the new bridge is up or after)."""
    # A fixed dashboard: the derived one names the port, new at each start here.
    config = CONFIG.format(forget="3s") + 'dashboard_url = "http://hub.test:1883/"\n'
    b = start_homicro(str(tmp_path), config=config)
    ha = HomeAssistant(b.port)
    try:
        web = register_over_mqtt(b.port, "web", {"host": "10.0.0.5", "port": 80})
        brief = register_over_mqtt(b.port, "brief", {"host": "10.0.0.7", "port": 80, "ttl": 1})
        gone = ha.attributes("brief", "expired")
        web.stop()  # no will: web stays registered
        brief.stop()
        before = retained_now(b.port, ["homeassistant/#", "homicro/ha/#"])
        assert before[state_topic("web")] == b"ON"
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(TIMEOUT) == 0
        ha.stop()
        b.stop()

        b = start_homicro(str(tmp_path), config=config)
        after = retained_now(b.port, ["homeassistant/#", "homicro/ha/#"])
        assert after[state_topic("web")] == b"ON"
        assert after[config_topic("web")] == before[config_topic("web")]
        if config_topic("brief") in after:
            # Not due yet: kept, off, gone since when it went (not since
            # the restart).
            assert after[state_topic("brief")] == b"OFF"
            assert json.loads(after[attributes_topic("brief")]) == gone
        # Its config goes 3 s after `since` (to the millisecond), restart or
        # not. A subscriber never gets a retained topic already cleared, so
        # ask the broker what it holds until brief is not there.
        deadline = time.monotonic() + TIMEOUT
        while config_topic("brief") in retained_now(b.port, [config_topic("brief")]):
            assert time.monotonic() < deadline, "brief's config is still there"
            time.sleep(0.05)  # polling the broker's state: no event to wait on
        gone_at = time.time()
        assert not retained_now(b.port, [state_topic("brief"), attributes_topic("brief")])
        went = datetime.fromisoformat(gone["since"]).timestamp()
        assert gone_at >= went + 3, (gone["since"], gone_at)
        assert gone["forget_at"] == datetime.fromtimestamp(went + 3, timezone.utc) \
            .isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert retained_now(b.port, [config_topic("web")]), "web is still there"
    finally:
        ha.stop()
        b.stop()
    assert "panicked" not in b.stderr()


def test_a_forged_config_is_repaired_and_a_deletion_in_home_assistant_respected(tmp_path):
    """The bridge stays subscribed to its topics: someone else's config on
    one of them is replaced by its own at once; an empty one, which is what
    Home Assistant publishes when its user deletes the device, is respected
    (state and attributes go too) until the service registers anew."""
    b = start_homicro(str(tmp_path), config=CONFIG.format(forget="1h"))
    ha = HomeAssistant(b.port)
    try:
        web = register_over_mqtt(b.port, "web", {"host": "10.0.0.5", "port": 80})
        ours = ha.wait(config_topic("web"))
        forged = json.loads(ours)
        forged["state_topic"] = "forger/web"
        forger = Client(b.port, client_id="forger", version=V311)
        forger.connect()
        forger.publish(config_topic("web"), json.dumps(forged), qos=1, retain=True)
        ha.wait(config_topic("web"), lambda p: json.loads(p)["state_topic"] == "forger/web")
        assert ha.wait(config_topic("web"), lambda p: p == ours) == ours
        assert retained_now(b.port, [config_topic("web")])[config_topic("web")] == ours

        # Deleted in Home Assistant: its state and attributes go too.
        ha.c.publish(config_topic("web"), b"", qos=1, retain=True)
        assert ha.wait(state_topic("web"), lambda p: p == b"") == b""
        assert ha.wait(attributes_topic("web"), lambda p: p == b"") == b""
        # Refreshed, and forged again: not shown (the forgery is cleared).
        # Another service, registered after, shows the bridge got that far.
        assert web.publish("homicro/services/web", json.dumps(
            {"host": "10.0.0.5", "port": 80, "version": "2.0.0"}), qos=1, retain=True) == 0
        assert web.get().json()["event"] == "updated"
        forger.publish(config_topic("web"), json.dumps(forged), qos=1, retain=True)
        nas = register_over_mqtt(b.port, "nas", {"host": "10.0.0.6", "port": 80})
        ha.wait(config_topic("nas"))
        assert ha.wait(config_topic("web"), lambda p: p == b"") == b""
        held = retained_now(b.port, ["homeassistant/#", "homicro/ha/#"])
        assert not [t for t in held if "/web/" in t], held

        # Registered anew: shown again.
        web.publish("homicro/services/web", b"", qos=1, retain=True)
        assert web.get().json()["event"] == "deregistered"
        web.publish("homicro/services/web", json.dumps({"host": "10.0.0.5", "port": 80}),
                    qos=1, retain=True)
        assert web.get().json()["event"] == "registered"
        assert ha.wait(state_topic("web"), lambda p: p == b"ON") == b"ON"
        check_config(config_topic("web"), ha.wait(config_topic("web"), lambda p: p != b""))
        forger.stop()
        web.stop()
        nas.stop()
    finally:
        ha.stop()
        b.stop()
    assert "panicked" not in b.stderr()


def test_turning_discovery_off_removes_the_entities(tmp_path):
    """A run with discovery off removes, at start, every entity an earlier
    run published (on the embedded bus nobody else may clear homicro/ha/)."""
    b = start_homicro(str(tmp_path), config=CONFIG.format(forget="1h"))
    try:
        web = register_over_mqtt(b.port, "web", {"host": "10.0.0.5", "port": 80})
        web.stop()
        assert retained_now(b.port, [config_topic("web")])
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(TIMEOUT) == 0
        b.stop()
        b = start_homicro(str(tmp_path), config="[home_assistant]\ndiscovery = false\n")
        wait_log(b, "removed what an earlier run published")
        assert retained_now(b.port, ["homeassistant/#", "homicro/ha/#"]) == {}
        # The record itself is the registry's, and stays.
        assert retained_now(b.port, ["homicro/services/web"])
    finally:
        b.stop()


def test_against_mosquitto_with_serve_broker(tmp_path):
    """`serve --broker`: the bridge is a client of Mosquitto like the registry,
    and after the broker came back empty it publishes the entities again."""
    (tmp_path / "m").mkdir()
    m = start_mosquitto(str(tmp_path / "m"))
    path = tmp_path / "homicro.toml"
    path.write_text(CONFIG.format(forget="1h"))
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [homicro_bin(), "serve", "--broker", f"mqtt://127.0.0.1:{m.port}",
         "--config", str(path), "--state-dir", str(tmp_path / "s")],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "NO_COLOR": "1"})
    ha = HomeAssistant(m.port)
    try:
        ha.wait("homicro/registry", lambda p: json.loads(p)["state"] == "online")
        svc = register_over_mqtt(m.port, "printer",
                                 {"host": "10.0.0.20", "port": 631, "version": "2.0.0"})
        c = check_config(config_topic("printer"), ha.wait(config_topic("printer")))
        assert "configuration_url" not in c["device"], "no dashboard without the one port"
        assert c["device"]["sw_version"] == "2.0.0"
        assert ha.wait(state_topic("printer")) == b"ON"
        assert ha.retained.get(config_topic("printer")) is False, "heard live"
        held = retained_now(m.port, ["homeassistant/#", "homicro/ha/#"])
        assert held[state_topic("printer")] == b"ON" and config_topic("printer") in held
        svc.stop()

        # On an external broker anyone may write homicro/ha/ (without an
        # ACL): a forged state is put right at once.
        forger = Client(m.port, client_id="forger", version=V311)
        forger.connect()
        forger.subscribe("homicro/events/printer", 1)
        forger.publish(state_topic("printer"), b"OFF", qos=1, retain=True)
        assert ha.wait(state_topic("printer"), lambda p: p == b"OFF")
        assert ha.wait(state_topic("printer"), lambda p: p == b"ON") == b"ON"
        # A record of another endpoint reaches the broker, and the registry
        # refuses it (owned) and restores the owner's: the entity ends as
        # the owner's. Another service, registered after, is the barrier.
        forger.publish("homicro/services/printer", json.dumps({"host": "10.0.0.99", "port": 631}),
                       qos=1, retain=True)
        assert forger.get().json()["event"] == "rejected"
        scanner = register_over_mqtt(m.port, "scanner", {"host": "10.0.0.21", "port": 80})
        ha.wait(config_topic("scanner"))
        assert ha.latest[state_topic("printer")] == b"ON"
        assert json.loads(ha.latest[attributes_topic("printer")])["endpoint"] == "10.0.0.20:631"
        forger.stop()
        scanner.stop()

        # Mosquitto restarted without persistence: every retained message is
        # lost; the registry restores the record, the bridge its entity.
        ha.stop()
        m.proc.kill()
        m.proc.wait()
        conf = str(tmp_path / "m" / "mosquitto.conf")
        with open(str(tmp_path / "m" / "mosquitto.log"), "a") as err:
            m.proc = subprocess.Popen([mosquitto_bin(), "-c", conf], stdout=err, stderr=err)
        wait_for_port(m.port, m.proc)
        ha = HomeAssistant(m.port, client_id="home-assistant-2")
        assert ha.wait(state_topic("printer")) == b"ON"
        check_config(config_topic("printer"), ha.wait(config_topic("printer")))

        # Deregistered: the config goes.
        svc = Client(m.port, client_id="svc-printer-2", version=V311)
        svc.connect()
        svc.publish("homicro/services/printer", b"", qos=1, retain=True)
        assert ha.wait(config_topic("printer"), lambda p: p == b"") == b""
        svc.stop()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(TIMEOUT) == 0
        ha.wait("homicro/registry", lambda p: json.loads(p)["state"] == "offline")
    finally:
        ha.stop()
        serve.kill()
        serve.wait()
        m.stop()
    assert "panicked" not in open(tmp_path / "serve.log").read()


@pytest.mark.parametrize("bad, says", [
    ("[home_assistant]\ndiscovery = 1", "home_assistant.discovery: must be true or false"),
    ("[home_assistant]\nforget_after = \"later\"", "home_assistant.forget_after:"),
    ("[home_assistant]\ndashboard_url = \"ftp://x\"", "home_assistant.dashboard_url:"),
    ("[home_assistant]\ncolour = 1", "home_assistant.colour: unknown key"),
])
def test_bad_values_stop_serve_with_the_key(tmp_path, bad, says):
    path = tmp_path / "homicro.toml"
    path.write_text(bad)
    out = subprocess.run([homicro_bin(), "serve", "--config", str(path), "--listen",
                          "127.0.0.1:0", "--state-dir", str(tmp_path / "s")],
                         capture_output=True, timeout=TIMEOUT)
    assert out.returncode == 2, out
    assert says in out.stderr.decode(), out.stderr
