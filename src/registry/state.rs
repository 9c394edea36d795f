//! The registry's rules as a pure state machine: a message or a moment in,
//! the publishes to make out. No I/O and no clock of its own; the actor
//! feeds it and carries its output to the broker. The entry points for the
//! broker's connection (`broker`) and for records judged before a broker
//! holds them (`gate`), and the payloads (`out`), are in child modules.

mod broker;
mod gate;
mod out;
mod persist;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::echoes::Echoes;
use super::health::{self, Outcome, Probe, Verdict};
use crate::identity::{Author, Identity};
use crate::protocol::{ErrorCode, EventKind, EventPayload, RegistryState, RegistryStatus};
use crate::record::{Endpoint, Name, Record};
use crate::topics::Topics;
pub use broker::Delivery;
pub use gate::{GateKind, Source};
pub use out::Publish;
use out::to_bytes;
use persist::ChangeLog;
pub use persist::{Kept, ops_for, recovered};

/// The answer to an accepted change the journal could not write: the
/// change is live, but it would not survive a restart.
pub fn not_durable(raw: &str, why: &str) -> Bytes {
    to_bytes(&crate::protocol::ErrorPayload {
        detail: format!(
            "applied but not written to disk, so it may not survive a restart ({why}); try again"
        ),
        endpoint: None,
        error: ErrorCode::Unavailable,
        name: raw.to_string(),
        owner: None,
    })
}

/// Counters for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub registrations: u64,
    pub updates: u64,
    pub refusals: u64,
    pub expiries: u64,
    pub deregistrations: u64,
    pub health_failures: u64,
    pub unhealthy: u64,
    /// Owners' wills ignored: another session's will guards the record.
    pub stale_wills: u64,
}

/// What the registry keeps of a record: its owner, its `ttl` and its bytes
/// (the parsed rest lives with the clients that need it). Kept small:
/// 100,000 of these are ~15 MB.
#[derive(Debug)]
struct Entry {
    endpoint: Endpoint,
    /// Who wrote it (`None`: not known, as through an external broker).
    owner: Option<Identity>,
    /// The bus session whose will guards it: the last to write or refresh
    /// it with a will that clears it (`None`: none did; over HTTP,
    /// through an external broker, restored at start). Another session's
    /// will changes nothing while there is one.
    writer: Option<u64>,
    ttl: Option<Duration>,
    payload: Bytes,
    deadline: Option<Instant>,
}

impl Entry {
    /// What its `ttl` has left at `now` (`None`: no `ttl`).
    fn ttl_left(&self, now: Instant) -> Option<Duration> {
        Some(self.deadline?.saturating_duration_since(now))
    }
}

/// One record as the dashboard shows it (see [`Registry::board`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub name: Name,
    pub payload: Bytes,
    /// What its `ttl` has left (`None`: no `ttl`).
    pub ttl_left: Option<Duration>,
    pub owner: Option<Identity>,
    pub health: Option<health::Status>,
}

/// What the rules made of a record publish.
#[derive(Debug)]
enum Judged {
    /// Applied: its `registered`, `updated` or `deregistered` event.
    Accepted(Publish),
    /// Refused, nothing changed: the error code, the error and the
    /// `rejected` event.
    Refused {
        code: ErrorCode,
        error: Publish,
        event: Publish,
    },
    /// Nothing to do or say (an empty publish to a free name, a retained
    /// copy of what the registry holds).
    Quiet,
}

/// The registry: every record, its deadline, and the echoes of its own
/// publishes still on their way back through the broker.
#[derive(Debug)]
pub struct Registry {
    topics: Topics,
    online: Bytes,
    offline: Bytes,
    records: HashMap<Name, Entry>,
    deadlines: BTreeSet<(Instant, Name)>,
    echoes: Echoes,
    /// The registry is the bus's gate: it sees every record before the
    /// broker does and none of its publishes come back (no echoes).
    gated: bool,
    restored: Vec<Name>,
    /// What the journal has not been told yet.
    changed: ChangeLog,
    stats: Stats,
    health: health::Schedule,
    /// Publishes made on the side (health statuses to clear), drained into
    /// the output of every entry point.
    extra: Vec<Publish>,
}

impl Registry {
    pub fn new(topics: Topics, version: &str) -> Registry {
        let state = |state| {
            to_bytes(&RegistryStatus {
                state,
                version: version.to_string(),
            })
        };
        Registry {
            topics,
            online: state(RegistryState::Online),
            offline: state(RegistryState::Offline),
            records: HashMap::new(),
            deadlines: BTreeSet::new(),
            echoes: Echoes::default(),
            gated: false,
            restored: Vec::new(),
            changed: ChangeLog::default(),
            stats: Stats::default(),
            health: health::Schedule::default(),
            extra: Vec::new(),
        }
    }

    /// Makes this registry the embedded bus's gate (see [`Registry::on_gate`]).
    pub fn set_gated(&mut self) {
        self.gated = true;
    }

    fn note_echoes(&mut self, out: &[Publish]) {
        if !self.gated {
            self.echoes.note(&self.topics, out);
        }
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// NAME's record, parsed again from its bytes.
    pub fn get(&self, name: &Name) -> Option<Record> {
        let e = self.records.get(name)?;
        Record::parse(name, e.payload.clone()).ok()
    }

    /// NAME's record as published.
    pub fn payload(&self, name: &Name) -> Option<&Bytes> {
        self.records.get(name).map(|e| &e.payload)
    }

    /// Every record's bytes, as published.
    pub fn records(&self) -> impl Iterator<Item = (&Name, &Bytes)> {
        self.records.iter().map(|(n, e)| (n, &e.payload))
    }

    /// Who wrote NAME's record (`None`: not registered, or not known).
    pub fn owner(&self, name: &Name) -> Option<&Identity> {
        self.records.get(name)?.owner.as_ref()
    }

    /// What NAME's `ttl` has left at `now` (`None`: not registered, or no
    /// `ttl`).
    pub fn ttl_left(&self, name: &Name, now: Instant) -> Option<Duration> {
        self.records.get(name)?.ttl_left(now)
    }

    /// Every record as the dashboard shows it, at `now`: its bytes, the
    /// time its `ttl` has left, its owner and its last health status.
    pub fn board(&self, now: Instant) -> Vec<Shown> {
        self.records
            .iter()
            .map(|(name, e)| Shown {
                name: name.clone(),
                payload: e.payload.clone(),
                ttl_left: e.ttl_left(now),
                owner: e.owner.clone(),
                health: self.health.status(name).cloned(),
            })
            .collect()
    }

    /// Bumped on every change worth persisting (not on a `ttl` refresh).
    pub fn changes(&self) -> u64 {
        self.changed.count()
    }

    /// Keeps a log of the changes for [`Self::take_changes`] (without
    /// this, they are only counted).
    pub fn set_journaled(&mut self) {
        self.changed.turn_on();
    }

    /// The changes not taken yet, as journal entries.
    pub fn take_changes(&mut self) -> Vec<crate::journal::Op> {
        self.changed.take()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The earliest `ttl` deadline, for the actor's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Takes the records of a state file after a restart; each `ttl` starts
    /// afresh at `now`. They are re-published on the next connect.
    pub fn load(&mut self, now: Instant, records: Vec<(Name, Record, Option<Identity>)>) {
        for (name, record, owner) in records {
            self.restored.push(name.clone());
            // Written before owners were kept: its host's address (when it
            // is one) owns it, not whoever publishes first after the
            // restart.
            let owner = owner.or_else(|| {
                let ip = record.endpoint.host.parse::<std::net::IpAddr>().ok()?;
                Some(Identity::address(ip))
            });
            self.insert(now, name, record, owner, None);
        }
    }

    /// Expires every record whose deadline is at or before `now`.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Publish> {
        let mut out = Vec::new();
        while let Some((t, name)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(entry) = self.records.remove(&name) else {
                continue;
            };
            self.changed.note(&name, None);
            self.stats.expiries += 1;
            info!(name = %name, owner = %entry.endpoint, "expired");
            if self.health.untrack(&name) {
                out.push(self.health_clear(name.as_str()));
            }
            out.push(self.clear(name.as_str()));
            out.push(self.event(&name, EventKind::Expired, Some(&entry.endpoint)));
        }
        self.note_echoes(&out);
        out
    }

    /// When the next health probe is due.
    pub fn next_probe(&self) -> Option<Instant> {
        self.health.next_due()
    }

    /// The health probes due at `now`, for the actor to run.
    pub fn take_probes(&mut self, now: Instant) -> Vec<Probe> {
        self.health.take_due(now)
    }

    /// How many records have a health check.
    pub fn checked(&self) -> usize {
        self.health.len()
    }

    /// A probe's result: a status to publish, or the record cleared after
    /// `failures` failures in a row.
    pub fn on_probe(&mut self, now: Instant, probe: &Probe, outcome: Outcome) -> Vec<Publish> {
        if matches!(outcome, Outcome::Fail(_)) && self.records.contains_key(&probe.name) {
            self.stats.health_failures += 1;
        }
        let name = &probe.name;
        let mut out = match self.health.result(now, name, probe.generation, outcome) {
            Verdict::Ignore => Vec::new(),
            Verdict::Status { status, changed } => {
                if !status.passing {
                    warn!(name = %name, check = %status.check, detail = %status.detail, failures = status.failures, "health check failed");
                }
                if changed {
                    vec![self.health_status(name, &status)]
                } else {
                    Vec::new()
                }
            }
            Verdict::Unhealthy { detail } => match self.remove(name) {
                Some(record) => {
                    self.stats.unhealthy += 1;
                    warn!(name = %name, owner = %record.endpoint, detail = %detail, "unhealthy; cleared");
                    let ev = self.announce(&EventPayload {
                        detail: Some(detail),
                        ..EventPayload::new(
                            name.as_str(),
                            EventKind::Unhealthy,
                            Some(&record.endpoint),
                        )
                    });
                    vec![
                        self.clear(name.as_str()),
                        self.health_clear(name.as_str()),
                        ev,
                    ]
                }
                None => Vec::new(),
            },
        };
        out.append(&mut self.extra);
        self.note_echoes(&out);
        out
    }

    /// Judges a record publish (empty: a removal) and applies it. `from`:
    /// the bus session it comes from, when the bus's gate asks.
    fn on_record(
        &mut self,
        now: Instant,
        raw: &str,
        payload: Bytes,
        delivery: Delivery,
        by: &Author,
        from: Option<Source>,
    ) -> Judged {
        let name = match Name::parse(raw) {
            Ok(n) => n,
            Err(e) if payload.is_empty() => {
                debug!(name = raw, error = %e, "empty publish to a bad name ignored");
                return Judged::Quiet;
            }
            Err(e) => return self.refuse(raw, e.code(), e.to_string(), None, None),
        };
        let will = from.is_some_and(|f| f.will);
        if let (Some(from), Some(entry)) = (from, self.records.get(&name))
            && from.will
            && entry.writer.is_some_and(|w| w != from.session)
            && by.may_change(entry.owner.as_ref())
        {
            // A session lost after its service came back on another one (a
            // restart, a half-open socket timing out), whose will guards
            // the record now: the old will must not clear or replace it. (A
            // stranger's will is refused below, as any stranger's publish.)
            info!(name = %name, owner = %entry.endpoint, "will ignored: another session's will guards the record");
            self.stats.stale_wills += 1;
            return Judged::Quiet;
        }
        if payload.is_empty() {
            if let Some(refused) = self.not_owner(raw, &name, by, None) {
                return refused;
            }
            return match self.remove(&name) {
                Some(record) => {
                    self.stats.deregistrations += 1;
                    info!(name = %name, owner = %record.endpoint, will, "deregistered");
                    Judged::Accepted(self.announce(&EventPayload {
                        will,
                        ..EventPayload::new(
                            name.as_str(),
                            EventKind::Deregistered,
                            Some(&record.endpoint),
                        )
                    }))
                }
                None => Judged::Quiet,
            };
        }
        let record = match Record::parse(&name, payload) {
            Ok(r) => r,
            Err(e) => return self.refuse(raw, e.code(), e.to_string(), None, None),
        };
        if !self.records.contains_key(&name) {
            self.stats.registrations += 1;
            info!(name = %name, owner = %record.endpoint, "registered");
            let ev = self.event(&name, EventKind::Registered, Some(&record.endpoint));
            self.insert(now, name, record, by.identity.clone(), guard(from));
            return Judged::Accepted(ev);
        }
        if let Some(refused) = self.not_owner(raw, &name, by, Some(&record.endpoint)) {
            return refused;
        }
        let existing = &self.records[&name];
        if existing.endpoint != record.endpoint {
            let owner = existing.endpoint.clone();
            let detail = owned_detail(&owner, &record.endpoint);
            let from = Some(&record.endpoint);
            return self.refuse(raw, ErrorCode::Owned, detail, Some(&owner), from);
        }
        if delivery == Delivery::Retained && existing.payload == record.payload() {
            // The broker still holds what we hold: not a refresh.
            return Judged::Quiet;
        }
        let changed = existing.payload != record.payload();
        self.stats.updates += 1;
        if changed {
            info!(name = %name, owner = %record.endpoint, "updated");
        } else {
            debug!(name = %name, owner = %record.endpoint, "refreshed");
        }
        let ev = self.announce(&EventPayload {
            changed: Some(changed),
            ..EventPayload::new(name.as_str(), EventKind::Updated, Some(&record.endpoint))
        });
        // A record whose writer was not known (restored from an older
        // state file) is its next accepted writer's.
        let owner = existing.owner.clone().or_else(|| by.identity.clone());
        if changed || owner != existing.owner {
            let writer = guard(from).or(existing.writer);
            self.insert(now, name, record, owner, writer);
        } else {
            self.refresh(now, &name, from);
        }
        Judged::Accepted(ev)
    }

    fn on_heartbeat(
        &mut self,
        now: Instant,
        raw: &str,
        payload: &[u8],
        by: &Author,
        source: Option<Source>,
    ) -> Vec<Publish> {
        let name = match Name::parse(raw) {
            Ok(n) => n,
            Err(e) => return vec![self.error(raw, e.code(), &e.to_string(), None, None)],
        };
        let from = match Endpoint::from_heartbeat(payload) {
            Ok(ep) => ep,
            Err(e) => return vec![self.error(raw, e.code(), &e.to_string(), None, None)],
        };
        let Some(entry) = self.records.get(&name) else {
            debug!(name = %name, from = %from, "heartbeat for an unregistered name");
            let detail = format!("{name} is not registered; publish its record again");
            return vec![self.error(raw, ErrorCode::Unknown, &detail, None, Some(&from))];
        };
        if !by.may_change(entry.owner.as_ref()) {
            let (owner, detail) = (&entry.endpoint, not_owner_detail(&name, entry, by));
            let error = self.error(raw, ErrorCode::NotOwner, &detail, Some(owner), Some(&from));
            self.stats.refusals += 1;
            warn!(name = %name, detail = %detail, "heartbeat refused");
            return vec![error];
        }
        if entry.endpoint.port.is_some() && from.port.is_none() {
            let detail = "heartbeat needs `port`: the record has one".to_string();
            return vec![self.error(raw, ErrorCode::Invalid, &detail, None, None)];
        }
        if entry.endpoint != from {
            let owner = &entry.endpoint;
            let detail = owned_detail(owner, &from);
            return vec![self.error(raw, ErrorCode::Owned, &detail, Some(owner), Some(&from))];
        }
        self.refresh(now, &name, source);
        Vec::new()
    }

    /// Refuses a publish: the error and the `rejected` event. `from` is the
    /// refused publisher's endpoint.
    fn refuse(
        &mut self,
        raw: &str,
        code: ErrorCode,
        detail: String,
        owner: Option<&Endpoint>,
        from: Option<&Endpoint>,
    ) -> Judged {
        self.stats.refusals += 1;
        warn!(name = raw, error = code.as_str(), detail = %detail, "refused");
        let error = self.error(raw, code, &detail, owner, from);
        let event = self.announce(&EventPayload {
            error: Some(code),
            ..EventPayload::new(raw, EventKind::Rejected, from)
        });
        Judged::Refused { code, error, event }
    }

    /// The refusal of a change to NAME by `by`, when NAME's record is
    /// another identity's. `from`: the endpoint `by` published, if any.
    fn not_owner(
        &mut self,
        raw: &str,
        name: &Name,
        by: &Author,
        from: Option<&Endpoint>,
    ) -> Option<Judged> {
        let entry = self.records.get(name)?;
        if by.may_change(entry.owner.as_ref()) {
            return None;
        }
        let owner = entry.endpoint.clone();
        let detail = not_owner_detail(name, entry, by);
        Some(self.refuse(raw, ErrorCode::NotOwner, detail, Some(&owner), from))
    }

    fn insert(
        &mut self,
        now: Instant,
        name: Name,
        record: Record,
        owner: Option<Identity>,
        writer: Option<u64>,
    ) {
        let old = self.records.remove(&name);
        if let Some(t) = old.as_ref().and_then(|o| o.deadline) {
            self.deadlines.remove(&(t, name.clone()));
        }
        // A record may have loopback probed only when written from
        // loopback: a remote client naming host 127.0.0.1 must not reach
        // this machine's loopback-only services through the registry.
        let local = matches!(&owner, Some(Identity::Address(ip)) if ip.is_loopback());
        if self.health.track(now, &name, &record, local) {
            self.extra.push(self.health_clear(name.as_str()));
        }
        let deadline = record.ttl.map(|ttl| now + ttl);
        if let Some(t) = deadline {
            self.deadlines.insert((t, name.clone()));
        }
        let entry = Entry {
            payload: record.payload().clone(),
            endpoint: record.endpoint,
            owner,
            writer,
            ttl: record.ttl,
            deadline,
        };
        let kept = Kept::of(&entry.payload, entry.owner.as_ref());
        self.changed.note(&name, Some(kept));
        self.records.insert(name, entry);
    }

    fn remove(&mut self, name: &Name) -> Option<Entry> {
        let entry = self.records.remove(name)?;
        if let Some(t) = entry.deadline {
            self.deadlines.remove(&(t, name.clone()));
        }
        if self.health.untrack(name) {
            self.extra.push(self.health_clear(name.as_str()));
        }
        self.changed.note(name, None);
        Some(entry)
    }

    /// Starts a record's `ttl` afresh; `from`: the bus session that
    /// refreshed it, whose will guards it from now on if it would clear it.
    fn refresh(&mut self, now: Instant, name: &Name, from: Option<Source>) {
        let Some(entry) = self.records.get_mut(name) else {
            return;
        };
        if let Some(session) = guard(from) {
            entry.writer = Some(session);
        }
        if let Some(ttl) = entry.ttl {
            if let Some(old) = entry.deadline {
                self.deadlines.remove(&(old, name.clone()));
            }
            entry.deadline = Some(now + ttl);
            self.deadlines.insert((now + ttl, name.clone()));
        }
    }
}

/// The bus session a publish comes from, when its will would clear the
/// record (never a will itself).
fn guard(from: Option<Source>) -> Option<u64> {
    from.filter(|f| f.guards && !f.will).map(|f| f.session)
}

fn not_owner_detail(name: &Name, entry: &Entry, by: &Author) -> String {
    let owner = entry
        .owner
        .as_ref()
        .map_or("?".to_string(), |o| o.to_string());
    let by = by
        .identity
        .as_ref()
        .map_or("?".to_string(), |o| o.to_string());
    format!(
        "{name} belongs to {owner}; {by} may not change it (only its owner, or an admin such as the HTTP API from loopback)"
    )
}

fn owned_detail(owner: &Endpoint, from: &Endpoint) -> String {
    format!("owned by {owner}; refused {from}")
}

#[cfg(test)]
mod tests;
