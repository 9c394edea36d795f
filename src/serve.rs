//! `homicro serve`: the embedded broker (unless an external one is given)
//! and the registry actor beside it, until `shutdown` resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::{error, info};

use crate::broker::{BrokerError, EmbeddedBroker};
use crate::config::{BrokerUrl, ServeConfig};
use crate::registry::{self, Handle};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the embedded broker stopped")]
    BrokerStopped,
}

/// A running `serve`: where clients connect, and the registry's handle.
pub struct Running {
    /// The MQTT address clients use (port resolved) or the external broker.
    pub broker: BrokerUrl,
    /// `None` with `registry = false` (the broker alone, for benchmarks).
    pub registry: Option<Handle>,
    embedded: Option<EmbeddedBroker>,
}

/// Starts the broker (if embedded) and the registry.
pub async fn start(config: &ServeConfig) -> Result<Running, ServeError> {
    let (embedded, actor_url, public) = match &config.broker {
        Some(url) => {
            info!(broker = %url, "using an external broker");
            (None, url.clone(), url.clone())
        }
        None => {
            let b = EmbeddedBroker::start(&config.embedded, config.listen).await?;
            let internal = url_of(b.internal);
            let public = url_of(b.listen);
            (Some(b), internal, public)
        }
    };
    let registry = config.registry.then(|| {
        Handle::spawn(registry::Options {
            broker: actor_url,
            prefix: config.prefix.clone(),
            state_file: config.state_file.clone(),
            state_flush: config.state_flush,
            will: embedded.is_none(),
            health_concurrency: config.health_concurrency,
        })
    });
    if registry.is_none() {
        info!("registry off: the broker alone");
    }
    info!(listen = %public, prefix = %config.prefix, "homicro serving");
    Ok(Running {
        broker: public,
        registry,
        embedded,
    })
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
