//! The registry's own publishes on their way back: every retained publish
//! it makes on `PREFIX/services/…` (restores, clears, HTTP registrations)
//! comes back through the broker, and must not be taken for a refresh by
//! the owner. Pure bookkeeping for `state.rs`.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::state::Publish;
use crate::topics::{Incoming, Topics};

/// How many of its own publishes per topic the registry remembers while
/// waiting for them to come back. A queue this long means the broker drops
/// our echoes; forgetting the oldest then only risks one missed refresh.
const MAX_ECHOES: usize = 64;

/// Pending echoes by raw name, oldest first.
#[derive(Debug, Default)]
pub(super) struct Echoes(HashMap<String, VecDeque<Bytes>>);

impl Echoes {
    /// Whether `payload` on `raw` is the oldest of our publishes still on
    /// its way back; if so it is consumed.
    pub(super) fn take(&mut self, raw: &str, payload: &Bytes) -> bool {
        let Some(queue) = self.0.get_mut(raw) else {
            return false;
        };
        if queue.front() != Some(payload) {
            return false;
        }
        queue.pop_front();
        if queue.is_empty() {
            self.0.remove(raw);
        }
        true
    }

    /// Whether one of our publishes to `raw` is still on its way.
    pub(super) fn pending(&self, raw: &str) -> bool {
        self.0.contains_key(raw)
    }

    /// Remembers the retained service publishes in `out`.
    pub(super) fn note(&mut self, topics: &Topics, out: &[Publish]) {
        for p in out.iter().filter(|p| p.retain) {
            if let Incoming::Service(raw) = topics.classify(&p.topic) {
                let queue = self.0.entry(raw.to_string()).or_default();
                if queue.len() == MAX_ECHOES {
                    queue.pop_front();
                }
                queue.push_back(p.payload.clone());
            }
        }
    }

    /// Forgets every pending echo; returns the names they were for (after a
    /// reconnection, those publishes may have been lost).
    pub(super) fn drain_topics(&mut self) -> Vec<String> {
        self.0.drain().map(|(raw, _)| raw).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload: &'static [u8]) -> Publish {
        Publish {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            retain: true,
        }
    }

    #[test]
    fn echoes_come_back_in_order_and_are_bounded() {
        let t = Topics::new("homicro");
        let mut e = Echoes::default();
        e.note(
            &t,
            &[
                publish("homicro/services/a", b"1"),
                publish("homicro/events/a", b"x"),
            ],
        );
        e.note(&t, &[publish("homicro/services/a", b"2")]);
        assert!(e.pending("a") && !e.pending("b"));
        assert!(!e.take("a", &Bytes::from_static(b"2")), "not the oldest");
        assert!(e.take("a", &Bytes::from_static(b"1")));
        assert!(e.take("a", &Bytes::from_static(b"2")));
        assert!(!e.pending("a"));
        for _ in 0..MAX_ECHOES + 5 {
            e.note(&t, &[publish("homicro/services/b", b"b")]);
        }
        assert_eq!(e.0["b"].len(), MAX_ECHOES);
        assert_eq!(e.drain_topics(), ["b"]);
        assert!(!e.pending("b"));
    }
}
