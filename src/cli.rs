//! The commands for people: `register`, `deregister`, `list`, `watch`.
//! Each talks to the broker as any MQTT client would.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, LastWill, QoS};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::BrokerUrl;
use crate::mqtt::{self, Incoming};
use crate::record::{Name, Record};
use crate::topics::Topics;

/// How long a command waits for the broker or the registry to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A command failed; `code` is the process exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

fn fail(message: impl Into<String>) -> CliError {
    CliError {
        code: 1,
        message: message.into(),
    }
}

fn usage(message: impl Into<String>) -> CliError {
    CliError {
        code: 2,
        message: message.into(),
    }
}

/// One MQTT connection of a command.
struct Session {
    client: AsyncClient,
    rx: UnboundedReceiver<Incoming>,
    broker: BrokerUrl,
}

impl Session {
    async fn open(broker: &BrokerUrl, will: Option<LastWill>) -> Result<Session, CliError> {
        let mut opts = mqtt::options(&mqtt::client_id("homicro-cli"), broker);
        if let Some(w) = will {
            opts.set_last_will(w);
        }
        let (client, rx) = mqtt::connect(opts, Duration::from_millis(500));
        let mut s = Session {
            client,
            rx,
            broker: broker.clone(),
        };
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut last_error = "no answer".to_string();
        loop {
            match timeout_at(deadline, s.rx.recv()).await {
                Ok(Some(Incoming::Connected)) => return Ok(s),
                Ok(Some(Incoming::Disconnected(e))) => last_error = e,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    return Err(fail(format!("cannot connect to {broker}: {last_error}")));
                }
            }
        }
    }

    /// Subscribes to `filters` and waits for every acknowledgement; messages
    /// that arrive meanwhile are kept in `early`.
    async fn subscribe(
        &mut self,
        filters: &[String],
        early: &mut Vec<(String, Bytes, bool)>,
    ) -> Result<(), CliError> {
        for f in filters {
            self.client
                .subscribe(f.clone(), QoS::AtMostOnce)
                .await
                .map_err(|e| fail(format!("subscribe: {e}")))?;
        }
        let mut acks = 0;
        while acks < filters.len() {
            match self.next(ANSWER_TIMEOUT).await? {
                Incoming::Subscribed => acks += 1,
                Incoming::Message {
                    topic,
                    payload,
                    retained,
                } => early.push((topic, payload, retained)),
                _ => {}
            }
        }
        Ok(())
    }

    async fn next(&mut self, wait: Duration) -> Result<Incoming, CliError> {
        match timeout(wait, self.rx.recv()).await {
            Ok(Some(Incoming::Disconnected(e))) => {
                Err(fail(format!("lost the broker {}: {e}", self.broker)))
            }
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(fail("connection closed")),
            Err(_) => Err(fail(format!(
                "no answer from {} within {wait:?}",
                self.broker
            ))),
        }
    }

    async fn publish(&self, topic: String, payload: Bytes, retain: bool) -> Result<(), CliError> {
        self.client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| fail(format!("publish: {e}")))
    }

    /// Every current record, complete (see [`mqtt::snapshot`]).
    async fn snapshot(&mut self, topics: &Topics) -> Result<BTreeMap<String, Bytes>, CliError> {
        let sync = format!("{}/sync/{}", topics.prefix(), mqtt::client_id("list"));
        let filter = topics.services_filter();
        let messages = mqtt::snapshot(&self.client, &mut self.rx, &filter, &sync, ANSWER_TIMEOUT)
            .await
            .map_err(|e| fail(format!("{}: {e}", self.broker)))?;
        let mut records = BTreeMap::new();
        for (topic, payload, _) in messages {
            if let Some(name) = topics.service_name(&topic) {
                if payload.is_empty() {
                    records.remove(name.as_str());
                } else {
                    records.insert(name.to_string(), payload);
                }
            }
        }
        Ok(records)
    }
}

/// What `homicro register` publishes.
#[derive(Debug, Clone, Default)]
pub struct RegisterArgs {
    pub name: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub ttl: Option<Duration>,
    pub role: Option<String>,
    pub version: Option<String>,
    pub scheme: Option<String>,
    pub meta: Vec<(String, String)>,
    pub health_http: Option<String>,
    pub health_tcp: bool,
    pub once: bool,
}

impl RegisterArgs {
    /// The record JSON, validated with the registry's own rules.
    pub fn record(&self, host: &str) -> Result<(Name, Record), CliError> {
        let name = Name::parse(&self.name).map_err(|e| usage(e.to_string()))?;
        let mut m = Map::new();
        m.insert("host".into(), json!(host));
        if let Some(p) = self.port {
            m.insert("port".into(), json!(p));
        }
        if let Some(t) = self.ttl.filter(|t| !t.is_zero()) {
            m.insert("ttl".into(), json!(t.as_secs().max(1)));
        }
        for (k, v) in [
            ("role", &self.role),
            ("version", &self.version),
            ("scheme", &self.scheme),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        if !self.meta.is_empty() {
            let meta: Map<String, Value> = self
                .meta
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            m.insert("meta".into(), Value::Object(meta));
        }
        match (&self.health_http, self.health_tcp) {
            (Some(_), true) => return Err(usage("give --health-http or --health-tcp, not both")),
            (Some(h), false) => {
                m.insert("health".into(), json!({"http": h}));
            }
            (None, true) => {
                m.insert("health".into(), json!({"tcp": true}));
            }
            (None, false) => {}
        }
        let payload = Bytes::from(Value::Object(m).to_string());
        let record =
            Record::parse(&name, payload).map_err(|e| usage(format!("bad record: {e}")))?;
        Ok((name, record))
    }
}

/// The local address this machine uses to reach `broker` (no packet sent).
pub fn local_address_towards(broker: &BrokerUrl) -> Result<String, CliError> {
    let target: SocketAddr = (broker.host.as_str(), broker.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| fail(format!("cannot resolve {}", broker.host)))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind).map_err(|e| fail(format!("local address: {e}")))?;
    sock.connect(target)
        .map_err(|e| fail(format!("no route to {}: {e}", broker.host)))?;
    Ok(sock
        .local_addr()
        .map_err(|e| fail(format!("local address: {e}")))?
        .ip()
        .to_string())
}

/// Registers and keeps the registration alive until `stop` resolves, then
/// deregisters. With `once`, returns as soon as the registry accepted.
pub async fn register(
    broker: &BrokerUrl,
    topics: &Topics,
    args: &RegisterArgs,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let host = match &args.host {
        Some(h) => h.clone(),
        None => local_address_towards(broker)?,
    };
    let (name, record) = args.record(&host)?;
    let topic = topics.service(name.as_str());
    // Without a ttl the record lives as long as this connection: the will
    // clears it when the broker loses us.
    let will = (record.ttl.is_none() && !args.once)
        .then(|| LastWill::new(topic.clone(), Bytes::new(), QoS::AtLeastOnce, true));
    let mut s = Session::open(broker, will).await?;
    let filters = [
        topics.error(name.as_str()),
        topics.event(name.as_str()),
        topics.registry(),
    ];
    let mut early = Vec::new();
    s.subscribe(&filters, &mut early).await?;
    let mut registry_state = early
        .iter()
        .find(|(t, ..)| *t == filters[2])
        .map(|(_, p, _)| p.clone());

    s.publish(topic.clone(), record.payload().clone(), true)
        .await?;
    let accepted = wait_for_answer(&mut s, &filters, &record, &mut registry_state).await?;
    println!(
        "{accepted} {name} at {} ({})",
        record.endpoint,
        record
            .ttl
            .map_or("no ttl: cleared when this process dies".to_string(), |t| {
                format!("ttl {}", humantime::format_duration(t))
            })
    );
    if args.once {
        let _ = s.client.disconnect().await;
        return Ok(());
    }

    let heartbeat = Bytes::from(record.endpoint.to_json().to_string());
    let every = record.ttl.map(|t| (t / 3).max(Duration::from_millis(100)));
    let mut ticker = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    ticker.tick().await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick(), if every.is_some() => {
                s.publish(topics.heartbeat(name.as_str()), heartbeat.clone(), false).await?;
            }
            m = s.rx.recv() => match m {
                Some(Incoming::Connected) => {
                    // A new session: subscriptions are gone and the broker
                    // may have lost the record. Assert it again.
                    s.client.subscribe_many(filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtMostOnce))).await
                        .map_err(|e| fail(format!("subscribe: {e}")))?;
                    s.publish(topic.clone(), record.payload().clone(), true).await?;
                }
                Some(Incoming::Message { topic: t, payload, .. }) if t == filters[0] => {
                    let e: Value = serde_json::from_slice(&payload).unwrap_or_default();
                    match e["error"].as_str() {
                        Some("unknown") => {
                            eprintln!("homicro: the registry forgot {name}; registering again");
                            s.publish(topic.clone(), record.payload().clone(), true).await?;
                        }
                        Some("owned") if is_about(&e, &record) => {
                            return Err(fail(format!("refused: {}", e["detail"].as_str().unwrap_or("owned"))));
                        }
                        _ => {}
                    }
                }
                Some(Incoming::Disconnected(e)) => eprintln!("homicro: lost the broker ({e}); reconnecting"),
                Some(_) => {}
                None => return Err(fail("connection closed")),
            }
        }
    }
    s.publish(topic, Bytes::new(), true).await?;
    println!("deregistered {name}");
    let _ = s.client.disconnect().await;
    drain_until_closed(&mut s).await;
    Ok(())
}

/// Whether an error payload is about our publish (not someone else's).
fn is_about(e: &Value, record: &Record) -> bool {
    match e.get("endpoint") {
        Some(ep) => *ep == record.endpoint.to_json(),
        None => true,
    }
}

async fn wait_for_answer(
    s: &mut Session,
    filters: &[String; 3],
    record: &Record,
    registry_state: &mut Option<Bytes>,
) -> Result<&'static str, CliError> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let m = match timeout_at(deadline, s.rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(fail("connection closed")),
            Err(_) => {
                let state = registry_state
                    .as_ref()
                    .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                    .and_then(|v| v["state"].as_str().map(str::to_string));
                return Err(fail(match state.as_deref() {
                    Some("online") => "the registry did not answer in time".to_string(),
                    Some(s) => format!("the registry is {s}: is `homicro serve` running?"),
                    None => "no registry on this broker: is `homicro serve` running?".to_string(),
                }));
            }
        };
        let Incoming::Message { topic, payload, .. } = m else {
            continue;
        };
        let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
        if topic == filters[2] {
            *registry_state = Some(payload);
        } else if topic == filters[0] && is_about(&v, record) {
            let code = v["error"].as_str().unwrap_or("error");
            let detail = v["detail"].as_str().unwrap_or("");
            return Err(fail(format!("refused ({code}): {detail}")));
        } else if topic == filters[1] && v["endpoint"] == record.endpoint.to_string() {
            match v["event"].as_str() {
                Some("registered") => return Ok("registered"),
                Some("updated") => return Ok("updated"),
                _ => {}
            }
        }
    }
}

async fn drain_until_closed(s: &mut Session) {
    let _ = timeout(Duration::from_secs(1), async {
        while let Some(m) = s.rx.recv().await {
            if matches!(m, Incoming::Closed) {
                return;
            }
        }
    })
    .await;
}

/// Clears NAME's record and waits for the registry to confirm.
pub async fn deregister(broker: &BrokerUrl, topics: &Topics, name: &str) -> Result<(), CliError> {
    let name = Name::parse(name).map_err(|e| usage(e.to_string()))?;
    let mut s = Session::open(broker, None).await?;
    let mut early = Vec::new();
    s.subscribe(&[topics.event(name.as_str())], &mut early)
        .await?;
    let snapshot = s.snapshot(topics).await?;
    if !snapshot.contains_key(name.as_str()) {
        return Err(fail(format!("{name} is not registered")));
    }
    s.publish(topics.service(name.as_str()), Bytes::new(), true)
        .await?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match timeout_at(deadline, s.rx.recv()).await {
            Ok(Some(Incoming::Message { topic, payload, .. }))
                if topic == topics.event(name.as_str()) =>
            {
                let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
                if v["event"] == "deregistered" {
                    println!("deregistered {name}");
                    let _ = s.client.disconnect().await;
                    return Ok(());
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(fail("connection closed")),
            Err(_) => {
                return Err(fail(format!(
                    "cleared {name}, but no registry confirmed it: is `homicro serve` running?"
                )));
            }
        }
    }
}

/// Prints the current records as a table, or as a JSON object name → record.
pub async fn list(broker: &BrokerUrl, topics: &Topics, as_json: bool) -> Result<(), CliError> {
    let mut s = Session::open(broker, None).await?;
    let records = s.snapshot(topics).await?;
    let _ = s.client.disconnect().await;
    if as_json {
        let obj: Map<String, Value> = records
            .iter()
            .map(|(n, p)| {
                let v =
                    serde_json::from_slice(p).unwrap_or_else(|_| json!(String::from_utf8_lossy(p)));
                (n.clone(), v)
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(obj)).expect("json")
        );
        return Ok(());
    }
    print!("{}", table(&records));
    Ok(())
}

/// The `list` table: name, endpoint, role, version, ttl.
pub fn table(records: &BTreeMap<String, Bytes>) -> String {
    let mut rows = vec![["NAME", "ENDPOINT", "ROLE", "VERSION", "TTL"].map(String::from)];
    for (name, payload) in records {
        let row = match Name::parse(name).and_then(|n| Record::parse(&n, payload.clone())) {
            Ok(r) => [
                name.clone(),
                r.endpoint.to_string(),
                r.role.to_string(),
                r.version.map_or("-".into(), |v| v.to_string()),
                r.ttl
                    .map_or("-".into(), |t| humantime::format_duration(t).to_string()),
            ],
            Err(e) => [
                name.clone(),
                format!("(invalid: {e})"),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        };
        rows.push(row);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Prints one line per change the registry announces, until `stop`.
pub async fn watch(
    broker: &BrokerUrl,
    topics: &Topics,
    as_json: bool,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let mut s = Session::open(broker, None).await?;
    let filters = [topics.events_filter(), topics.registry()];
    let mut early = Vec::new();
    s.subscribe(&filters, &mut early).await?;
    let print = |topic: &str, payload: &Bytes| {
        if as_json {
            println!("{}", String::from_utf8_lossy(payload));
            return;
        }
        let v: Value = serde_json::from_slice(payload).unwrap_or_default();
        if topic == filters[1] {
            println!("registry {}", v["state"].as_str().unwrap_or("?"));
            return;
        }
        if v["event"] == "updated" && v["changed"] == false {
            return; // a refresh, not a change
        }
        let mut line = format!(
            "{:<12} {}",
            v["event"].as_str().unwrap_or("?"),
            v["name"].as_str().unwrap_or("?")
        );
        if let Some(ep) = v["endpoint"].as_str() {
            line.push_str(&format!(" {ep}"));
        }
        if let Some(e) = v["error"].as_str() {
            line.push_str(&format!(" ({e})"));
        }
        println!("{line}");
    };
    for (t, p, _) in &early {
        print(t, p);
    }
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            m = s.rx.recv() => match m {
                Some(Incoming::Message { topic, payload, .. }) => print(&topic, &payload),
                Some(Incoming::Connected) => {
                    for f in &filters {
                        s.client.subscribe(f.clone(), QoS::AtMostOnce).await.map_err(|e| fail(e.to_string()))?;
                    }
                }
                Some(Incoming::Disconnected(e)) => eprintln!("homicro: lost the broker ({e}); reconnecting"),
                Some(_) => {}
                None => break,
            }
        }
    }
    let _ = s.client.disconnect().await;
    Ok(())
}
