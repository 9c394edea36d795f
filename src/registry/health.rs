//! Health-check scheduling as pure data: which record is due for a probe,
//! and what a probe's outcome means. The actor runs the probes
//! (`probe.rs`); the registry (`state.rs`) owns this schedule.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{HealthState, HealthStatus};
use crate::record::{Endpoint, Health, HealthCheck, Name, Record};

/// Probes are never more frequent than this (a record asking for more is
/// refused; this guards the schedule itself).
pub const MIN_INTERVAL: Duration = Health::MIN_INTERVAL;

/// One probe to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub name: Name,
    /// Which version of the record's health settings this probe is for;
    /// results for an older generation are dropped.
    pub generation: u64,
    pub target: Target,
    pub timeout: Duration,
    /// An https:// check takes any certificate.
    pub tls_skip_verify: bool,
    /// The record's host is this machine's own: the probe may reach
    /// loopback. Otherwise an address that resolves to loopback (or
    /// 0.0.0.0) is not probed.
    pub loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// GET this URL; a 2xx passes unless the body names another service.
    Http(String),
    /// Connect to host:port.
    Tcp { host: String, port: u16 },
}

impl Target {
    fn of(check: &HealthCheck, ep: &Endpoint) -> Target {
        let host = if ep.host.contains(':') {
            format!("[{}]", ep.host)
        } else {
            ep.host.clone()
        };
        match check {
            HealthCheck::Tcp => Target::Tcp {
                host: ep.host.clone(),
                port: ep.port.unwrap_or(80),
            },
            HealthCheck::Http(url) if url.starts_with("http://") || url.starts_with("https://") => {
                Target::Http(url.clone())
            }
            HealthCheck::Http(path) => {
                let port = ep.port.map_or(String::new(), |p| format!(":{p}"));
                Target::Http(format!("http://{host}{port}{path}"))
            }
        }
    }

    /// How a person reads the check: `GET http://…` or `tcp host:port`.
    pub fn describe(&self) -> String {
        match self {
            Target::Http(url) => format!("GET {url}"),
            Target::Tcp { host, port } => format!("tcp {host}:{port}"),
        }
    }
}

/// A probe's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
}

/// What the registry does with a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stale (the record changed or went); nothing to do.
    Ignore,
    /// Still registered; publish this status when it changed.
    Status { status: Status, changed: bool },
    /// `failures` failures in a row: clear the record.
    Unhealthy { detail: String },
}

/// The health of one record, as published on `PREFIX/health/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub passing: bool,
    pub failures: u32,
    /// Failures in a row that clear the record.
    pub of: u32,
    pub detail: String,
    pub check: String,
}

impl Status {
    /// The `PREFIX/health/NAME` payload.
    pub fn payload(&self, name: &Name) -> HealthStatus {
        HealthStatus {
            check: self.check.clone(),
            detail: self.detail.clone(),
            failures: self.failures,
            name: name.to_string(),
            of: self.of,
            status: if self.passing {
                HealthState::Passing
            } else {
                HealthState::Failing
            },
        }
    }
}

#[derive(Debug)]
struct Tracked {
    generation: u64,
    health: Health,
    target: Target,
    loopback: bool,
    failures: u32,
    in_flight: bool,
    due: Option<Instant>,
    status: Option<Status>,
}

/// Every record with a health check and when it is next probed.
#[derive(Debug, Default)]
pub struct Schedule {
    tracked: HashMap<Name, Tracked>,
    due: BTreeSet<(Instant, Name)>,
    generations: u64,
}

impl Schedule {
    /// Follows a record that was inserted or updated. Unchanged settings keep
    /// their schedule and failure count; new ones start over, first probed
    /// at an offset within the interval spread by name (jitter).
    /// Returns whether a published status was dropped (to be cleared).
    /// `local_writer`: the record was written from this machine (loopback);
    /// only then may a record whose host is loopback be probed there.
    pub fn track(
        &mut self,
        now: Instant,
        name: &Name,
        record: &Record,
        local_writer: bool,
    ) -> bool {
        let Some(health) = &record.health else {
            return self.untrack(name);
        };
        let target = Target::of(&health.check, &record.endpoint);
        let loopback = local_writer && record.endpoint.is_loopback();
        if let Some(t) = self.tracked.get(name)
            && t.health == *health
            && t.target == target
            && t.loopback == loopback
        {
            return false;
        }
        let dropped = self.untrack(name);
        self.generations += 1;
        let interval = health.interval.max(MIN_INTERVAL);
        let at = now + spread(name, interval);
        self.due.insert((at, name.clone()));
        self.tracked.insert(
            name.clone(),
            Tracked {
                generation: self.generations,
                health: health.clone(),
                target,
                loopback,
                failures: 0,
                in_flight: false,
                due: Some(at),
                status: None,
            },
        );
        dropped
    }

    /// Stops probing `name` at once; returns whether a status was published
    /// for it (so that it can be cleared).
    pub fn untrack(&mut self, name: &Name) -> bool {
        let Some(t) = self.tracked.remove(name) else {
            return false;
        };
        if let Some(at) = t.due {
            self.due.remove(&(at, name.clone()));
        }
        t.status.is_some()
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(t, _)| *t)
    }

    /// The probes due at `now`. A record has at most one probe in flight;
    /// its next one is scheduled when the result arrives.
    pub fn take_due(&mut self, now: Instant) -> Vec<Probe> {
        let mut out = Vec::new();
        while let Some((at, name)) = self.due.first().cloned() {
            if at > now {
                break;
            }
            self.due.pop_first();
            if let Some(t) = self.tracked.get_mut(&name) {
                t.due = None;
                t.in_flight = true;
                out.push(Probe {
                    name,
                    generation: t.generation,
                    target: t.target.clone(),
                    timeout: timeout_of(&t.health),
                    loopback: t.loopback,
                    tls_skip_verify: t.health.tls_skip_verify,
                });
            }
        }
        out
    }

    /// Applies a probe's result.
    pub fn result(
        &mut self,
        now: Instant,
        name: &Name,
        generation: u64,
        outcome: Outcome,
    ) -> Verdict {
        let Some(t) = self.tracked.get_mut(name) else {
            return Verdict::Ignore;
        };
        if t.generation != generation || !t.in_flight {
            return Verdict::Ignore;
        }
        t.in_flight = false;
        let (passing, detail) = match outcome {
            Outcome::Pass => {
                t.failures = 0;
                (true, "ok".to_string())
            }
            Outcome::Fail(why) => {
                t.failures += 1;
                (false, why)
            }
        };
        if t.failures >= t.health.failures {
            let detail = format!(
                "{} failed {} times in a row: {detail}",
                t.target.describe(),
                t.failures
            );
            self.untrack(name);
            return Verdict::Unhealthy { detail };
        }
        let at = now + t.health.interval.max(MIN_INTERVAL);
        t.due = Some(at);
        self.due.insert((at, name.clone()));
        let status = Status {
            passing,
            failures: t.failures,
            of: t.health.failures,
            detail,
            check: t.target.describe(),
        };
        let changed = t.status.as_ref() != Some(&status);
        t.status = Some(status.clone());
        Verdict::Status { status, changed }
    }

    /// Every published status, for re-publishing after a reconnection.
    pub fn statuses(&self) -> impl Iterator<Item = (&Name, &Status)> {
        self.tracked
            .iter()
            .filter_map(|(n, t)| t.status.as_ref().map(|s| (n, s)))
    }

    /// NAME's last published status.
    pub fn status(&self, name: &Name) -> Option<&Status> {
        self.tracked.get(name)?.status.as_ref()
    }

    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }
}

/// A probe never waits longer than a minute, so that endpoints that accept
/// and stall cannot hold probe slots for long.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

fn timeout_of(h: &Health) -> Duration {
    h.timeout.min(MAX_TIMEOUT)
}

/// A stable offset in `[0, interval)` from the name, so that records
/// registered together are not probed in the same millisecond.
fn spread(name: &Name, interval: Duration) -> Duration {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    let nanos = interval.as_nanos().max(1) as u64;
    Duration::from_nanos(h.finish() % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::record::parsed as rec;

    #[test]
    fn targets() {
        let (_, r) = rec(
            "a",
            r#"{"host":"10.0.0.5","port":8080,"health":{"http":"/health"}}"#,
        );
        let h = r.health.unwrap();
        assert_eq!(
            Target::of(&h.check, &r.endpoint),
            Target::Http("http://10.0.0.5:8080/health".into())
        );
        let ep = Endpoint::new("::1", Some(80)).unwrap();
        assert_eq!(
            Target::of(&HealthCheck::Http("/h".into()), &ep),
            Target::Http("http://[::1]:80/h".into())
        );
        assert_eq!(
            Target::of(&HealthCheck::Http("https://nas:5001/x".into()), &ep),
            Target::Http("https://nas:5001/x".into())
        );
        assert_eq!(
            Target::of(&HealthCheck::Http("http://other/x".into()), &ep),
            Target::Http("http://other/x".into())
        );
        assert_eq!(
            Target::of(&HealthCheck::Tcp, &ep),
            Target::Tcp {
                host: "::1".into(),
                port: 80
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_make_it_unhealthy_and_a_pass_resets() {
        let (n, r) = rec(
            "a",
            r#"{"host":"h","port":1,"health":{"tcp":true,"interval":"10s","failures":3}}"#,
        );
        let mut s = Schedule::default();
        s.track(Instant::now(), &n, &r, false);
        let first = s.next_due().unwrap();
        assert!(
            first < Instant::now() + Duration::from_secs(10),
            "jittered within the interval"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let fail = |s: &mut Schedule| {
            let p = s.take_due(Instant::now()).pop().expect("a probe is due");
            assert!(
                s.take_due(Instant::now()).is_empty(),
                "one in flight at most"
            );
            s.result(
                Instant::now(),
                &n,
                p.generation,
                Outcome::Fail("refused".into()),
            )
        };
        let v = fail(&mut s);
        assert!(
            matches!(v, Verdict::Status { ref status, changed: true } if status.failures == 1 && !status.passing)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        fail(&mut s);
        tokio::time::advance(Duration::from_secs(10)).await;
        let p = s.take_due(Instant::now()).pop().unwrap();
        let v = s.result(Instant::now(), &n, p.generation, Outcome::Pass);
        assert!(
            matches!(v, Verdict::Status { ref status, .. } if status.passing && status.failures == 0)
        );
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(10)).await;
            fail(&mut s);
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        match fail(&mut s) {
            Verdict::Unhealthy { detail } => assert!(
                detail.contains("tcp h:1 failed 3 times in a row: refused"),
                "{detail}"
            ),
            v => panic!("{v:?}"),
        }
        assert!(s.is_empty() && s.next_due().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn updates_and_removal_change_what_is_probed() {
        let (n, r) = rec(
            "a",
            r#"{"host":"h","port":1,"health":{"tcp":true,"interval":"1s"}}"#,
        );
        let mut s = Schedule::default();
        s.track(Instant::now(), &n, &r, false);
        tokio::time::advance(Duration::from_secs(1)).await;
        let p = s.take_due(Instant::now()).pop().unwrap();
        // The record changes its check while the probe is in flight.
        let (_, r2) = rec(
            "a",
            r#"{"host":"h","port":1,"health":{"http":"/h","interval":"1s"}}"#,
        );
        s.track(Instant::now(), &n, &r2, false);
        assert_eq!(
            s.result(Instant::now(), &n, p.generation, Outcome::Fail("x".into())),
            Verdict::Ignore
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let p2 = s.take_due(Instant::now()).pop().unwrap();
        assert_eq!(p2.target, Target::Http("http://h:1/h".into()));
        // The same settings again keep the schedule.
        s.track(Instant::now(), &n, &r2, false);
        assert_eq!(
            s.result(Instant::now(), &n, p2.generation, Outcome::Pass)
                .clone(),
            Verdict::Status {
                status: Status {
                    passing: true,
                    failures: 0,
                    of: 3,
                    detail: "ok".into(),
                    check: "GET http://h:1/h".into()
                },
                changed: true,
            }
        );
        // Health removed from the record: no more probes, at once.
        let (_, plain) = rec("a", r#"{"host":"h","port":1}"#);
        s.track(Instant::now(), &n, &plain, false);
        assert!(s.is_empty() && s.next_due().is_none());
    }

    #[test]
    fn a_thousand_records_are_spread_over_the_interval() {
        let mut s = Schedule::default();
        let now = Instant::now();
        for i in 0..1000 {
            let (n, r) = rec(
                &format!("s{i}"),
                r#"{"host":"h","port":1,"health":{"tcp":true,"interval":"30s"}}"#,
            );
            s.track(now, &n, &r, false);
        }
        let mut per_second = [0u32; 30];
        for (at, _) in &s.due {
            per_second[(*at - now).as_secs() as usize] += 1;
        }
        assert!(per_second.iter().all(|c| *c < 80), "{per_second:?}");
    }
}
