//! The registry: a pure rule set (`state`), the actor that runs it against a
//! broker (`actor`), and the handle the rest of the program holds.

mod actor;
mod echoes;
pub mod health;
mod probe;
mod probe_tls;
mod shared;
pub mod state;

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{LastWill, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::BrokerUrl;
use crate::identity::Identity;
use crate::journal::Journal;
use crate::record::Name;
use crate::record::Record;
use crate::topics::Topics;
use actor::{Actor, Request, Transport};
use shared::Shared;
pub use state::{Delivery, GateKind, Publish, Registry, Shown, Stats};

/// Which bus the registry works on.
#[derive(Clone)]
pub enum Bus {
    /// An external broker at this address (the registry's MQTT will says
    /// `offline`).
    External(BrokerUrl),
    /// The embedded bus: the registry is its gate, on a router link.
    Embedded(crate::bus::Router),
}

/// Where and how the registry runs.
#[derive(Clone)]
pub struct Options {
    pub bus: Bus,
    pub prefix: String,
    /// Where every change is written before it is acknowledged (`None`:
    /// nowhere, for tests).
    pub journal: Option<Journal>,
    /// The records recovered at start (their `ttl` starts afresh).
    pub restored: Vec<(Name, Record, Option<Identity>)>,
    /// How many health probes may run at once.
    pub health_concurrency: usize,
}

/// The registry's answer to a submitted record: the event's JSON (as
/// published on `PREFIX/events/NAME`) when it was applied, the error's JSON
/// (as on `PREFIX/errors/NAME`) when it was refused.
pub type Answer = Result<Bytes, Bytes>;

/// What `GET /health` and `/metrics` show of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub stats: Stats,
    /// The registry's MQTT session with the broker is up.
    pub connected: bool,
    pub records: usize,
}

/// The registry actor is gone.
#[derive(Debug, thiserror::Error)]
#[error("the registry has stopped")]
pub struct Stopped;

/// A handle to the running registry actor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    shared: std::sync::Arc<Shared>,
}

impl Handle {
    /// Loads the state file and starts the actor on the current runtime.
    pub async fn spawn(opts: Options) -> Handle {
        let topics = Topics::new(&opts.prefix);
        let mut state = Registry::new(topics, env!("CARGO_PKG_VERSION"));
        if !opts.restored.is_empty() {
            info!(records = opts.restored.len(), "records restored");
            state.load(Instant::now(), opts.restored);
        }
        if opts.journal.is_some() {
            state.set_journaled();
        }
        let transport = match &opts.bus {
            Bus::External(broker) => {
                let mut mqtt =
                    crate::mqtt::options(&crate::mqtt::client_id("homicro-registry"), broker);
                let off = state.offline();
                mqtt.set_last_will(LastWill::new(
                    off.topic,
                    off.payload,
                    QoS::AtLeastOnce,
                    true,
                ));
                let (client, incoming) = crate::mqtt::connect(mqtt, Duration::from_millis(200));
                Transport::Mqtt { client, incoming }
            }
            Bus::Embedded(_) => {
                state.set_gated();
                Transport::Router
            }
        };
        let router = match &opts.bus {
            Bus::Embedded(router) => Some(router.clone()),
            Bus::External(_) => None,
        };
        let shared = std::sync::Arc::new(Shared::new(state, router, opts.journal.clone()));
        let (tx, requests) = mpsc::channel(16);
        let actor = Actor {
            shared: shared.clone(),
            probes_in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(
                opts.health_concurrency,
            )),
            transport,
            requests,
            connected: false,
        };
        tokio::spawn(actor.run());
        Handle { tx, shared }
    }

    /// Counters of what the registry has done.
    pub async fn stats(&self) -> Result<Stats, Stopped> {
        self.ask(Request::Stats).await
    }

    /// Counters, record count and whether the broker is connected.
    pub async fn status(&self) -> Result<Status, Stopped> {
        self.ask(Request::Status).await
    }

    /// Every record's name and bytes, as published (in no order).
    pub async fn records(&self) -> Result<Vec<(Name, Bytes)>, Stopped> {
        self.ask(Request::Records).await
    }

    /// Every record as published, read under the registry's lock on the
    /// caller's thread (no hop to the actor: for the hub's per-request
    /// lookups).
    pub fn records_now(&self) -> Vec<(Name, Bytes)> {
        let l = self.shared.lock();
        l.reg
            .records()
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect()
    }

    /// The records a `/svc/` or call QUERY names, sorted by name: the
    /// record named QUERY when there is one (a name wins over a role of
    /// the same spelling), else every record `q` (QUERY parsed as
    /// role@range) matches. Read under the lock like
    /// [`Handle::records_now`].
    pub fn matching(&self, query: &str, q: &crate::record::Query) -> Vec<(Name, Record)> {
        if let Ok(name) = Name::parse(query)
            && let Some(payload) = self.record_now(&name)
            && let Ok(record) = Record::parse(&name, payload)
        {
            return vec![(name, record)];
        }
        let mut found: Vec<(Name, Record)> = self
            .records_now()
            .into_iter()
            .filter_map(|(name, payload)| {
                let record = Record::parse(&name, payload).ok()?;
                q.matches(&record).then_some((name, record))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// What NAME's `ttl` has left (`None`: not registered, or no `ttl`).
    pub fn ttl_left_now(&self, name: &Name) -> Option<Duration> {
        self.shared.lock().reg.ttl_left(name, Instant::now())
    }

    /// Every record as the dashboard shows it (see [`Registry::board`]),
    /// read under the lock like [`Handle::records_now`].
    pub fn board_now(&self) -> Vec<Shown> {
        self.shared.lock().reg.board(Instant::now())
    }

    /// The topic of everything the registry publishes from now on (with
    /// the payload for events only), and an empty message on
    /// `PREFIX/heartbeat/NAME` for each accepted heartbeat. A receiver
    /// that falls behind skips what it missed (`Lagged`).
    pub fn feed(&self) -> tokio::sync::broadcast::Receiver<Publish> {
        self.shared.feed.subscribe()
    }

    /// NAME's record as published, read like [`Handle::records_now`].
    pub fn record_now(&self, name: &Name) -> Option<Bytes> {
        self.shared.lock().reg.payload(name).cloned()
    }

    /// NAME's record as published, if it is registered.
    pub async fn record(&self, name: &Name) -> Result<Option<Bytes>, Stopped> {
        self.ask(|tx| Request::Record(name.clone(), tx)).await
    }

    /// Submits NAME's record (empty: removes it) through the same rules as
    /// a publish on `PREFIX/services/NAME`; the registry publishes the
    /// outcome. See [`Registry::on_submit`]. An accepted change is
    /// answered once it is on disk; when it cannot be written, the answer
    /// is an `unavailable` error (the change is live, but not durable).
    pub async fn submit(
        &self,
        name: &str,
        payload: Bytes,
        by: crate::identity::Author,
    ) -> Result<Answer, Stopped> {
        let answer = self
            .ask(|respond_to| Request::Submit {
                name: name.to_string(),
                payload,
                by,
                respond_to,
            })
            .await?;
        if let (Ok(_), Some(j)) = (&answer, &self.shared.journal) {
            // Appended before the answer came: whatever is last now
            // includes it.
            if let Err(e) = j.synced_all_within(crate::journal::PATIENCE).await {
                return Ok(Err(state::not_durable(name, &e)));
            }
        }
        Ok(answer)
    }

    /// The journal the registry writes its changes to.
    pub fn journal(&self) -> Option<&Journal> {
        self.shared.journal.as_ref()
    }

    /// Judges a record or heartbeat published on the embedded bus, in the
    /// caller's task; an accepted one is published by the time this
    /// returns (with its event), a refused one has its error published.
    pub async fn gate(
        &self,
        submission: crate::bus::gate::Submission,
    ) -> Result<crate::bus::gate::Gated, Stopped> {
        self.shared.gate(submission).await
    }

    /// Puts a record or heartbeat to the gate without waiting for the
    /// verdict, which comes on the receiver. Submissions are judged in the
    /// order they are put.
    pub fn gate_later(
        &self,
        submission: crate::bus::gate::Submission,
    ) -> Result<oneshot::Receiver<crate::bus::gate::Gated>, Stopped> {
        self.shared.gate_later(submission)
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(request(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Announces `offline` and stops the actor.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Shutdown(tx)).await.is_err() {
            warn!("registry already stopped");
            return;
        }
        let _ = rx.await;
    }
}
