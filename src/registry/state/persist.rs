//! What the state file must learn: every change worth persisting is
//! logged as it is made, and the state file's writer takes the log (a
//! swap, under the registry's lock) and applies it to a copy of its own.
//! A full copy of the records under the lock took 1 to 4 ms for 1,000
//! records on a 2-core machine, once per second, and every publish on the
//! bus waited for it.

use std::collections::HashMap;

use bytes::Bytes;

use crate::identity::Identity;
use crate::record::Name;

/// What the state file keeps of a record: its bytes and who wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub payload: Bytes,
    pub owner: Option<Identity>,
}

impl Kept {
    pub fn of(payload: &Bytes, owner: Option<&Identity>) -> Kept {
        Kept {
            payload: payload.clone(),
            owner: owner.cloned(),
        }
    }
}

/// The records' changes since the writer last took them, or all of the
/// records when the log grew past what a full copy costs.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// In the order they were made; `None`: the record is gone.
    Since(Vec<(Name, Option<Kept>)>),
    All(Vec<(Name, Kept)>),
}

impl Changes {
    /// Brings `copy` (the records as last taken) up to date.
    pub fn apply(self, copy: &mut HashMap<Name, Kept>) {
        match self {
            Changes::Since(log) => {
                for (name, payload) in log {
                    match payload {
                        Some(p) => copy.insert(name, p),
                        None => copy.remove(&name),
                    };
                }
            }
            Changes::All(all) => *copy = all.into_iter().collect(),
        }
    }
}

/// The log the registry keeps (see [`Changes`]).
#[derive(Debug, Default)]
pub(super) struct ChangeLog {
    since: Vec<(Name, Option<Kept>)>,
    /// The log was dropped for its size: the next take is a full copy.
    overflowed: bool,
    /// Every change ever logged.
    count: u64,
}

impl ChangeLog {
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Logs NAME's new bytes (`None`: removed); `records` is how many the
    /// registry holds now.
    pub fn note(&mut self, name: &Name, kept: Option<Kept>, records: usize) {
        self.count += 1;
        if self.overflowed {
            return;
        }
        self.since.push((name.clone(), kept));
        // Unread for long (a long `state_flush`, a burst of churn): a full
        // copy is cheaper than the log now.
        if self.since.len() > 2 * records + 1024 {
            self.since = Vec::new();
            self.overflowed = true;
        }
    }

    /// The log since the last take (or, after an overflow, `all()`).
    pub fn take(&mut self, all: impl FnOnce() -> Vec<(Name, Kept)>) -> Changes {
        if std::mem::take(&mut self.overflowed) {
            Changes::All(all())
        } else {
            Changes::Since(std::mem::take(&mut self.since))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn kept(b: &'static [u8]) -> Kept {
        Kept::of(&Bytes::from_static(b), None)
    }

    #[test]
    fn the_log_brings_a_copy_up_to_date_in_order() {
        let mut log = ChangeLog::default();
        let a = kept(b"a");
        let b = Kept {
            owner: Some(Identity::user("alice")),
            ..kept(b"b")
        };
        log.note(&n("web"), Some(a.clone()), 1);
        log.note(&n("nas"), Some(a), 2);
        log.note(&n("web"), Some(b.clone()), 2);
        log.note(&n("nas"), None, 1);
        let mut copy = HashMap::new();
        log.take(|| unreachable!("no overflow")).apply(&mut copy);
        assert_eq!(copy, HashMap::from([(n("web"), b.clone())]));
        assert_eq!(log.take(Vec::new), Changes::Since(vec![]), "taken");
        assert_eq!(log.count(), 4);
    }

    #[test]
    fn a_log_larger_than_a_copy_becomes_a_copy() {
        let mut log = ChangeLog::default();
        let p = kept(b"p");
        for _ in 0..1026 {
            log.note(&n("web"), Some(p.clone()), 1);
        }
        assert_eq!(log.since.len(), 1026, "up to 2 × records + 1024");
        log.note(&n("web"), Some(p.clone()), 1);
        assert!(log.since.is_empty() && log.overflowed);
        let all = vec![(n("web"), p.clone())];
        let mut copy = HashMap::from([(n("gone"), p.clone())]);
        log.take(|| all.clone()).apply(&mut copy);
        assert_eq!(copy, HashMap::from([(n("web"), p)]));
        assert_eq!(log.take(Vec::new), Changes::Since(vec![]));
        assert_eq!(log.count(), 1027);
    }
}
