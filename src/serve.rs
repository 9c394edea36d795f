//! `homicro serve`: the bus on the one port with the registry as its gate
//! (or the registry alone against an external broker), until `shutdown`
//! resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::auth::Auth;
use crate::bus::tls::Tls;
use crate::bus::{self, Bus, Limits, Router, listener};
use crate::config::{BrokerUrl, ServeConfig};
use crate::durable;
use crate::homeassistant;
use crate::journal::Journal;
use crate::registry::{self, Handle};
use crate::topics::Topics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Auth(#[from] crate::auth::FileError),
    #[error("{0}")]
    Tls(#[from] crate::bus::tls::TlsError),
    #[error("{}", listen_error(addr, source))]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    StateDir(#[from] crate::durable::DirError),
    /// The final write failed: what was not written.
    #[error("stopped, but {0}: they may be lost")]
    NotWritten(String),
}

/// A running `serve`: where clients connect, and the registry's handle.
pub struct Running {
    /// The MQTT address clients use (port resolved) or the external broker.
    pub broker: BrokerUrl,
    /// `None` with `registry = false` (the bus alone, for benchmarks).
    pub registry: Option<Handle>,
    /// The bus (embedded mode only).
    pub bus: Option<Arc<Bus>>,
    /// Where every change is written (`None`: nowhere).
    pub journal: Option<Journal>,
    listener_task: Option<JoinHandle<()>>,
    /// The Home Assistant bridge (with discovery off, its one-shot remover).
    home_assistant: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in [&self.listener_task, &self.home_assistant]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

/// Binds the public port first (so a taken port fails before anything
/// starts), then starts the router (if embedded), the registry and the
/// listener.
pub async fn start(config: &ServeConfig) -> Result<Running, ServeError> {
    let Some(url) = &config.broker else {
        return start_embedded(config).await;
    };
    info!(broker = %url, "using an external broker");
    if config.auth.password_file.is_some() {
        tracing::warn!(
            "[auth] is for the embedded bus: the external broker checks its own clients"
        );
    }
    let opened = open_state(config).await?;
    let journal = opened.journal.clone();
    let registry = match config.registry {
        true => Some(
            registry::Handle::spawn(options(
                config,
                registry::Bus::External(url.clone()),
                opened,
            ))
            .await,
        ),
        false => None,
    };
    let home_assistant =
        homeassistant::start(config, homeassistant::Bus::External(url.clone()), None);
    info!(url = %url, prefix = %config.prefix, "homicro serving");
    Ok(Running {
        broker: url.clone(),
        registry,
        bus: None,
        journal,
        listener_task: None,
        home_assistant,
    })
}

async fn start_embedded(config: &ServeConfig) -> Result<Running, ServeError> {
    let addr = config.listen;
    let tcp = bind(addr).map_err(|source| ServeError::Listen { addr, source })?;
    let listen = tcp
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    let auth = Arc::new(Auth::load(config.auth.clone())?);
    if auth.enabled() {
        info!(
            users = auth.users(),
            allow_anonymous = auth.allow_anonymous(),
            "password file read"
        );
    }
    let tls = match &config.tls {
        Some(c) => {
            let tls = Arc::new(Tls::load(c.clone())?);
            info!(cert = %c.cert.display(), require = c.require, "TLS on the port");
            Some(tls)
        }
        None => None,
    };
    let mut opened = open_state(config).await?;
    let journal = opened.journal.clone();
    let router = Router::new();
    router.restore(std::mem::take(&mut opened.retained));
    let topics = Topics::new(&config.prefix);
    if let Some(j) = &journal {
        // The registry journals its own topics' state (its records) itself;
        // without one, every retained topic is the bus's.
        let own = topics.clone();
        let registry = config.registry;
        router.journal_retained(
            j.clone(),
            Box::new(move |t| !registry || bus::gate::journaled_by_router(&own, t)),
        );
    }
    let registry = match config.registry {
        true => Some(
            registry::Handle::spawn(options(
                config,
                registry::Bus::Embedded(router.clone()),
                opened,
            ))
            .await,
        ),
        false => {
            info!("registry off: the bus alone");
            None
        }
    };
    let home_assistant = homeassistant::start(
        config,
        homeassistant::Bus::Embedded(router.clone()),
        Some(listen),
    );
    let limits = limits(config);
    info!(
        max_sessions = limits.max_sessions,
        max_connections = limits.max_connections,
        "limits from the file-descriptor limit"
    );
    let mut bus = Bus::new(limits, router, topics, registry.clone(), auth.clone());
    bus.tls = tls.clone();
    bus.journal = journal.clone();
    let bus = Arc::new(bus);
    tokio::spawn(reload_on_hangup(auth, tls));
    info!(%listen, "listening (MQTT 3.1.1 and 5, WebSocket /mqtt, HTTP API)");
    let listener_task = tokio::spawn(listener::run(tcp, bus.clone()));
    tokio::spawn(bus::trim_memory(bus.clone()));
    if bus.gate.is_some() {
        tokio::spawn(crate::rpc::watch(bus.clone()));
    }
    let public = url_of(listen);
    // `listen`: the socket as bound (0.0.0.0: every interface); `url`:
    // where a client on this machine connects.
    info!(%listen, url = %public, prefix = %config.prefix, "homicro serving");
    Ok(Running {
        broker: public,
        registry,
        bus: Some(bus),
        journal,
        listener_task: Some(listener_task),
        home_assistant,
    })
}

/// Listen queue for the public port. tokio's `bind` asks for 128: a storm
/// of 10,000 CONNECTs overflowed it thousands of times, each a SYN retried
/// a second or more later (measured: 4,500 to 45,000 overflows a storm).
const BACKLOG: i32 = 4096;

/// Binds the public port with a deep listen queue.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The state directory, opened (or, with none, nothing kept).
async fn open_state(config: &ServeConfig) -> Result<durable::Opened, ServeError> {
    match &config.state_dir {
        Some(dir) => Ok(durable::open(dir, config.state_file.as_deref()).await?),
        None => {
            tracing::warn!(
                "state_dir is empty: nothing is kept, a restart starts empty, and \
                 acknowledgements do not wait for a disk"
            );
            Ok(durable::Opened::default())
        }
    }
}

fn options(config: &ServeConfig, bus: registry::Bus, opened: durable::Opened) -> registry::Options {
    registry::Options {
        bus,
        prefix: config.prefix.clone(),
        journal: opened.journal,
        restored: opened.records,
        health_concurrency: config.health_concurrency,
    }
}

/// The bus's limits: sessions and connections from the file-descriptor
/// limit (one descriptor per client) within the configured cap.
fn limits(config: &ServeConfig) -> Limits {
    let e = &config.embedded;
    let (max_sessions, max_connections) = listener::caps(
        listener::fd_limit(),
        config.health_concurrency,
        e.max_connections,
    );
    Limits {
        // Room for the fixed header, topic and properties around the
        // largest payload.
        max_packet: e.max_payload_size + 65_536 + 16,
        max_payload: e.max_payload_size,
        handshake_timeout: e.connect_timeout,
        receive_maximum: e.max_inflight_messages,
        max_inflight: e.max_inflight_messages,
        max_queued: e.max_queued_messages,
        topic_alias_max: e.max_topic_alias,
        max_keepalive: e.max_keepalive,
        max_sessions,
        max_connections,
        proxy_timeout: config.proxy_timeout,
    }
}

/// Serves until `shutdown` resolves, then announces `offline`, writes
/// what the journal holds and returns (`NotWritten`: what it could not).
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let running = start(&config).await?;
    shutdown.await;
    info!("shutting down");
    running.stop().await
}

impl Running {
    /// Announces `offline`, stops the registry, and closes the journal
    /// once everything in it is written (`NotWritten`: what could not be).
    pub async fn stop(&self) -> Result<(), ServeError> {
        if let Some(t) = &self.home_assistant {
            // Before the journal closes: it may be publishing.
            t.abort();
        }
        if let Some(r) = &self.registry {
            r.shutdown().await;
        }
        let Some(journal) = self.journal.clone() else {
            return Ok(());
        };
        let closed = tokio::task::spawn_blocking(move || journal.close())
            .await
            .unwrap_or_else(|e| Err(format!("the journal's writer failed: {e}")));
        match closed {
            Ok(()) => {
                info!("state written");
                Ok(())
            }
            Err(what) => {
                tracing::error!(error = %what, "the final write failed");
                Err(ServeError::NotWritten(what))
            }
        }
    }
}

/// Reads the password and ACL files and the TLS certificate again on every
/// SIGHUP, as Mosquitto does; a file with errors is logged and what it
/// held stays as it was.
async fn reload_on_hangup(auth: Arc<Auth>, tls: Option<Arc<Tls>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        if let Err(e) = auth.reload() {
            tracing::error!(error = %e, "not reloaded; what it held stays as it was");
        }
        if let Some(Err(e)) = tls.as_ref().map(|t| t.reload()) {
            tracing::error!(error = %e, "TLS certificate not reloaded; the old one stays");
        }
    }
}

/// Why the public port could not be bound, and what to do when it is taken.
fn listen_error(addr: &SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            let mut other = *addr;
            other.set_port(addr.port().checked_add(1).unwrap_or(1883));
            format!(
                "port {} is in use (another broker, or homicro already running?): \
                 pick another with --listen {other}",
                addr.port()
            )
        }
        _ => format!("cannot listen on {addr}: {e}"),
    }
}

fn url_of(addr: SocketAddr) -> BrokerUrl {
    let host = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => "127.0.0.1".to_string(),
            SocketAddr::V6(_) => "::1".to_string(),
        }
    } else {
        addr.ip().to_string()
    };
    BrokerUrl {
        host,
        port: addr.port(),
        login: None,
        tls: false,
        cafile: None,
        fail_fast: false,
    }
}
