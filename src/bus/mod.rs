//! The house's MQTT bus: homicro's own MQTT 3.1.1 and 5 server and its
//! router, in one process.
//!
//! ```text
//!  socket ─▶ listener (classify, limits) ─▶ connect (CONNECT, CONNACK)
//!        ─▶ session (keepalive, QoS flows, aliases, wills, expiry) ─┬─▶ router (store, fan out)
//!                     └─ PREFIX/services|heartbeat ─▶ registry gate ─┘        │
//!  session ◀── forwards (QoS = min(publish, granted), properties) ◀───────────┘
//! ```
//!
//! `codec` is pure (bytes in, packets out); `session::outbound` is the
//! pure delivery queue; `router` holds the subscriptions and retained
//! messages and fans messages out; `session` is one task per MQTT session,
//! outliving its connections while the session has not expired.

pub mod classify;
pub mod codec;
pub mod connect;
pub mod gate;
pub mod listener;
pub mod router;
pub mod session;
pub mod sessions;
pub mod tls;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::registry;
use crate::topics::Topics;
pub use router::Router;

/// The bus's limits and the values it announces in CONNACK.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest packet accepted from a client, in bytes.
    pub max_packet: usize,
    /// The largest payload a client may publish; a larger one closes its
    /// connection (MQTT 5: reason 0x95).
    pub max_payload: usize,
    /// QoS 2 messages a client may have unreleased (our Receive Maximum).
    pub receive_maximum: u16,
    /// QoS 1 and 2 messages in flight to a 3.1.1 client (an MQTT 5 client
    /// says its own Receive Maximum).
    pub max_inflight: u16,
    /// Messages a session queues for its client; more are dropped.
    pub max_queued: usize,
    /// Topic aliases a client may use.
    pub topic_alias_max: u16,
    /// The longest keepalive granted; longer (or 0, in MQTT 5) is lowered
    /// to it and announced as Server Keep Alive.
    pub max_keepalive: u16,
    /// How long a new connection may take to send its whole CONNECT.
    pub handshake_timeout: Duration,
    /// MQTT sessions at once (derived from the file-descriptor limit).
    pub max_sessions: usize,
    /// Open connections of any kind at once; beyond `max_sessions` the
    /// rest are answered "server unavailable" and closed.
    pub max_connections: usize,
    /// How long `/svc/` waits for an instance's answer (then 504).
    pub proxy_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_packet: (1 << 20) + 65_552,
            max_payload: 1 << 20,
            receive_maximum: 20,
            max_inflight: 20,
            max_queued: 1000,
            topic_alias_max: 10,
            max_keepalive: 65_535,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 10_000,
            max_connections: 10_064,
            proxy_timeout: Duration::from_secs(30),
        }
    }
}

/// What every connection and session task shares.
pub struct Bus {
    pub limits: Limits,
    pub router: Router,
    pub topics: Topics,
    /// The registry, judging publishes under `PREFIX/services` and
    /// `PREFIX/heartbeat` (`None` with `--no-registry`).
    pub gate: Option<registry::Handle>,
    pub metrics: Metrics,
    /// Who may connect (users, anonymous clients).
    pub auth: std::sync::Arc<crate::auth::Auth>,
    /// TLS on the port (`None`: plaintext only).
    pub tls: Option<std::sync::Arc<tls::Tls>>,
    /// Where changes are written before they are acknowledged (`None`:
    /// nowhere; nothing waits).
    pub journal: Option<crate::journal::Journal>,
    pub started: Instant,
    pub(crate) sessions: Mutex<HashMap<String, sessions::Entry>>,
    next_session: AtomicU64,
    /// `/svc/`'s round-robin and recent failures.
    pub hub: crate::http::proxy::Hub,
    /// Calls through the hub waiting for their answer, and the long-poll
    /// queues.
    pub calls: crate::rpc::Calls,
    /// The listener's connection slots (set when it starts).
    pub slots: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>>,
}

impl Bus {
    pub fn new(
        limits: Limits,
        router: Router,
        topics: Topics,
        gate: Option<registry::Handle>,
        auth: std::sync::Arc<crate::auth::Auth>,
    ) -> Bus {
        Bus {
            limits,
            router,
            topics,
            gate,
            auth,
            tls: None,
            journal: None,
            metrics: Metrics::default(),
            started: Instant::now(),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            hub: Default::default(),
            calls: Default::default(),
            slots: std::sync::OnceLock::new(),
        }
    }

    /// A number for a new session, unique in this process (never 0: the
    /// server's own publishes).
    pub fn session_number(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Connections open now, of any kind (each holds a slot until it is
    /// closed and its task is done).
    pub fn connections_open(&self) -> usize {
        self.slots
            .get()
            .map_or(0, |s| self.limits.max_connections - s.available_permits())
    }

    /// MQTT sessions alive now (connected or waiting for their client).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }
}

/// Counters of the bus, for `GET /metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub mqtt_v4: Gauge,
    pub mqtt_v5: Gauge,
    pub websocket: Gauge,
    pub http: Gauge,
    /// Connections closed because they sent something unrecognisable.
    pub garbage: AtomicU64,
    /// Connections closed because they said nothing within the timeout.
    pub silent: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failed: AtomicU64,
    /// Plaintext connections refused (`[tls] require`).
    pub plaintext_refused: AtomicU64,
    /// Connections refused because the bus was full.
    pub refused_full: AtomicU64,
    /// Publishes refused: to the registry's own topics, or by the gate.
    pub refused_publishes: AtomicU64,
    /// Messages dropped because a session's queue was full.
    pub dropped: AtomicU64,
    /// Wills published.
    pub wills: AtomicU64,
    /// Times freed memory was given back after sessions ended.
    pub trims: AtomicU64,
    /// Sessions that have ended.
    pub sessions_ended: AtomicU64,
}

/// Connections of one kind: how many are open and how many there were.
#[derive(Debug, Default)]
pub struct Gauge {
    pub open: AtomicU64,
    pub total: AtomicU64,
}

impl Gauge {
    /// Counts a connection open until the guard drops.
    pub fn enter(&self) -> GaugeGuard<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(self)
    }
}

pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives freed memory back to the system after clients leave: once
/// sessions have ended and their number has held still for a second,
/// every allocator arena is purged, off the executor (see `crate::alloc`;
/// with glibc's allocator, 20 rounds of 2,000 subscribers once left RSS at
/// 1.15 GB with no client and no record).
pub async fn trim_memory(bus: std::sync::Arc<Bus>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ended = || bus.metrics.sessions_ended.load(Ordering::Relaxed);
    let mut trimmed_at = ended();
    let mut prev = bus.session_count();
    loop {
        tick.tick().await;
        let now = bus.session_count();
        if ended() > trimmed_at && now == prev {
            trimmed_at = ended();
            let _ = tokio::task::spawn_blocking(crate::alloc::purge).await;
            bus.metrics.trims.fetch_add(1, Ordering::Relaxed);
        }
        prev = now;
    }
}
