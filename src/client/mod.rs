//! The helper for Rust services: register and stay registered, and keep a
//! live local directory of every service. Built on rumqttc; the CLI uses it
//! too.
//!
//! A service registers in three lines and deregisters on shutdown:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use homicro::client::{Broker, Registration};
//! let broker = Broker::parse("mqtt://localhost:1883")?;
//! let reg = Registration::builder("web").port(8080).ttl_secs(30).version("1.2.0")
//!     .health_http("/health").register(&broker).await?;
//! // ... serve ...
//! reg.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! A consumer finds a live instance of a role and version range:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use homicro::client::{Broker, Directory};
//! let dir = Directory::connect(&Broker::parse("mqtt://localhost:1883")?).await?;
//! dir.ready().await;
//! if let Some(api) = dir.pick("api@^1.2")? {
//!     println!("calling {}", api.endpoint());
//! }
//! # Ok(()) }
//! ```

//! A service answers calls through the hub (it needs no open port), and
//! anyone calls one instance of a name or `role@range`:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use homicro::client::{Broker, Caller, Registration, Reply};
//! let broker = Broker::parse("mqtt://localhost:1883")?;
//! let reg = Registration::builder("pinger").port(9).register(&broker).await?;
//! let _serving = reg.serve_requests(|req| async move {
//!     Reply::ok(format!("pong: {}", String::from_utf8_lossy(&req.body)))
//! }).await?;
//! let caller = Caller::connect(&broker).await?;
//! let reply = caller.call("pinger", "ping", std::time::Duration::from_secs(5)).await?;
//! assert_eq!(reply.status, 200);
//! # Ok(()) }
//! ```

// The HTTP admin path (for `homicro deregister`) needs hyper: server only.
#[cfg(feature = "server")]
mod admin;
mod directory;
mod registration;
mod rpc;

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, timeout_at};

pub use crate::config::BrokerUrl as Broker;
pub use crate::record::{Endpoint, Name, Record};
#[cfg(feature = "server")]
pub use admin::deregister_as_admin;
pub use directory::{
    Change, Directory, DirectoryError, Options as DirectoryOptions, Service, Strategy,
};
pub use registration::{
    Notice, RegisterError, Registration, RegistrationBuilder, Status as RegistrationStatus,
};
pub use rpc::{CallError, Caller, Reply, Request, RequestServer};

use crate::mqtt::{self, Incoming, SnapshotError};
use crate::protocol::{
    ErrorCode, ErrorPayload, EventKind, EventPayload, RegistryState, RegistryStatus,
};
use crate::topics::Topics;

/// How long the helper waits for the broker or the registry to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the broker could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to {broker}: {reason}")]
    Connect { broker: String, reason: String },
    /// Nothing to connect to (`reason`: connection refused, unknown host,
    /// no route): through the first 10 s of trying, or at the first
    /// attempt with [`Broker::fail_fast`].
    #[error("cannot reach the broker at {broker} ({reason}): is `homicro serve` running?")]
    Unreachable { broker: String, reason: String },
    #[error("lost the broker {broker}: {reason}")]
    Lost { broker: String, reason: String },
    #[error("no answer from {broker} within {wait:?}")]
    Timeout { broker: String, wait: Duration },
    #[error("the MQTT client has stopped")]
    Closed,
}

/// One MQTT session: a rumqttc client and the events of its event loop.
pub(crate) struct Connection {
    pub client: AsyncClient,
    pub rx: UnboundedReceiver<Incoming>,
    pub broker: Broker,
    /// Whether snapshots sync on `$PREFIX/sync/ID` (false once the broker
    /// dropped one: then `PREFIX/sync/ID`).
    dollar_sync: bool,
}

impl Connection {
    /// Connects (with an optional will) and waits for the CONNACK, trying
    /// for up to 10 s; when nothing listened (or there was no such host)
    /// all that time, the error is [`ConnectionError::Unreachable`]. With
    /// [`Broker::fail_fast`] (the CLI's), the first such attempt gives up
    /// at once. Once connected, the connection reconnects by itself.
    pub async fn open(
        broker: &Broker,
        client_prefix: &str,
        will: Option<LastWill>,
    ) -> Result<Connection, ConnectionError> {
        let mut opts =
            mqtt::options_checked(&mqtt::client_id(client_prefix), broker).map_err(|reason| {
                ConnectionError::Connect {
                    broker: broker.to_string(),
                    reason,
                }
            })?;
        if let Some(w) = will {
            opts.set_last_will(w);
        }
        let (client, rx) = mqtt::connect(opts, Duration::from_millis(100));
        let mut c = Connection {
            client,
            rx,
            broker: broker.clone(),
            dollar_sync: true,
        };
        // Room for a few attempts (each gives up after 2 s).
        let deadline = Instant::now() + 2 * ANSWER_TIMEOUT;
        let mut reason = "no answer".to_string();
        let mut unreachable = None;
        loop {
            match timeout_at(deadline, c.rx.recv()).await {
                Ok(Some(Incoming::Connected)) => return Ok(c),
                // A refused login or certificate does not get better by
                // trying again.
                Ok(Some(Incoming::Disconnected(e))) if e.contains("invalid peer certificate") => {
                    return Err(ConnectionError::Connect {
                        broker: broker.to_string(),
                        reason: e,
                    });
                }
                Ok(Some(Incoming::Disconnected(e)))
                    if e.contains("NotAuthorized") || e.contains("BadUserNamePassword") =>
                {
                    return Err(ConnectionError::Connect {
                        broker: broker.to_string(),
                        reason: format!(
                            "bad user name or password, or not authorized ({e}); \
                             check the user and its password"
                        ),
                    });
                }
                // Nothing listens there: a person is told now, as curl
                // does; a service waits for its broker to come up.
                Ok(Some(Incoming::Disconnected(e))) if let Some(why) = mqtt::unreachable(&e) => {
                    if broker.fail_fast {
                        return Err(ConnectionError::Unreachable {
                            broker: broker.to_string(),
                            reason: why.to_string(),
                        });
                    }
                    unreachable = Some(why);
                    reason = e;
                }
                Ok(Some(Incoming::Disconnected(e))) => {
                    unreachable = None;
                    reason = e;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    return Err(match unreachable {
                        Some(why) => ConnectionError::Unreachable {
                            broker: broker.to_string(),
                            reason: why.to_string(),
                        },
                        None => ConnectionError::Connect {
                            broker: broker.to_string(),
                            reason,
                        },
                    });
                }
            }
        }
    }

    /// The next event, or an error on a lost connection or after `deadline`.
    pub async fn next(&mut self, deadline: Instant) -> Result<Incoming, ConnectionError> {
        match timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(Incoming::Disconnected(reason))) => Err(ConnectionError::Lost {
                broker: self.broker.to_string(),
                reason,
            }),
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(ConnectionError::Closed),
            Err(_) => Err(ConnectionError::Timeout {
                broker: self.broker.to_string(),
                wait: ANSWER_TIMEOUT,
            }),
        }
    }

    /// Subscribes to each filter and waits for every SUBACK; messages that
    /// arrive meanwhile are returned.
    pub async fn subscribe(
        &mut self,
        filters: &[String],
    ) -> Result<Vec<mqtt::Message>, ConnectionError> {
        for f in filters {
            self.client
                .subscribe(f.clone(), QoS::AtMostOnce)
                .await
                .map_err(|_| ConnectionError::Closed)?;
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let (mut acks, mut early) = (0, Vec::new());
        while acks < filters.len() {
            match self.next(deadline).await? {
                Incoming::Subscribed => acks += 1,
                Incoming::Message {
                    topic,
                    payload,
                    retained,
                } => early.push((topic, payload, retained)),
                _ => {}
            }
        }
        Ok(early)
    }

    /// Every message up to the end of `filter`'s retained copies (see
    /// [`mqtt::snapshot`]), synced on `$PREFIX/sync/ID`, out of the way of
    /// `#` subscribers. A broker that drops that (Mosquitto does when its
    /// ACL does not grant it) costs one timeout, a warning, and the plain
    /// `PREFIX/sync/ID` from then on; so at most twice [`ANSWER_TIMEOUT`].
    pub async fn snapshot(
        &mut self,
        topics: &Topics,
        filter: &str,
    ) -> Result<Vec<mqtt::Message>, ConnectionError> {
        let id = mqtt::client_id("dir");
        if self.dollar_sync {
            let sync = topics.sync(&id);
            match mqtt::snapshot(&self.client, &mut self.rx, filter, &sync, ANSWER_TIMEOUT).await {
                Err(SnapshotError::Timeout(_)) => {
                    let _ = self.client.unsubscribe(&sync).await;
                    tracing::warn!(
                        broker = %self.broker,
                        "no answer on {sync}: the broker dropped it (a Mosquitto ACL that does \
                         not grant readwrite on ${}/sync/#) or is slow; syncing on {} instead",
                        topics.prefix(),
                        topics.plain_sync("ID"),
                    );
                    self.dollar_sync = false;
                }
                r => return r.map_err(|e| self.snapshot_error(e)),
            }
        }
        let sync = topics.plain_sync(&id);
        mqtt::snapshot(&self.client, &mut self.rx, filter, &sync, ANSWER_TIMEOUT)
            .await
            .map_err(|e| self.snapshot_error(e))
    }

    fn snapshot_error(&self, e: SnapshotError) -> ConnectionError {
        let broker = self.broker.to_string();
        match e {
            SnapshotError::Timeout(wait) => ConnectionError::Timeout { broker, wait },
            SnapshotError::Disconnected(reason) => ConnectionError::Lost { broker, reason },
            SnapshotError::Closed => ConnectionError::Closed,
        }
    }

    pub async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), ConnectionError> {
        self.client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|_| ConnectionError::Closed)
    }

    /// Disconnects and waits (briefly) until the DISCONNECT went out.
    pub async fn close(mut self) {
        let _ = self.client.disconnect().await;
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(m) = self.next(deadline).await {
            if matches!(m, Incoming::Closed) {
                return;
            }
        }
    }
}

/// What `PREFIX/registry` says; `None` when there is no registry on the
/// broker, or the payload is not a registry state.
pub(crate) fn registry_state(payload: &[u8]) -> Option<RegistryState> {
    serde_json::from_slice::<RegistryStatus>(payload)
        .ok()
        .map(|s| s.state)
}

/// The local address this machine uses to reach `broker` (no packet sent):
/// the host a service registers when it is not told one.
pub fn local_address_towards(broker: &Broker) -> std::io::Result<String> {
    let target: SocketAddr = (broker.host.as_str(), broker.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {}", broker.host)))?;
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip().to_string())
}

/// Clears NAME's record and waits until the registry confirms. Returns
/// `Ok(false)` when NAME was not registered.
pub async fn deregister(broker: &Broker, prefix: &str, name: &Name) -> Result<bool, RegisterError> {
    let topics = Topics::new(prefix);
    let mut c = Connection::open(broker, "homicro-dereg", None).await?;
    let events = topics.event(name.as_str());
    let errors = topics.error(name.as_str());
    c.subscribe(&[events.clone(), errors.clone()]).await?;
    let topic = topics.service(name.as_str());
    let snapshot = c.snapshot(&topics, &topic).await?;
    if !snapshot
        .iter()
        .any(|(t, p, _)| *t == topic && !p.is_empty())
    {
        c.close().await;
        return Ok(false);
    }
    c.publish(topic, Bytes::new(), true).await?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match c.next(deadline).await {
            Ok(Incoming::Message { topic, payload, .. }) if topic == events => {
                let event = serde_json::from_slice::<EventPayload>(&payload);
                if event.is_ok_and(|e| e.event == EventKind::Deregistered) {
                    c.close().await;
                    return Ok(true);
                }
            }
            Ok(Incoming::Message { topic, payload, .. }) if topic == errors => {
                // Another identity's record: only it or an admin may clear it.
                if let Ok(e) = serde_json::from_slice::<ErrorPayload>(&payload)
                    && e.error == ErrorCode::NotOwner
                {
                    c.close().await;
                    return Err(RegisterError::Owned {
                        owner: e.owner.unwrap_or_else(|| Endpoint {
                            host: "unknown".into(),
                            port: None,
                        }),
                        detail: e.detail,
                    });
                }
            }
            Ok(_) => {}
            Err(ConnectionError::Timeout { .. }) => return Err(RegisterError::RegistryOffline),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A pseudo-random number (std's per-process random SipHash keys).
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// What the registry announces on `PREFIX/events/+` and `PREFIX/registry`.
#[derive(Debug, Clone, PartialEq)]
pub enum Announcement {
    /// An event; `name` is the topic's NAME.
    Event { name: String, event: EventPayload },
    /// The registry's state; `None` when `PREFIX/registry` holds none (it
    /// was cleared, or is not a registry state).
    Registry(Option<RegistryState>),
}

/// Follows the registry's announcements (for `homicro watch`), reconnecting
/// and resubscribing as needed.
pub struct Announcements {
    conn: Connection,
    topics: Topics,
    filters: [String; 2],
    pending: std::collections::VecDeque<mqtt::Message>,
}

impl Announcements {
    pub async fn connect(broker: &Broker, prefix: &str) -> Result<Announcements, ConnectionError> {
        let topics = Topics::new(prefix);
        let mut conn = Connection::open(broker, "homicro-watch", None).await?;
        let filters = [topics.events_filter(), topics.registry()];
        let early = conn.subscribe(&filters).await?;
        Ok(Announcements {
            conn,
            topics,
            filters,
            pending: early.into(),
        })
    }

    /// The next announcement; `Err` only when the client has stopped.
    pub async fn next(&mut self) -> Result<Announcement, ConnectionError> {
        loop {
            let (topic, payload) = match self.pending.pop_front() {
                Some((t, p, _)) => (t, p),
                None => match self.conn.rx.recv().await {
                    None => return Err(ConnectionError::Closed),
                    Some(Incoming::Message { topic, payload, .. }) => (topic, payload),
                    Some(Incoming::Connected) => {
                        for f in &self.filters {
                            self.conn
                                .client
                                .subscribe(f.clone(), QoS::AtMostOnce)
                                .await
                                .map_err(|_| ConnectionError::Closed)?;
                        }
                        continue;
                    }
                    Some(Incoming::Disconnected(e)) => {
                        tracing::warn!(error = %e, "lost the broker; reconnecting");
                        continue;
                    }
                    Some(_) => continue,
                },
            };
            if topic == self.filters[1] {
                return Ok(Announcement::Registry(registry_state(&payload)));
            }
            let Ok(event) = serde_json::from_slice::<EventPayload>(&payload) else {
                continue;
            };
            let name = topic
                .strip_prefix(&format!("{}/events/", self.topics.prefix()))
                .unwrap_or(&topic)
                .to_string();
            return Ok(Announcement::Event { name, event });
        }
    }

    pub async fn close(self) {
        self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forged `PREFIX/registry` (anyone may publish there) that is not a
    /// registry state reads as no registry, never as `online`, and never panics.
    #[test]
    fn a_forged_registry_state_is_not_online() {
        for forged in [
            &b"online"[..],
            b"",
            b"\xff\xfe",
            b"{",
            br#"{"state":"ONLINE","version":"0.1.0"}"#,
            br#"{"state":"maybe","version":"0.1.0"}"#,
            br#"{"state":1,"version":"0.1.0"}"#,
            br#"{"state":"online"}"#,
            br#"["online"]"#,
        ] {
            assert_eq!(registry_state(forged), None, "{forged:?}");
        }
        let offline = br#"{"state":"offline","version":"0.1.0"}"#;
        assert_eq!(registry_state(offline), Some(RegistryState::Offline));
        let online = br#"{"version":"9.9.9","extra":[1],"state":"online"}"#;
        assert_eq!(registry_state(online), Some(RegistryState::Online));
    }
}
