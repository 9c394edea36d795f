//! The one public port: accepts, recognises each connection from its first
//! bytes (MQTT, HTTP — WebSocket upgrades included — or garbage) and
//! applies the limits derived from the file-descriptor limit: at most
//! `max_connections` sockets open at once (the rest wait in the kernel's
//! queue), and beyond `max_sessions` a client is answered "server
//! unavailable" (CONNACK) or 503 and closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::classify::{self, Kind};
use super::tls::Prefixed;
use super::{Bus, connect, sessions};

/// Accepts connections on `listener` until the task is dropped.
pub async fn run(listener: TcpListener, bus: Arc<Bus>) {
    let permits = Arc::new(Semaphore::new(bus.limits.max_connections));
    let _ = bus.slots.set(permits.clone());
    let mut garbage_log = RateLimit::new(Duration::from_secs(1));
    let mut accept_log = RateLimit::new(Duration::from_secs(1));
    let (garbage_tx, mut garbage_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(what) = garbage_rx.recv() => {
                if let Some(suppressed) = garbage_log.allow(Instant::now()) {
                    warn!(%what, suppressed, "closed a connection that is neither MQTT nor HTTP");
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                bus.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                // Into the refusal room: answer "unavailable" and close.
                let full = permits.available_permits() < REFUSAL_ROOM;
                let bus = bus.clone();
                let garbage_tx = garbage_tx.clone();
                tokio::spawn(async move {
                    if let Some(what) = handle(bus, stream, peer, full, permit).await {
                        let _ = garbage_tx.send(what);
                    }
                });
            }
            Err(e) => {
                // Out of descriptors despite the limit (another part of the
                // process holds more than reserved): back off, log rarely.
                if let Some(suppressed) = accept_log.allow(Instant::now()) {
                    warn!(error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one connection; returns a description of it if it was garbage.
/// `permit` is held as long as the connection is open (an MQTT client's
/// goes with it to its session).
async fn handle(
    bus: Arc<Bus>,
    stream: TcpStream,
    peer: SocketAddr,
    full: bool,
    permit: OwnedSemaphorePermit,
) -> Option<String> {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let deadline = Instant::now() + bus.limits.handshake_timeout;
    let mut first = [0u8; 16];
    let kind = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(n)) => classify::classify(&first[..n]),
        Err(_) => {
            bus.metrics.silent.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "closed a connection that said nothing");
            return None;
        }
    };
    let plaintext = matches!(kind, Kind::Mqtt | Kind::Http);
    if plaintext
        && bus.tls.as_ref().is_some_and(|t| t.required())
        && !peer.ip().to_canonical().is_loopback()
    {
        debug!(%peer, "plaintext refused: [tls] require = true");
        bus.metrics
            .plaintext_refused
            .fetch_add(1, Ordering::Relaxed);
        return None;
    }
    match kind {
        Kind::Tls if bus.tls.is_some() => {
            serve_tls(bus, stream, peer, deadline, full, permit).await
        }
        Kind::Mqtt => {
            let (r, w) = stream.into_split();
            let io = (
                Box::new(r) as connect::Reader,
                Box::new(w) as connect::Writer,
            );
            start_mqtt(&bus, io, peer, deadline, full, Some(permit), None).await;
            None
        }
        // Monitoring still sees an overloaded server.
        Kind::Http if full && !first.starts_with(b"GET /metrics") => {
            bus.metrics.refused_full.fetch_add(1, Ordering::Relaxed);
            crate::http::unavailable(stream, deadline).await;
            None
        }
        Kind::Http => {
            crate::http::serve(bus, stream, peer).await;
            drop(permit);
            None
        }
        Kind::Garbage | Kind::Tls => {
            bus.metrics.garbage.fetch_add(1, Ordering::Relaxed);
            Some(format!("{peer} sent {}", classify::hex(&first)))
        }
    }
}

/// A TLS connection: the handshake within the connection's deadline, then
/// what it carries, classified from its first bytes as a plain one is.
async fn serve_tls(
    bus: Arc<Bus>,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    full: bool,
    permit: OwnedSemaphorePermit,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let acceptor = bus.tls.as_ref()?.acceptor();
    let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            bus.metrics.tls_failed.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            bus.metrics.silent.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "TLS handshake not done in time; closed");
            return None;
        }
    };
    let mut first = vec![0u8; 16];
    let n = match tokio::time::timeout_at(deadline, tls.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        Ok(_) => return None,
        Err(_) => {
            bus.metrics.silent.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    first.truncate(n);
    // A verified client certificate names its user (`[tls] client_ca`).
    let cert = super::tls::client_name(&tls);
    let kind = classify::classify(&first);
    let io = Prefixed::new(bytes::Bytes::from(first.clone()), tls);
    match kind {
        Kind::Mqtt => {
            let (r, w) = tokio::io::split(io);
            let io = (
                Box::new(r) as connect::Reader,
                Box::new(w) as connect::Writer,
            );
            start_mqtt(&bus, io, peer, deadline, full, Some(permit), cert).await;
            None
        }
        Kind::Http => {
            crate::http::serve_as(bus, io, peer, cert, true).await;
            drop(permit);
            None
        }
        Kind::Garbage | Kind::Tls => {
            bus.metrics.garbage.fetch_add(1, Ordering::Relaxed);
            Some(format!("{peer} sent {} inside TLS", classify::hex(&first)))
        }
    }
}

/// MQTT on any byte stream (a WebSocket's, once upgraded).
pub async fn serve_mqtt<S>(bus: Arc<Bus>, io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let deadline = Instant::now() + bus.limits.handshake_timeout;
    let (r, w) = tokio::io::split(io);
    start_mqtt(
        &bus,
        (Box::new(r), Box::new(w)),
        peer,
        deadline,
        false,
        None,
        None,
    )
    .await;
}

async fn start_mqtt(
    bus: &Arc<Bus>,
    (r, w): (connect::Reader, connect::Writer),
    peer: SocketAddr,
    deadline: Instant,
    full: bool,
    permit: Option<OwnedSemaphorePermit>,
    cert: Option<Arc<str>>,
) {
    if let Some(mut conn) = connect::handshake(bus, r, w, peer, deadline, full, cert).await {
        conn.permit = permit;
        sessions::dispatch(bus, conn);
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
pub struct RateLimit {
    every: Duration,
    next: Option<Instant>,
    held: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            next: None,
            held: 0,
        }
    }

    /// `Some(held back since the last one)` when a line may be logged.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|t| now < t) {
            self.held += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.held))
    }
}

/// The soft limit on open files, raised to the hard limit first.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a live local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    let cur = lim.rlim_cur as u64;
    cur
}

/// Descriptors kept for everything but client connections: the listener,
/// the state file, logs, the runtime, health probes.
pub const FD_RESERVE: u64 = 64;

/// Connections beyond the session cap that may be open at once to be told
/// "server unavailable".
pub const REFUSAL_ROOM: usize = 32;

/// `(max_sessions, max_connections)` for a descriptor limit, within the
/// configured cap: each client holds one descriptor.
pub fn caps(fd_limit: u64, probes: usize, configured: usize) -> (usize, usize) {
    let usable = fd_limit.saturating_sub(FD_RESERVE + probes as u64) as usize;
    let sessions = usable
        .saturating_sub(REFUSAL_ROOM)
        .clamp(1, configured.max(1));
    (sessions, sessions + REFUSAL_ROOM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_descriptor_limit() {
        assert_eq!(caps(2048, 16, 100_000), (1936, 1968));
        assert_eq!(caps(1_048_576, 16, 10_000), (10_000, 10_032));
        assert_eq!(caps(10, 16, 10_000), (1, 33));
    }

    #[test]
    fn logs_at_most_once_a_second() {
        let mut rl = RateLimit::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(rl.allow(t), Some(0));
        assert_eq!(rl.allow(t + Duration::from_millis(10)), None);
        assert_eq!(rl.allow(t + Duration::from_millis(900)), None);
        assert_eq!(rl.allow(t + Duration::from_secs(1)), Some(2));
    }

    #[tokio::test]
    async fn accepted_sockets_get_tcp_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        set_keepalive(&s);
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
    }
}
