//! The commands for people: `register`, `deregister`, `list`, `watch`, thin
//! over the Rust helper ([`crate::client`]).

use std::future::Future;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::client::{
    self, Announcement, Announcements, Broker, ConnectionError, Directory, DirectoryOptions,
    Notice, RegisterError, Registration, RegistrationBuilder, Service,
};
use crate::protocol::{EventKind, RegistryState};
use crate::record::Name;

/// A command failed; `code` is the process exit code (1: it did not work,
/// 2: bad input).
mod passwd;
mod proxy;
pub use passwd::passwd;

/// `homicro call QUERY [BODY]`: one call through the hub; the answer's
/// body on stdout, its status on stderr when it is not 2xx (exit 1).
pub async fn call(
    broker: &Broker,
    prefix: &str,
    query: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(), CliError> {
    use std::io::{Read, Write};
    if Name::parse(query).is_err() {
        crate::record::Query::parse(query).map_err(|e| {
            usage(format!(
                "{e}: QUERY is a service name or role@range, such as api@^1.2"
            ))
        })?;
    }
    let body = match body {
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .map_err(|e| fail(format!("cannot read stdin: {e}")))?;
            b
        }
        Some(text) => text.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let caller = client::Caller::connect_with_prefix(broker, prefix).await?;
    let reply = caller.call(query, body, timeout).await.map_err(fail)?;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&reply.body);
    let _ = out.flush();
    if (200..300).contains(&reply.status) {
        Ok(())
    } else {
        Err(fail(format!("{query} answered {}", reply.status)))
    }
}
pub use proxy::proxy;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: 1,
        message: e.to_string(),
    }
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: 2,
        message: e.to_string(),
    }
}

/// What to do when nothing answers at the broker's address.
const START_HINT: &str = " Start it with scripts/serve (or homicro serve), or give --broker \
     (HOMICRO_BROKER) for another address.";

impl From<ConnectionError> for CliError {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::Unreachable { .. } => fail(format!("{e}{START_HINT}")),
            e => fail(e),
        }
    }
}

impl From<RegisterError> for CliError {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::Connection(e) => e.into(),
            e => fail(e),
        }
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
    /// The check's `interval` and `failures` (the registry's defaults
    /// otherwise).
    pub health_interval: Option<Duration>,
    pub health_failures: Option<u32>,
    pub once: bool,
}

impl RegisterArgs {
    fn builder(&self, prefix: &str) -> Result<RegistrationBuilder, CliError> {
        let mut b = Registration::builder(&self.name).prefix(prefix);
        if let Some(h) = &self.host {
            b = b.host(h);
        }
        if let Some(p) = self.port {
            b = b.port(p);
        }
        if let Some(t) = self.ttl {
            b = b.ttl(t);
        }
        for (set, v) in [
            (RegistrationBuilder::role as fn(_, &str) -> _, &self.role),
            (RegistrationBuilder::version, &self.version),
            (RegistrationBuilder::scheme, &self.scheme),
        ] {
            if let Some(v) = v {
                b = set(b, v);
            }
        }
        for (k, v) in &self.meta {
            b = b.meta(k, v.as_str());
        }
        let mut health = match (&self.health_http, self.health_tcp) {
            (Some(_), true) => return Err(usage("give --health-http or --health-tcp, not both")),
            (Some(h), false) => serde_json::json!({ "http": h }),
            (None, true) => serde_json::json!({ "tcp": true }),
            (None, false) if self.health_interval.is_some() || self.health_failures.is_some() => {
                return Err(usage(
                    "--health-interval and --health-failures need --health-http or --health-tcp",
                ));
            }
            (None, false) => Value::Null,
        };
        if let Some(i) = self.health_interval {
            health["interval"] = humantime::format_duration(i).to_string().into();
        }
        if let Some(f) = self.health_failures {
            health["failures"] = f.into();
        }
        if !health.is_null() {
            b = b.field("health", health);
        }
        // Validate here so that bad input is a usage error (exit 2).
        b.record(self.host.as_deref().unwrap_or("localhost"))
            .map_err(usage)?;
        Ok(b)
    }
}

/// Registers and keeps the registration alive until `stop` resolves, then
/// deregisters. With `once`, returns as soon as the registry accepted.
pub async fn register(
    broker: &Broker,
    prefix: &str,
    args: &RegisterArgs,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let builder = args.builder(prefix)?;
    let describe = |r: &crate::record::Record| {
        r.ttl
            .map_or("no ttl: cleared when this process dies".to_string(), |t| {
                format!("ttl {}", humantime::format_duration(t))
            })
    };
    if args.once {
        let (record, how) = builder.publish_once(broker).await?;
        println!(
            "{how} {} at {} ({})",
            args.name,
            record.endpoint,
            if record.ttl.is_some() {
                describe(&record)
            } else {
                "no ttl".into()
            }
        );
        return Ok(());
    }
    let reg = builder.register(broker).await?;
    println!(
        "registered {} at {} ({})",
        reg.name(),
        reg.record().endpoint,
        describe(reg.record())
    );
    let mut notices = reg.notices();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            n = notices.recv() => match n {
                // Another endpoint owns the name now: nothing of ours to
                // keep or to deregister.
                Ok(Notice::Lost { owner }) => {
                    return Err(fail(format!(
                        "{}: the name now belongs to {owner}; stopped asserting it",
                        reg.name()
                    )));
                }
                Ok(n) => {
                    if let Some(line) = notice_line(&reg, &n) {
                        eprintln!("{line}");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    let name = reg.name().clone();
    reg.deregister().await?;
    println!("deregistered {name}");
    Ok(())
}

/// The line `register` prints (on stderr) when the registry clears its
/// record and when it is registered again; `None` for what the log says
/// already (a lost broker, a failed attempt: warnings; a lost name ends
/// `register`).
fn notice_line(reg: &Registration, n: &Notice) -> Option<String> {
    let name = reg.name();
    let line = match n {
        Notice::Cleared {
            event: EventKind::Unhealthy,
            detail,
        } => format!(
            "{name}: cleared by the registry as unhealthy ({}); registering it again",
            detail.as_deref().unwrap_or("its health check failed")
        ),
        Notice::Cleared {
            event: EventKind::Expired,
            ..
        } => format!(
            "{name}: expired (no heartbeat reached the registry within its ttl); \
             registering it again"
        ),
        Notice::Cleared { event, .. } => {
            format!("{name}: {event} by someone else; registering it again")
        }
        Notice::Reasserted(_) => {
            format!("{name}: registered again at {}", reg.record().endpoint)
        }
        Notice::ReassertFailed(_) | Notice::Disconnected(_) | Notice::Lost { .. } => return None,
    };
    Some(line)
}

/// Clears NAME's record and waits for the registry to confirm.
pub async fn deregister(broker: &Broker, prefix: &str, name: &str) -> Result<(), CliError> {
    let name = Name::parse(name).map_err(usage)?;
    match client::deregister(broker, prefix, &name).await {
        Ok(true) => {
            println!("deregistered {name}");
            Ok(())
        }
        Ok(false) => Err(fail(format!("{name} is not registered"))),
        Err(RegisterError::Owned { detail, .. }) => {
            // Another identity's record: an admin may still clear it, and
            // on this machine `homicro serve`'s HTTP API takes us for one.
            match client::deregister_as_admin(broker, &name).await {
                Ok(true) => {
                    println!("deregistered {name} (as admin: {detail})");
                    Ok(())
                }
                Ok(false) => Err(fail(format!("{name} is not registered"))),
                Err(e) => Err(fail(format!("{detail}; and as admin: {e}"))),
            }
        }
        Err(RegisterError::RegistryOffline) => Err(fail(format!(
            "cleared {name}, but no registry confirmed it: is `homicro serve` running?"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Prints the current records as a table, or as a JSON object name → record.
pub async fn list(broker: &Broker, prefix: &str, as_json: bool) -> Result<(), CliError> {
    let options = DirectoryOptions {
        prefix: prefix.to_string(),
        ..Default::default()
    };
    let dir = Directory::connect_with(broker, options).await?;
    tokio::time::timeout(2 * client::ANSWER_TIMEOUT, dir.ready())
        .await
        .map_err(|_| fail(format!("no answer from {broker}")))?;
    let services = dir.list();
    if as_json {
        let obj: Map<String, Value> = services
            .iter()
            .map(|s| (s.name.to_string(), s.record.to_json()))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(obj)).expect("json")
        );
    } else {
        let health: Vec<Option<String>> = services
            .iter()
            .map(|s| dir.health(s.name.as_str()).map(|h| h.to_string()))
            .collect();
        print!("{}", table(&services, &health));
    }
    Ok(())
}

/// The `list` table: name, endpoint, role, version, ttl, and the last
/// health result (`health[i]` for `services[i]`).
pub fn table(services: &[Service], health: &[Option<String>]) -> String {
    let mut rows = vec![["NAME", "ENDPOINT", "ROLE", "VERSION", "TTL", "HEALTH"].map(String::from)];
    for (s, h) in services.iter().zip(health) {
        let r = &s.record;
        rows.push([
            s.name.to_string(),
            r.endpoint.to_string(),
            r.role.to_string(),
            r.version.as_ref().map_or("-".into(), |v| v.to_string()),
            r.ttl
                .map_or("-".into(), |t| humantime::format_duration(t).to_string()),
            h.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..6)
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
    broker: &Broker,
    prefix: &str,
    as_json: bool,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let mut a = Announcements::connect(broker, prefix).await?;
    tokio::pin!(stop);
    loop {
        let next = tokio::select! {
            _ = &mut stop => break,
            n = a.next() => n?,
        };
        match next {
            Announcement::Registry(state) => {
                let state = state.map_or("unknown", RegistryState::as_str);
                if as_json {
                    println!("{}", serde_json::json!({"registry": state}));
                } else {
                    println!("registry {state}");
                }
            }
            Announcement::Event { event, .. } if as_json => {
                println!("{}", serde_json::to_string(&event).expect("json"));
            }
            Announcement::Event { name, event } => {
                if event.event == EventKind::Updated && event.changed == Some(false) {
                    continue; // a refresh, not a change
                }
                let mut line = format!("{:<12} {name}", event.event);
                if let Some(ep) = &event.endpoint {
                    line.push_str(&format!(" {ep}"));
                }
                if let Some(e) = event.error {
                    line.push_str(&format!(" ({e})"));
                }
                println!("{line}");
            }
        }
    }
    a.close().await;
    Ok(())
}
