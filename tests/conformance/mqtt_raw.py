"""Hand-encoded MQTT 3.1.1 / 5 packets over a plain socket.

For what paho will not send: a client that goes silent, Topic Alias 0,
PUBLISHes past Receive Maximum, a 3.1.1 empty client id with a persistent
session. Only what the conformance tests need is encoded; decoding covers
every packet a server sends.
"""

import socket
import struct
import time
from dataclasses import dataclass, field

V311, V5 = 4, 5

# packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)

# MQTT 5 property identifiers: (name, kind)
PROPS = {
    0x01: ("PayloadFormatIndicator", "byte"),
    0x02: ("MessageExpiryInterval", "u32"),
    0x03: ("ContentType", "str"),
    0x08: ("ResponseTopic", "str"),
    0x09: ("CorrelationData", "bin"),
    0x0B: ("SubscriptionIdentifier", "varint"),
    0x11: ("SessionExpiryInterval", "u32"),
    0x12: ("AssignedClientIdentifier", "str"),
    0x13: ("ServerKeepAlive", "u16"),
    0x15: ("AuthenticationMethod", "str"),
    0x16: ("AuthenticationData", "bin"),
    0x17: ("RequestProblemInformation", "byte"),
    0x18: ("WillDelayInterval", "u32"),
    0x19: ("RequestResponseInformation", "byte"),
    0x1A: ("ResponseInformation", "str"),
    0x1C: ("ServerReference", "str"),
    0x1F: ("ReasonString", "str"),
    0x21: ("ReceiveMaximum", "u16"),
    0x22: ("TopicAliasMaximum", "u16"),
    0x23: ("TopicAlias", "u16"),
    0x24: ("MaximumQoS", "byte"),
    0x25: ("RetainAvailable", "byte"),
    0x26: ("UserProperty", "pair"),
    0x27: ("MaximumPacketSize", "u32"),
    0x28: ("WildcardSubscriptionAvailable", "byte"),
    0x29: ("SubscriptionIdentifierAvailable", "byte"),
    0x2A: ("SharedSubscriptionAvailable", "byte"),
}
PROP_IDS = {name: (pid, kind) for pid, (name, kind) in PROPS.items()}


# -- encoding --------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def properties(props=None):
    """Encodes a dict {name: value} (UserProperty: list of pairs)."""
    body = bytearray()
    for name, value in (props or {}).items():
        pid, kind = PROP_IDS[name]
        values = value if kind == "pair" else [value]
        for v in values:
            body.append(pid)
            if kind == "byte":
                body.append(v)
            elif kind == "u16":
                body += struct.pack("!H", v)
            elif kind == "u32":
                body += struct.pack("!I", v)
            elif kind == "varint":
                body += varint(v)
            elif kind in ("str", "bin"):
                body += mqtt_str(v)
            elif kind == "pair":
                body += mqtt_str(v[0]) + mqtt_str(v[1])
    return varint(len(body)) + bytes(body)


def packet(ptype, flags, body):
    return bytes([ptype << 4 | flags]) + varint(len(body)) + body


def connect(client_id, version=V311, keepalive=60, clean=True, will=None,
            props=None, username=None, password=None):
    """will: dict(topic, payload, qos=0, retain=False, props=None)."""
    flags = 0x02 if clean else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    if will:
        flags |= 0x04 | will.get("qos", 0) << 3 | (0x20 if will.get("retain") else 0)
    body = mqtt_str("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == V5:
        body += properties(props)
    body += mqtt_str(client_id)
    if will:
        if version == V5:
            body += properties(will.get("props"))
        body += mqtt_str(will["topic"]) + mqtt_str(will["payload"])
    if username is not None:
        body += mqtt_str(username)
    if password is not None:
        body += mqtt_str(password)
    return packet(CONNECT, 0, body)


def publish(topic, payload=b"", qos=0, retain=False, packet_id=1, version=V311,
            props=None, dup=False):
    payload = payload.encode() if isinstance(payload, str) else payload
    body = mqtt_str(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if version == V5:
        body += properties(props)
    flags = qos << 1 | (1 if retain else 0) | (8 if dup else 0)
    return packet(PUBLISH, flags, body + payload)


def ack(ptype, packet_id, version=V311, reason=0):
    body = struct.pack("!H", packet_id)
    if version == V5 and reason:
        body += bytes([reason])
    return packet(ptype, 2 if ptype == PUBREL else 0, body)


def subscribe(packet_id, filters, version=V311, props=None):
    """filters: [(filter, options byte)]; options is the QoS for 3.1.1."""
    body = struct.pack("!H", packet_id)
    if version == V5:
        body += properties(props)
    for f, opts in filters:
        body += mqtt_str(f) + bytes([opts])
    return packet(SUBSCRIBE, 2, body)


def disconnect(version=V311, reason=0, props=None):
    if version == V5 and (reason or props):
        return packet(DISCONNECT, 0, bytes([reason]) + properties(props))
    return packet(DISCONNECT, 0, b"")


def pingreq():
    return packet(PINGREQ, 0, b"")


# -- decoding --------------------------------------------------------------

@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    version: int = V311
    fields: dict = field(default_factory=dict)

    @property
    def props(self):
        return self.fields.get("props", {})


def _read_varint(buf, pos):
    mult, value = 1, 0
    while True:
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos
        mult *= 128


def _read_str(buf, pos):
    (n,) = struct.unpack_from("!H", buf, pos)
    return buf[pos + 2:pos + 2 + n], pos + 2 + n


def decode_properties(buf, pos):
    length, pos = _read_varint(buf, pos)
    end, props = pos + length, {}
    while pos < end:
        pid = buf[pos]
        pos += 1
        name, kind = PROPS[pid]
        if kind == "byte":
            v, pos = buf[pos], pos + 1
        elif kind == "u16":
            (v,), pos = struct.unpack_from("!H", buf, pos), pos + 2
        elif kind == "u32":
            (v,), pos = struct.unpack_from("!I", buf, pos), pos + 4
        elif kind == "varint":
            v, pos = _read_varint(buf, pos)
        elif kind == "str":
            v, pos = _read_str(buf, pos)
            v = v.decode()
        elif kind == "bin":
            v, pos = _read_str(buf, pos)
        else:
            k, pos = _read_str(buf, pos)
            v, pos = _read_str(buf, pos)
            props.setdefault(name, []).append((k.decode(), v.decode()))
            continue
        props[name] = v
    return props, end


def decode(ptype, flags, body, version):
    p = Packet(ptype, flags, body, version)
    f = p.fields
    if ptype == CONNACK:
        f["session_present"] = bool(body[0] & 1)
        f["reason"] = body[1]
        if version == V5 and len(body) > 2:
            f["props"], _ = decode_properties(body, 2)
    elif ptype == PUBLISH:
        f["qos"], f["retain"], f["dup"] = flags >> 1 & 3, bool(flags & 1), bool(flags & 8)
        topic, pos = _read_str(body, 0)
        f["topic"] = topic.decode()
        if f["qos"]:
            (f["packet_id"],), pos = struct.unpack_from("!H", body, pos), pos + 2
        if version == V5:
            f["props"], pos = decode_properties(body, pos)
        f["payload"] = body[pos:]
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK):
        (f["packet_id"],) = struct.unpack_from("!H", body, 0)
        f["reason"] = body[2] if len(body) > 2 else 0
    elif ptype == SUBACK:
        (f["packet_id"],) = struct.unpack_from("!H", body, 0)
        pos = 2
        if version == V5:
            f["props"], pos = decode_properties(body, pos)
        f["codes"] = list(body[pos:])
    elif ptype == DISCONNECT:
        f["reason"] = body[0] if body else 0
        if version == V5 and len(body) > 1:
            f["props"], _ = decode_properties(body, 1)
    return p


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """One TCP connection speaking hand-made packets."""

    def __init__(self, port, version=V311, host="127.0.0.1", timeout=10.0):
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no packet from the server in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                raise TimeoutError("no packet from the server in time")
            if not chunk:
                raise Closed()
            self.buf += chunk

    def recv(self, timeout=10.0):
        """The next packet; raises Closed when the server closed the socket."""
        deadline = time.monotonic() + timeout
        self._fill(2, deadline)
        pos, mult, length = 1, 1, 0
        while True:
            self._fill(pos + 1, deadline)
            b = self.buf[pos]
            pos += 1
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        self._fill(pos + length, deadline)
        first, body = self.buf[0], self.buf[pos:pos + length]
        self.buf = self.buf[pos + length:]
        return decode(first >> 4, first & 0x0F, body, self.version)

    def expect(self, ptype, timeout=10.0):
        """The next packet of type `ptype`, skipping PINGRESPs."""
        while True:
            p = self.recv(timeout)
            if p.type == ptype:
                return p
            if p.type != PINGRESP:
                raise AssertionError(f"expected packet type {ptype}, got {p.type} {p.fields}")

    def recv_until_closed(self, timeout=10.0):
        """Every packet until the server closes the connection."""
        got = []
        try:
            while True:
                got.append(self.recv(timeout))
        except Closed:
            return got

    def connect(self, client_id, **kw):
        """Sends CONNECT and returns the CONNACK packet."""
        self.send(connect(client_id, version=self.version, **kw))
        return self.expect(CONNACK)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
