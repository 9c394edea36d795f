//! `homicro serve`: the embedded broker behind the one-port front (unless
//! an external broker is given) and the registry actor beside it, until
//! `shutdown` resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::broker::{BrokerError, EmbeddedBroker};
use crate::config::{BrokerUrl, ServeConfig};
use crate::front::{self, Shared};
use crate::registry::{self, Handle};
use crate::topics::Topics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded broker stopped")]
    BrokerStopped,
}

/// A running `serve`: where clients connect, and the registry's handle.
pub struct Running {
    /// The MQTT address clients use (port resolved) or the external broker.
    pub broker: BrokerUrl,
    /// `None` with `registry = false` (the broker alone, for benchmarks).
    pub registry: Option<Handle>,
    /// The front's shared state (embedded mode only).
    pub front: Option<Arc<Shared>>,
    embedded: Option<EmbeddedBroker>,
    front_task: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.front_task {
            t.abort();
        }
    }
}

/// Binds the public port first (so a taken port fails before anything
/// starts), then starts the broker (if embedded), the registry and the
/// front.
pub async fn start(config: &ServeConfig) -> Result<Running, ServeError> {
    let Some(url) = &config.broker else {
        return start_embedded(config).await;
    };
    info!(broker = %url, "using an external broker");
    let registry = spawn_registry(config, url.clone(), true);
    info!(listen = %url, prefix = %config.prefix, "homicro serving");
    Ok(Running {
        broker: url.clone(),
        registry,
        front: None,
        embedded: None,
        front_task: None,
    })
}

async fn start_embedded(config: &ServeConfig) -> Result<Running, ServeError> {
    let addr = config.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let listen = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    raise_fd_limit();
    let b = EmbeddedBroker::start(&config.embedded).await?;
    let registry = spawn_registry(config, url_of(b.v4), false);
    let mut shared = Shared::new(
        b.v4,
        b.v5,
        Topics::new(&config.prefix),
        registry.clone(),
        config.embedded.connect_timeout,
    );
    // Room for the fixed header, topic and properties around the largest
    // payload the broker accepts.
    shared.max_packet = config.embedded.max_payload_size + 65_536 + 16;
    // Room under the broker's limit for the registry and the front's own
    // one-off connections (wills).
    shared.max_sessions = config.embedded.max_connections.saturating_sub(16).max(1);
    let shared = Arc::new(shared);
    front::announce(listen, &shared);
    let front_task = tokio::spawn(front::run(listener, shared.clone()));
    let public = url_of(listen);
    info!(listen = %public, prefix = %config.prefix, "homicro serving");
    Ok(Running {
        broker: public,
        registry,
        front: Some(shared),
        embedded: Some(b),
        front_task: Some(front_task),
    })
}

fn spawn_registry(config: &ServeConfig, broker: BrokerUrl, will: bool) -> Option<Handle> {
    let registry = config.registry.then(|| {
        Handle::spawn(registry::Options {
            broker,
            prefix: config.prefix.clone(),
            state_file: config.state_file.clone(),
            state_flush: config.state_flush,
            will,
            health_concurrency: config.health_concurrency,
        })
    });
    if registry.is_none() {
        info!("registry off: the broker alone");
    }
    registry
}

/// Each MQTT client through the front holds three descriptors (its socket,
/// the front's broker connection and the broker's end of it): lift the
/// soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a live local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Serves until `shutdown` resolves, then announces `offline`, writes the
/// state file and returns.
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let running = start(&config).await?;
    tokio::pin!(shutdown);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = check.tick() => {
                if running.embedded.as_ref().is_some_and(EmbeddedBroker::failed) {
                    error!("embedded broker listener failed; stopping");
                    break Err(ServeError::BrokerStopped);
                }
                if running.front.as_ref().is_some_and(|f| f.broker_health.broken()) {
                    error!(
                        "the embedded broker answers no CONNECT any more (rumqttd's listener \
                         is poisoned); stopping so that a supervisor restarts homicro"
                    );
                    break Err(ServeError::BrokerStopped);
                }
            }
        }
    };
    info!("shutting down");
    if let Some(r) = &running.registry {
        r.shutdown().await;
    }
    result
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
    }
}
