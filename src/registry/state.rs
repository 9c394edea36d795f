//! The registry's rules as a pure state machine: a message or a moment in,
//! the publishes to make out. No I/O and no clock of its own; the actor
//! feeds it and carries its output to the broker.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use serde::Serialize;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::echoes::Echoes;
use super::health::{self, Outcome, Probe, Verdict};
use crate::protocol::{
    ErrorCode, ErrorPayload, EventKind, EventPayload, HealthState, HealthStatus, RegistryState,
    RegistryStatus,
};
use crate::record::{Endpoint, Name, Record};
use crate::topics::{Incoming, Topics};

/// One MQTT publish the registry wants made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// Whether a message was forwarded live or delivered from the broker's
/// retained store at subscribe time (retain flag set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Live,
    Retained,
}

/// What a publish put to the gate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateKind {
    Record,
    Heartbeat,
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
}

/// What the registry keeps of a record: its owner, its `ttl` and its bytes
/// (the parsed rest lives with the clients that need it). Kept small:
/// 100,000 of these are ~15 MB.
#[derive(Debug)]
struct Entry {
    endpoint: Endpoint,
    ttl: Option<Duration>,
    payload: Bytes,
    deadline: Option<Instant>,
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
    changes: u64,
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
            changes: 0,
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

    /// Bumped on every change worth persisting (not on a `ttl` refresh).
    pub fn changes(&self) -> u64 {
        self.changes
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
    pub fn load(&mut self, now: Instant, records: Vec<(Name, Record)>) {
        for (name, record) in records {
            self.restored.push(name.clone());
            self.insert(now, name, record);
        }
    }

    /// The connection to the broker is (re)established: announce the
    /// registry and re-publish every record, so a broker that lost its
    /// retained messages gets them back. The caller publishes these before
    /// it subscribes; the copies then come back as retained deliveries.
    pub fn on_connected(&mut self) -> Vec<Publish> {
        let mut out = vec![self.online()];
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
                let mut out = match self.on_record(now, &raw, payload, delivery) {
                    Judged::Accepted(ev) => vec![ev],
                    // What the broker now holds is the refused publish:
                    // restore the previous record or clear the topic.
                    Judged::Refused { error, event, .. } => vec![self.current(&raw), error, event],
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
                self.on_heartbeat(now, raw, &payload)
            }
            Incoming::Heartbeat(_) | Incoming::Registry | Incoming::Other => Vec::new(),
        }
    }

    /// A record submitted through the HTTP API for `raw` (empty: remove
    /// it), judged by the same rules as a live publish. The broker has not
    /// seen it: on acceptance the output holds the retained publish of the
    /// record (or the clear) and its event, and the answer is the event's
    /// JSON; on refusal the output holds the error and the `rejected` event
    /// (nothing to restore) and the answer is the error's JSON. A bad name
    /// publishes nothing (it may not even be a valid topic); removing a name
    /// that is not registered is answered `unknown` and publishes nothing.
    pub fn on_submit(
        &mut self,
        now: Instant,
        raw: &str,
        payload: Bytes,
    ) -> (Result<Bytes, Bytes>, Vec<Publish>) {
        let name = match Name::parse(raw) {
            Ok(n) => n,
            Err(e) => {
                self.stats.refusals += 1;
                warn!(name = raw, error = e.code().as_str(), detail = %e, "refused");
                let err = self.error(raw, e.code(), &e.to_string(), None, None);
                return (Err(err.payload), Vec::new());
            }
        };
        let (answer, mut out) = match self.on_record(now, raw, payload, Delivery::Live) {
            Judged::Accepted(ev) => (Ok(ev.payload.clone()), vec![self.current(raw), ev]),
            Judged::Refused { error, event, .. } => {
                (Err(error.payload.clone()), vec![error, event])
            }
            // A live submission is quiet only when it removes a free name.
            Judged::Quiet => {
                let detail = format!("{name} is not registered");
                let err = self.error(raw, ErrorCode::Unknown, &detail, None, None);
                (Err(err.payload), Vec::new())
            }
        };
        out.append(&mut self.extra);
        self.note_echoes(&out);
        (answer, out)
    }

    /// A record (empty: a removal) or a heartbeat published on the bus,
    /// judged before the bus stores or forwards it. Accepted: the output
    /// holds what the bus is to store and forward (the record, its clear,
    /// or the heartbeat) and the event; refused: the error and the
    /// `rejected` event only. An empty publish to a free or bad name is
    /// accepted and changes nothing.
    pub fn on_gate(
        &mut self,
        now: Instant,
        kind: GateKind,
        raw: &str,
        payload: Bytes,
    ) -> (Result<(), ErrorCode>, Vec<Publish>) {
        let (verdict, mut out) = match kind {
            GateKind::Record => match self.on_record(now, raw, payload, Delivery::Live) {
                Judged::Accepted(ev) => (Ok(()), vec![self.current(raw), ev]),
                Judged::Refused { code, error, event } => (Err(code), vec![error, event]),
                Judged::Quiet => (Ok(()), Vec::new()),
            },
            GateKind::Heartbeat => {
                let errors = self.on_heartbeat(now, raw, &payload);
                match errors.first() {
                    None => {
                        let beat = Publish {
                            topic: self.topics.heartbeat(raw),
                            payload,
                            retain: false,
                        };
                        (Ok(()), vec![beat])
                    }
                    Some(e) => {
                        let code = serde_json::from_slice::<ErrorPayload>(&e.payload)
                            .map_or(ErrorCode::Invalid, |p| p.error);
                        (Err(code), errors)
                    }
                }
            }
        };
        out.append(&mut self.extra);
        (verdict, out)
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
            self.changes += 1;
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

    /// Judges a record publish (empty: a removal) and applies it.
    fn on_record(&mut self, now: Instant, raw: &str, payload: Bytes, delivery: Delivery) -> Judged {
        let name = match Name::parse(raw) {
            Ok(n) => n,
            Err(e) if payload.is_empty() => {
                debug!(name = raw, error = %e, "empty publish to a bad name ignored");
                return Judged::Quiet;
            }
            Err(e) => return self.refuse(raw, e.code(), e.to_string(), None, None),
        };
        if payload.is_empty() {
            return match self.remove(&name) {
                Some(record) => {
                    self.stats.deregistrations += 1;
                    info!(name = %name, owner = %record.endpoint, "deregistered");
                    Judged::Accepted(self.event(
                        &name,
                        EventKind::Deregistered,
                        Some(&record.endpoint),
                    ))
                }
                None => Judged::Quiet,
            };
        }
        let record = match Record::parse(&name, payload) {
            Ok(r) => r,
            Err(e) => return self.refuse(raw, e.code(), e.to_string(), None, None),
        };
        let Some(existing) = self.records.get(&name) else {
            self.stats.registrations += 1;
            info!(name = %name, owner = %record.endpoint, "registered");
            let ev = self.event(&name, EventKind::Registered, Some(&record.endpoint));
            self.insert(now, name, record);
            return Judged::Accepted(ev);
        };
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
        if changed {
            self.insert(now, name, record);
        } else {
            self.refresh(now, &name);
        }
        Judged::Accepted(ev)
    }

    fn on_heartbeat(&mut self, now: Instant, raw: &str, payload: &[u8]) -> Vec<Publish> {
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
        if entry.endpoint.port.is_some() && from.port.is_none() {
            let detail = "heartbeat needs `port`: the record has one".to_string();
            return vec![self.error(raw, ErrorCode::Invalid, &detail, None, None)];
        }
        if entry.endpoint != from {
            let owner = &entry.endpoint;
            let detail = owned_detail(owner, &from);
            return vec![self.error(raw, ErrorCode::Owned, &detail, Some(owner), Some(&from))];
        }
        self.refresh(now, &name);
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

    /// What the topic of `raw` should hold now: the record, or nothing.
    fn current(&self, raw: &str) -> Publish {
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

    fn health_clear(&self, name: &str) -> Publish {
        Publish {
            topic: self.topics.health(name),
            payload: Bytes::new(),
            retain: true,
        }
    }

    fn health_status(&self, name: &Name, s: &health::Status) -> Publish {
        let status = HealthStatus {
            check: s.check.clone(),
            detail: s.detail.clone(),
            failures: s.failures,
            name: name.to_string(),
            of: s.of,
            status: if s.passing {
                HealthState::Passing
            } else {
                HealthState::Failing
            },
        };
        Publish {
            topic: self.topics.health(name.as_str()),
            payload: to_bytes(&status),
            retain: true,
        }
    }

    fn clear(&self, raw: &str) -> Publish {
        Publish {
            topic: self.topics.service(raw),
            payload: Bytes::new(),
            retain: true,
        }
    }

    fn insert(&mut self, now: Instant, name: Name, record: Record) {
        if let Some(old) = self.records.remove(&name)
            && let Some(t) = old.deadline
        {
            self.deadlines.remove(&(t, name.clone()));
        }
        if self.health.track(now, &name, &record) {
            self.extra.push(self.health_clear(name.as_str()));
        }
        let deadline = record.ttl.map(|ttl| now + ttl);
        if let Some(t) = deadline {
            self.deadlines.insert((t, name.clone()));
        }
        let entry = Entry {
            payload: record.payload().clone(),
            endpoint: record.endpoint,
            ttl: record.ttl,
            deadline,
        };
        self.records.insert(name, entry);
        self.changes += 1;
    }

    fn remove(&mut self, name: &Name) -> Option<Entry> {
        let entry = self.records.remove(name)?;
        if let Some(t) = entry.deadline {
            self.deadlines.remove(&(t, name.clone()));
        }
        if self.health.untrack(name) {
            self.extra.push(self.health_clear(name.as_str()));
        }
        self.changes += 1;
        Some(entry)
    }

    fn refresh(&mut self, now: Instant, name: &Name) {
        let Some(entry) = self.records.get_mut(name) else {
            return;
        };
        if let Some(ttl) = entry.ttl {
            if let Some(old) = entry.deadline {
                self.deadlines.remove(&(old, name.clone()));
            }
            entry.deadline = Some(now + ttl);
            self.deadlines.insert((now + ttl, name.clone()));
        }
    }

    /// An error; `owner` for `owned`, `from` the refused publisher's
    /// endpoint where it is known.
    fn error(
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

    fn event(&self, name: &Name, kind: EventKind, endpoint: Option<&Endpoint>) -> Publish {
        self.announce(&EventPayload::new(name.as_str(), kind, endpoint))
    }

    fn announce(&self, event: &EventPayload) -> Publish {
        Publish {
            topic: self.topics.event(&event.name),
            payload: to_bytes(event),
            retain: false,
        }
    }
}

/// A payload's JSON.
fn to_bytes(payload: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(payload).expect("a payload is JSON"))
}

fn owned_detail(owner: &Endpoint, from: &Endpoint) -> String {
    format!("owned by {owner}; refused {from}")
}

#[cfg(test)]
mod tests;
