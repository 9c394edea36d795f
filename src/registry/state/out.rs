//! What the registry publishes: the `Publish` type and the payloads the
//! rules in `state.rs` hand to the actor (records, clears, errors, events,
//! health statuses and the registry's own state). Pure: no I/O.

use bytes::Bytes;
use serde::Serialize;

use super::{Registry, health};
use crate::protocol::{ErrorCode, ErrorPayload, EventKind, EventPayload};
use crate::record::{Endpoint, Name};

/// One MQTT publish the registry wants made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Registry {
    /// The retained `registry` message while the registry enforces.
    pub fn online(&self) -> Publish {
        self.registry_state(self.online.clone())
    }

    /// The retained `registry` message on shutdown, and the will.
    pub fn offline(&self) -> Publish {
        self.registry_state(self.offline.clone())
    }

    fn registry_state(&self, payload: Bytes) -> Publish {
        Publish {
            topic: self.topics.registry(),
            payload,
            retain: true,
        }
    }

    /// What the topic of `raw` should hold now: the record, or nothing.
    pub(super) fn current(&self, raw: &str) -> Publish {
        let record = Name::parse(raw).ok().and_then(|n| self.records.get(&n));
        match record {
            Some(e) => Publish {
                topic: self.topics.service(raw),
                payload: e.payload.clone(),
                retain: true,
            },
            None => self.clear(raw),
        }
    }

    pub(super) fn health_clear(&self, name: &str) -> Publish {
        Publish {
            topic: self.topics.health(name),
            payload: Bytes::new(),
            retain: true,
        }
    }

    pub(super) fn health_status(&self, name: &Name, s: &health::Status) -> Publish {
        Publish {
            topic: self.topics.health(name.as_str()),
            payload: to_bytes(&s.payload(name)),
            retain: true,
        }
    }

    pub(super) fn clear(&self, raw: &str) -> Publish {
        Publish {
            topic: self.topics.service(raw),
            payload: Bytes::new(),
            retain: true,
        }
    }

    /// An error; `owner` for `owned`, `from` the refused publisher's
    /// endpoint where it is known.
    pub(super) fn error(
        &self,
        raw: &str,
        code: ErrorCode,
        detail: &str,
        owner: Option<&Endpoint>,
        from: Option<&Endpoint>,
    ) -> Publish {
        let error = ErrorPayload {
            detail: detail.to_string(),
            endpoint: from.cloned(),
            error: code,
            name: raw.to_string(),
            owner: owner.cloned(),
        };
        Publish {
            topic: self.topics.error(raw),
            payload: to_bytes(&error),
            retain: false,
        }
    }

    pub(super) fn event(
        &self,
        name: &Name,
        kind: EventKind,
        endpoint: Option<&Endpoint>,
    ) -> Publish {
        self.announce(&EventPayload::new(name.as_str(), kind, endpoint))
    }

    pub(super) fn announce(&self, event: &EventPayload) -> Publish {
        Publish {
            topic: self.topics.event(&event.name),
            payload: to_bytes(event),
            retain: false,
        }
    }
}

/// A payload's JSON.
pub(super) fn to_bytes(payload: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(payload).expect("a payload is JSON"))
}
