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
//! [`record`] validates names and records for everyone; [`protocol`] types
//! the registry's payloads; [`registry`] holds the rules and the actor;
//! [`bus`] is the MQTT server and its router; [`http`] the HTTP API;
//! [`serve`] wires them; [`client`] is the helper for Rust services;
//! [`cli`] is the commands for people, built on it. The wire
//! contract is `docs/PROTOCOL.md`; [`protocol`] types the registry's
//! payloads for all of them.

pub mod alloc;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod durable;
pub mod homeassistant;
pub mod http;
pub mod hugetext;
pub mod identity;
pub mod journal;
pub mod mqtt;
pub mod protocol;
pub mod record;
pub mod registry;
pub mod rpc;
pub mod serve;
pub mod statefile;
pub mod tls_client;
pub mod topics;
