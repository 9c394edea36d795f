//! A service's own registration: validated before sending, accepted by the
//! registry before `register` returns, kept alive in the background.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{LastWill, QoS};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{
    ANSWER_TIMEOUT, Broker, Connection, ConnectionError, local_address_towards, registry_state,
};
use crate::mqtt::Incoming;
use crate::protocol::{ErrorCode, ErrorPayload, EventKind, EventPayload, RegistryState};
use crate::record::{Endpoint, Name, Record, RecordError};
use crate::topics::Topics;

/// Why a registration failed; callers branch on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Another endpoint owns the name.
    #[error("refused: {detail}")]
    Owned { owner: Endpoint, detail: String },
    /// The record (or name) is not valid; nothing was sent if the helper
    /// found out itself.
    #[error("invalid: {0}")]
    Invalid(String),
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
    name: Name,
    record: Record,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
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
        let mut session = Session::new(topics, name.clone(), record.clone());
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
        tokio::spawn(session.keep(conn, rx, status_tx));
        Ok(Registration {
            name,
            record,
            commands,
            status,
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

/// The background side of a registration.
struct Session {
    topics: Topics,
    name: Name,
    record: Record,
    topic: String,
    filters: [String; 4],
    /// Messages that arrived while waiting for an answer.
    backlog: VecDeque<Incoming>,
}

impl Session {
    fn new(topics: Topics, name: Name, record: Record) -> Session {
        let n = name.as_str();
        let filters = [
            topics.error(n),
            topics.event(n),
            topics.registry(),
            topics.service(n),
        ];
        Session {
            topic: topics.service(n),
            topics,
            name,
            record,
            filters,
            backlog: VecDeque::new(),
        }
    }

    /// Subscribes, publishes the record and waits for the registry's answer:
    /// `registered` or `updated`. With `check_registry`, refuses to
    /// publish when the registry is known to be offline or absent.
    async fn assert(
        &mut self,
        c: &mut Connection,
        check_registry: bool,
    ) -> Result<EventKind, RegisterError> {
        let filters = self.filters.clone();
        c.subscribe(&filters[..3]).await?;
        if check_registry {
            let snap = c.snapshot(&self.topics, &filters[2]).await?;
            let state = snap
                .iter()
                .find(|(t, ..)| *t == filters[2])
                .and_then(|(_, p, _)| registry_state(p));
            if state != Some(RegistryState::Online) {
                return Err(RegisterError::RegistryOffline);
            }
        }
        c.publish(self.topic.clone(), self.record.payload().clone(), true)
            .await?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let m = match c.next(deadline).await {
                Ok(m) => m,
                Err(ConnectionError::Timeout { .. }) => return Err(RegisterError::RegistryOffline),
                Err(e) => return Err(e.into()),
            };
            let Incoming::Message {
                topic,
                payload,
                retained,
            } = m
            else {
                continue;
            };
            if let Some(answer) = self.answer(&topic, &payload) {
                // Watch our own topic only now: the registry has spoken.
                let early = c.subscribe(&filters[3..]).await?;
                self.keep_for_later(early);
                return answer;
            }
            // Not the answer: the keep-alive loop looks at it afterwards (a
            // clear of our record that raced this publish, say).
            self.keep_for_later([(topic, payload, retained)]);
        }
    }

    fn keep_for_later(&mut self, messages: impl IntoIterator<Item = crate::mqtt::Message>) {
        self.backlog
            .extend(
                messages
                    .into_iter()
                    .map(|(topic, payload, retained)| Incoming::Message {
                        topic,
                        payload,
                        retained,
                    }),
            );
    }

    /// The registry's answer to our publish, if this message is one.
    fn answer(&self, topic: &str, payload: &[u8]) -> Option<Result<EventKind, RegisterError>> {
        if topic == self.filters[0] {
            let e = serde_json::from_slice::<ErrorPayload>(payload).ok()?;
            return self.is_about(&e).then(|| Err(refusal(e)));
        }
        if topic == self.filters[1] {
            let ev = serde_json::from_slice::<EventPayload>(payload).ok()?;
            let ours = ev.endpoint == Some(self.record.endpoint.to_string());
            return match ev.event {
                EventKind::Registered | EventKind::Updated if ours => Some(Ok(ev.event)),
                _ => None,
            };
        }
        None
    }

    /// Whether an error payload is about our publish (not someone else's).
    fn is_about(&self, e: &ErrorPayload) -> bool {
        e.endpoint
            .as_ref()
            .is_none_or(|ep| *ep == self.record.endpoint)
    }

    /// Keeps the registration alive until told to deregister.
    async fn keep(
        mut self,
        mut c: Connection,
        mut commands: mpsc::Receiver<Command>,
        status: watch::Sender<Status>,
    ) {
        let every = self
            .record
            .ttl
            .map(|t| (t / 3).max(Duration::from_millis(50)));
        let mut beat = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        beat.tick().await;
        let heartbeat = Bytes::from(self.record.endpoint.to_json().to_string());
        let mut last_assert = Instant::now();
        let mut lost = false;
        // Some(reply): told to deregister; None: the name was lost.
        let ended = loop {
            if lost {
                break None;
            }
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Deregister(reply)) => break Some(reply),
                    None => break Some(None),
                },
                _ = beat.tick(), if every.is_some() && !lost => {
                    let _ = c.publish(self.topics.heartbeat(self.name.as_str()), heartbeat.clone(), false).await;
                }
                m = next_message(&mut self.backlog, &mut c.rx) => {
                    let Some(m) = m else { break None };
                    let reassert = match m {
                        // A new session: subscriptions are gone and the broker
                        // may have lost the record (a restarted registry).
                        Incoming::Connected => {
                            debug!(name = %self.name, "reconnected; registering again");
                            true
                        }
                        Incoming::Message { topic, payload, retained } => {
                            self.on_message(&topic, &payload, retained, &mut lost, &status)
                        }
                        Incoming::Disconnected(e) => {
                            warn!(name = %self.name, error = %e, "lost the broker; reconnecting");
                            false
                        }
                        _ => false,
                    };
                    if reassert && !lost {
                        // At most once a second, so that a deliberate
                        // deregistration loop cannot make us spin.
                        let wait = (last_assert + Duration::from_secs(1)).saturating_duration_since(Instant::now());
                        tokio::time::sleep(wait).await;
                        last_assert = Instant::now();
                        match self.assert(&mut c, false).await {
                            Ok(_) => info!(name = %self.name, "registration re-asserted"),
                            Err(RegisterError::Owned { owner, .. }) => {
                                warn!(name = %self.name, owner = %owner, "name taken by another endpoint; giving up");
                                lost = true;
                                let _ = status.send(Status::Lost { owner });
                            }
                            Err(e) => warn!(name = %self.name, error = %e, "re-registration failed; will retry"),
                        }
                    }
                }
            }
        };
        let Some(reply) = ended else {
            // Another endpoint owns the name. Disconnect cleanly so that our
            // will (an empty record) never clears the new owner's record, and
            // answer a later `deregister` with Ok.
            c.close().await;
            while let Some(Command::Deregister(reply)) = commands.recv().await {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            return;
        };
        let result = c
            .publish(self.topic.clone(), Bytes::new(), true)
            .await
            .map_err(RegisterError::from);
        info!(name = %self.name, "deregistered");
        let _ = status.send(Status::Deregistered);
        c.close().await;
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    /// Handles a message while registered; returns whether to re-assert.
    fn on_message(
        &self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        lost: &mut bool,
        status: &watch::Sender<Status>,
    ) -> bool {
        debug!(name = %self.name, topic, len = payload.len(), retained, "message");
        if topic == self.topic {
            // Our record vanished (expired, cleared by a restarted registry,
            // or deregistered by someone): assert it again. A record from
            // another endpoint is not fought: the registry decides.
            return payload.is_empty() && !retained;
        }
        if topic == self.filters[2] {
            // A registry that comes (back) online may not know us.
            return !retained && registry_state(payload) == Some(RegistryState::Online);
        }
        if topic == self.filters[0]
            && let Ok(e) = serde_json::from_slice::<ErrorPayload>(payload)
        {
            match e.error {
                ErrorCode::Unknown => return true,
                ErrorCode::Owned if self.is_about(&e) => {
                    if let RegisterError::Owned { owner, .. } = refusal(e) {
                        warn!(name = %self.name, owner = %owner, "name taken by another endpoint; giving up");
                        *lost = true;
                        let _ = status.send(Status::Lost { owner });
                    }
                }
                _ => {}
            }
        }
        false
    }
}

/// The error a refusal is to the caller.
fn refusal(e: ErrorPayload) -> RegisterError {
    match (e.error, e.owner) {
        (ErrorCode::Owned, owner) => RegisterError::Owned {
            owner: owner.unwrap_or_else(|| Endpoint {
                host: "unknown".into(),
                port: None,
            }),
            detail: e.detail,
        },
        (code, _) => RegisterError::Invalid(format!("{code}: {}", e.detail)),
    }
}

/// The next message: from the backlog first, then from the connection.
async fn next_message(
    backlog: &mut VecDeque<Incoming>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Incoming>,
) -> Option<Incoming> {
    match backlog.pop_front() {
        Some(m) => Some(m),
        None => rx.recv().await,
    }
}
