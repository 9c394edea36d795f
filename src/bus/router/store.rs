//! Retained messages: one per topic, in topic order, so a filter's
//! messages are found by a range scan from its literal prefix
//! (`homicro/services/+` reads only `homicro/services/…`).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::Message;
use crate::bus::codec;

#[derive(Default)]
pub(super) struct Store {
    by_topic: BTreeMap<Arc<str>, Arc<Message>>,
    /// Topics whose message expired and was dropped, for the journal.
    expired: Vec<Arc<str>>,
}

impl Store {
    /// Keeps `m` as its topic's retained message, or clears the topic's
    /// when `m`'s payload is empty.
    pub fn set(&mut self, m: &Arc<Message>) {
        if m.payload.is_empty() {
            self.by_topic.remove(&*m.topic);
        } else {
            self.by_topic.insert(m.topic.clone(), m.clone());
        }
    }

    /// The retained messages matching `filter`, in topic order; messages
    /// whose expiry ran out are dropped on the way.
    pub fn matching(&mut self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        let prefix = literal_prefix(filter);
        let mut found = Vec::new();
        let mut expired = Vec::new();
        if prefix.len() == filter.len() {
            // No wildcard: one topic.
            found.extend(self.by_topic.get(filter).cloned());
        } else {
            let range = self
                .by_topic
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded));
            for (topic, m) in range {
                if !topic.starts_with(prefix) {
                    break;
                }
                if codec::matches(topic, filter) {
                    found.push(m.clone());
                }
            }
        }
        found.retain(|m| match m.remaining_expiry(now_ms) {
            Ok(_) => true,
            Err(_) => {
                expired.push(m.topic.clone());
                false
            }
        });
        for t in expired {
            self.by_topic.remove(&t);
            self.expired.push(t);
        }
        found
    }

    /// The topics dropped for their expiry since the last call.
    pub fn take_expired(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.expired)
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }
}

/// The part of `filter` before its first wildcard level.
fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for level in filter.split('/') {
        if level == "+" || level == "#" {
            return &filter[..end];
        }
        end += level.len() + 1;
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            ..Message::default()
        })
    }

    #[test]
    fn prefixes() {
        assert_eq!(literal_prefix("a/b/+"), "a/b/");
        assert_eq!(literal_prefix("#"), "");
        assert_eq!(literal_prefix("a/+/c"), "a/");
        assert_eq!(literal_prefix("a/b"), "a/b");
        assert_eq!(literal_prefix("a/bc#"), "a/bc#");
    }

    #[test]
    fn keeps_clears_and_finds() {
        let mut s = Store::default();
        for t in ["a/b", "a/c", "a/b/c", "ab", "b", "$SYS/x"] {
            s.set(&msg(t, b"x"));
        }
        let topics =
            |v: Vec<Arc<Message>>| v.iter().map(|m| m.topic.to_string()).collect::<Vec<_>>();
        assert_eq!(topics(s.matching("a/+", 0)), ["a/b", "a/c"]);
        assert_eq!(topics(s.matching("a/#", 0)), ["a/b", "a/b/c", "a/c"]);
        assert_eq!(
            topics(s.matching("#", 0)),
            ["a/b", "a/b/c", "a/c", "ab", "b"]
        );
        assert_eq!(topics(s.matching("ab", 0)), ["ab"]);
        s.set(&msg("a/b", b""));
        assert_eq!(topics(s.matching("a/+", 0)), ["a/c"]);
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn expired_messages_go() {
        let mut s = Store::default();
        let m = Arc::new(Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"x"),
            at_ms: 1_000,
            expiry: Some(5),
            ..Message::default()
        });
        s.set(&m);
        assert_eq!(s.matching("t", 2_000).len(), 1);
        assert_eq!(s.matching("#", 7_000).len(), 0);
        assert_eq!(s.len(), 0);
    }
}
