//! The registry's state, shared by its actor and, on the embedded bus, by
//! every session: a record or heartbeat published on the bus is judged in
//! the publisher's own task, under one lock, and what the verdict
//! publishes goes to the router under that same lock, so the router sees
//! the registry's changes in the order the registry made them. The actor
//! keeps the clock (ttl deadlines, health probes) and is woken only when a
//! change moves one of its deadlines earlier. Whoever changes the registry
//! appends the change to the journal before letting go of the lock, so the
//! journal holds the changes in the order they were made.
//!
//! The lock combines: a session that finds it taken does not wait for it
//! but leaves its submission in a queue, and whoever holds the lock judges
//! every queued submission before letting go (flat combining). Alone, a
//! publish is judged at once in its own task (no hop to another task: the
//! latency of the bus alone); under a burst from many clients, one thread
//! judges them in a batch while the others go on reading (the throughput
//! of a single registry task, without threads taking turns at a lock).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use tokio::sync::{Notify, broadcast, oneshot};
use tokio::time::Instant;

use super::Stopped;
use super::state::{GateKind, Publish, Registry, Source};
use crate::bus::Router;
use crate::bus::gate::{Gated, Submission};
use crate::bus::router::{After, Message, now_ms};

type Queued = (Submission, oneshot::Sender<Gated>);

/// Submissions from different sessions closer together than this (µs) are
/// a burst, judged by the actor in batches; further apart, or from the
/// session judged last, each is judged in its publisher's task.
const BURST_GAP_US: u64 = 250;

/// Submissions one holder judges for others before it hands the rest to
/// the actor (so that a long burst does not hold one session's task).
const COMBINE_MAX: usize = 1024;

pub(super) struct Shared {
    locked: Mutex<Locked>,
    /// Submissions left for the lock's holder to judge.
    queue: Mutex<Vec<Queued>>,
    /// When a submission was last judged, in µs since `started`.
    last_judged: AtomicU64,
    /// The session whose submission was judged last.
    last_origin: AtomicU64,
    started: std::time::Instant,
    /// The embedded bus's router (`None`: an external broker, reached by
    /// the actor alone).
    pub router: Option<Router>,
    /// Wakes the actor to look at its deadlines again.
    pub wake: Notify,
    pub stopped: AtomicBool,
    /// Where changes are written (`None`: nowhere).
    pub journal: Option<crate::journal::Journal>,
    /// A copy of everything the registry publishes, and an empty message
    /// on `PREFIX/heartbeat/NAME` for each accepted heartbeat, for the
    /// dashboard (see [`Shared::tap`]).
    pub feed: broadcast::Sender<Publish>,
    /// `PREFIX/events/`: the only payloads the feed carries.
    events: String,
}

/// How many publishes a slow dashboard may fall behind before it skips
/// them (and takes a fresh snapshot).
const FEED_BACKLOG: usize = 4096;

pub(super) struct Locked {
    pub reg: Registry,
    /// What the actor sleeps on.
    pub armed: Armed,
}

/// The actor's deadlines as it last set them.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Armed {
    pub deadline: Option<Instant>,
    pub probe_at: Option<Instant>,
}

impl Armed {
    /// Whether `reg` now needs the actor sooner than it will wake.
    fn stale(&self, reg: &Registry) -> bool {
        let sooner = |new: Option<Instant>, old: Option<Instant>| match (new, old) {
            (Some(n), Some(o)) => n < o,
            (Some(_), None) => true,
            (None, _) => false,
        };
        sooner(reg.next_deadline(), self.deadline) || sooner(reg.next_probe(), self.probe_at)
    }
}

/// The submission whose publishes the registry is making: its record or
/// heartbeat goes out as its publisher sent it (origin and QoS).
#[derive(Clone, Copy)]
pub(super) struct On<'a> {
    pub topic: &'a str,
    pub origin: u64,
    pub qos: u8,
}

impl Shared {
    pub fn new(
        reg: Registry,
        router: Option<Router>,
        journal: Option<crate::journal::Journal>,
    ) -> Shared {
        let reg_prefix = reg.topics().prefix().to_string();
        Shared {
            locked: Mutex::new(Locked {
                reg,
                armed: Armed::default(),
            }),
            queue: Mutex::default(),
            last_judged: AtomicU64::new(0),
            last_origin: AtomicU64::new(0),
            started: std::time::Instant::now(),
            router,
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            journal,
            events: format!("{}/events/", reg_prefix),
            feed: broadcast::channel(FEED_BACKLOG).0,
        }
    }

    /// The registry, locked; submissions queued meanwhile are judged
    /// before the lock is let go.
    pub fn lock(&self) -> Guard<'_> {
        // The rules do not panic by design; if one did, the state is
        // still whole (each change is one call) and the bus goes on.
        let inner = self.locked.lock().unwrap_or_else(|e| e.into_inner());
        Guard {
            shared: self,
            inner: Some(inner),
        }
    }

    fn try_lock(&self) -> Option<Guard<'_>> {
        let inner = match self.locked.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Guard {
            shared: self,
            inner: Some(inner),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Judges the queued submissions (the lock held), up to
    /// [`COMBINE_MAX`] of them; how many it judged.
    fn combine(&self, l: &mut Locked) -> usize {
        let mut wake = false;
        let mut judged = 0;
        while judged < COMBINE_MAX {
            let batch = std::mem::take(&mut *self.queue());
            if batch.is_empty() {
                break;
            }
            judged += batch.len();
            for (sub, tx) in batch {
                self.last_origin.store(sub.origin, Ordering::Relaxed);
                wake |= self.judge(l, sub, tx);
            }
        }
        if wake {
            self.wake.notify_one();
        }
        if judged > 0 {
            let now = self.started.elapsed().as_micros() as u64;
            self.last_judged.store(now, Ordering::Relaxed);
        }
        judged
    }

    /// Hands `out` to the router (embedded bus): call it with the lock
    /// held. Retained messages go out at QoS 1, the rest at QoS 0, from the
    /// server, but for `on`'s own record, which keeps its publisher's.
    pub fn route(&self, out: Vec<Publish>, on: Option<On<'_>>) {
        self.route_after(out, on, None);
    }

    /// [`Self::route`], the publisher's acknowledgement waiting for the
    /// subscribers it wakes (see [`crate::bus::router::After`]).
    fn route_after(&self, out: Vec<Publish>, on: Option<On<'_>>, after: Option<&After>) {
        self.tap(&out);
        let Some(router) = &self.router else {
            return;
        };
        for p in out {
            let (origin, qos) = match on {
                Some(on) if on.topic == p.topic => (on.origin, on.qos),
                _ => (0, u8::from(p.retain)),
            };
            // The payload as the registry holds it: a record is stored
            // once, shared by the registry and the router.
            router.publish_after(
                Message {
                    topic: p.topic.into(),
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    origin,
                    at_ms: now_ms(),
                    ..Message::default()
                },
                after,
            );
        }
    }

    /// Judges a record or heartbeat published on the embedded bus; an
    /// accepted one is published (with its event) before the verdict is
    /// given.
    pub async fn gate(&self, sub: Submission) -> Result<Gated, Stopped> {
        self.gate_later(sub)?.await.map_err(|_| Stopped)
    }

    /// Copies `out` to the dashboards watching (nothing when none is):
    /// the topics, and the payloads of events only (a dashboard reads
    /// records under the lock; the backlog holds no record's bytes).
    pub fn tap(&self, out: &[Publish]) {
        if self.feed.receiver_count() == 0 {
            return;
        }
        for p in out {
            let payload = if p.topic.starts_with(&self.events) {
                p.payload.clone()
            } else {
                bytes::Bytes::new()
            };
            let _ = self.feed.send(Publish {
                topic: p.topic.clone(),
                payload,
                retain: p.retain,
            });
        }
    }

    /// [`Self::gate`] without waiting: the verdict comes on the receiver
    /// (at once when the lock was free). Submissions are judged in the
    /// order they are made.
    pub fn gate_later(&self, sub: Submission) -> Result<oneshot::Receiver<Gated>, Stopped> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Stopped);
        }
        let (tx, rx) = oneshot::channel();
        let origin = sub.origin;
        self.queue().push((sub, tx));
        let close = self.started.elapsed().as_micros() as u64
            - self.last_judged.load(Ordering::Relaxed)
            < BURST_GAP_US;
        if close && self.last_origin.load(Ordering::Relaxed) != origin {
            // A burst from many clients: the actor judges the queue in
            // batches, on one thread, while the sessions go on reading.
            // (One client's publishes in a row are judged in its own task:
            // a hop to the actor and back would wake a thread twice for
            // each; measured, a fifth of item 2's records took that hop.)
            self.wake.notify_one();
        } else {
            // Alone: judged here and now. Taken: its holder judges the
            // queue before letting go (and, when it has just let go, looks
            // again: see `Guard::drop`).
            drop(self.try_lock());
        }
        Ok(rx)
    }

    /// Appends the registry's changes not yet journaled (the lock held).
    pub fn journal(&self, l: &mut Locked) {
        if let Some(j) = &self.journal {
            j.append(l.reg.take_changes());
        }
    }

    /// Judges one submission and publishes what it says; whether the actor
    /// must look at its deadlines again.
    fn judge(&self, l: &mut Locked, sub: Submission, tx: oneshot::Sender<Gated>) -> bool {
        let from = Source {
            session: sub.origin,
            will: sub.will,
            guards: sub.guards,
        };
        let (verdict, out) = l.reg.on_gate(
            Instant::now(),
            sub.kind,
            &sub.raw,
            sub.payload,
            &sub.by,
            from,
        );
        let topic = match sub.kind {
            GateKind::Record => l.reg.topics().service(&sub.raw),
            GateKind::Heartbeat => l.reg.topics().heartbeat(&sub.raw),
        };
        let on = On {
            topic: &topic,
            origin: sub.origin,
            qos: sub.qos,
        };
        self.route_after(out, Some(on), sub.after.as_ref());
        if sub.kind == GateKind::Heartbeat && verdict.is_ok() {
            // A heartbeat publishes nothing, but moves a deadline.
            self.tap(&[Publish {
                topic,
                payload: bytes::Bytes::new(),
                retain: false,
            }]);
        }
        self.journal(l);
        let _ = tx.send(match verdict {
            Ok(()) => Gated::Accepted,
            Err(code) => Gated::Refused(code),
        });
        l.armed.stale(&l.reg)
    }
}

/// The locked registry (see [`Shared::lock`]).
pub(super) struct Guard<'a> {
    shared: &'a Shared,
    inner: Option<MutexGuard<'a, Locked>>,
}

impl Deref for Guard<'_> {
    type Target = Locked;
    fn deref(&self) -> &Locked {
        self.inner.as_ref().expect("held until dropped")
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Locked {
        self.inner.as_mut().expect("held until dropped")
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let shared = self.shared;
        let mut judged = 0;
        if let Some(mut g) = self.inner.take() {
            judged += shared.combine(&mut g);
        }
        // A submission queued after the last look, by a session that found
        // the lock still held, must not wait for the next holder: look
        // again now that it is free. (The queue's own lock orders this
        // look after that session's push, or its try_lock after our
        // release: one of the two sees the other.)
        while !shared.queue().is_empty() {
            if judged >= COMBINE_MAX {
                // The actor locks the registry as it wakes, and judges them.
                shared.wake.notify_one();
                return;
            }
            judged += match shared.locked.try_lock() {
                Ok(mut g) => shared.combine(&mut g),
                Err(TryLockError::Poisoned(e)) => shared.combine(&mut e.into_inner()),
                Err(TryLockError::WouldBlock) => return,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::topics::Topics;

    fn record(task: usize, i: usize) -> Submission {
        Submission {
            kind: GateKind::Record,
            raw: format!("t{task}-{i}"),
            payload: Bytes::from(format!(r#"{{"host":"10.0.{task}.{}","port":80}}"#, i % 250)),
            qos: 1,
            by: crate::identity::Author::UNKNOWN,
            origin: task as u64,
            will: false,
            guards: false,
            after: None,
        }
    }

    /// One session's records in a row are judged in its own task, however
    /// close together: each verdict is there when `gate_later` returns (no
    /// actor runs here to judge a queued one). Under the earlier rule
    /// (any two close submissions are a burst) the second was queued.
    #[tokio::test]
    async fn one_clients_records_in_a_row_are_judged_at_once() {
        let mut reg = Registry::new(Topics::new("homicro"), "test");
        reg.set_gated();
        let shared = Shared::new(reg, Some(Router::new()), None);
        // The first may count as a burst after another client's (the
        // start): whoever takes the lock next judges it.
        let mut first = shared.gate_later(record(1, 0)).unwrap();
        drop(shared.lock());
        assert_eq!(first.try_recv(), Ok(Gated::Accepted));
        for i in 1..200 {
            let mut rx = shared.gate_later(record(1, i)).unwrap();
            assert_eq!(rx.try_recv(), Ok(Gated::Accepted), "record {i}");
        }
        assert!(shared.queue().is_empty());
    }

    /// Many sessions at once, some in bursts (queued), some alone (judged
    /// in their own task): every submission gets its verdict, none is left
    /// in the queue, and each is published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_submission_is_judged_once_whoever_holds_the_lock() {
        let router = Router::new();
        let mut watch = router.link();
        watch.subscribe("homicro/services/+", true);
        let mut reg = Registry::new(Topics::new("homicro"), "test");
        reg.set_gated();
        let shared = Arc::new(Shared::new(reg, Some(router), None));
        // Stands in for the actor: judges the queue when woken.
        let actor = {
            let s = shared.clone();
            tokio::spawn(async move {
                loop {
                    s.wake.notified().await;
                    drop(s.lock());
                }
            })
        };
        let mut tasks = Vec::new();
        for task in 0..8 {
            let s = shared.clone();
            tasks.push(tokio::spawn(async move {
                let mut verdicts = Vec::new();
                for i in 0..500 {
                    verdicts.push(s.gate_later(record(task, i)).unwrap());
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                for v in verdicts {
                    let v = tokio::time::timeout(Duration::from_secs(10), v).await;
                    assert_eq!(v.expect("a verdict").unwrap(), Gated::Accepted);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(shared.lock().reg.len(), 4000);
        assert!(shared.queue().is_empty());
        for _ in 0..4000 {
            let f = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
            assert!(f.is_ok(), "every accepted record is published");
        }
        actor.abort();
    }
}
