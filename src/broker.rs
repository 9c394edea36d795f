//! The embedded rumqttd broker, configured for a registry.
//!
//! rumqttd's defaults do not fit (see shared/RUMQTT-NOTES.md): every field
//! is set here. The broker listens only on loopback: an MQTT 3.1.1 listener
//! and an MQTT 5 one (rumqttd cannot serve both on one port). The front
//! (`front`) owns the public port and hands each client to one of them; the
//! registry actor uses the 3.1.1 one, reaching the broker the same way it
//! reaches an external one.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};

use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::config::BrokerConfig;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker did not start listening on {0}")]
    NotListening(SocketAddr),
}

/// A running embedded broker. rumqttd has no shutdown: its router thread
/// ends with the process.
pub struct EmbeddedBroker {
    /// The MQTT 3.1.1 listener (loopback).
    pub v4: SocketAddr,
    /// The MQTT 5 listener (loopback).
    pub v5: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts the router and both loopback listeners on the current tokio
    /// runtime and returns once both listen.
    pub async fn start(config: &BrokerConfig) -> Result<Self, BrokerError> {
        // Both reservations are held until both ports are known: released
        // one by one, the second could get the port the first just freed,
        // and the two listeners would race for it (seen in CI).
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let (a, b) = (reserve(loopback)?, reserve(loopback)?);
        let (v4, v5) = (local(&a, loopback)?, local(&b, loopback)?);
        drop((a, b));
        let router_tx = Router::new(0, router_config(config)).spawn();
        let mut tasks = Vec::new();
        let mut s4 = Server::new(server_settings(config, "v4", v4), router_tx.clone(), V4);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = s4.start(LinkType::Remote).await {
                error!(listener = "v4", addr = %v4, error = %e, "broker listener stopped");
            }
        }));
        let mut s5 = Server::new(server_settings(config, "v5", v5), router_tx, V5);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = s5.start(LinkType::Remote).await {
                error!(listener = "v5", addr = %v5, error = %e, "broker listener stopped");
            }
        }));
        for addr in [v4, v5] {
            nodelay::when_listening(addr).await?;
        }
        info!(%v4, %v5, "embedded broker listening on loopback");
        Ok(EmbeddedBroker { v4, v5, tasks })
    }

    /// Whether a listener has stopped (it only stops on an error).
    pub fn failed(&self) -> bool {
        self.tasks.iter().any(|t| t.is_finished())
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Resolves port 0 to a free port. rumqttd binds by address itself, so the
/// caller releases the port again and the listener takes it moments later
/// (on loopback only: the public port is the front's own socket).
fn reserve(addr: SocketAddr) -> Result<StdListener, BrokerError> {
    StdListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })
}

fn local(l: &StdListener, addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    l.local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

fn router_config(c: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        max_connections: c.max_connections,
        // For QoS 0 subscriptions this is both the batch size of a read and
        // the cap on retained messages delivered at subscribe time: it must
        // exceed the number of records, or newcomers miss some.
        max_outgoing_packet_count: c.max_retained_delivery,
        max_segment_size: c.segment_size,
        max_segment_count: c.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn server_settings(c: &BrokerConfig, name: &str, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: c.connect_timeout.as_millis().min(u16::MAX as u128) as u16,
            max_payload_size: c.max_payload_size,
            max_inflight_count: 100,
            auth: None::<HashMap<String, String>>,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// rumqttd never sets TCP_NODELAY on its sockets, so a subscriber that gets
/// two messages in a row waits for a delayed ACK (~40 ms) before the second
/// (measured: the refusal window was 44 ms). Linux copies TCP_NODELAY from a
/// listening socket to the sockets it accepts, so it is set once on
/// rumqttd's listeners, found by port among this process's descriptors.
mod nodelay {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::BrokerError;

    /// Waits (up to 5 s) until rumqttd listens on `addr`, then sets
    /// TCP_NODELAY on that listener.
    pub async fn when_listening(addr: SocketAddr) -> Result<(), BrokerError> {
        for _ in 0..500 {
            if let Some(fd) = listener_fd(addr.port()) {
                set_nodelay(fd, addr);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(BrokerError::NotListening(addr))
    }

    #[cfg(target_os = "linux")]
    fn listener_fd(port: u16) -> Option<i32> {
        socket_fd(port, "0A")
    }

    /// A socket of this process with local `port` in TCP `state` (hex, as in
    /// /proc/net/tcp: 0A listening, 01 established).
    #[cfg(target_os = "linux")]
    pub(super) fn socket_fd(port: u16, state: &str) -> Option<i32> {
        let mut sockets = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
            let Ok(link) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                && let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>()
            {
                sockets.insert(inode.to_string(), fd);
            }
        }
        for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let Some(local_port) = cols.get(1).and_then(|l| l.rsplit(':').next()) else {
                    continue;
                };
                if cols.get(3) == Some(&state)
                    && u16::from_str_radix(local_port, 16) == Ok(port)
                    && let Some(fd) = cols.get(9).and_then(|i| sockets.get(*i))
                {
                    return Some(*fd);
                }
            }
        }
        None
    }

    #[cfg(not(target_os = "linux"))]
    fn listener_fd(port: u16) -> Option<i32> {
        // Elsewhere: no way to find rumqttd's listener; check it accepts.
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| -1)
    }

    fn set_nodelay(fd: i32, addr: SocketAddr) {
        if fd < 0 {
            return;
        }
        let one: libc::c_int = 1;
        // SAFETY: `fd` is an open TCP socket of this process (found above);
        // setsockopt reads `size_of::<c_int>()` bytes from a live local.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::warn!(%addr, error = %std::io::Error::last_os_error(), "TCP_NODELAY not set");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn config() -> BrokerConfig {
        crate::config::ServeConfig::load(None, &Default::default())
            .unwrap()
            .embedded
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let b = EmbeddedBroker::start(&config()).await.unwrap();
        for addr in [b.v4, b.v5] {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let fd = loop {
                if let Some(fd) = nodelay::socket_fd(addr.port(), "01") {
                    break fd;
                }
                tokio::task::yield_now().await;
            };
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into a live local.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            assert_eq!(
                v, 1,
                "rumqttd's accepted socket on {addr} lacks TCP_NODELAY"
            );
        }
    }

    #[tokio::test]
    async fn listens_on_loopback_only() {
        let b = EmbeddedBroker::start(&config()).await.unwrap();
        assert!(b.v4.ip().is_loopback() && b.v5.ip().is_loopback());
        assert_ne!(b.v4, b.v5);
    }
}
