//! MQTT 3.1.1 and 5.0 packets as the server sees them: the packets a client
//! sends are read (`read`), the packets a server sends are written
//! (`write`). Pure: bytes in, values out; every length is checked, so any
//! input gives a packet or an error naming what is wrong, never a panic
//! (proptested in `tests.rs`).

mod props;
mod read;
mod write;

pub use props::Properties;
pub use read::{Error, frame, read, read_connect};
pub use write::{
    publish_len, write_ack, write_connack, write_disconnect, write_pingresp, write_publish,
    write_suback, write_unsuback,
};

use bytes::{Bytes, BytesMut};

/// A PUBLISH's properties as a property block (its length first), as
/// the journal keeps a retained message's.
pub fn write_publish_props(props: &Properties, out: &mut BytesMut) {
    props.write(out);
}

/// Reads what [`write_publish_props`] wrote at the start of `bytes`; the
/// properties and the bytes after them.
pub fn read_publish_props(bytes: Bytes) -> Result<(Properties, Bytes), Error> {
    let mut c = read::Cursor::over(bytes);
    let props = Properties::read(&mut c, props::Allowed::Publish)?;
    Ok((props, c.rest()))
}

/// The protocol level a client spoke in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    /// Clean Session (3.1.1) or Clean Start (5).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub props: Properties,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

/// A CONNECT's will message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Will properties (5): delay, expiry, content type, response topic...
    pub props: Properties,
}

/// A PUBLISH, either way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty in an MQTT 5 PUBLISH that names its topic by alias only.
    pub topic: String,
    /// 0 at QoS 0.
    pub pkid: u16,
    pub payload: Bytes,
    pub props: Properties,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubRel,
    PubComp,
}

/// One subscription of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only for a new
    /// subscription; 2: never.
    pub retain_handling: u8,
}

/// A packet a client sends after its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Publish(Publish),
    Ack {
        kind: AckKind,
        pkid: u16,
        reason: u8,
    },
    Subscribe {
        pkid: u16,
        /// Subscription Identifier (5).
        id: Option<u32>,
        subscriptions: Vec<Subscription>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        props: Properties,
    },
    /// AUTH (5): homicro offers no extended authentication.
    Auth,
    /// A second CONNECT on one connection (a protocol error).
    Connect,
}

/// MQTT 5 reason codes the server sends.
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
}

/// Whether `topic` is a valid topic name for a PUBLISH: no wildcards.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

/// Whether `filter` is a valid topic filter: `#` only as the whole last
/// level, `+` only as a whole level; `$share/GROUP/filter` with a valid
/// group and filter.
pub fn valid_filter(filter: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) => f,
            _ => return false,
        },
        None => filter,
    };
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// The filter a `$share/GROUP/filter` subscription matches with.
pub fn match_part(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

/// Whether `topic` matches `filter` (MQTT 4.7; topics starting with `$`
/// are not matched by a leading wildcard).
pub fn matches(topic: &str, filter: &str) -> bool {
    let filter = match_part(filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests;
