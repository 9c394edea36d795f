//! The registry as the bus's gate: a publish to `PREFIX/services/NAME` or
//! `PREFIX/heartbeat/NAME` is a question to the registry, answered before
//! the router stores or forwards anything; a refused record is never seen
//! by a watcher. Only the registry publishes under `PREFIX/registry`,
//! `PREFIX/events`, `PREFIX/errors` and `PREFIX/health`, only the hub
//! under `PREFIX/rpc` (a request reaches a service through the hub alone),
//! and only the Home Assistant bridge under `PREFIX/ha` (a service's state
//! in Home Assistant cannot be forged).

use std::net::SocketAddr;

use bytes::Bytes;

use super::codec::{Publish, reason};
use crate::identity::Author;
use crate::protocol::ErrorCode;
use crate::topics::Topics;

pub use crate::registry::state::GateKind as Kind;

/// A publish put to the registry.
#[derive(Debug, Clone)]
pub struct Submission {
    pub kind: Kind,
    /// The rest of the topic after the kind's level (maybe a bad name).
    pub raw: String,
    /// As published, with `host` completed from the publisher's address
    /// when a JSON object lacks it.
    pub payload: Bytes,
    pub qos: u8,
    /// Who publishes it.
    pub by: Author,
    /// The publishing session (for NoLocal on the stored copy).
    pub origin: u64,
    /// The session's will, published after the bus lost its client.
    pub will: bool,
    /// The session's will would clear this record (see
    /// [`crate::registry::state::Source::guards`]).
    pub guards: bool,
    /// What the publisher's acknowledgement waits for (see
    /// [`crate::bus::router::After`]).
    pub after: Option<crate::bus::router::After>,
}

impl Submission {
    pub fn new(
        kind: Kind,
        raw: &str,
        p: &Publish,
        peer: Option<SocketAddr>,
        by: Author,
        origin: u64,
    ) -> Self {
        let payload = peer
            .and_then(|peer| with_host(&p.payload, || peer.ip().to_string()))
            // A copy, not a slice of the client's read buffer: the registry
            // keeps it as long as the record lives.
            .map_or_else(|| Bytes::copy_from_slice(&p.payload), Bytes::from);
        Submission {
            kind,
            raw: raw.to_string(),
            payload,
            qos: p.qos,
            by,
            origin,
            will: false,
            guards: false,
            after: None,
        }
    }
}

/// The registry's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gated {
    /// Applied; the registry has published it (and its event).
    Accepted,
    /// Refused with this error code (published on `PREFIX/errors/NAME`).
    Refused(ErrorCode),
}

/// Whether `topic` is one only homicro itself writes (other than
/// `PREFIX/registry`, which [`Topics::classify`] names).
pub fn reserved(topics: &Topics, topic: &str) -> bool {
    kind(topics, topic).is_some_and(|k| matches!(k, "events" | "errors" | "health" | "rpc" | "ha"))
}

/// Whether the router itself journals a retained message on `topic` while
/// the registry runs: every topic but homicro's own (the registry journals
/// its records and publishes the rest anew at start), and `PREFIX/ha/…`,
/// which the Home Assistant bridge reads back after a restart.
pub fn journaled_by_router(topics: &Topics, topic: &str) -> bool {
    matches!(topics.classify(topic), crate::topics::Incoming::Other)
        && (!reserved(topics, topic) || kind(topics, topic) == Some("ha"))
}

/// The level after the prefix, when more levels follow.
fn kind<'a>(topics: &Topics, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix(topics.prefix())
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.split_once('/'))
        .map(|(kind, _)| kind)
}

/// The MQTT 5 reason code for a registry error code.
pub fn reason_for(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::BadName => reason::TOPIC_NAME_INVALID,
        ErrorCode::Invalid | ErrorCode::TooLarge => reason::PAYLOAD_FORMAT_INVALID,
        ErrorCode::Owned | ErrorCode::NotOwner => reason::NOT_AUTHORIZED,
        _ => reason::IMPLEMENTATION_SPECIFIC,
    }
}

/// A record or heartbeat JSON object without `host`, completed with `host`
/// (the publisher's address, formatted only when it is needed) as its
/// first field. `None`: leave the payload as it is (not a JSON object, or
/// it has a `host`). Only the top-level keys are read: values are skipped
/// without being built.
pub fn with_host(payload: &[u8], host: impl FnOnce() -> String) -> Option<Vec<u8>> {
    let keys: TopKeys = serde_json::from_slice(payload).ok()?;
    if keys.has_host {
        return None;
    }
    let at = payload.iter().position(|b| *b == b'{')?;
    let field = serde_json::to_string(&host()).ok()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_completed_only_when_missing() {
        assert_eq!(
            with_host(br#"{"port":1}"#, || "10.0.0.2".into()).unwrap(),
            br#"{"host":"10.0.0.2","port":1}"#
        );
        assert_eq!(with_host(b"{}", || "h".into()).unwrap(), br#"{"host":"h"}"#);
        assert_eq!(with_host(br#"{"host":"a","port":1}"#, || "h".into()), None);
        assert_eq!(with_host(b"not json", || "h".into()), None);
        assert_eq!(with_host(b"[1]", || "h".into()), None);
    }

    #[test]
    fn registry_topics_are_reserved() {
        let t = Topics::new("homicro");
        for yes in [
            "homicro/events/a",
            "homicro/errors/a",
            "homicro/health/a",
            "homicro/rpc/a/1",
            "homicro/ha/a/state",
        ] {
            assert!(reserved(&t, yes), "{yes}");
        }
        assert!(journaled_by_router(&t, "homicro/ha/a/attributes"));
        assert!(journaled_by_router(
            &t,
            "homeassistant/binary_sensor/x/config"
        ));
        for no in ["homicro/health/a", "homicro/services/a", "homicro/registry"] {
            assert!(!journaled_by_router(&t, no), "{no}");
        }
        for no in [
            "homicro/services/a",
            "homicro/eventsx/a",
            "other/events/a",
            "homicro/events",
        ] {
            assert!(!reserved(&t, no), "{no}");
        }
    }
}
