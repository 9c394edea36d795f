//! MQTT 3.1.1 and 5 packet framing, and the few packets the front reads and
//! rewrites: CONNECT (client id, keepalive, will), PUBLISH (v5 properties,
//! registry records without `host`) and SUBSCRIBE (QoS of registry
//! filters). Pure: bytes in, bytes out; every length is checked, so random
//! bytes give an error, never a panic (see the proptests below).

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

/// Why a packet could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("malformed remaining length")]
    Length,
    #[error("packet ends early in {0}")]
    Short(&'static str),
    #[error("{0}")]
    Bad(&'static str),
}

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const SUBSCRIBE: u8 = 8;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// One complete packet at the start of a buffer: its first byte, where its
/// body starts and its total length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub first: u8,
    pub header_len: usize,
    pub len: usize,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }
}

/// Finds the packet at the start of `buf`: `Ok(None)` until it is complete.
/// `max` bounds the remaining length.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<Frame>, Malformed> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(Malformed::Bad("packet larger than the maximum"));
            }
            let header_len = 2 + i;
            if buf.len() < header_len + len {
                return Ok(None);
            }
            return Ok(Some(Frame {
                first,
                header_len,
                len: header_len + len,
            }));
        }
    }
    Err(Malformed::Length)
}

/// Appends a fixed header for a body of `len` bytes.
fn put_header(out: &mut BytesMut, first: u8, len: usize) {
    out.put_u8(first);
    put_varint(out, len);
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if n == 0 {
            return;
        }
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A cursor over a packet body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed::Short(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn binary(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.binary(what)?).map_err(|_| Malformed::Bad("string is not UTF-8"))
    }

    fn varint(&mut self, what: &'static str) -> Result<usize, Malformed> {
        let mut n = 0usize;
        for i in 0..4 {
            let b = self.u8(what)?;
            n |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(Malformed::Length)
    }

    /// MQTT 5 properties: the raw property bytes, after checking that each
    /// property is known and complete.
    fn properties(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.varint(what)?;
        let raw = self.take(n, what)?;
        for p in Properties(Reader { buf: raw }) {
            p?;
        }
        Ok(raw)
    }
}

/// MQTT 5 properties, one `(id, value bytes)` at a time.
struct Properties<'a>(Reader<'a>);

impl<'a> Iterator for Properties<'a> {
    type Item = Result<(u8, &'a [u8]), Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.buf.is_empty() {
            return None;
        }
        Some(self.property())
    }
}

impl<'a> Properties<'a> {
    fn property(&mut self) -> Result<(u8, &'a [u8]), Malformed> {
        let r = &mut self.0;
        let id = r.u8("property")?;
        let start = r.buf;
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                r.take(1, "property")?;
            }
            0x13 | 0x21 | 0x22 | 0x23 => {
                r.take(2, "property")?;
            }
            0x02 | 0x11 | 0x18 | 0x27 => {
                r.take(4, "property")?;
            }
            0x0B => {
                r.varint("property")?;
            }
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                r.string("property")?;
            }
            0x09 | 0x16 => {
                r.binary("property")?;
            }
            0x26 => {
                r.string("property")?;
                r.string("property")?;
            }
            _ => return Err(Malformed::Bad("unknown property")),
        }
        let used = start.len() - r.buf.len();
        Ok((id, &start[..used]))
    }
}

/// A will message, kept by the front instead of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// A CONNECT packet, as much of it as the front needs to rewrite it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// 4 (MQTT 3.1.1) or 5.
    pub level: u8,
    /// The flags byte without the will bits.
    flags: u8,
    pub keep_alive: u16,
    /// v5 CONNECT properties, raw.
    properties: Bytes,
    pub client_id: String,
    pub will: Option<Will>,
    /// Username and password, raw, as they follow the will.
    credentials: Bytes,
}

impl Connect {
    pub fn v5(&self) -> bool {
        self.level == 5
    }

    pub fn clean_start(&self) -> bool {
        self.flags & 0x02 != 0
    }

    /// Whether the broker keeps the session after the connection ends: no
    /// clean session (v4), or a v5 session expiry interval above 0.
    pub fn persistent(&self) -> bool {
        if !self.clean_start() {
            return true;
        }
        self.v5()
            && Properties(Reader {
                buf: &self.properties,
            })
            .filter_map(Result::ok)
            .any(|(id, v)| id == 0x11 && v != [0, 0, 0, 0])
    }
}

/// Reads a CONNECT packet (`packet` is the whole frame).
pub fn parse_connect(packet: &[u8], f: Frame) -> Result<Connect, Malformed> {
    if f.first != 0x10 {
        return Err(Malformed::Bad("first packet is not CONNECT"));
    }
    let mut r = Reader {
        buf: &packet[f.header_len..f.len],
    };
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    match (name, level) {
        (b"MQTT", 4 | 5) => {}
        (b"MQTT" | b"MQIsdp", _) => return Err(Malformed::Bad("unsupported protocol level")),
        _ => return Err(Malformed::Bad("not the MQTT protocol")),
    }
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(Malformed::Bad("reserved connect flag set"));
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if level == 5 {
        Bytes::copy_from_slice(r.properties("connect properties")?)
    } else {
        Bytes::new()
    };
    let client_id = r.string("client id")?.to_string();
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let will = if will_flag {
        if will_qos > 2 {
            return Err(Malformed::Bad("will QoS 3"));
        }
        if level == 5 {
            // Will properties (delay, expiry, content type…) are dropped:
            // the front publishes the will itself, at once.
            r.properties("will properties")?;
        }
        let topic = r.string("will topic")?.to_string();
        let payload = Bytes::copy_from_slice(r.binary("will payload")?);
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else if will_qos != 0 || will_retain {
        return Err(Malformed::Bad("will QoS or retain without a will"));
    } else {
        None
    };
    let credentials = r.buf;
    let mut c = Reader { buf: credentials };
    if flags & 0x80 != 0 {
        c.string("username")?;
    }
    if flags & 0x40 != 0 {
        c.binary("password")?;
    }
    if !c.buf.is_empty() {
        return Err(Malformed::Bad("bytes after the CONNECT payload"));
    }
    Ok(Connect {
        level,
        flags: flags & !0x3c,
        keep_alive,
        properties,
        client_id,
        will,
        credentials: Bytes::copy_from_slice(credentials),
    })
}

/// Writes `c` as the broker should see it: without the will, with
/// `client_id` and `keep_alive` as given.
pub fn encode_connect(c: &Connect, client_id: &str, keep_alive: u16) -> BytesMut {
    let props = if c.v5() {
        varint_len(c.properties.len()) + c.properties.len()
    } else {
        0
    };
    let len = 6 + 1 + 1 + 2 + props + 2 + client_id.len() + c.credentials.len();
    let mut out = BytesMut::with_capacity(len + 5);
    put_header(&mut out, 0x10, len);
    out.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', c.level, c.flags]);
    out.put_u16(keep_alive);
    if c.v5() {
        put_varint(&mut out, c.properties.len());
        out.put_slice(&c.properties);
    }
    out.put_u16(client_id.len() as u16);
    out.put_slice(client_id.as_bytes());
    out.put_slice(&c.credentials);
    out
}

/// A plain MQTT 3.1.1 clean-session CONNECT, for the front's own one-off
/// connections.
pub fn clean_connect_v4(client_id: &str, keep_alive: u16) -> BytesMut {
    let c = Connect {
        level: 4,
        flags: 0x02,
        keep_alive,
        properties: Bytes::new(),
        client_id: client_id.to_string(),
        will: None,
        credentials: Bytes::new(),
    };
    encode_connect(&c, client_id, keep_alive)
}

/// A client id the broker accepts, one-to-one with the client's own:
/// rumqttd refuses `/ + # $` (and the front adds none of its own ids'
/// prefix), so those and `%` are percent-escaped.
pub fn broker_client_id(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.contains(['/', '+', '#', '$', '%']) {
        return id.into();
    }
    let mut out = String::with_capacity(id.len() + 8);
    for ch in id.chars() {
        match ch {
            '/' | '+' | '#' | '$' | '%' => {
                let _ = write!(out, "%{:02X}", ch as u32);
            }
            c => out.push(c),
        }
    }
    out.into()
}

/// A CONNACK refusing the connection: v4 return code 1 (unacceptable
/// protocol level) or the v5 reason code given.
pub fn connack_refusal(v5: bool, v4_code: u8, v5_reason: u8) -> Vec<u8> {
    if v5 {
        vec![0x20, 3, 0, v5_reason, 0]
    } else {
        vec![0x20, 2, 0, v4_code]
    }
}

/// A PUBLISH, borrowed from its packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    pub first: u8,
    pub topic: &'a str,
    pub pkid: Option<u16>,
    /// v5 properties (raw), empty for v4.
    pub properties: &'a [u8],
    pub payload: &'a [u8],
}

impl Publish<'_> {
    pub fn qos(&self) -> u8 {
        (self.first >> 1) & 0x03
    }

    pub fn retain(&self) -> bool {
        self.first & 0x01 != 0
    }

    /// The v5 topic alias, if the publish carries one.
    pub fn topic_alias(&self) -> Option<u16> {
        Properties(Reader {
            buf: self.properties,
        })
        .filter_map(Result::ok)
        .find(|(id, _)| *id == 0x23)
        .map(|(_, v)| u16::from_be_bytes([v[0], v[1]]))
    }
}

pub fn parse_publish(packet: &[u8], f: Frame, v5: bool) -> Result<Publish<'_>, Malformed> {
    let mut r = Reader {
        buf: &packet[f.header_len..f.len],
    };
    let qos = (f.first >> 1) & 0x03;
    if qos == 3 {
        return Err(Malformed::Bad("PUBLISH with QoS 3"));
    }
    let topic = r.string("topic")?;
    let pkid = if qos > 0 {
        Some(r.u16("packet id")?)
    } else {
        None
    };
    let properties = if v5 { r.properties("properties")? } else { &[] };
    Ok(Publish {
        first: f.first,
        topic,
        pkid,
        properties,
        payload: r.buf,
    })
}

/// Writes a PUBLISH with `topic` and `payload` and no properties.
pub fn encode_publish(out: &mut BytesMut, p: &Publish, topic: &str, payload: &[u8], v5: bool) {
    let len = 2 + topic.len() + p.pkid.map_or(0, |_| 2) + usize::from(v5) + payload.len();
    put_header(out, p.first, len);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if let Some(id) = p.pkid {
        out.put_u16(id);
    }
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// A will as a PUBLISH packet (no packet id needed at QoS 0).
pub fn will_publish(w: &Will, v5: bool) -> BytesMut {
    let mut out = BytesMut::new();
    let p = Publish {
        first: 0x30 | u8::from(w.retain),
        topic: &w.topic,
        pkid: None,
        properties: &[],
        payload: &w.payload,
    };
    encode_publish(&mut out, &p, &w.topic, &w.payload, v5);
    out
}

/// Rewrites a SUBSCRIBE in place: every filter for which `downgrade` holds
/// asks for QoS 0 (rumqttd then grants 0 in its SUBACK). Returns how many
/// were changed.
pub fn downgrade_subscribe(
    packet: &mut [u8],
    f: Frame,
    v5: bool,
    downgrade: impl Fn(&str) -> bool,
) -> Result<usize, Malformed> {
    if f.first != 0x82 {
        return Err(Malformed::Bad("SUBSCRIBE with bad flags"));
    }
    let mut options = Vec::new();
    {
        let body = &packet[f.header_len..f.len];
        let mut r = Reader { buf: body };
        r.u16("packet id")?;
        if v5 {
            r.properties("subscribe properties")?;
        }
        if r.buf.is_empty() {
            return Err(Malformed::Bad("SUBSCRIBE without a filter"));
        }
        while !r.buf.is_empty() {
            let filter = r.string("filter")?;
            let at = f.header_len + (body.len() - r.buf.len());
            let o = r.u8("subscription options")?;
            if o & 0x03 == 3 {
                return Err(Malformed::Bad("subscription with QoS 3"));
            }
            if o & 0x03 != 0 && downgrade(filter) {
                options.push(at);
            }
        }
    }
    for &at in &options {
        packet[at] &= !0x03;
    }
    Ok(options.len())
}

/// Whether `filter` can match a topic under `prefix` (so subscribers of it
/// get registry records).
pub fn filter_reaches(filter: &str, prefix: &str) -> bool {
    let mut f = filter.split('/');
    for level in prefix.split('/') {
        match f.next() {
            // Prefixes never start with `$`, so `#` reaches them.
            Some("#") => return true,
            Some("+") => {}
            Some(l) if l == level => {}
            _ => return false,
        }
    }
    // The prefix matched; something below it must be allowed too.
    f.next().is_some()
}

/// A record or heartbeat JSON object without `host`, completed with `host`
/// (the publisher's address). `None`: leave the payload as it is (not a
/// JSON object, or it has a `host`). Only the top-level keys are read:
/// values are skipped without being built.
pub fn with_host(payload: &[u8], host: &str) -> Option<Vec<u8>> {
    let keys: TopKeys = serde_json::from_slice(payload).ok()?;
    if keys.has_host {
        return None;
    }
    let at = payload.iter().position(|b| *b == b'{')?;
    let field = serde_json::to_string(host).ok()?;
    let mut out = Vec::with_capacity(payload.len() + field.len() + 10);
    out.extend_from_slice(&payload[..=at]);
    out.extend_from_slice(b"\"host\":");
    out.extend_from_slice(field.as_bytes());
    if keys.count > 0 {
        out.push(b',');
    }
    out.extend_from_slice(&payload[at + 1..]);
    Some(out)
}

/// What `with_host` needs of a JSON object: its number of keys and whether
/// one is `host`.
struct TopKeys {
    count: usize,
    has_host: bool,
}

impl<'de> serde::Deserialize<'de> for TopKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = TopKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<TopKeys, A::Error> {
                let mut keys = TopKeys {
                    count: 0,
                    has_host: false,
                };
                while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    keys.count += 1;
                    keys.has_host |= k == "host";
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(keys)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The v5 DISCONNECT reason code (0 when absent or v4).
pub fn disconnect_reason(packet: &[u8], f: Frame) -> u8 {
    packet
        .get(f.header_len)
        .copied()
        .filter(|_| f.len > f.header_len)
        .unwrap_or(0)
}

/// A PINGREQ.
pub const PING: [u8; 2] = [0xC0, 0];

#[cfg(test)]
mod tests;
