//! The embedded rumqttd broker, configured for a registry.
//!
//! rumqttd's defaults do not fit (see shared/RUMQTT-NOTES.md): every field
//! is set here. The broker gets two MQTT 3.1.1 listeners: the public one
//! (`listen`) and a private one on a loopback port that only the registry
//! actor uses, so the actor reaches the broker the same way it reaches an
//! external one, whatever address the public listener binds.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};

use rumqttd::protocol::v4::V4;
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
    /// Where clients connect (the public listener, port resolved).
    pub listen: SocketAddr,
    /// The private loopback listener for the registry actor.
    pub internal: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts the router and both listeners on the current tokio runtime and
    /// returns once both listen. Bind errors are returned before anything
    /// listens.
    pub async fn start(config: &BrokerConfig, listen: SocketAddr) -> Result<Self, BrokerError> {
        // Both reservations are held until both ports are known: released
        // one by one, the second could get the port the first just freed,
        // and the two listeners would race for it (seen in CI).
        let public = reserve(listen)?;
        let private = reserve(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let (listen, internal) = (local(&public, listen)?, local(&private, listen)?);
        drop((public, private));
        let router_tx = Router::new(0, router_config(config)).spawn();
        let mut tasks = Vec::new();
        for (name, addr) in [("public", listen), ("internal", internal)] {
            let mut server =
                Server::new(server_settings(config, name, addr), router_tx.clone(), V4);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    error!(listener = name, %addr, error = %e, "broker listener stopped");
                }
            }));
        }
        for addr in [listen, internal] {
            nodelay::when_listening(addr).await?;
        }
        info!(%listen, "embedded broker listening");
        Ok(EmbeddedBroker {
            listen,
            internal,
            tasks,
        })
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

/// Checks that `addr` can be bound and resolves port 0 to a free port.
/// rumqttd binds by address itself, so the caller releases the port again
/// and the listener takes it moments later.
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
        let b = EmbeddedBroker::start(&config(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let _client = tokio::net::TcpStream::connect(b.listen).await.unwrap();
        let fd = loop {
            if let Some(fd) = nodelay::socket_fd(b.listen.port(), "01") {
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
        assert_eq!(v, 1, "rumqttd's accepted socket lacks TCP_NODELAY");
    }

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = EmbeddedBroker::start(&config(), taken.local_addr().unwrap())
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("cannot listen on 127.0.0.1:"),
            "{err}"
        );
    }
}
