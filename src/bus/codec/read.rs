//! Reading the packets a client sends.

use bytes::Bytes;

use super::props::Allowed;
use super::{AckKind, Connect, Packet, Properties, Publish, Subscription, Version, Will, reason};

/// Why a packet could not be read. Each maps to the MQTT 5 reason code
/// the server closes with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a well-formed packet (0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed, but against the protocol (0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// Larger than the server accepts (0x95).
    #[error("packet of {0} bytes is larger than the maximum")]
    TooLarge(usize),
    /// A CONNECT with a protocol name or level the server does not speak.
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
    /// A topic name with wildcards, or empty without an alias (0x90).
    #[error("invalid topic name")]
    TopicName,
}

impl Error {
    /// The MQTT 5 reason code for a DISCONNECT or CONNACK.
    pub fn reason(&self) -> u8 {
        match self {
            Error::Malformed(_) => reason::MALFORMED,
            Error::Protocol(_) => reason::PROTOCOL_ERROR,
            Error::TooLarge(_) => reason::PACKET_TOO_LARGE,
            Error::UnsupportedVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            Error::TopicName => reason::TOPIC_NAME_INVALID,
        }
    }
}

/// Where the complete packet at the start of `buf` ends: `Ok(None)` until
/// it is all there. A packet longer than `max` bytes is an error as soon
/// as its length is known.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<usize>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + len;
            if total > max {
                return Err(Error::TooLarge(total));
            }
            return Ok((buf.len() >= total).then_some(total));
        }
    }
    Err(Error::Malformed("remaining length longer than 4 bytes"))
}

/// A bounds-checked reader over one packet.
pub(super) struct Cursor {
    buf: Bytes,
}

impl Cursor {
    pub(super) fn over(buf: Bytes) -> Cursor {
        Cursor { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, Error> {
        if self.buf.len() < n {
            return Err(Error::Malformed(what));
        }
        Ok(self.buf.split_to(n))
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn bool_byte(&mut self, what: &'static str) -> Result<u8, Error> {
        let v = self.u8(what)?;
        if v > 1 {
            return Err(Error::Protocol("a 0-or-1 property above 1"));
        }
        Ok(v)
    }

    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn varint(&mut self, what: &'static str) -> Result<usize, Error> {
        let mut n = 0usize;
        for i in 0..4 {
            let b = self.u8(what)?;
            n |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(Error::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    pub(super) fn binary(&mut self, what: &'static str) -> Result<Bytes, Error> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }

    /// A UTF-8 string without U+0000 (MQTT 1.5.4).
    pub(super) fn string(&mut self, what: &'static str) -> Result<String, Error> {
        let b = self.binary(what)?;
        let s = std::str::from_utf8(&b).map_err(|_| Error::Malformed("string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(Error::Malformed("string contains U+0000"));
        }
        Ok(s.to_string())
    }

    pub(super) fn sub(&mut self, n: usize, what: &'static str) -> Result<Cursor, Error> {
        Ok(Cursor {
            buf: self.take(n, what)?,
        })
    }

    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

/// Splits one framed packet into its first byte and a cursor on its body.
fn open(packet: Bytes) -> Result<(u8, Cursor), Error> {
    let mut c = Cursor { buf: packet };
    let first = c.u8("fixed header")?;
    let len = c.varint("remaining length")?;
    if c.buf.len() != len {
        return Err(Error::Malformed("remaining length does not match"));
    }
    Ok((first, c))
}

/// Reads a CONNECT (one framed packet, see [`frame`]).
pub fn read_connect(packet: Bytes) -> Result<Connect, Error> {
    let (first, mut c) = open(packet)?;
    if first != 0x10 {
        return Err(Error::Protocol("the first packet must be CONNECT"));
    }
    let name = c.binary("protocol name")?;
    let level = c.u8("protocol level")?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => Version::V4,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(Error::UnsupportedVersion(l)),
        _ => return Err(Error::Protocol("unknown protocol name")),
    };
    let flags = c.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(Error::Malformed("reserved connect flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let has_will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(Error::Malformed("will QoS 3"));
    }
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(Error::Malformed("will QoS or retain without a will"));
    }
    if version == Version::V4 && has_password && !has_username {
        return Err(Error::Protocol("password without user name"));
    }
    let keep_alive = c.u16("keep alive")?;
    let props = match version {
        Version::V5 => Properties::read(&mut c, Allowed::Connect)?,
        Version::V4 => Properties::default(),
    };
    let client_id = c.string("client id")?;
    let will = if has_will {
        let props = match version {
            Version::V5 => Properties::read(&mut c, Allowed::Will)?,
            Version::V4 => Properties::default(),
        };
        let topic = c.string("will topic")?;
        if !super::valid_topic(&topic) {
            return Err(Error::TopicName);
        }
        let payload = c.binary("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            props,
        })
    } else {
        None
    };
    let username = has_username.then(|| c.string("user name")).transpose()?;
    let password = has_password.then(|| c.binary("password")).transpose()?;
    if !c.is_empty() {
        return Err(Error::Malformed("bytes after the CONNECT payload"));
    }
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        client_id,
        props,
        will,
        username,
        password,
    })
}

/// Reads one framed packet a client sends after its CONNECT.
pub fn read(packet: Bytes, version: Version) -> Result<Packet, Error> {
    let v5 = version == Version::V5;
    let (first, mut c) = open(packet)?;
    let flags = first & 0x0F;
    let fixed_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(Error::Malformed("reserved fixed header flags"))
        }
    };
    let packet = match first >> 4 {
        1 => Packet::Connect,
        3 => Packet::Publish(read_publish(flags, &mut c, v5)?),
        kind @ (4..=7) => {
            let kind = match kind {
                4 => AckKind::PubAck,
                5 => AckKind::PubRec,
                6 => AckKind::PubRel,
                _ => AckKind::PubComp,
            };
            fixed_flags(if kind == AckKind::PubRel { 0x02 } else { 0 })?;
            let pkid = c.u16("packet identifier")?;
            let mut reason = 0;
            if v5 && !c.is_empty() {
                reason = c.u8("reason code")?;
                if !c.is_empty() {
                    Properties::read(&mut c, Allowed::Ack)?;
                }
            }
            Packet::Ack { kind, pkid, reason }
        }
        8 => {
            fixed_flags(0x02)?;
            let pkid = nonzero(c.u16("packet identifier")?)?;
            let props = if v5 {
                Properties::read(&mut c, Allowed::Subscribe)?
            } else {
                Properties::default()
            };
            if props.subscription_ids.len() > 1 {
                return Err(Error::Protocol("more than one subscription identifier"));
            }
            let mut subscriptions = Vec::new();
            while !c.is_empty() {
                let filter = c.string("topic filter")?;
                let options = c.u8("subscription options")?;
                let reserved = if v5 { 0xC0 } else { 0xFC };
                if options & reserved != 0 {
                    return Err(Error::Malformed("reserved subscription option bits"));
                }
                let qos = options & 0x03;
                let retain_handling = (options >> 4) & 0x03;
                if qos == 3 || retain_handling == 3 {
                    return Err(Error::Malformed("QoS or retain handling 3"));
                }
                subscriptions.push(Subscription {
                    filter,
                    qos,
                    no_local: options & 0x04 != 0,
                    retain_as_published: options & 0x08 != 0,
                    retain_handling,
                });
            }
            if subscriptions.is_empty() {
                return Err(Error::Protocol("SUBSCRIBE without a subscription"));
            }
            Packet::Subscribe {
                pkid,
                id: props.subscription_ids.first().copied(),
                subscriptions,
            }
        }
        10 => {
            fixed_flags(0x02)?;
            let pkid = nonzero(c.u16("packet identifier")?)?;
            if v5 {
                Properties::read(&mut c, Allowed::Unsubscribe)?;
            }
            let mut filters = Vec::new();
            while !c.is_empty() {
                filters.push(c.string("topic filter")?);
            }
            if filters.is_empty() {
                return Err(Error::Protocol("UNSUBSCRIBE without a filter"));
            }
            Packet::Unsubscribe { pkid, filters }
        }
        12 => {
            fixed_flags(0)?;
            if !c.is_empty() {
                return Err(Error::Malformed("PINGREQ with a body"));
            }
            Packet::PingReq
        }
        14 => {
            fixed_flags(0)?;
            let mut reason = 0;
            let mut props = Properties::default();
            if v5 && !c.is_empty() {
                reason = c.u8("reason code")?;
                if !c.is_empty() {
                    props = Properties::read(&mut c, Allowed::Disconnect)?;
                }
            }
            if !c.is_empty() {
                return Err(Error::Malformed("bytes after DISCONNECT"));
            }
            Packet::Disconnect { reason, props }
        }
        15 if v5 => {
            fixed_flags(0)?;
            if !c.is_empty() {
                c.u8("reason code")?;
                if !c.is_empty() {
                    Properties::read(&mut c, Allowed::Auth)?;
                }
            }
            Packet::Auth
        }
        _ => return Err(Error::Protocol("a packet type a client may not send")),
    };
    Ok(packet)
}

fn nonzero(pkid: u16) -> Result<u16, Error> {
    if pkid == 0 {
        return Err(Error::Protocol("packet identifier 0"));
    }
    Ok(pkid)
}

fn read_publish(flags: u8, c: &mut Cursor, v5: bool) -> Result<Publish, Error> {
    let dup = flags & 0x08 != 0;
    let qos = (flags >> 1) & 0x03;
    let retain = flags & 0x01 != 0;
    if qos == 3 {
        return Err(Error::Malformed("PUBLISH QoS 3"));
    }
    if qos == 0 && dup {
        return Err(Error::Malformed("DUP set at QoS 0"));
    }
    let topic = c.string("topic name")?;
    if topic.contains(['+', '#']) {
        return Err(Error::TopicName);
    }
    let pkid = if qos > 0 {
        nonzero(c.u16("packet identifier")?)?
    } else {
        0
    };
    let props = if v5 {
        let p = Properties::read(c, Allowed::Publish)?;
        if !p.subscription_ids.is_empty() {
            return Err(Error::Protocol("a client's PUBLISH with a subscription id"));
        }
        p
    } else {
        Properties::default()
    };
    if topic.is_empty() && props.topic_alias.is_none() {
        return Err(Error::TopicName);
    }
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        payload: c.rest(),
        props,
    })
}
