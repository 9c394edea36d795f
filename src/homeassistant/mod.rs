//! Home Assistant MQTT discovery for the registry's services (opt-in:
//! `[home_assistant] discovery = true`). Every record becomes a device in
//! Home Assistant with one `binary_sensor` of device class
//! `connectivity`: on while the service is registered, off once it expired,
//! failed its health check or vanished, and removed when it is gone for
//! good (docs/PROTOCOL.md, "Home Assistant").
//!
//! A component beside the registry that talks MQTT to the bus like any
//! client: it subscribes to the registry's topics and publishes Home
//! Assistant's, so it works the same on the embedded bus and against an
//! external broker. The rules are pure ([`Bridge`]: registry messages and
//! the time in, the publishes to make out; `payload` builds what Home
//! Assistant reads); `actor` moves the bytes and keeps the clock.
//!
//! "Gone for good": a deregistration (event `deregistered`) removes the
//! entity at once; a service that expired, turned unhealthy or vanished
//! without a word stays, off, until `forget_after` (24 h by default) has
//! passed without it coming back. What homicro published is retained on
//! the broker, its attributes saying since when a service is gone, and is
//! read back after every (re)connection: a restart forgets nothing and
//! cleans up what fell due while it was away. With `discovery = false`
//! the bridge only reads that back once at start and removes it all: the
//! entities of a run with discovery on do not outlive it.

mod actor;
mod payload;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{BrokerUrl, ServeConfig};
use crate::protocol::{EventKind, EventPayload, HealthStatus, RegistryState, RegistryStatus};
use crate::record::{Name, Record};
use crate::registry::Publish;
use crate::topics::Topics;
use payload::{Attributes, Info, Status};

/// `[home_assistant]` of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeAssistantConfig {
    /// Publish the services to Home Assistant (false: remove what an
    /// earlier run published, then stop).
    pub discovery: bool,
    /// Home Assistant's discovery prefix (its MQTT integration's setting).
    pub discovery_prefix: String,
    /// Each device's `configuration_url` (`None`: derived from where
    /// `serve` listens; none against an external broker).
    pub dashboard_url: Option<String>,
    /// How long an entity stays, off, after its service expired, turned
    /// unhealthy or vanished.
    pub forget_after: Duration,
}

impl HomeAssistantConfig {
    pub const DEFAULT_DISCOVERY_PREFIX: &'static str = "homeassistant";
}

/// Which bus the bridge talks to.
pub enum Bus {
    /// An external broker, as a client of its own (the registry's login).
    External(BrokerUrl),
    /// The embedded bus, on a router link of its own: inside the process,
    /// like the registry, so no user, ACL or TLS setting stands in its way.
    Embedded(crate::bus::Router),
}

/// Starts the bridge (with `discovery` off, the remover of what an earlier
/// run published); `listen` is the embedded bus's bound address (for the
/// default dashboard URL).
pub fn start(config: &ServeConfig, bus: Bus, listen: Option<SocketAddr>) -> Option<JoinHandle<()>> {
    let ha = &config.home_assistant;
    if !config.registry {
        if ha.discovery {
            warn!("[home_assistant] needs the registry: off with --no-registry");
        }
        return None;
    }
    let layout = Layout::new(&config.prefix, &ha.discovery_prefix);
    let version = env!("CARGO_PKG_VERSION");
    if !ha.discovery {
        return Some(tokio::spawn(actor::run(
            Bridge::remover(layout, version),
            bus,
        )));
    }
    let https = config.tls.as_ref().is_some_and(|t| t.require);
    let dashboard = ha.dashboard_url.clone().or_else(|| {
        listen.map(|l| dashboard_url(l, https, || host_name().unwrap_or("localhost".into())))
    });
    info!(
        discovery_prefix = %ha.discovery_prefix,
        dashboard_url = dashboard.as_deref().unwrap_or("(none)"),
        forget_after = ?ha.forget_after,
        "Home Assistant discovery on"
    );
    let bridge = Bridge::new(layout, dashboard, ha.forget_after, version);
    Some(tokio::spawn(actor::run(bridge, bus)))
}

/// The dashboard on `serve`'s one port: `http://HOST:PORT/`, HOST the
/// bound address or, when that is every address (0.0.0.0, ::), the
/// machine's host name; `https` when plaintext is refused (`[tls]
/// require`).
pub fn dashboard_url(
    listen: SocketAddr,
    https: bool,
    host_name: impl FnOnce() -> String,
) -> String {
    let scheme = if https { "https" } else { "http" };
    let host = match listen {
        a if a.ip().is_unspecified() => host_name(),
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    format!("{scheme}://{host}:{}/", listen.port())
}

/// This machine's host name (Linux).
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// Where everything lives: the registry's topics (read), Home Assistant's
/// (written).
#[derive(Debug, Clone)]
pub struct Layout {
    topics: Topics,
    discovery_prefix: String,
    /// The discovery topics' node id, and the start of every unique id:
    /// the registry's prefix in `[a-zA-Z0-9_-]` (`homicro`).
    node: String,
}

/// What a topic the bridge hears is, with the name in it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    Record(Name),
    Event(Name),
    Health(Name),
    Registry,
    /// One of ours, retained on the broker: a discovery config, a state or
    /// an attributes topic.
    Ours(Name),
    Other,
}

impl Layout {
    pub fn new(prefix: &str, discovery_prefix: &str) -> Layout {
        let node = prefix
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' => c,
                _ => '_',
            })
            .collect();
        Layout {
            topics: Topics::new(prefix),
            discovery_prefix: discovery_prefix.to_string(),
            node,
        }
    }

    /// `DISCOVERY/binary_sensor/NODE/OBJECT/config`: OBJECT is NAME with
    /// each `.` as `_2E` (Home Assistant takes only `[a-zA-Z0-9_-]` there;
    /// a name has no upper case, so no two names meet).
    pub fn config(&self, name: &Name) -> String {
        let object = name.as_str().replace('.', "_2E");
        format!("{}/{object}/config", self.configs())
    }

    fn configs(&self) -> String {
        format!("{}/binary_sensor/{}", self.discovery_prefix, self.node)
    }

    /// `PREFIX/ha/NAME/state`: `ON` or `OFF`.
    pub fn state(&self, name: &Name) -> String {
        format!("{}/ha/{name}/state", self.topics.prefix())
    }

    /// `PREFIX/ha/NAME/attributes`: the entity's attributes (JSON).
    pub fn attributes(&self, name: &Name) -> String {
        format!("{}/ha/{name}/attributes", self.topics.prefix())
    }

    /// The entity's `unique_id` and its device's identifier: `NODE_NAME`.
    pub fn unique_id(&self, name: &Name) -> String {
        format!("{}_{name}", self.node)
    }

    /// What the bridge subscribes to after every (re)connection.
    pub fn filters(&self) -> Vec<String> {
        let p = self.topics.prefix();
        vec![
            self.topics.services_filter(),
            self.topics.events_filter(),
            self.topics.health_filter(),
            self.topics.registry(),
            format!("{p}/ha/+/+"),
            format!("{}/+/config", self.configs()),
        ]
    }

    /// Of [`Self::filters`], those of its own topics: all a remover reads.
    pub fn read_back_filters(&self) -> Vec<String> {
        self.filters().split_off(4)
    }

    fn heard(&self, topic: &str) -> Heard {
        if let Some(name) = self.topics.service_name(topic) {
            return Heard::Record(name);
        }
        if topic == self.topics.registry() {
            return Heard::Registry;
        }
        if let Some(rest) = topic.strip_prefix(&self.configs()) {
            let object = rest
                .strip_prefix('/')
                .and_then(|r| r.strip_suffix("/config"));
            return match object.map(|o| Name::parse(&o.replace("_2E", "."))) {
                Some(Ok(name)) if self.config(&name) == topic => Heard::Ours(name),
                _ => Heard::Other,
            };
        }
        let Some(rest) = topic
            .strip_prefix(self.topics.prefix())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Heard::Other;
        };
        let mut levels = rest.split('/');
        let (kind, name, more) = (levels.next(), levels.next(), levels.next());
        let name = match name.map(Name::parse) {
            Some(Ok(n)) => n,
            _ => return Heard::Other,
        };
        match (kind, more, levels.next()) {
            (Some("events"), None, _) => Heard::Event(name),
            (Some("health"), None, _) => Heard::Health(name),
            (Some("ha"), Some("state" | "attributes"), None) => Heard::Ours(name),
            _ => Heard::Other,
        }
    }
}

/// One service as Home Assistant shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Service {
    info: Info,
    /// The registry's last health result (while registered).
    health: Option<HealthStatus>,
    status: Status,
    /// Since when it is not registered (`status` other than registered).
    since: Option<SystemTime>,
    /// What failed (unhealthy).
    detail: Option<String>,
}

/// The rules: what Home Assistant should hold for each service, and the
/// publishes that make the broker hold it.
///
/// After every (re)connection it reads: the registry's records, events and
/// health, and what the broker retains of its own topics (discovery
/// configs under its node id whose `unique_id` is its own, and
/// `PREFIX/ha/+/+`). Once that read is complete and the registry is
/// `online` (so every record it restored has arrived), it reconciles the
/// two and publishes only what differs; from then on every change is
/// published as it comes.
#[derive(Debug)]
pub struct Bridge {
    layout: Layout,
    /// Discovery is on (false: remove everything read back, then stop).
    enabled: bool,
    dashboard_url: Option<String>,
    forget_after: Duration,
    version: String,
    /// Reading what the broker holds (after a (re)connection), not yet
    /// reconciled: nothing is published.
    reading: bool,
    /// The broker has delivered every retained message of the reading.
    synced: bool,
    /// The registry says `online`.
    online: bool,
    services: BTreeMap<Name, Service>,
    /// Deregistered while reading: their entities go at once.
    deregistered: HashSet<Name>,
    /// What the broker retains on our topics, as far as we know: read back,
    /// then as we published it.
    retained: HashMap<String, Bytes>,
    /// When gone services fall due, in time order (stale entries are
    /// skipped: the service came back, or went again later).
    forget: BTreeSet<(SystemTime, Name)>,
    /// Our publishes on our topics not heard back yet, oldest first: what
    /// comes back on those topics is ours until they are all back.
    inflight: HashMap<String, VecDeque<Bytes>>,
    /// Services whose config someone else cleared (Home Assistant, when
    /// its user deletes the device): not published again until the
    /// service registers anew (event `registered`) or homicro restarts.
    /// Kept across reconnections.
    dismissed: HashSet<Name>,
    /// A record that made NAME registered, not yet judged by the registry:
    /// what NAME was before it (`None`: nothing). Undone on the registry's
    /// `rejected` if the record was then cleared (see [`Bridge::on_message`]).
    unconfirmed: HashMap<Name, Option<Service>>,
}

/// How many of its publishes per topic the bridge remembers while waiting
/// for them to come back (more means the bus drops them; the oldest go).
const MAX_INFLIGHT: usize = 64;

impl Bridge {
    pub fn new(
        layout: Layout,
        dashboard_url: Option<String>,
        forget_after: Duration,
        version: &str,
    ) -> Bridge {
        Bridge {
            layout,
            enabled: true,
            dashboard_url,
            forget_after,
            version: version.to_string(),
            reading: true,
            synced: false,
            online: false,
            services: BTreeMap::new(),
            deregistered: HashSet::new(),
            retained: HashMap::new(),
            forget: BTreeSet::new(),
            inflight: HashMap::new(),
            dismissed: HashSet::new(),
            unconfirmed: HashMap::new(),
        }
    }

    /// A bridge for `discovery = false`: it reads back what the broker
    /// holds of ours once, removes all of it, and is then
    /// [finished](Bridge::finished) (it waits for nothing of the registry).
    pub fn remover(layout: Layout, version: &str) -> Bridge {
        Bridge {
            enabled: false,
            ..Bridge::new(layout, None, Duration::ZERO, version)
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// What to subscribe to after every (re)connection.
    pub fn filters(&self) -> Vec<String> {
        match self.enabled {
            true => self.layout.filters(),
            false => self.layout.read_back_filters(),
        }
    }

    /// A remover that has done its work.
    pub fn finished(&self) -> bool {
        !self.enabled && !self.reading
    }

    /// A new session with the broker (the first, or after a loss): forget
    /// everything and read it all again (what the broker holds is the
    /// truth; a clean session may have lost publishes in flight), but for
    /// the devices deleted in Home Assistant.
    pub fn on_connected(&mut self) {
        self.reading = true;
        self.synced = false;
        self.online = false;
        self.services.clear();
        self.deregistered.clear();
        self.retained.clear();
        self.forget.clear();
        self.inflight.clear();
        self.unconfirmed.clear();
    }

    /// The broker has delivered every retained message of the reading.
    pub fn on_synced(&mut self, now: SystemTime) -> Vec<Publish> {
        self.synced = true;
        self.reconcile(now)
    }

    /// When [`Bridge::on_tick`] is next due.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.forget.first().map(|(t, _)| *t)
    }

    /// Removes the entities whose `forget_after` has passed.
    pub fn on_tick(&mut self, now: SystemTime) -> Vec<Publish> {
        let mut out = Vec::new();
        while self.forget.first().is_some_and(|(due, _)| *due <= now) {
            let (_, name) = self.forget.pop_first().expect("a first entry");
            // While reading, the reconciliation settles every name.
            if !self.reading {
                out.extend(self.settle(now, &name));
            }
        }
        out
    }

    /// A message from the bus.
    pub fn on_message(&mut self, now: SystemTime, topic: &str, payload: &[u8]) -> Vec<Publish> {
        let heard = self.layout.heard(topic);
        if !self.enabled && !matches!(heard, Heard::Ours(_)) {
            return Vec::new();
        }
        let name = match heard {
            Heard::Record(name) if payload.is_empty() => {
                self.went(now, &name, Status::Gone, None);
                name
            }
            Heard::Record(name) => {
                match Record::parse(&name, Bytes::copy_from_slice(payload)) {
                    Ok(record) => self.came(&name, &record),
                    // Refused by the registry, which restores or clears it.
                    Err(_) => return Vec::new(),
                }
                name
            }
            Heard::Event(name) => {
                let Ok(event) = serde_json::from_slice::<EventPayload>(payload) else {
                    return Vec::new();
                };
                // The registry's verdict on the record before it.
                let before = self.unconfirmed.remove(&name);
                match event.event {
                    EventKind::Expired => self.went(now, &name, Status::Expired, None),
                    EventKind::Unhealthy => self.went(now, &name, Status::Unhealthy, event.detail),
                    // Not deregistered on purpose: its client was lost
                    // (off, and forgotten after `forget_after`, as expired).
                    EventKind::Deregistered if event.will => {
                        self.went(now, &name, Status::Lost, None)
                    }
                    EventKind::Deregistered => {
                        self.services.remove(&name);
                        self.dismissed.remove(&name);
                        if self.reading {
                            self.deregistered.insert(name.clone());
                        }
                    }
                    // Registered anew: shown again even if it was deleted
                    // in Home Assistant.
                    EventKind::Registered if self.dismissed.remove(&name) => {}
                    // Refused (through an external broker the record
                    // reached the bus, and the registry restored the one
                    // it holds or cleared it): if the record made NAME
                    // registered and was cleared since, NAME is again what
                    // it was before it.
                    EventKind::Rejected => {
                        let Some(before) = before else {
                            return Vec::new();
                        };
                        let registered = self.services.get(&name).map(|s| s.status);
                        if registered == Some(Status::Registered) {
                            return Vec::new();
                        }
                        match before {
                            Some(s) => self.services.insert(name.clone(), s),
                            None => self.services.remove(&name),
                        };
                    }
                    _ => return Vec::new(),
                }
                name
            }
            Heard::Health(name) => {
                let health = serde_json::from_slice::<HealthStatus>(payload).ok();
                match self.services.get_mut(&name) {
                    Some(s) if s.status == Status::Registered => s.health = health,
                    _ => return Vec::new(),
                }
                name
            }
            Heard::Registry => {
                self.online = serde_json::from_slice::<RegistryStatus>(payload)
                    .is_ok_and(|s| s.state == RegistryState::Online);
                return self.reconcile(now);
            }
            Heard::Ours(name) if self.reading => {
                self.read_back(topic, &name, payload);
                return Vec::new();
            }
            Heard::Ours(name) => return self.changed(topic, &name, payload),
            Heard::Other => return Vec::new(),
        };
        if self.reading {
            return Vec::new();
        }
        self.settle(now, &name)
    }

    /// A record arrived: the service is registered.
    fn came(&mut self, name: &Name, record: &Record) {
        let info = Info::of(record);
        self.deregistered.remove(name);
        match self.services.get_mut(name) {
            Some(s) if s.status == Status::Registered => s.info = info,
            before => {
                let before = before.map(|s| s.clone());
                self.unconfirmed.entry(name.clone()).or_insert(before);
                self.services.insert(
                    name.clone(),
                    Service {
                        info,
                        health: None,
                        status: Status::Registered,
                        since: None,
                        detail: None,
                    },
                );
            }
        }
    }

    /// The service is no longer registered: `why` is `gone` for a record
    /// cleared (whose event, if any, comes next and says more), else the
    /// event's.
    fn went(&mut self, now: SystemTime, name: &Name, why: Status, detail: Option<String>) {
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        if s.status == Status::Registered {
            s.since = Some(now);
            s.health = None;
            let due = now + self.forget_after;
            self.forget.insert((due, name.clone()));
        } else if why == Status::Gone {
            // The clear after its event: the event said more.
            return;
        }
        s.status = why;
        s.detail = detail;
    }

    /// What the broker holds of ours, while reading. A discovery config is
    /// ours only with our unique id (another program's under our node id
    /// is left alone).
    fn read_back(&mut self, topic: &str, name: &Name, payload: &[u8]) {
        let ours = topic != self.layout.config(name) || self.is_ours(name, payload);
        if payload.is_empty() || !ours {
            self.retained.remove(topic);
        } else {
            self.retained
                .insert(topic.to_string(), Bytes::copy_from_slice(payload));
        }
    }

    /// One of our topics changed on the broker, after the reading: our own
    /// publish coming back, or someone else's. Someone else's, once all of
    /// ours on that topic are back (else ours lands after it), is repaired
    /// at once: NAME's config, state and attributes are published again as
    /// they should be, with one exception: an empty config of a service we
    /// show is its device deleted in Home Assistant by its user, which is
    /// respected (see `dismissed`). A config under our node id that is not
    /// ours (another `unique_id`) for a name we do not show is left alone.
    fn changed(&mut self, topic: &str, name: &Name, payload: &[u8]) -> Vec<Publish> {
        if let Some(queue) = self.inflight.get_mut(topic) {
            // Ours (those before it, if any, were lost on the way).
            if let Some(i) = queue.iter().position(|p| p == payload) {
                queue.drain(..=i);
            }
            if queue.is_empty() {
                self.inflight.remove(topic);
            }
            return Vec::new();
        }
        let config = topic == self.layout.config(name);
        if payload.is_empty() {
            self.retained.remove(topic);
            if config && self.services.contains_key(name) && self.dismissed.insert(name.clone()) {
                info!(name = %name, "Home Assistant: device deleted there; not published again until it registers anew");
                // Its state and attributes go too.
                return self.sync(name);
            }
        } else {
            if config && !self.services.contains_key(name) && !self.is_ours(name, payload) {
                return Vec::new();
            }
            self.retained
                .insert(topic.to_string(), Bytes::copy_from_slice(payload));
        }
        let out = self.sync(name);
        if !out.is_empty() {
            warn!(
                topic,
                "Home Assistant: someone else changed one of our topics; repaired"
            );
        }
        out
    }

    /// Whether a discovery config for NAME has our `unique_id`.
    fn is_ours(&self, name: &Name, config: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(config).is_ok_and(|c| {
            c.get("unique_id").and_then(|u| u.as_str()) == Some(&self.layout.unique_id(name))
        })
    }

    /// Once the reading is complete and the registry online (a remover
    /// does not wait for it, and keeps nothing): every
    /// discovery config of ours without a record is a service gone while
    /// we were away (or before), kept as its attributes say; then
    /// everything that differs from what the broker holds is published.
    fn reconcile(&mut self, now: SystemTime) -> Vec<Publish> {
        if !(self.reading && self.synced && (self.online || !self.enabled)) {
            return Vec::new();
        }
        self.reading = false;
        let mut names: BTreeSet<Name> = self.services.keys().cloned().collect();
        for topic in self.retained.keys() {
            if let Heard::Ours(name) = self.layout.heard(topic) {
                names.insert(name);
            }
        }
        for name in &names {
            let config = self.layout.config(name);
            if self.services.contains_key(name)
                || self.deregistered.contains(name)
                || !self.retained.contains_key(&config)
            {
                continue;
            }
            let attributes = self
                .retained
                .get(&self.layout.attributes(name))
                .and_then(|a| serde_json::from_slice::<Attributes>(a).ok())
                .unwrap_or_default();
            let service = attributes.gone_service(name, now);
            let due = service.since.unwrap_or(now) + self.forget_after;
            self.forget.insert((due, name.clone()));
            self.services.insert(name.clone(), service);
        }
        self.deregistered.clear();
        self.dismissed.retain(|n| self.services.contains_key(n));
        let mut out = Vec::new();
        for name in &names {
            out.extend(self.settle(now, name));
        }
        // Those due now were settled above.
        self.forget.retain(|(due, _)| *due > now);
        match self.enabled {
            true => info!(
                services = self.services.len(),
                publishes = out.len(),
                "Home Assistant: in step with the broker"
            ),
            false if !out.is_empty() => info!(
                publishes = out.len(),
                "Home Assistant discovery is off: removed what an earlier run published"
            ),
            false => {}
        }
        out
    }

    /// Forgets NAME if it is gone and due, then publishes what differs.
    fn settle(&mut self, now: SystemTime, name: &Name) -> Vec<Publish> {
        let due = self
            .services
            .get(name)
            .and_then(|s| s.since)
            .map(|t| t + self.forget_after);
        if due.is_some_and(|due| due <= now) {
            self.services.remove(name);
            self.dismissed.remove(name);
        }
        self.sync(name)
    }

    /// The publishes that make the broker hold what NAME's entity should
    /// be: its attributes and state before its config (so Home Assistant
    /// finds them when it subscribes), or, to remove it, its config first.
    fn sync(&mut self, name: &Name) -> Vec<Publish> {
        let topics = [
            self.layout.attributes(name),
            self.layout.state(name),
            self.layout.config(name),
        ];
        let shown = self
            .services
            .get(name)
            .filter(|_| !self.dismissed.contains(name));
        let removing = shown.is_none();
        let wanted: [Option<Bytes>; 3] = match shown {
            Some(s) => [
                Some(payload::attributes(s, self.forget_after)),
                Some(payload::state(s.status)),
                Some(payload::config(
                    &self.layout,
                    name,
                    &s.info,
                    self.dashboard_url.as_deref(),
                    &self.version,
                )),
            ],
            None => [None, None, None],
        };
        let mut out = Vec::new();
        for (topic, want) in topics.into_iter().zip(wanted) {
            let held = self.retained.get(&topic);
            if held == want.as_ref() {
                continue;
            }
            let payload = match want {
                Some(p) => {
                    self.retained.insert(topic.clone(), p.clone());
                    p
                }
                None => {
                    self.retained.remove(&topic);
                    Bytes::new()
                }
            };
            let queue = self.inflight.entry(topic.clone()).or_default();
            if queue.len() == MAX_INFLIGHT {
                queue.pop_front();
            }
            queue.push_back(payload.clone());
            out.push(Publish {
                topic,
                payload,
                retain: true,
            });
        }
        if removing {
            out.reverse();
        }
        out
    }
}

#[cfg(test)]
mod tests;
