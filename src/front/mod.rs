//! The one-port front: owns the public socket, recognises each connection
//! from its first bytes and hands it on.
//!
//! ```text
//!  public port ──▶ classify ──┬─ MQTT CONNECT level 4 ──▶ proxy ──▶ rumqttd v4 (loopback)
//!                             ├─ MQTT CONNECT level 5 ──▶ proxy ──▶ rumqttd v5 (loopback)
//!                             ├─ HTTP Upgrade /mqtt   ──▶ websocket ─▶ proxy
//!                             ├─ other HTTP           ──▶ API (http.rs) ──▶ registry
//!                             └─ anything else        ──▶ closed
//! ```
//!
//! `classify` and `packet` are pure (bytes in, decisions and bytes out);
//! `mqtt` is the proxy that moves bytes and time and closes the embedded
//! broker's defects (see docs/PROTOCOL.md, "The one-port front").

mod claim;
pub mod classify;
pub mod http;
pub mod mqtt;
pub mod packet;
mod will;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::registry;
use crate::topics::Topics;
use classify::Kind;

/// What every connection task shares.
pub struct Shared {
    /// rumqttd's MQTT 3.1.1 listener on loopback.
    pub v4: SocketAddr,
    /// rumqttd's MQTT 5 listener on loopback.
    pub v5: SocketAddr,
    pub topics: Topics,
    /// `None` with `--no-registry`.
    pub registry: Option<registry::Handle>,
    pub metrics: Metrics,
    /// How long a new connection may take to say what it is (and an MQTT
    /// client to send its whole CONNECT).
    pub handshake_timeout: Duration,
    /// The largest packet the front passes on (the broker's limit).
    pub max_packet: usize,
    /// MQTT sessions the front lets through (below the broker's own limit).
    pub max_sessions: usize,
    /// Bounds the CONNECTs waiting for the broker's CONNACK.
    pub(crate) connects: tokio::sync::Semaphore,
    /// Whether the broker still answers CONNECTs.
    pub broker_health: BrokerHealth,
    pub started: Instant,
    /// Live MQTT sessions by client id, for takeovers (see `claim.rs`).
    pub(crate) sessions: Mutex<HashMap<String, claim::SessionSlot>>,
    /// Broker client ids for clean sessions (see `claim::IdPool`).
    pub(crate) broker_ids: Mutex<claim::IdPool>,
}

/// CONNECTs that may wait for the broker's CONNACK at once (rumqttd's
/// accept queue holds 128).
pub const CONNECTS_IN_FLIGHT: usize = 64;

/// After this many CONNECTs in a row that the broker closed or left
/// unanswered, it is taken as broken.
pub const UNANSWERED_LIMIT: u32 = 5;

/// Tracks CONNECTs the broker did not answer. rumqttd has a failure mode
/// in which its listener refuses every later connection (a poisoned lock in
/// its will table); nothing but a restart of the process cures it, so
/// `serve` stops when `broken()` says so, for a supervisor to restart it.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    unanswered_in_a_row: std::sync::atomic::AtomicU32,
}

impl BrokerHealth {
    pub fn answered(&self) {
        self.unanswered_in_a_row.store(0, Ordering::Relaxed);
    }

    pub fn unanswered(&self) {
        self.unanswered_in_a_row.fetch_add(1, Ordering::Relaxed);
    }

    pub fn broken(&self) -> bool {
        self.unanswered_in_a_row.load(Ordering::Relaxed) >= UNANSWERED_LIMIT
    }
}

/// Counters of the front, for `GET /metrics`.
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

impl Shared {
    pub fn new(
        v4: SocketAddr,
        v5: SocketAddr,
        topics: Topics,
        registry: Option<registry::Handle>,
        handshake_timeout: Duration,
    ) -> Shared {
        Shared {
            v4,
            v5,
            topics,
            registry,
            metrics: Metrics::default(),
            handshake_timeout,
            max_packet: 1 << 20,
            max_sessions: 10_000,
            connects: tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT),
            broker_health: BrokerHealth::default(),
            started: Instant::now(),
            sessions: Mutex::new(HashMap::new()),
            broker_ids: Mutex::new(claim::IdPool::default()),
        }
    }
}

/// Accepts connections on `listener` until the task is dropped.
pub async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let mut garbage_log = RateLimit::new(Duration::from_secs(1));
    let (garbage_tx, mut garbage_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                    let shared = shared.clone();
                    let garbage_tx = garbage_tx.clone();
                    tokio::spawn(async move {
                        if let Some(what) = handle(shared, stream, peer).await {
                            let _ = garbage_tx.send(what);
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(what) = garbage_rx.recv() => {
                if let Some(suppressed) = garbage_log.allow(Instant::now()) {
                    warn!(%what, suppressed, "closed a connection that is neither MQTT nor HTTP");
                } else {
                    debug!(%what, "closed an unrecognised connection");
                }
            }
        }
    }
}

/// Serves one connection; returns a description of it if it was garbage.
async fn handle(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) -> Option<String> {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    // One deadline for the first byte and the whole CONNECT.
    let deadline = Instant::now() + shared.handshake_timeout;
    let mut first = [0u8; 8];
    let kind = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(n)) => classify::classify(&first[..n]),
        Err(_) => {
            shared.metrics.silent.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "closed a connection that said nothing");
            return None;
        }
    };
    match kind {
        Kind::Mqtt => {
            mqtt::serve_until(shared, stream, peer, mqtt::Via::Tcp, deadline).await;
            None
        }
        Kind::Http => {
            http::serve(shared, stream, peer).await;
            None
        }
        Kind::Garbage => {
            shared.metrics.garbage.fetch_add(1, Ordering::Relaxed);
            Some(format!("{peer} sent {}", classify::hex(&first)))
        }
    }
}

/// Half-open sockets (a device that lost power) are found by TCP
/// keepalive even when the MQTT client asked for none.
fn set_keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        debug!(error = %e, "TCP keepalive not set");
    }
}

/// Lets one log line through per `every`, counting what it held back.
struct RateLimit {
    every: Duration,
    next: Option<Instant>,
    held: u64,
}

impl RateLimit {
    fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            next: None,
            held: 0,
        }
    }

    /// `Some(held back since the last one)` when a line may be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|t| now < t) {
            self.held += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.held))
    }
}

/// Logged once at start.
pub fn announce(listen: SocketAddr, shared: &Shared) {
    info!(%listen, v4 = %shared.v4, v5 = %shared.v5, "front listening (MQTT 3.1.1 and 5, WebSocket /mqtt, HTTP API)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_tcp_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        set_keepalive(&s);
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 3);
    }

    #[test]
    fn garbage_is_logged_at_most_once_a_second() {
        let mut rl = RateLimit::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(rl.allow(t), Some(0));
        assert_eq!(rl.allow(t + Duration::from_millis(10)), None);
        assert_eq!(rl.allow(t + Duration::from_millis(900)), None);
        assert_eq!(rl.allow(t + Duration::from_secs(1)), Some(2));
    }
}
