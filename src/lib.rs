//! homicro: a service registry for home and small-cluster microservices,
//! over MQTT.
//!
//! ```text
//!  services ──publish retained──▶ PREFIX/services/NAME ◀──subscribe── consumers
//!     │                                                                 ▲
//!     ▼ one port: MQTT 3.1.1/5, WebSocket, HTTP (bus::listener, http)   │
//!  session (bus::session) ──▶ registry gate ──▶ router (bus::router) ──┘
//!                             (registry::shared, registry::actor: input + time
//!                              ▶ pure rules: registry::state, record)
//! ```
//!
//! With `--broker` the registry runs against an external broker instead and
//! judges records after the fact (restore / clear).
//!
//! A Rust service registers in three lines with [`client::Registration`]
//! (heartbeats, re-assertion and reconnection run in the background) and
//! deregisters on shutdown:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use homicro::client::{Broker, Registration};
//! let broker = Broker::parse("mqtt://localhost:1883")?;
//! let reg = Registration::builder("web").port(8080).ttl_secs(30).version("1.2.0")
//!     .health_http("/health").register(&broker).await?;
//! // ... serve until asked to stop ...
//! reg.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! A consumer keeps a live [`client::Directory`] and picks an instance by
//! role and semver range, failing over to another when one fails:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use homicro::client::{Broker, Directory};
//! let dir = Directory::connect(&Broker::parse("mqtt://localhost:1883")?).await?;
//! dir.ready().await;
//! if let Some(api) = dir.pick("api@^1.2")? {
//!     println!("calling {}", api.url());
//!     // on failure: dir.report_failed(&api) and pick again
//! }
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! `server` (default): `homicro serve` (the embedded broker, the registry,
//! the HTTP API), the commands for people (`cli`) and what only they need
//! (hyper, tungstenite, clap, toml, jemalloc...). A Rust service that only
//! registers and discovers depends on the helper alone:
//!
//! ```toml
//! homicro = { git = "…", default-features = false }
//! ```
//!
//! which is [`client`] with [`record`], [`topics`], [`protocol`], [`mqtt`],
//! [`tls_client`] and `config::BrokerUrl` (of [`rpc`], only its `wire`
//! rules); `client::deregister_as_admin` needs `server`.
//!
//! # Modules
//!
//! [`record`] validates names and records for everyone; [`protocol`] types
//! the registry's payloads; `registry` holds the rules and the actor;
//! `bus` is the MQTT server and its router; `http` the HTTP API and the
//! dashboard; `homeassistant` the Home Assistant bridge; `serve` wires
//! them (these with `server`); [`client`] is the helper for Rust services;
//! `cli` is the commands for people, built on it. The wire
//! contract is `docs/PROTOCOL.md`; [`protocol`] types the registry's
//! payloads for all of them.

// The helper for Rust services, and what it needs: always built.
pub mod client;
pub mod mqtt;
pub mod protocol;
pub mod record;
pub mod tls_client;
pub mod topics;

// The server (`homicro serve`), the commands for people, and what only
// they need: the `server` feature (a default one).
#[cfg(feature = "server")]
pub mod alloc;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod bus;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod durable;
#[cfg(feature = "server")]
pub mod homeassistant;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod hugetext;
#[cfg(feature = "server")]
pub mod identity;
#[cfg(feature = "server")]
pub mod journal;
#[cfg(feature = "server")]
pub mod registry;
#[cfg(feature = "server")]
pub mod rpc;
#[cfg(feature = "server")]
pub mod serve;
#[cfg(feature = "server")]
pub mod statefile;

/// Without the `server` feature: of the configuration, only the broker's
/// address (`crate::config::BrokerUrl`, as with it).
#[cfg(not(feature = "server"))]
pub mod config {
    mod broker;
    pub use broker::{BrokerUrl, Login};
}

/// Without the `server` feature: of the calls through the hub, only the
/// topics' rules, which the helper's `Caller` follows.
#[cfg(not(feature = "server"))]
pub mod rpc {
    pub mod wire;
}
