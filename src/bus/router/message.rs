//! A message as the router holds it: published once, shared by the
//! retained store and every subscriber it goes to.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::bus::codec::{Properties, Publish};

/// A published message.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// The QoS it was published with (delivered at min(this, granted)).
    pub qos: u8,
    pub retain: bool,
    /// The publishing session (0: the server itself), for NoLocal.
    pub origin: u64,
    /// When it was published, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The message expiry interval it was published with.
    pub expiry: Option<u32>,
    /// The MQTT 5 properties that travel with it (payload format, content
    /// type, response topic, correlation data, user properties), when it
    /// has any.
    pub props: Option<Box<Properties>>,
}

impl Message {
    /// `p` as published by session `origin` (its topic alias resolved).
    pub fn new(p: &Publish, origin: u64) -> Message {
        let q = &p.props;
        let props = Properties {
            payload_format: q.payload_format,
            content_type: q.content_type.clone(),
            response_topic: q.response_topic.clone(),
            correlation_data: q.correlation_data.clone(),
            user: q.user.clone(),
            ..Properties::default()
        };
        Message {
            topic: p.topic.as_str().into(),
            // A copy: the payload is a slice of the publisher's read buffer,
            // which a retained or queued message would otherwise pin whole
            // (up to 32 KiB) for as long as it lives.
            payload: Bytes::copy_from_slice(&p.payload),
            qos: p.qos,
            retain: p.retain,
            origin,
            at_ms: now_ms(),
            expiry: q.message_expiry,
            props: (props != Properties::default()).then(|| Box::new(props)),
        }
    }

    /// The message as a PUBLISH to a subscriber, before the subscription
    /// decides its QoS, retain flag, expiry left and subscription ids.
    pub fn to_publish(&self) -> Publish {
        let mut props = self.props.as_deref().cloned().unwrap_or_default();
        props.message_expiry = self.expiry;
        Publish {
            dup: false,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic.to_string(),
            pkid: 0,
            payload: self.payload.clone(),
            props,
        }
    }

    /// The expiry interval left at `now_ms` (`None`: it has none).
    pub fn remaining_expiry(&self, now_ms: u64) -> Result<Option<u32>, Expired> {
        let Some(e) = self.expiry else {
            return Ok(None);
        };
        let age = now_ms.saturating_sub(self.at_ms) / 1000;
        match (e as u64).checked_sub(age) {
            Some(left) if left > 0 || age == 0 => Ok(Some(left as u32)),
            _ => Err(Expired),
        }
    }
}

/// A retained message as the journal keeps it:
///
/// ```text
/// 1 | qos: u8 | at_ms: u64 LE | properties (MQTT 5 block, expiry included) | payload
/// ```
///
/// The properties in the form MQTT itself gives them, read back by the
/// same code that reads a client's PUBLISH; `at_ms` keeps the expiry
/// interval counting across a restart. This is everything before the
/// payload (which the journal writes after it without a copy).
pub fn stored_head(m: &Message) -> Bytes {
    let mut props = m.props.as_deref().cloned().unwrap_or_default();
    props.message_expiry = m.expiry;
    let mut out = bytes::BytesMut::with_capacity(16);
    out.extend_from_slice(&[1, m.qos]);
    out.extend_from_slice(&m.at_ms.to_le_bytes());
    crate::bus::codec::write_publish_props(&props, &mut out);
    out.freeze()
}

/// A retained message from its stored form ([`stored_head`], then the
/// payload) (`None`: not one).
pub fn from_stored(topic: &str, b: Bytes) -> Option<Message> {
    if b.len() < 10 || b[0] != 1 || b[1] > 2 {
        return None;
    }
    let qos = b[1];
    let at_ms = u64::from_le_bytes(b[2..10].try_into().ok()?);
    let (mut props, payload) = crate::bus::codec::read_publish_props(b.slice(10..)).ok()?;
    let expiry = props.message_expiry.take();
    Some(Message {
        topic: topic.into(),
        payload,
        qos,
        retain: true,
        origin: 0,
        at_ms,
        expiry,
        props: (props != Properties::default()).then(|| Box::new(props)),
    })
}

/// A message the router hands to a link.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub msg: Arc<Message>,
    /// Delivered from the retained store at subscribe time.
    pub from_store: bool,
}

/// What a publisher's writes wait for: the subscribers its publish woke.
/// Each link it was handed to that is taking messages keeps a clone until
/// its session's next turn (see [`super::Link::turn`]); the last clone
/// dropped lets the publisher's connection write again.
///
/// Why: a publish wakes each subscriber's session on the publisher's
/// thread, queued behind the publisher's own task. Had the publisher
/// written its acknowledgement first, each delivery would wait for that
/// write; had it yielded to let them run, it would be queued where the
/// other worker thread steals it (a wake-up of that thread for every
/// message, measured: 0.65 a message). Waiting for the subscribers'
/// sessions to take their turn, which wakes the publisher's task on the
/// same thread right behind them, puts delivery before acknowledgement
/// with no thread woken, as Mosquitto's single thread does. No timer
/// bounds the wait (a timer sooner than every other wakes the I/O driver's
/// thread to re-arm it: one more wake-up a message); a link takes no
/// token while its session is not taking messages, and lets go of those
/// it holds when it stops.
#[derive(Debug, Clone)]
pub struct After {
    /// Never sent on: dropped with the last clone, which completes the
    /// receiver.
    _done: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl After {
    /// A token, and what completes when its last clone is dropped.
    pub fn new() -> (After, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            After {
                _done: Arc::new(tx),
            },
            rx,
        )
    }
}

/// A message whose expiry interval ran out while it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retained_message_comes_back_from_the_journal_as_it_was() {
        let mut p = Publish {
            qos: 1,
            retain: true,
            topic: "ha/config".into(),
            payload: Bytes::from_static(b"{\"name\":\"lamp\"}"),
            ..Publish::default()
        };
        p.props.user = vec![("k".into(), "v".into())];
        p.props.content_type = Some("application/json".into());
        p.props.message_expiry = Some(30);
        let m = Message::new(&p, 7);
        let stored = |m: &Message| [stored_head(m), m.payload.clone()].concat().into();
        let back = from_stored("ha/config", stored(&m)).unwrap();
        assert_eq!(
            (back.payload.clone(), back.qos, back.at_ms, back.expiry),
            (m.payload.clone(), 1, m.at_ms, Some(30))
        );
        assert_eq!(back.props, m.props);
        assert!(back.retain);
        let plain = Message::new(
            &Publish {
                props: Default::default(),
                ..p
            },
            1,
        );
        let back = from_stored("ha/config", stored(&plain)).unwrap();
        assert_eq!((back.props, back.expiry), (None, None));
        assert!(from_stored("t", Bytes::from_static(b"\x02xxxxxxxxxx")).is_none());
        assert!(from_stored("t", Bytes::new()).is_none());
    }

    #[test]
    fn properties_travel_and_expiry_counts_down() {
        let mut p = Publish {
            qos: 1,
            retain: true,
            topic: "a/b".into(),
            pkid: 7,
            payload: Bytes::from_static(b"x"),
            ..Publish::default()
        };
        p.props.user = vec![("k".into(), "v".into())];
        p.props.message_expiry = Some(30);
        p.props.topic_alias = Some(3);
        let m = Message::new(&p, 9);
        let out = m.to_publish();
        assert_eq!(out.props.user, p.props.user);
        assert_eq!(out.props.topic_alias, None);
        assert_eq!(out.pkid, 0);
        assert_eq!((out.qos, out.retain, m.origin), (1, true, 9));
        assert_eq!(m.remaining_expiry(m.at_ms + 10_500), Ok(Some(20)));
        assert_eq!(m.remaining_expiry(m.at_ms + 30_000), Err(Expired));
        let bare = Message::new(&Publish::default(), 0);
        assert!(bare.props.is_none());
    }
}
