"""Brokers under test and a small synchronous wrapper around paho-mqtt 2.x.

Every wait is on a queue or an event with a timeout; nothing sleeps to wait
for something that can be waited for.
"""

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import mqtt_raw

TIMEOUT = 10.0  # the longest any single wait may take
V311, V5 = mqtt.MQTTv311, mqtt.MQTTv5  # 4 and 5, as in mqtt_raw
VERSIONS = [pytest.param(V311, id="v311"), pytest.param(V5, id="v5")]
HERE = os.path.dirname(os.path.abspath(__file__))


def props(packet_type, **values):
    """paho Properties, e.g. props(PacketTypes.PUBLISH, MessageExpiryInterval=10)."""
    p = Properties(packet_type)
    for name, value in values.items():
        setattr(p, name, value)
    return p


def publish_props(**values):
    return props(PacketTypes.PUBLISH, **values)


def connect_props(**values):
    return props(PacketTypes.CONNECT, **values)


def sub_opts(qos, **kw):
    return SubscribeOptions(qos=qos, **kw)


class Message:
    """What a subscriber received; `props` is a dict of the MQTT 5 properties."""

    def __init__(self, msg):
        self.topic = msg.topic
        self.payload = msg.payload
        self.qos = msg.qos
        self.retain = bool(msg.retain)
        p = getattr(msg, "properties", None)
        self.props = p.json() if p is not None else {}
        self.raw_props = p

    def json(self):
        return json.loads(self.payload)

    def prop(self, name):
        """One MQTT 5 property as paho decoded it, or None."""
        return getattr(self.raw_props, name, None) if self.raw_props is not None else None

    def __repr__(self):
        return f"Message({self.topic!r}, {self.payload[:60]!r}, qos={self.qos}, retain={self.retain}, {self.props})"


class Client:
    """A paho client that connects, subscribes and publishes synchronously."""

    def __init__(self, port, client_id="", version=V5, clean=True, keepalive=30,
                 will=None, properties=None, session_expiry=None, bind="",
                 host="127.0.0.1", transport="tcp"):
        """`bind`: the local address to connect from (127.0.0.2, 127.0.0.3:
        strangers to each other on one machine)."""
        self.port, self.version, self.clean, self.bind = port, version, clean, bind
        self.host = host
        self.keepalive, self.properties = keepalive, properties
        if session_expiry is not None:
            self.properties = self.properties or connect_props()
            self.properties.SessionExpiryInterval = session_expiry
        kw = {"clean_session": clean} if version != V5 else {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=version, transport=transport, **kw)
        if will:
            self.c.will_set(**will)
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self._acks = {}
        self._acked = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.messages.put(Message(m))
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)

    # -- callbacks (paho's network thread) --
    def _on_connect(self, c, u, flags, rc, p):
        self.connacks.put((flags, rc, p))

    def _on_ack(self, c, u, mid, codes, p):
        with self._acked:
            self._acks[mid] = codes
            self._acked.notify_all()

    def _on_publish(self, c, u, mid, rc, p):
        with self._acked:
            self._acks[mid] = rc
            self._acked.notify_all()

    def _wait_ack(self, mid):
        with self._acked:
            ok = self._acked.wait_for(lambda: mid in self._acks, TIMEOUT)
            assert ok, f"no acknowledgement for packet {mid} in {TIMEOUT}s"
            return self._acks.pop(mid)

    # -- API --
    def connect(self, clean_start=None):
        """Connects and returns (session_present, reason code, CONNACK properties)."""
        kw = {}
        if self.version == V5:
            kw["clean_start"] = self.clean if clean_start is None else clean_start
            kw["properties"] = self.properties
        self.c.connect(self.host, self.port, keepalive=self.keepalive,
                       bind_address=self.bind, **kw)
        self.c.loop_start()
        flags, rc, p = self.connacks.get(timeout=TIMEOUT)
        assert not rc.is_failure, f"CONNACK refused: {rc}"
        self.connack_props = p.json() if p is not None else {}
        return flags.session_present, rc, self.connack_props

    def subscribe(self, topic, qos=0, options=None, properties=None):
        """Subscribes and returns the SUBACK codes as ints."""
        if options is not None:
            rc, mid = self.c.subscribe(topic, options=options, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos, properties=properties)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return [code.value if hasattr(code, "value") else code for code in self._wait_ack(mid)]

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None):
        """Publishes; for QoS 1/2 waits for PUBACK/PUBCOMP and returns its reason code."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        rc = self._wait_ack(info.mid)
        return rc.value if hasattr(rc, "value") else rc

    def publish_nowait(self, topic, payload=b"", qos=0, retain=False, properties=None):
        return self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def get(self, timeout=TIMEOUT):
        """The next message; fails the test if none arrives in time."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def get_n(self, n, timeout=TIMEOUT):
        """The next n messages, within `timeout` overall."""
        deadline, got = time.monotonic() + timeout, []
        while len(got) < n:
            left = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError(f"got {len(got)} of {n} messages in {timeout}s: {got[-3:]}") from None
        return got

    def get_until(self, topic, timeout=TIMEOUT):
        """Every message up to and including the first one on `topic`."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                m = self.messages.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no message on {topic} in {timeout}s; got {got}") from None
            got.append(m)
            if m.topic == topic:
                return got

    def drain(self, quiet=0.5):
        """Messages that arrive until none has come for `quiet` seconds."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return got

    def connected(self):
        return self.c.is_connected()

    def disconnect(self, reason=None):
        if reason is not None:
            self.c.disconnect(reasoncode=reason)
        else:
            self.c.disconnect()
        self.disconnects.get(timeout=TIMEOUT)
        self.c.loop_stop()

    def stop(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout}s")
            time.sleep(0.02)  # polling a port: there is no event to wait on


class Broker:
    """A running broker. `kind` is "mosquitto" or "homicro"."""

    def __init__(self, kind, port, proc, stderr_path, pump=None):
        self.kind, self.port, self.proc = kind, port, proc
        self.stderr_path, self.pump = stderr_path, pump
        self.clients = []

    def client(self, client_id="", version=V5, connect=True, **kw):
        """A paho client (connected unless connect=False), stopped at teardown."""
        c = Client(self.port, client_id=client_id, version=version, **kw)
        self.clients.append(c)
        if connect:
            c.connect()
        return c

    def raw(self, version=mqtt_raw.V311):
        r = mqtt_raw.RawClient(self.port, version)
        self.clients.append(r)
        return r

    def stderr(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def stop(self):
        for c in self.clients:
            try:
                c.stop() if isinstance(c, Client) else c.close()
            except Exception:
                pass
        self.proc.kill()
        self.proc.wait()
        if self.pump:
            self.pump.join(TIMEOUT)  # the log is complete


def mosquitto_bin():
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(found):
        raise RuntimeError("mosquitto not found (scripts/setup installs it)")
    return found


def start_mosquitto(tmp, extra=""):
    """`extra`: more lines for mosquitto.conf."""
    port = free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        anonymous = "" if "allow_anonymous" in extra else "allow_anonymous true\n"
        f.write(f"listener {port} 127.0.0.1\n{anonymous}persistence false\n{extra}")
    log = os.path.join(tmp, "mosquitto.log")
    with open(log, "w") as err:
        proc = subprocess.Popen([mosquitto_bin(), "-c", conf], stdout=err, stderr=err)
    wait_for_port(port, proc)
    return Broker("mosquitto", port, proc, log)


def homicro_bin():
    path = os.environ.get("HOMICRO_BIN") or os.path.join(HERE, "..", "..", "target", "debug", "homicro")
    if not os.path.exists(path):
        raise RuntimeError(f"homicro binary {path} not found: set HOMICRO_BIN or cargo build")
    return path


SERVING = re.compile(r"homicro serving.*url=mqtt://127\.0\.0\.1:(\d+)")


def start_homicro(tmp, config="", user=None, password=None, listen="127.0.0.1:0"):
    """`config`: a homicro.toml to serve with (empty: the defaults); `user`
    and `password`: what the readiness probe connects with."""
    log = os.path.join(tmp, "homicro.log")
    args = [homicro_bin(), "serve", "--listen", listen,
            "--state-dir", os.path.join(tmp, "state")]
    if config:
        path = os.path.join(tmp, "homicro.toml")
        with open(path, "w") as f:
            f.write(config)
        args += ["--config", path]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"})
    found = queue.Queue()

    def pump():  # copies stderr to the log file, reports the port
        with open(log, "w") as out:
            for line in iter(proc.stderr.readline, b""):
                text = line.decode(errors="replace")
                out.write(text)
                out.flush()
                m = SERVING.search(text)
                if m:
                    found.put(int(m.group(1)))
        found.put(None)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        port = found.get(timeout=TIMEOUT)
    except queue.Empty:
        port = None
    if port is None:
        proc.kill()
        raise RuntimeError(f"homicro did not report `homicro serving`:\n{open(log).read()}")
    broker = Broker("homicro", port, proc, log, pumper)
    try:
        watcher = broker.client("conformance-registry-probe", version=V311, connect=False)
        if user:
            watcher.c.username_pw_set(user, password)
        watcher.connect()
        watcher.subscribe("homicro/registry", 1)
        while True:
            m = watcher.get()
            if m.topic == "homicro/registry" and m.json().get("state") == "online":
                break
    except BaseException:
        broker.stop()  # never leave a server behind
        raise
    watcher.stop()
    broker.clients.remove(watcher)
    return broker
