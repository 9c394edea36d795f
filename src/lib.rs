//! homicro: a service registry for home and small-cluster microservices,
//! over MQTT.
//!
//! ```text
//!  services ──publish retained──▶ PREFIX/services/NAME ◀──subscribe── consumers
//!                                      │   ▲
//!                     (embedded rumqttd│or │an external broker)
//!                                      ▼   │ restore / clear / events
//!                              registry actor (registry::actor)
//!                                      │ input + time
//!                                      ▼
//!                     pure rules (registry::state, record) ──▶ publishes
//! ```
//!
//! [`record`] validates names and records for everyone; [`registry`] holds
//! the rules and the actor; [`broker`] configures the embedded broker;
//! [`serve`] wires them; [`cli`] is the commands for people. The wire
//! contract is `docs/PROTOCOL.md`.

pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod mqtt;
pub mod record;
pub mod registry;
pub mod serve;
pub mod statefile;
pub mod topics;
