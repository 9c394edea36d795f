//! What the journal must learn: every change worth persisting is logged
//! as it is made, and whoever made it (under the registry's lock) takes
//! the log as journal entries and appends them before it lets go, so the
//! journal holds the registry's changes in the order they were made.

use bytes::Bytes;
use tracing::warn;

use crate::identity::Identity;
use crate::journal::{Op, Space, State, Value};
use crate::record::{Name, Record};

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

/// The log the registry keeps: every change to a record's bytes or owner,
/// or its removal (`None`), in the order made; not a `ttl` refresh.
#[derive(Debug, Default)]
pub(super) struct ChangeLog {
    since: Vec<(Name, Option<Kept>)>,
    /// Someone takes the log (a journal): without one, changes are only
    /// counted.
    on: bool,
    /// Every change ever logged.
    count: u64,
}

impl ChangeLog {
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn turn_on(&mut self) {
        self.on = true;
    }

    /// Logs NAME's new bytes and owner (`None`: removed).
    pub fn note(&mut self, name: &Name, kept: Option<Kept>) {
        self.count += 1;
        if self.on {
            self.since.push((name.clone(), kept));
        }
    }

    /// The log since the last take, as journal entries.
    pub fn take(&mut self) -> Vec<Op> {
        self.since
            .drain(..)
            .map(|(name, kept)| ops_for(&name, kept))
            .collect()
    }
}

/// The journal's entry for NAME's new bytes and owner (`None`: removed):
/// the value is `owner_len: u16 LE | owner (Identity::to_stored) | record`,
/// the record shared with the registry's copy.
pub fn ops_for(name: &Name, kept: Option<Kept>) -> Op {
    let key = name.shared();
    match kept {
        Some(k) => {
            let owner = k.owner.map(|o| o.to_stored()).unwrap_or_default();
            let mut head = Vec::with_capacity(2 + owner.len());
            head.extend_from_slice(&(owner.len() as u16).to_le_bytes());
            head.extend_from_slice(owner.as_bytes());
            Op::Put {
                space: Space::Records,
                key,
                value: Value {
                    head: Bytes::from(head),
                    body: k.payload,
                },
            }
        }
        None => Op::Delete {
            space: Space::Records,
            key,
        },
    }
}

/// A stored record's owner (as stored) and bytes.
fn split(v: &Value) -> Option<(String, Bytes)> {
    let b = v.to_bytes();
    let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let owner = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
    Some((owner, b.slice(2 + n..)))
}

/// The records a journal recovered, with their owners; a record that no
/// longer validates, or an owner that is not an identity, is skipped with
/// a warning.
pub fn recovered(state: &State) -> Vec<(Name, Record, Option<Identity>)> {
    let mut out = Vec::new();
    for ((space, name), value) in state {
        if *space != Space::Records {
            continue;
        }
        let name = &**name;
        let Some((owner, payload)) = split(value) else {
            warn!(name, "skipped a stored record that cannot be read");
            continue;
        };
        let owner = (!owner.is_empty())
            .then(|| {
                let id = Identity::from_stored(&owner);
                if id.is_none() {
                    warn!(
                        name,
                        owner,
                        "a stored owner is not an identity; the record's next writer owns it"
                    );
                }
                id
            })
            .flatten();
        let parsed =
            Name::parse(name).and_then(|n| Record::parse(&n, payload).map(|r| (n, r, owner)));
        match parsed {
            Ok(nr) => out.push(nr),
            Err(e) => warn!(name, error = %e, "skipped a stored record"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn the_log_becomes_entries_that_recover_the_records_and_owners() {
        let mut log = ChangeLog::default();
        let p = |s: &'static str| Bytes::from_static(s.as_bytes());
        log.note(&n("off"), Some(Kept::of(&p("{}"), None)));
        assert!(log.take().is_empty(), "off: counted only");
        log.turn_on();
        let alice = Identity::user("alice");
        log.note(&n("web"), Some(Kept::of(&p(r#"{"host":"a"}"#), None)));
        log.note(&n("nas"), Some(Kept::of(&p(r#"{"host":"b"}"#), None)));
        log.note(
            &n("web"),
            Some(Kept::of(&p(r#"{"host":"c"}"#), Some(&alice))),
        );
        log.note(&n("nas"), None);
        let mut state = State::new();
        for op in log.take() {
            crate::journal::apply(&mut state, op);
        }
        assert!(log.take().is_empty(), "taken");
        assert_eq!(log.count(), 5);
        let got = recovered(&state);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, n("web"));
        assert_eq!(got[0].1.payload(), &p(r#"{"host":"c"}"#));
        assert_eq!(got[0].2, Some(alice));
    }
}
