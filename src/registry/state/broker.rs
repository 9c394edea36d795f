//! The registry on its connection to the broker: what it announces when
//! the connection is (re)established, and how it judges what the broker
//! delivers (its own echoes, retained copies, refusals to undo). The
//! rules themselves are in `state.rs`.

use bytes::Bytes;
use tokio::time::Instant;
use tracing::info;

use super::{Judged, Publish, Registry};
use crate::identity::Author;
use crate::protocol::EventKind;
use crate::record::Name;
use crate::topics::Incoming;

/// Whether a message was forwarded live or delivered from the broker's
/// retained store at subscribe time (retain flag set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Live,
    Retained,
}

impl Registry {
    /// The connection to the broker is (re)established: announce the
    /// registry and re-publish every record, so a broker that lost its
    /// retained messages gets them back. The caller publishes these before
    /// it subscribes; the copies then come back as retained deliveries.
    ///
    /// `online` comes last: whoever sees it and subscribes to the records
    /// gets every one of them as a retained copy (with `online` first, a
    /// client quick enough got the rest of a restart's records live).
    pub fn on_connected(&mut self) -> Vec<Publish> {
        let mut out = Vec::new();
        // Publishes still unconfirmed may have been lost with the old session
        // (a clean session drops QoS 1 in flight): assert those topics again.
        let mut pending: Vec<String> = self.echoes.drain_topics();
        pending.sort();
        out.extend(
            pending
                .iter()
                .map(|raw| self.current(raw))
                .filter(|p| p.payload.is_empty()),
        );
        let mut names: Vec<&Name> = self.records.keys().collect();
        names.sort();
        out.extend(names.into_iter().map(|n| Publish {
            topic: self.topics.service(n.as_str()),
            payload: self.records[n].payload.clone(),
            retain: true,
        }));
        let statuses: Vec<Publish> = self
            .health
            .statuses()
            .map(|(n, st)| self.health_status(n, st))
            .collect();
        out.extend(statuses);
        for name in std::mem::take(&mut self.restored) {
            if let Some(e) = self.records.get(&name) {
                info!(name = %name, owner = %e.endpoint, "restored from state file");
                out.push(self.event(&name, EventKind::Restored, Some(&e.endpoint)));
            }
        }
        out.push(self.online());
        out
    }

    /// A message arrived on one of the registry's subscriptions.
    pub fn on_message(
        &mut self,
        now: Instant,
        topic: &str,
        payload: Bytes,
        delivery: Delivery,
    ) -> Vec<Publish> {
        match self.topics.classify(topic) {
            Incoming::Service(raw) => {
                let raw = raw.to_string();
                if delivery == Delivery::Live && self.echoes.take(&raw, &payload) {
                    return Vec::new();
                }
                let reassert = delivery == Delivery::Live && self.echoes.pending(&raw);
                let mut out =
                    match self.on_record(now, &raw, payload, delivery, &Author::UNKNOWN, None) {
                        Judged::Accepted(ev) => vec![ev],
                        // What the broker now holds is the refused publish:
                        // restore the previous record or clear the topic.
                        Judged::Refused { error, event, .. } => {
                            vec![self.current(&raw), error, event]
                        }
                        Judged::Quiet => Vec::new(),
                    };
                out.append(&mut self.extra);
                let topic = self.topics.service(&raw);
                if reassert && !out.iter().any(|p| p.retain && p.topic == topic) {
                    // One of our publishes to this topic is still on its way
                    // and will overwrite what just arrived: assert the
                    // outcome again after it.
                    out.push(self.current(&raw));
                }
                self.note_echoes(&out);
                out
            }
            // A retained heartbeat is an old one replayed at subscribe time.
            Incoming::Heartbeat(raw) if delivery == Delivery::Live => {
                self.on_heartbeat(now, raw, &payload, &Author::UNKNOWN, None)
            }
            Incoming::Heartbeat(_) | Incoming::Registry | Incoming::Other => Vec::new(),
        }
    }
}
