//! Writing the packets a server sends. Properties are written for MQTT 5
//! only; a 3.1.1 client gets the same packet without them.

use bytes::{BufMut, BytesMut};

use super::props::{put_bytes, put_varint, varint_len};
use super::{AckKind, Properties, Publish, Version};

fn header(out: &mut BytesMut, first: u8, remaining: usize) {
    out.put_u8(first);
    put_varint(out, remaining);
}

/// CONNACK: `code` is the 3.1.1 return code or the MQTT 5 reason code.
pub fn write_connack(
    out: &mut BytesMut,
    version: Version,
    session_present: bool,
    code: u8,
    props: &Properties,
) {
    match version {
        Version::V4 => {
            header(out, 0x20, 2);
            out.put_u8(session_present as u8);
            out.put_u8(code);
        }
        Version::V5 => {
            header(out, 0x20, 2 + props.encoded_len());
            out.put_u8(session_present as u8);
            out.put_u8(code);
            props.write(out);
        }
    }
}

/// The size of the PUBLISH `write_publish` would write.
pub fn publish_len(version: Version, p: &Publish) -> usize {
    let rem = publish_remaining(version, p);
    1 + varint_len(rem) + rem
}

fn publish_remaining(version: Version, p: &Publish) -> usize {
    let mut n = 2 + p.topic.len() + p.payload.len();
    if p.qos > 0 {
        n += 2;
    }
    if version == Version::V5 {
        n += p.props.encoded_len();
    }
    n
}

pub fn write_publish(out: &mut BytesMut, version: Version, p: &Publish) {
    let first = 0x30 | ((p.dup as u8) << 3) | (p.qos << 1) | p.retain as u8;
    header(out, first, publish_remaining(version, p));
    put_bytes(out, p.topic.as_bytes());
    if p.qos > 0 {
        out.put_u16(p.pkid);
    }
    if version == Version::V5 {
        p.props.write(out);
    }
    out.extend_from_slice(&p.payload);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP; the reason code (5) is left out when
/// it is 0, as the specification allows.
pub fn write_ack(out: &mut BytesMut, version: Version, kind: AckKind, pkid: u16, reason: u8) {
    let first = match kind {
        AckKind::PubAck => 0x40,
        AckKind::PubRec => 0x50,
        AckKind::PubRel => 0x62,
        AckKind::PubComp => 0x70,
    };
    if version == Version::V5 && reason != 0 {
        header(out, first, 3);
        out.put_u16(pkid);
        out.put_u8(reason);
    } else {
        header(out, first, 2);
        out.put_u16(pkid);
    }
}

/// SUBACK: one code per subscription (granted QoS, or a failure code:
/// 0x80 in 3.1.1, a reason code in 5).
pub fn write_suback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    let props = usize::from(version == Version::V5);
    header(out, 0x90, 2 + props + codes.len());
    out.put_u16(pkid);
    if props == 1 {
        out.put_u8(0);
    }
    out.extend_from_slice(codes);
}

/// UNSUBACK: in 5, one reason code per filter; in 3.1.1, none.
pub fn write_unsuback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    match version {
        Version::V4 => {
            header(out, 0xB0, 2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            header(out, 0xB0, 3 + codes.len());
            out.put_u16(pkid);
            out.put_u8(0);
            out.extend_from_slice(codes);
        }
    }
}

pub fn write_pingresp(out: &mut BytesMut) {
    out.extend_from_slice(&[0xD0, 0]);
}

/// A server's DISCONNECT (MQTT 5 only: a 3.1.1 server just closes).
pub fn write_disconnect(out: &mut BytesMut, reason: u8, props: &Properties) {
    let plen = props.encoded_len();
    if plen == 1 {
        header(out, 0xE0, 1);
        out.put_u8(reason);
    } else {
        header(out, 0xE0, 1 + plen);
        out.put_u8(reason);
        props.write(out);
    }
}
