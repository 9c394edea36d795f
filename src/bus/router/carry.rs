//! What travels through rumqttd's router beside a message, for what the
//! router would lose: [`Meta`] in one user property, added on the way in
//! ([`RoutedPublish`]) and removed on the way out ([`Forwarded`]).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

use super::META_KEY;
use crate::bus::codec::{Properties, Publish};

/// What the router carries for homicro beside a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The publishing session (0: the server itself).
    pub origin: u64,
    pub qos: u8,
    pub retain: bool,
    /// The payload is empty (one placeholder byte travelled instead).
    pub empty: bool,
    /// When it was published, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The message expiry interval it was published with (5).
    pub expiry: Option<u32>,
}

impl Meta {
    fn encode(&self) -> String {
        let expiry = self.expiry.map(|e| e.to_string()).unwrap_or_default();
        format!(
            "{},{},{},{},{},{}",
            self.origin, self.qos, self.retain as u8, self.empty as u8, self.at_ms, expiry
        )
    }

    fn decode(s: &str) -> Option<Meta> {
        let mut it = s.split(',');
        let origin = it.next()?.parse().ok()?;
        let qos = it.next()?.parse().ok()?;
        let retain = it.next()? == "1";
        let empty = it.next()? == "1";
        let at_ms = it.next()?.parse().ok()?;
        let expiry = match it.next()? {
            "" => None,
            e => Some(e.parse().ok()?),
        };
        Some(Meta {
            origin,
            qos,
            retain,
            empty,
            at_ms,
            expiry,
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A publish ready for the router: meta attached, expiry taken out of the
/// router's hands, an empty payload replaced by a placeholder byte.
#[derive(Debug, Clone)]
pub struct RoutedPublish {
    pub(super) topic: Bytes,
    pub(super) payload: Bytes,
    pub(super) retain: bool,
    pub(super) props: PublishProperties,
}

impl RoutedPublish {
    /// `p` as published by session `origin` (its topic alias resolved).
    pub fn new(p: &Publish, origin: u64) -> RoutedPublish {
        let empty = p.payload.is_empty();
        let meta = Meta {
            origin,
            qos: p.qos,
            retain: p.retain,
            empty,
            at_ms: now_ms(),
            expiry: p.props.message_expiry,
        };
        let mut user: Vec<(String, String)> = p
            .props
            .user
            .iter()
            .filter(|(k, _)| k != META_KEY)
            .cloned()
            .collect();
        user.push((META_KEY.to_string(), meta.encode()));
        let props = PublishProperties {
            payload_format_indicator: p.props.payload_format,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: p.props.response_topic.clone(),
            correlation_data: p.props.correlation_data.clone(),
            user_properties: user,
            subscription_identifiers: Vec::new(),
            content_type: p.props.content_type.clone(),
        };
        // A non-retained empty publish must not clear the retained message:
        // it travels with one byte, restored to empty on the way out.
        let payload = if empty && !p.retain {
            Bytes::from_static(b"\0")
        } else {
            // A copy: the payload is a slice of the publisher's read buffer,
            // and the router keeps it (retained, and in its log) long after;
            // the slice would pin the whole buffer (up to 32 KiB) with it.
            Bytes::copy_from_slice(&p.payload)
        };
        RoutedPublish {
            topic: Bytes::from(p.topic.clone()),
            payload,
            retain: p.retain,
            props,
        }
    }

    pub fn topic(&self) -> &[u8] {
        &self.topic
    }
}

/// A message the router forwarded to a link, with what homicro carried
/// beside it.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The message as published (QoS and retain from its publisher; the
    /// message expiry interval as published).
    pub publish: Publish,
    pub meta: Meta,
    /// Delivered from the retained store at subscribe time.
    pub from_store: bool,
}

impl Forwarded {
    pub(super) fn from_router(
        p: rumqttd::protocol::Publish,
        props: Option<PublishProperties>,
    ) -> Forwarded {
        let mut props = props.unwrap_or_default();
        let meta = match props.user_properties.last() {
            Some((k, v)) if k == META_KEY => Meta::decode(v),
            _ => None,
        };
        if meta.is_some() {
            props.user_properties.pop();
        }
        let meta = meta.unwrap_or(Meta {
            origin: 0,
            qos: 0,
            retain: false,
            empty: false,
            at_ms: now_ms(),
            expiry: None,
        });
        let payload = if meta.empty { Bytes::new() } else { p.payload };
        let publish = Publish {
            dup: false,
            qos: meta.qos,
            retain: meta.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: 0,
            payload,
            props: Properties {
                payload_format: props.payload_format_indicator,
                message_expiry: meta.expiry,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
                user: props.user_properties,
                ..Properties::default()
            },
        };
        Forwarded {
            publish,
            meta,
            from_store: p.retain,
        }
    }

    /// The expiry interval left at `now_ms` (`None`: it has none).
    pub fn remaining_expiry(&self, now_ms: u64) -> Result<Option<u32>, Expired> {
        let Some(e) = self.meta.expiry else {
            return Ok(None);
        };
        let age = now_ms.saturating_sub(self.meta.at_ms) / 1000;
        match (e as u64).checked_sub(age) {
            Some(left) if left > 0 || age == 0 => Ok(Some(left as u32)),
            _ => Err(Expired),
        }
    }
}

/// A message whose expiry interval ran out while it waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let m = Meta {
            origin: 42,
            qos: 2,
            retain: true,
            empty: false,
            at_ms: 1_700_000_000_123,
            expiry: Some(30),
        };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        let m = Meta { expiry: None, ..m };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        assert_eq!(Meta::decode("garbage"), None);
    }
}
