//! MQTT 5 properties (section 2.2.2): one struct for every packet; which
//! identifiers a packet may carry is checked when it is read.

use bytes::{BufMut, Bytes, BytesMut};

use super::read::{Cursor, Error};

/// Every MQTT 5 property; `None`/empty where absent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_ids: Vec<u32>,
    pub session_expiry: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
    pub request_problem_info: Option<u8>,
    pub will_delay: Option<u32>,
    pub request_response_info: Option<u8>,
    pub response_info: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_max: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user: Vec<(String, String)>,
    pub max_packet_size: Option<u32>,
    pub wildcard_sub_available: Option<u8>,
    pub sub_id_available: Option<u8>,
    pub shared_sub_available: Option<u8>,
}

/// Which properties a packet may carry (MQTT 5, table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Allowed {
    Connect,
    Will,
    Publish,
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

impl Allowed {
    fn permits(self, id: u8) -> bool {
        let ids: &[u8] = match self {
            Allowed::Connect => &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27],
            Allowed::Will => &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26],
            Allowed::Publish => &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26],
            Allowed::Ack | Allowed::Unsubscribe => &[0x1F, 0x26],
            Allowed::Subscribe => &[0x0B, 0x26],
            Allowed::Disconnect => &[0x11, 0x1C, 0x1F, 0x26],
            Allowed::Auth => &[0x15, 0x16, 0x1F, 0x26],
        };
        ids.contains(&id)
    }
}

impl Properties {
    /// Reads a property block (its length first) for a packet of `kind`.
    pub(super) fn read(c: &mut Cursor, kind: Allowed) -> Result<Properties, Error> {
        let len = c.varint("property length")?;
        let mut block = c.sub(len, "properties")?;
        let mut p = Properties::default();
        while !block.is_empty() {
            let id = block.varint("property identifier")?;
            let id = u8::try_from(id).map_err(|_| Error::Malformed("unknown property"))?;
            if !kind.permits(id) {
                return Err(Error::Malformed("property not allowed in this packet"));
            }
            p.read_one(id, &mut block)?;
        }
        Ok(p)
    }

    fn read_one(&mut self, id: u8, c: &mut Cursor) -> Result<(), Error> {
        fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), Error> {
            if slot.is_some() {
                return Err(Error::Protocol("a property appears twice"));
            }
            *slot = Some(v);
            Ok(())
        }
        match id {
            0x01 => {
                let v = c.u8("payload format")?;
                if v > 1 {
                    return Err(Error::Protocol("payload format indicator above 1"));
                }
                once(&mut self.payload_format, v)
            }
            0x02 => once(&mut self.message_expiry, c.u32("message expiry")?),
            0x03 => once(&mut self.content_type, c.string("content type")?),
            0x08 => {
                let t = c.string("response topic")?;
                if !super::valid_topic(&t) {
                    return Err(Error::Protocol("response topic has wildcards"));
                }
                once(&mut self.response_topic, t)
            }
            0x09 => once(&mut self.correlation_data, c.binary("correlation data")?),
            0x0B => {
                let v = c.varint("subscription identifier")?;
                if v == 0 {
                    return Err(Error::Protocol("subscription identifier 0"));
                }
                self.subscription_ids.push(v as u32);
                Ok(())
            }
            0x11 => once(&mut self.session_expiry, c.u32("session expiry")?),
            0x12 => once(&mut self.assigned_client_id, c.string("client id")?),
            0x13 => once(&mut self.server_keep_alive, c.u16("server keep alive")?),
            0x15 => once(&mut self.auth_method, c.string("authentication method")?),
            0x16 => once(&mut self.auth_data, c.binary("authentication data")?),
            0x17 => once(
                &mut self.request_problem_info,
                c.bool_byte("request problem")?,
            ),
            0x18 => once(&mut self.will_delay, c.u32("will delay")?),
            0x19 => once(
                &mut self.request_response_info,
                c.bool_byte("request response")?,
            ),
            0x1A => once(&mut self.response_info, c.string("response information")?),
            0x1C => once(&mut self.server_reference, c.string("server reference")?),
            0x1F => once(&mut self.reason_string, c.string("reason string")?),
            0x21 => {
                let v = c.u16("receive maximum")?;
                if v == 0 {
                    return Err(Error::Protocol("receive maximum 0"));
                }
                once(&mut self.receive_maximum, v)
            }
            0x22 => once(&mut self.topic_alias_max, c.u16("topic alias maximum")?),
            0x23 => once(&mut self.topic_alias, c.u16("topic alias")?),
            0x24 => once(&mut self.maximum_qos, c.u8("maximum qos")?),
            0x25 => once(&mut self.retain_available, c.u8("retain available")?),
            0x26 => {
                let k = c.string("user property")?;
                let v = c.string("user property")?;
                self.user.push((k, v));
                Ok(())
            }
            0x27 => {
                let v = c.u32("maximum packet size")?;
                if v == 0 {
                    return Err(Error::Protocol("maximum packet size 0"));
                }
                once(&mut self.max_packet_size, v)
            }
            0x28 => once(&mut self.wildcard_sub_available, c.u8("wildcard")?),
            0x29 => once(&mut self.sub_id_available, c.u8("subscription ids")?),
            0x2A => once(&mut self.shared_sub_available, c.u8("shared")?),
            _ => Err(Error::Malformed("unknown property")),
        }
    }

    /// Writes the property block, its length first.
    pub(super) fn write(&self, out: &mut BytesMut) {
        let mut b = BytesMut::new();
        self.write_body(&mut b);
        put_varint(out, b.len());
        out.extend_from_slice(&b);
    }

    /// The length of the block `write` writes, its length field included.
    pub(super) fn encoded_len(&self) -> usize {
        let mut b = BytesMut::new();
        self.write_body(&mut b);
        varint_len(b.len()) + b.len()
    }

    fn write_body(&self, b: &mut BytesMut) {
        let u8p = |b: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u8(v);
            }
        };
        let u16p = |b: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u16(v);
            }
        };
        let u32p = |b: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u32(v);
            }
        };
        let strp = |b: &mut BytesMut, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                b.put_u8(id);
                put_bytes(b, v.as_bytes());
            }
        };
        u8p(b, 0x01, self.payload_format);
        u32p(b, 0x02, self.message_expiry);
        strp(b, 0x03, &self.content_type);
        strp(b, 0x08, &self.response_topic);
        if let Some(v) = &self.correlation_data {
            b.put_u8(0x09);
            put_bytes(b, v);
        }
        for id in &self.subscription_ids {
            b.put_u8(0x0B);
            put_varint(b, *id as usize);
        }
        u32p(b, 0x11, self.session_expiry);
        strp(b, 0x12, &self.assigned_client_id);
        u16p(b, 0x13, self.server_keep_alive);
        strp(b, 0x15, &self.auth_method);
        if let Some(v) = &self.auth_data {
            b.put_u8(0x16);
            put_bytes(b, v);
        }
        u8p(b, 0x17, self.request_problem_info);
        u32p(b, 0x18, self.will_delay);
        u8p(b, 0x19, self.request_response_info);
        strp(b, 0x1A, &self.response_info);
        strp(b, 0x1C, &self.server_reference);
        strp(b, 0x1F, &self.reason_string);
        u16p(b, 0x21, self.receive_maximum);
        u16p(b, 0x22, self.topic_alias_max);
        u16p(b, 0x23, self.topic_alias);
        u8p(b, 0x24, self.maximum_qos);
        u8p(b, 0x25, self.retain_available);
        for (k, v) in &self.user {
            b.put_u8(0x26);
            put_bytes(b, k.as_bytes());
            put_bytes(b, v.as_bytes());
        }
        u32p(b, 0x27, self.max_packet_size);
        u8p(b, 0x28, self.wildcard_sub_available);
        u8p(b, 0x29, self.sub_id_available);
        u8p(b, 0x2A, self.shared_sub_available);
    }
}

pub(super) fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.extend_from_slice(b);
}

pub(super) fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

pub(super) fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}
