//! A service's own registration: validated before sending, accepted by the
//! registry before `register` returns, kept alive in the background (by
//! `session`, the task behind the `Registration` handle).

mod session;

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{LastWill, QoS};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::info;

use super::{Broker, Connection, ConnectionError, local_address_towards};
use crate::protocol::EventKind;
use crate::record::{Endpoint, Name, Record, RecordError};
use crate::topics::Topics;
use session::Session;

/// Why a registration failed; callers branch on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Another endpoint owns the name (`owned`), or another identity
    /// wrote its record (`not_owner`: only that writer or an admin may
    /// change it); `detail` says which.
    #[error("refused: {detail}")]
    Owned { owner: Endpoint, detail: String },
    /// The record (or name) is not valid; nothing was sent if the helper
    /// found out itself.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The server refused what only an admin may do, or could not be asked.
    #[error("refused: {0}")]
    Refused(String),
    /// The broker has no registry, or it is offline or did not answer.
    #[error("the registry is offline or absent: is `homicro serve` running?")]
    RegistryOffline,
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<RecordError> for RegisterError {
    fn from(e: RecordError) -> Self {
        RegisterError::Invalid(e.to_string())
    }
}

/// Builds a registration: a name and an endpoint, and optional fields.
#[derive(Debug, Clone)]
pub struct RegistrationBuilder {
    name: String,
    host: Option<String>,
    port: Option<u16>,
    fields: Map<String, Value>,
    prefix: String,
    ttl: Option<Duration>,
}

/// A live registration. Heartbeats (or the will) keep it; it re-asserts its
/// record when the record vanishes. `deregister` removes it; dropping it
/// deregisters on a best-effort basis.
pub struct Registration {
    pub(super) name: Name,
    record: Record,
    /// Where it registered (for [`Registration::serve_requests`]).
    pub(super) broker: Broker,
    pub(super) topics: Topics,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    notices: broadcast::Sender<Notice>,
}

/// What happened to a live registration in the background, as it happens
/// (see [`Registration::notices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The registry removed the record: `event` is `unhealthy` (its health
    /// check failed; `detail` says how), `expired` or `deregistered`
    /// (someone else cleared it). The helper registers it again.
    Cleared {
        event: EventKind,
        detail: Option<String>,
    },
    /// The record was published again and accepted (`registered` or
    /// `updated`), after a clear, a reconnection or a registry restart.
    Reasserted(EventKind),
    /// Registering again failed for now (`reason`); it is retried.
    ReassertFailed(String),
    /// The connection to the broker was lost; it is being reconnected.
    Disconnected(String),
    /// Another endpoint now owns the name; the helper stopped asserting it
    /// (the status is [`Status::Lost`]). Its connection is closed cleanly
    /// by then, so the process may exit at once: its will cannot clear
    /// the new owner's record.
    Lost { owner: Endpoint },
}

/// What the background task knows about the registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Registered,
    /// Another endpoint now owns the name; the helper stopped asserting it.
    Lost {
        owner: Endpoint,
    },
    Deregistered,
}

enum Command {
    Deregister(Option<oneshot::Sender<Result<(), RegisterError>>>),
}

impl Registration {
    /// A registration of `name`; give at least `.port()` or `.host()`.
    /// Without `.host()`, the local address towards the broker is used.
    pub fn builder(name: &str) -> RegistrationBuilder {
        RegistrationBuilder {
            name: name.to_string(),
            host: None,
            port: None,
            fields: Map::new(),
            prefix: Topics::DEFAULT_PREFIX.to_string(),
            ttl: None,
        }
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// What happens to the registration from now on: the registry clearing
    /// it (unhealthy, expired), the helper registering it again, the broker
    /// lost. A receiver that falls 64 notices behind loses the oldest.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Removes the record and stops keeping it alive.
    pub async fn deregister(self) -> Result<(), RegisterError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Deregister(Some(tx)))
            .await
            .map_err(|_| ConnectionError::Closed)?;
        rx.await.map_err(|_| ConnectionError::Closed)?
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("endpoint", &self.record.endpoint)
            .field("status", &self.status())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.commands.try_send(Command::Deregister(None));
    }
}

impl RegistrationBuilder {
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Expire unless refreshed within `ttl`; the helper heartbeats at a
    /// third of it. Without a ttl the record lives as long as the MQTT
    /// connection (its will clears it).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = (!ttl.is_zero()).then_some(ttl);
        self
    }

    pub fn ttl_secs(self, secs: u64) -> Self {
        self.ttl(Duration::from_secs(secs))
    }

    pub fn role(self, role: &str) -> Self {
        self.field("role", json!(role))
    }

    pub fn version(self, version: &str) -> Self {
        self.field("version", json!(version))
    }

    pub fn scheme(self, scheme: &str) -> Self {
        self.field("scheme", json!(scheme))
    }

    pub fn meta(mut self, key: &str, value: impl Into<Value>) -> Self {
        let meta = self
            .fields
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = meta {
            m.insert(key.to_string(), value.into());
        }
        self
    }

    /// A health check: a path on host:port (`/health`) or a full URL.
    pub fn health_http(self, path_or_url: &str) -> Self {
        self.field("health", json!({"http": path_or_url}))
    }

    /// A health check: a TCP connect to host:port.
    pub fn health_tcp(self) -> Self {
        self.field("health", json!({"tcp": true}))
    }

    /// Any other record field (`health` with intervals, say).
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.fields.insert(key.to_string(), value);
        self
    }

    /// Topic prefix (default `homicro`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// The record this builder describes, validated with the registry's
    /// own rules, for the given host.
    pub fn record(&self, host: &str) -> Result<(Name, Record), RegisterError> {
        let name = Name::parse(&self.name)?;
        Topics::validate_prefix(&self.prefix).map_err(RegisterError::Invalid)?;
        let mut m = self.fields.clone();
        m.insert("host".into(), json!(host));
        if let Some(p) = self.port {
            m.insert("port".into(), json!(p));
        }
        if let Some(t) = self.ttl {
            // Whole seconds where exact, a duration string otherwise.
            let v = if t.subsec_nanos() == 0 {
                json!(t.as_secs())
            } else {
                json!(humantime::format_duration(t).to_string())
            };
            m.insert("ttl".into(), v);
        }
        let record = Record::parse(&name, Bytes::from(Value::Object(m).to_string()))?;
        Ok((name, record))
    }

    /// Publishes the record and returns once the registry accepted it.
    pub async fn register(self, broker: &Broker) -> Result<Registration, RegisterError> {
        let host = match &self.host {
            Some(h) => h.clone(),
            None => local_address_towards(broker).map_err(|e| ConnectionError::Connect {
                broker: broker.to_string(),
                reason: format!("cannot find this machine's address: {e}"),
            })?,
        };
        let (name, record) = self.record(&host)?;
        let topics = Topics::new(&self.prefix);
        let mut session = Session::new(topics.clone(), name.clone(), record.clone());
        let will = record
            .ttl
            .is_none()
            .then(|| LastWill::new(session.topic.clone(), Bytes::new(), QoS::AtLeastOnce, true));
        let mut conn = Connection::open(broker, "homicro-svc", will).await?;
        if let Err(e) = session.assert(&mut conn, true).await {
            // A clean DISCONNECT: the will must not fire, it would clear the
            // owner's record.
            conn.close().await;
            return Err(e);
        }
        info!(name = %name, endpoint = %record.endpoint, "registered");
        let (commands, rx) = mpsc::channel(4);
        let (status_tx, status) = watch::channel(Status::Registered);
        let (notices, _) = broadcast::channel(64);
        tokio::spawn(session.keep(conn, rx, status_tx, notices.clone()));
        Ok(Registration {
            name,
            record,
            broker: broker.clone(),
            topics,
            commands,
            status,
            notices,
        })
    }

    /// Publishes the record once, waits for the registry to accept it
    /// (`registered` or `updated`) and disconnects, without keeping it alive
    /// or deregistering.
    pub async fn publish_once(self, broker: &Broker) -> Result<(Record, EventKind), RegisterError> {
        let host = match &self.host {
            Some(h) => h.clone(),
            None => local_address_towards(broker).map_err(|e| ConnectionError::Connect {
                broker: broker.to_string(),
                reason: e.to_string(),
            })?,
        };
        let (name, record) = self.record(&host)?;
        let mut session = Session::new(Topics::new(&self.prefix), name, record.clone());
        let mut conn = Connection::open(broker, "homicro-svc", None).await?;
        let how = session.assert(&mut conn, true).await;
        conn.close().await;
        Ok((record, how?))
    }
}
