//! A live local copy of every record, kept by a background task subscribed
//! to `PREFIX/services/+`, with lookups by name, role and `role@range`.
//!
//! Completeness: the task subscribes, waits for the SUBACK, then subscribes
//! to a private `$PREFIX/sync/ID` topic and publishes to it (see
//! [`super::Connection::snapshot`]). Brokers queue a
//! subscription's retained copies as they acknowledge it, so the sync
//! message comes back behind the last retained record: at that moment the
//! copy is complete and `ready()` returns. The same happens after every
//! reconnection, and records missing from the new snapshot are removed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Broker, Connection, ConnectionError, random};
use crate::mqtt::Incoming;
use crate::protocol::HealthStatus;
use crate::record::{BadQuery, Endpoint, Name, Query, Record};
use crate::topics::Topics;

/// One registered service as the directory sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: Name,
    pub record: Record,
}

impl Service {
    pub fn endpoint(&self) -> &Endpoint {
        &self.record.endpoint
    }

    /// `scheme://host:port` (scheme `http` when the record has none).
    pub fn url(&self) -> String {
        let scheme = self.record.scheme.as_deref().unwrap_or("http");
        format!("{scheme}://{}", self.record.endpoint)
    }
}

/// A change to the directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(Service),
    Updated(Service),
    Removed(Service),
}

/// How `pick` chooses among matching instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    RoundRobin,
    Random,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub prefix: String,
    pub strategy: Strategy,
    /// How long an instance reported failed is skipped by `pick` (unless its
    /// record changes first).
    pub failure_ttl: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prefix: Topics::DEFAULT_PREFIX.to_string(),
            strategy: Strategy::default(),
            failure_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    BadQuery(#[from] BadQuery),
    #[error("nothing matched {0:?} in time")]
    Timeout(String),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

#[derive(Default)]
struct State {
    services: BTreeMap<Name, Service>,
    failed: HashMap<Name, Instant>,
    health: HashMap<Name, HealthStatus>,
}

struct Shared {
    state: RwLock<State>,
    next: AtomicUsize,
    options: Options,
    changes: broadcast::Sender<Change>,
}

/// The live directory; cheap to clone. When the last clone is dropped, the
/// background task disconnects.
#[derive(Clone)]
pub struct Directory {
    shared: Arc<Shared>,
    ready: watch::Receiver<u64>,
    _closer: Arc<Closer>,
}

/// Tells the background task to stop when dropped.
struct Closer(Option<oneshot::Sender<()>>);

impl Drop for Closer {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Directory {
    /// Connects and starts keeping the copy; see [`Directory::ready`].
    pub async fn connect(broker: &Broker) -> Result<Directory, ConnectionError> {
        Directory::connect_with(broker, Options::default()).await
    }

    pub async fn connect_with(
        broker: &Broker,
        options: Options,
    ) -> Result<Directory, ConnectionError> {
        let conn = Connection::open(broker, "homicro-dir", None).await?;
        let topics = Topics::new(&options.prefix);
        let (ready_tx, ready) = watch::channel(0);
        let (changes, _) = broadcast::channel(4096);
        let (close_tx, close_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            state: RwLock::new(State::default()),
            next: AtomicUsize::new(0),
            options,
            changes,
        });
        tokio::spawn(keep(shared.clone(), conn, topics, ready_tx, close_rx));
        Ok(Directory {
            shared,
            ready,
            _closer: Arc::new(Closer(Some(close_tx))),
        })
    }

    /// Returns once the first complete copy is held (every record the broker
    /// retained at subscribe time).
    pub async fn ready(&self) {
        let mut r = self.ready.clone();
        let _ = r.wait_for(|n| *n > 0).await;
    }

    pub fn get(&self, name: &str) -> Option<Service> {
        let name = Name::parse(name).ok()?;
        self.shared
            .state
            .read()
            .unwrap()
            .services
            .get(&name)
            .cloned()
    }

    /// Every service, by name.
    pub fn list(&self) -> Vec<Service> {
        self.shared
            .state
            .read()
            .unwrap()
            .services
            .values()
            .cloned()
            .collect()
    }

    pub fn by_role(&self, role: &str) -> Vec<Service> {
        self.list()
            .into_iter()
            .filter(|s| s.record.role.as_str() == role)
            .collect()
    }

    /// Every instance matching `role` or `role@range` (e.g. `api@^1.2`,
    /// `couchdb@3.x`, `db@*`), failed ones included.
    pub fn find(&self, query: &str) -> Result<Vec<Service>, DirectoryError> {
        let q = Query::parse(query)?;
        Ok(self
            .list()
            .into_iter()
            .filter(|s| q.matches(&s.record))
            .collect())
    }

    /// One live instance matching the query, skipping those reported failed;
    /// round-robin or random per [`Options::strategy`]. `None` when no
    /// instance matches or all matching ones failed.
    pub fn pick(&self, query: &str) -> Result<Option<Service>, DirectoryError> {
        let q = Query::parse(query)?;
        let now = Instant::now();
        let ttl = self.shared.options.failure_ttl;
        let state = self.shared.state.read().unwrap();
        let live: Vec<&Service> = state
            .services
            .values()
            .filter(|s| q.matches(&s.record))
            .filter(|s| {
                state
                    .failed
                    .get(&s.name)
                    .is_none_or(|t| now.duration_since(*t) >= ttl)
            })
            .collect();
        if live.is_empty() {
            return Ok(None);
        }
        let i = match self.shared.options.strategy {
            Strategy::RoundRobin => self.shared.next.fetch_add(1, Ordering::Relaxed),
            Strategy::Random => random() as usize,
        };
        Ok(Some(live[i % live.len()].clone()))
    }

    /// The registry's last health result for NAME, where it probes one.
    pub fn health(&self, name: &str) -> Option<HealthStatus> {
        let name = Name::parse(name).ok()?;
        self.shared.state.read().unwrap().health.get(&name).cloned()
    }

    /// Reports that calling `service` failed: `pick` skips it for
    /// `failure_ttl`, or until its record changes.
    pub fn report_failed(&self, service: &Service) {
        let mut state = self.shared.state.write().unwrap();
        if state.services.get(&service.name) == Some(service) {
            state.failed.insert(service.name.clone(), Instant::now());
        }
    }

    /// Waits until a service named `query`, or an instance of the role (or
    /// `role@range`) `query`, is present.
    pub async fn wait_for(
        &self,
        query: &str,
        timeout: Duration,
    ) -> Result<Service, DirectoryError> {
        let by_name = Name::parse(query).is_ok();
        let q = Query::parse(query)?;
        let mut changes = self.shared.changes.subscribe();
        let find = || -> Option<Service> {
            if by_name && let Some(s) = self.get(query) {
                return Some(s);
            }
            self.list().into_iter().find(|s| q.matches(&s.record))
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = find() {
                return Ok(s);
            }
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) => return Err(DirectoryError::Timeout(query.to_string())),
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(ConnectionError::Closed.into());
                }
                Ok(_) => {}
            }
        }
    }

    /// A stream of changes from now on. A receiver that falls more than
    /// 4,096 changes behind loses the oldest (`RecvError::Lagged`).
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }
}

impl Shared {
    /// Applies one record publish; returns the change, if any.
    fn apply(&self, name: Name, payload: &Bytes) -> Option<Change> {
        let mut state = self.state.write().unwrap();
        if payload.is_empty() {
            state.failed.remove(&name);
            return state.services.remove(&name).map(Change::Removed);
        }
        let record = match Record::parse(&name, payload.clone()) {
            Ok(r) => r,
            Err(e) => {
                // The registry refuses and clears it; keep what we had.
                debug!(name = %name, error = %e, "ignored an invalid record");
                return None;
            }
        };
        let service = Service {
            name: name.clone(),
            record,
        };
        match state.services.insert(name.clone(), service.clone()) {
            None => Some(Change::Added(service)),
            Some(old) if old == service => None,
            Some(_) => {
                state.failed.remove(&name);
                Some(Change::Updated(service))
            }
        }
    }

    fn apply_health(&self, name: Name, payload: &Bytes) {
        let mut state = self.state.write().unwrap();
        match serde_json::from_slice::<HealthStatus>(payload) {
            Ok(h) => {
                state.health.insert(name, h);
            }
            Err(_) => {
                state.health.remove(&name);
            }
        }
    }

    /// Replaces the whole copy with a fresh snapshot; returns the changes.
    fn replace(&self, fresh: BTreeMap<Name, Bytes>) -> Vec<Change> {
        let gone: Vec<Name> = {
            let state = self.state.read().unwrap();
            state
                .services
                .keys()
                .filter(|n| !fresh.contains_key(*n))
                .cloned()
                .collect()
        };
        let mut out: Vec<Change> = gone
            .into_iter()
            .filter_map(|n| self.apply(n, &Bytes::new()))
            .collect();
        out.extend(fresh.into_iter().filter_map(|(n, p)| self.apply(n, &p)));
        out
    }

    fn emit(&self, changes: impl IntoIterator<Item = Change>) {
        for c in changes {
            let _ = self.changes.send(c);
        }
    }
}

/// Keeps the copy: a snapshot after every (re)connection, then live changes,
/// until the last `Directory` is dropped.
async fn keep(
    dir: Arc<Shared>,
    conn: Connection,
    topics: Topics,
    ready: watch::Sender<u64>,
    close: oneshot::Receiver<()>,
) {
    let mut conn = conn;
    tokio::select! {
        _ = follow(&dir, &mut conn, &topics, &ready) => {}
        _ = close => conn.close().await,
    }
}

async fn follow(dir: &Shared, conn: &mut Connection, topics: &Topics, ready: &watch::Sender<u64>) {
    let filter = topics.services_filter();
    let mut snapshots = 0u64;
    loop {
        // Health statuses first: their retained copies are queued before the
        // services' SUBACK, so the sync message comes after them too.
        let health_filter = [topics.health_filter()];
        let snapshot = match conn.subscribe(&health_filter).await {
            Ok(early) => conn.snapshot(topics, &filter).await.map(|m| (early, m)),
            Err(e) => Err(e),
        };
        match snapshot {
            Ok((early, messages)) => {
                let mut fresh = BTreeMap::new();
                let mut health = HashMap::new();
                for (topic, payload, _) in early.into_iter().chain(messages) {
                    if let Some(name) = topics.health_name(&topic) {
                        health.insert(name, payload);
                    } else if let Some(name) = topics.service_name(&topic) {
                        if payload.is_empty() {
                            fresh.remove(&name);
                        } else {
                            fresh.insert(name, payload);
                        }
                    }
                }
                let changes = dir.replace(fresh);
                dir.state.write().unwrap().health.clear();
                for (name, payload) in health {
                    dir.apply_health(name, &payload);
                }
                dir.emit(changes);
                snapshots += 1;
                let _ = ready.send(snapshots);
            }
            Err(ConnectionError::Closed) => return,
            Err(e @ ConnectionError::Timeout { .. }) => {
                // Still connected, only slow (a large registry on a slow
                // link): take the snapshot again rather than wait for a
                // reconnection that may never come.
                warn!(error = %e, "directory snapshot timed out; taking it again");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "directory snapshot failed; retrying after reconnect");
                if !wait_connected(conn).await {
                    return;
                }
                continue;
            }
        }
        // Live changes until the session ends.
        loop {
            match conn.rx.recv().await {
                None => return,
                Some(Incoming::Message { topic, payload, .. }) => {
                    if let Some(name) = topics.health_name(&topic) {
                        dir.apply_health(name, &payload);
                    } else if let Some(name) = topics.service_name(&topic) {
                        let change = dir.apply(name, &payload);
                        dir.emit(change);
                    }
                }
                Some(Incoming::Disconnected(e)) => {
                    warn!(error = %e, "directory lost the broker; reconnecting");
                    if !wait_connected(conn).await {
                        return;
                    }
                    break;
                }
                Some(Incoming::Connected) => break,
                Some(_) => {}
            }
        }
    }
}

/// Waits for the next CONNACK; false when the client has stopped.
async fn wait_connected(conn: &mut Connection) -> bool {
    loop {
        match conn.rx.recv().await {
            Some(Incoming::Connected) => return true,
            None => return false,
            Some(_) => {}
        }
    }
}
