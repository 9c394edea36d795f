//! Request/response through the hub: a call names a service (or a role and
//! range), the hub picks one instance that takes requests, hands it the
//! request once, and gives the caller its answer, a 504 when none came in
//! time, or a 503 when no instance takes requests.
//!
//! ```text
//!  POST /call/QUERY ─┐                         ┌─▶ PREFIX/rpc/NAME/ID  (an MQTT instance)
//!                    ├─▶ Calls::call ─ pick ───┤
//!  PREFIX/call/QUERY ┘        ▲                └─▶ GET /jobs/NAME     (a long-polling one)
//!                             └── PREFIX/reply/ID, POST /jobs/ID: Calls::answer
//! ```
//!
//! An instance takes requests when a session subscribes to its request
//! filter (`PREFIX/rpc/NAME/+` or `/#`, not a wider wildcard such as a
//! debugging `#`), or when it long-polls `GET /jobs/NAME` (now, or within
//! the last [`POLLED_WITHIN`]). A request goes to one instance at most
//! once (MQTT QoS 0; a job to one poller). When the instance goes away
//! before it answers (its record is removed, or nothing subscribes to its
//! request topic any more; looked at every [`SWEEP`]), the call ends with 504, or, when the record says
//! `"idempotent": true` or the request was never handed over, is tried on
//! the next instance.

pub mod mqtt;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use crate::bus::Bus;
use crate::bus::codec::Properties;
use crate::bus::router::{Message, now_ms};
use crate::protocol::ErrorCode;
use crate::record::{Name, Query};

/// How long after its last poll a long-polling instance still counts as
/// taking requests (a request queued meanwhile waits for its next poll).
pub const POLLED_WITHIN: Duration = Duration::from_secs(30);

/// Calls waiting for their answer at once; more are refused with 503.
pub const MAX_PENDING: usize = 10_000;

/// The request bodies calls waiting for their answer may hold in all;
/// beyond, calls are refused with 503 (one client calling a service of its
/// own that never answers cannot hold 10,000 × 1 MiB).
pub const MAX_PENDING_BYTES: usize = 64 << 20;

/// A request as the caller sent it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub body: Bytes,
    pub content_type: Option<String>,
}

/// An instance's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// An HTTP status (200 unless the instance says otherwise).
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// A request handed to a long-polling instance.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Arc<str>,
    pub request: Request,
}

/// Why a call got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// QUERY is not a name or `role@range`.
    #[error("{0}")]
    BadQuery(String),
    #[error("no service named {0} and no instance of role {0}")]
    NotFound(String),
    #[error("the ACL does not let this client call {0}")]
    Forbidden(String),
    /// No instance takes requests now, or the hub is full.
    #[error("{0}")]
    Unavailable(String),
    #[error("{instance} did not answer within {}", humantime::format_duration(*.after))]
    Timeout { instance: Name, after: Duration },
    #[error("{instance} went away before it answered")]
    Gone { instance: Name },
}

impl CallError {
    /// The HTTP status the caller gets.
    pub fn status(&self) -> u16 {
        match self {
            CallError::BadQuery(_) => 400,
            CallError::Forbidden(_) => 403,
            CallError::NotFound(_) => 404,
            CallError::Unavailable(_) => 503,
            CallError::Timeout { .. } | CallError::Gone { .. } => 504,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            CallError::BadQuery(_) => ErrorCode::BadName,
            CallError::Forbidden(_) => ErrorCode::NotAuthorized,
            CallError::NotFound(_) => ErrorCode::NotFound,
            _ => ErrorCode::Unavailable,
        }
    }

    /// The answer a caller gets: the status, and `{"error", "detail"}`.
    pub fn answer(&self) -> Answer {
        let body = serde_json::json!({"error": self.code(), "detail": self.to_string()});
        Answer {
            status: self.status(),
            content_type: Some("application/json".into()),
            body: Bytes::from(body.to_string()),
        }
    }
}

/// Why an answer was not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnswered {
    #[error("no call waits for this answer: it timed out, or was answered already")]
    NoSuchCall,
    #[error("not allowed to answer for {0}")]
    NotAllowed(Name),
}

/// How a pending call reached its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Published on its request topic.
    Mqtt,
    /// Queued for its next poll: not handed over yet.
    Queued,
    /// Taken by a poll.
    Taken,
}

/// What ends a pending call.
enum Outcome {
    Answered(Answer),
    /// Answered, and the answer went to the call's [`Deliver`].
    Delivered,
    /// The instance went away; `handed`: it may have seen the request.
    Gone {
        handed: bool,
    },
}

struct Pending {
    instance: Name,
    via: Via,
    /// The request body's size, counted in [`State::bytes`].
    bytes: usize,
    tx: oneshot::Sender<Outcome>,
    /// Where the answer goes at once (`None`: to `tx`).
    deliver: Option<Deliver>,
}

/// Where an answer goes the moment it arrives (an MQTT caller's reply
/// topic), published by the task that brought it, so that no other task
/// is woken on the way back.
pub type Deliver = Arc<dyn Fn(&Name, Answer) + Send + Sync>;

/// A call handed to its first instance, waiting in [`Calls::finish`].
pub struct Started {
    query: String,
    candidates: Vec<Candidate>,
    tried: Vec<Name>,
    req: Request,
    deadline: Instant,
    timeout: Duration,
    deliver: Option<Deliver>,
    current: Option<Try>,
}

/// The instance a call is with now.
struct Try {
    /// Its index in `candidates`.
    at: usize,
    id: Arc<str>,
    rx: oneshot::Receiver<Outcome>,
}

/// One long-polling instance's requests and pollers.
struct Queue {
    waiting: VecDeque<oneshot::Sender<Job>>,
    jobs: VecDeque<Job>,
    seen: Instant,
}

#[derive(Default)]
struct State {
    pending: HashMap<Arc<str>, Pending>,
    /// The request bodies the pending calls hold.
    bytes: usize,
    queues: HashMap<Name, Queue>,
}

impl State {
    /// Removes call `id` (every removal goes through here).
    fn take(&mut self, id: &str) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.bytes -= p.bytes;
        Some(p)
    }

    /// Ends the calls of `name` that `which` picks as gone.
    fn end(&mut self, name: &Name, which: impl Fn(&Pending) -> bool) {
        let ids: Vec<Arc<str>> = self
            .pending
            .iter()
            .filter(|(_, p)| &p.instance == name && which(p))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(p) = self.take(&id) {
                debug!(call = %id, instance = %name, "instance gone mid-call");
                let _ = p.tx.send(Outcome::Gone {
                    handed: p.via != Via::Queued,
                });
            }
        }
    }
}

/// Ends a call's pending entry (and its queued job) however `call`
/// ends, its caller hanging up included.
struct Forget<'a> {
    calls: &'a Calls,
    id: Arc<str>,
    instance: Name,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.calls.forget(&self.id, &self.instance);
    }
}

/// The hub's calls in flight and the long-poll queues.
#[derive(Default)]
pub struct Calls {
    state: Mutex<State>,
    next: AtomicUsize,
    pub metrics: CallMetrics,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct CallMetrics {
    pub calls: AtomicU64,
    pub answered: AtomicU64,
    pub timed_out: AtomicU64,
    pub gone: AtomicU64,
    pub retried: AtomicU64,
}

/// One instance a call may go to.
struct Candidate {
    name: Name,
    idempotent: bool,
}

impl Calls {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls waiting for their answer now.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    /// Calls QUERY with `req` and waits up to `timeout` for the answer.
    /// `may_read` says whether the caller may reach NAME (the ACL's read
    /// on its record).
    pub async fn call(
        &self,
        bus: &Bus,
        query: &str,
        req: Request,
        timeout: Duration,
        may_read: impl Fn(&str) -> bool,
    ) -> Result<(Name, Answer), CallError> {
        let started = self.start(bus, query, req, timeout, may_read, None)?;
        let answered = self.finish(bus, started).await?;
        Ok(answered.expect("without a Deliver the answer comes back here"))
    }

    /// Hands the request to its first instance at once (on the caller's
    /// task: no hop before the instance has it). With `deliver`, the
    /// answer goes there the moment it arrives, from the answering task.
    pub fn start(
        &self,
        bus: &Bus,
        query: &str,
        req: Request,
        timeout: Duration,
        may_read: impl Fn(&str) -> bool,
        deliver: Option<Deliver>,
    ) -> Result<Started, CallError> {
        self.metrics.calls.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let candidates: Vec<Candidate> = candidates(bus, query)?
            .into_iter()
            .filter(|c| may_read(c.name.as_str()))
            .collect();
        if candidates.is_empty() {
            return Err(CallError::Forbidden(query.to_string()));
        }
        let mut s = Started {
            query: query.to_string(),
            candidates,
            tried: Vec::new(),
            req,
            deadline,
            timeout,
            deliver,
            current: None,
        };
        self.next_try(bus, &mut s)?;
        Ok(s)
    }

    /// Hands the request to the next instance that takes requests.
    fn next_try(&self, bus: &Bus, s: &mut Started) -> Result<(), CallError> {
        let id: Arc<str> = wire::new_id().into();
        let (tx, rx) = oneshot::channel();
        let handed = self.hand_over(
            bus,
            &s.candidates,
            &mut s.tried,
            &id,
            &s.req,
            tx,
            s.deliver.clone(),
        )?;
        let Some((at, via)) = handed else {
            let query = &s.query;
            return Err(CallError::Unavailable(if s.tried.is_empty() {
                format!(
                    "no instance of {query} takes requests: none subscribes to {} \
                     or polls GET /jobs/NAME",
                    bus.topics.request_filter("NAME")
                )
            } else {
                let names: Vec<&str> = s.tried.iter().map(Name::as_str).collect();
                format!(
                    "no instance of {query} takes requests now ({} went away or \
                     could not be reached)",
                    names.join(", ")
                )
            }));
        };
        debug!(call = %id, instance = %s.candidates[at].name, ?via, "call handed over");
        s.current = Some(Try { at, id, rx });
        Ok(())
    }

    /// Waits for a started call's answer, trying the next instance when
    /// one goes away and that is allowed. `None`: the answer went to the
    /// call's [`Deliver`].
    pub async fn finish(
        &self,
        bus: &Bus,
        mut s: Started,
    ) -> Result<Option<(Name, Answer)>, CallError> {
        loop {
            let t = s.current.take().expect("a started call has a try");
            let c = &s.candidates[t.at];
            let name = c.name.clone();
            let _forget = Forget {
                calls: self,
                id: t.id.clone(),
                instance: name.clone(),
            };
            match tokio::time::timeout_at(s.deadline, t.rx).await {
                Ok(Ok(Outcome::Answered(a))) => {
                    self.metrics.answered.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some((name, a)));
                }
                Ok(Ok(Outcome::Delivered)) => {
                    self.metrics.answered.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                Ok(Ok(Outcome::Gone { handed })) => {
                    if handed && !c.idempotent {
                        self.metrics.gone.fetch_add(1, Ordering::Relaxed);
                        return Err(CallError::Gone { instance: name });
                    }
                    self.metrics.retried.fetch_add(1, Ordering::Relaxed);
                    s.tried.push(name);
                    self.next_try(bus, &mut s)?;
                }
                // The hub dropped the call without an outcome: cannot happen
                // while `self` lives; answer as gone.
                Ok(Err(_)) => return Err(CallError::Gone { instance: name }),
                Err(_) => {
                    self.metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Err(CallError::Timeout {
                        instance: name,
                        after: s.timeout,
                    });
                }
            }
        }
    }

    /// Picks the next instance in turn that takes requests (and was not
    /// tried), and hands it the request. `None`: no instance takes them.
    /// An MQTT instance the request reached nobody at (it unsubscribed a
    /// moment ago, or its queue is full) counts as tried.
    #[allow(clippy::too_many_arguments)]
    fn hand_over(
        &self,
        bus: &Bus,
        candidates: &[Candidate],
        tried: &mut Vec<Name>,
        id: &Arc<str>,
        req: &Request,
        tx: oneshot::Sender<Outcome>,
        deliver: Option<Deliver>,
    ) -> Result<Option<(usize, Via)>, CallError> {
        let now = Instant::now();
        let mut state = self.state();
        if state.pending.len() >= MAX_PENDING || state.bytes + req.body.len() > MAX_PENDING_BYTES {
            return Err(CallError::Unavailable(format!(
                "the hub holds {} calls ({} bytes) waiting for their answer; try again later",
                state.pending.len(),
                state.bytes
            )));
        }
        loop {
            let live: Vec<(usize, Route)> = candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| !tried.contains(&c.name))
                .filter_map(|(i, c)| Some((i, route(bus, &mut state, &c.name, now)?)))
                .collect();
            if live.is_empty() {
                return Ok(None);
            }
            let turn = self.next.fetch_add(1, Ordering::Relaxed);
            let (at, route) = live[turn % live.len()];
            let c = &candidates[at];
            let via = match route {
                Route::Mqtt => {
                    let props = Properties {
                        response_topic: Some(bus.topics.reply(id)),
                        correlation_data: Some(Bytes::copy_from_slice(id.as_bytes())),
                        content_type: req.content_type.clone(),
                        ..Properties::default()
                    };
                    let reached = bus.router.publish_counted(Message {
                        topic: bus.topics.request(c.name.as_str(), id).into(),
                        payload: req.body.clone(),
                        qos: 0,
                        retain: false,
                        origin: 0,
                        at_ms: now_ms(),
                        expiry: None,
                        props: Some(Box::new(props)),
                    });
                    if reached == 0 {
                        tried.push(c.name.clone());
                        continue;
                    }
                    Via::Mqtt
                }
                Route::Poll => {
                    let job = Job {
                        id: id.clone(),
                        request: req.clone(),
                    };
                    let queue = state.queues.get_mut(&c.name).expect("routed to a queue");
                    match give(queue, job) {
                        None => Via::Taken,
                        Some(job) => {
                            queue.jobs.push_back(job);
                            Via::Queued
                        }
                    }
                }
            };
            state.bytes += req.body.len();
            state.pending.insert(
                id.clone(),
                Pending {
                    instance: c.name.clone(),
                    via,
                    bytes: req.body.len(),
                    tx,
                    deliver,
                },
            );
            return Ok(Some((at, via)));
        }
    }

    /// Ends a call that timed out (its queued job, if not taken, with it).
    fn forget(&self, id: &Arc<str>, instance: &Name) {
        let mut state = self.state();
        if let Some(p) = state.take(id)
            && p.via == Via::Queued
            && let Some(q) = state.queues.get_mut(instance)
        {
            q.jobs.retain(|j| &j.id != id);
        }
    }

    /// An instance's answer to call `id`, given when `may_answer` lets
    /// its sender answer for that instance.
    pub fn answer(
        &self,
        id: &str,
        answer: Answer,
        may_answer: impl FnOnce(&Name) -> bool,
    ) -> Result<(), NotAnswered> {
        let p = {
            let mut state = self.state();
            let Some(p) = state.pending.get(id) else {
                return Err(NotAnswered::NoSuchCall);
            };
            if !may_answer(&p.instance) {
                return Err(NotAnswered::NotAllowed(p.instance.clone()));
            }
            state.take(id).expect("looked up under the same lock")
        };
        match &p.deliver {
            Some(deliver) => {
                deliver(&p.instance, answer);
                let _ = p.tx.send(Outcome::Delivered);
            }
            None => {
                let _ = p.tx.send(Outcome::Answered(answer));
            }
        }
        Ok(())
    }

    /// The next request for long-polling instance `name`, waiting up to
    /// `wait` (`None`: none came).
    pub async fn next_job(&self, name: &Name, wait: Duration) -> Option<Job> {
        let rx = {
            let mut state = self.state();
            let now = Instant::now();
            let queue = state.queues.entry(name.clone()).or_insert_with(|| Queue {
                waiting: VecDeque::new(),
                jobs: VecDeque::new(),
                seen: now,
            });
            queue.seen = now;
            if let Some(job) = queue.jobs.pop_front() {
                mark_taken(&mut state, &job.id);
                return Some(job);
            }
            let (tx, rx) = oneshot::channel();
            queue.waiting.push_back(tx);
            rx
        };
        let mut rx = rx;
        let got = match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(job)) => Some(job),
            Ok(Err(_)) => None,
            Err(_) => {
                // A job given at the last moment is taken, not lost.
                rx.close();
                rx.try_recv().ok()
            }
        };
        let mut state = self.state();
        if let Some(q) = state.queues.get_mut(name) {
            q.seen = Instant::now();
        }
        if let Some(job) = &got {
            mark_taken(&mut state, &job.id);
        }
        got
    }

    /// Instance `name` went away: its calls end (see [`Calls::call`]).
    pub fn gone(&self, name: &Name) {
        let mut state = self.state();
        state.queues.remove(name);
        state.end(name, |_| true);
    }

    /// Every [`SWEEP`]: calls whose instance's record is gone, or whose
    /// MQTT instance no longer subscribes, end as gone; queues nobody
    /// polled for a while are dropped.
    fn sweep(&self, bus: &Bus) {
        let now = Instant::now();
        let pending: HashMap<Name, bool> = {
            let mut state = self.state();
            if state.pending.is_empty() && state.queues.is_empty() {
                return;
            }
            // A poller not seen for POLLED_WITHIN is gone: the jobs queued
            // for it were never handed over and go to the next instance.
            let mut stale = Vec::new();
            state.queues.retain(|name, q| {
                q.waiting.retain(|w| !w.is_closed());
                let quiet = q.waiting.is_empty() && now.duration_since(q.seen) > POLLED_WITHIN;
                if quiet && !q.jobs.is_empty() {
                    q.jobs.clear();
                    stale.push(name.clone());
                }
                !(quiet && now.duration_since(q.seen) > 2 * POLLED_WITHIN)
            });
            for name in stale {
                state.end(&name, |p| p.via == Via::Queued);
            }
            let mut by_instance: HashMap<Name, bool> = HashMap::new();
            for p in state.pending.values() {
                *by_instance.entry(p.instance.clone()).or_default() |= p.via == Via::Mqtt;
            }
            by_instance
        };
        let Some(registry) = &bus.gate else {
            return;
        };
        for (name, mqtt) in pending {
            if registry.record_now(&name).is_none() {
                self.gone(&name);
            } else if mqtt
                && !bus
                    .router
                    .subscribed(&bus.topics.request_filters(name.as_str()))
            {
                self.gone_mqtt(&name);
            }
        }
    }

    /// Ends the MQTT calls of `name` (it unsubscribed).
    fn gone_mqtt(&self, name: &Name) {
        self.state().end(name, |p| p.via == Via::Mqtt);
    }
}

/// How an instance takes requests right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Mqtt,
    Poll,
}

/// A poller waiting now wins; then a subscription to the request topic;
/// then a poller seen lately (the job waits for its next poll).
fn route(bus: &Bus, state: &mut State, name: &Name, now: Instant) -> Option<Route> {
    let queue = state.queues.get_mut(name);
    let polled_lately = match queue {
        Some(q) => {
            q.waiting.retain(|w| !w.is_closed());
            if !q.waiting.is_empty() {
                return Some(Route::Poll);
            }
            now.duration_since(q.seen) <= POLLED_WITHIN
        }
        None => false,
    };
    if bus
        .router
        .subscribed(&bus.topics.request_filters(name.as_str()))
    {
        return Some(Route::Mqtt);
    }
    polled_lately.then_some(Route::Poll)
}

/// Gives `job` to the first poller still waiting; the job back if none.
fn give(queue: &mut Queue, job: Job) -> Option<Job> {
    let mut job = job;
    while let Some(w) = queue.waiting.pop_front() {
        match w.send(job) {
            Ok(()) => return None,
            Err(back) => job = back,
        }
    }
    Some(job)
}

fn mark_taken(state: &mut State, id: &Arc<str>) {
    if let Some(p) = state.pending.get_mut(id) {
        p.via = Via::Taken;
    }
}

/// The instances QUERY names that a call may go to: one record by name,
/// or every instance of a role (and range), in name order.
fn candidates(bus: &Bus, query: &str) -> Result<Vec<Candidate>, CallError> {
    let Some(registry) = &bus.gate else {
        return Err(CallError::Unavailable(
            "this server runs without a registry (--no-registry)".into(),
        ));
    };
    let q = Query::parse(query).map_err(|e| {
        CallError::BadQuery(format!(
            "{e}: a call takes a service name or role@range, such as api@^1.2"
        ))
    })?;
    let found: Vec<Candidate> = registry
        .matching(query, &q)
        .into_iter()
        .map(|(name, record)| Candidate {
            name,
            idempotent: record.idempotent,
        })
        .collect();
    if found.is_empty() {
        return Err(CallError::NotFound(query.to_string()));
    }
    Ok(found)
}

/// How often [`watch`] looks for instances gone mid-call.
pub const SWEEP: Duration = Duration::from_millis(250);

/// Watches for instances that go away while calls wait on them (a record
/// removed, or an MQTT instance that no longer subscribes). It looks every
/// [`SWEEP`] rather than following every record change: a registration
/// costs nothing more for it.
pub async fn watch(bus: Arc<Bus>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        bus.calls.sweep(&bus);
    }
}
