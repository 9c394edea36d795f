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
    /// Starts the router and both listeners on the current tokio runtime.
    /// Bind errors are returned before anything listens.
    pub fn start(config: &BrokerConfig, listen: SocketAddr) -> Result<Self, BrokerError> {
        let listen = reserve(listen)?;
        let internal = reserve(SocketAddr::from(([127, 0, 0, 1], 0)))?;
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
/// rumqttd binds by address itself, so the port is released again here
/// and taken by the listener moments later.
fn reserve(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let l = StdListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
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
