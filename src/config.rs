//! `homicro serve` configuration: the shipped defaults, a config file and
//! flags, in that order, each value checked with an error that names the key
//! and what it accepts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use crate::record::parse_duration_str;
use crate::topics::Topics;

mod auth;
mod broker;
mod home_assistant;
mod tls;

pub use broker::{BrokerUrl, Login};

/// The default configuration, commented; `homicro config` prints it.
pub const DEFAULT_CONFIG: &str = include_str!("../config/homicro.toml");

/// A configuration value that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {key}: {message}")]
pub struct ConfigError {
    /// Where the value came from: a file path, "flag" or "defaults".
    pub source_name: String,
    pub key: String,
    pub message: String,
}

/// Settings of the embedded bus (see `config/homicro.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    pub max_connections: usize,
    pub max_payload_size: usize,
    pub connect_timeout: Duration,
    /// QoS 1 and 2 messages in flight to a 3.1.1 client, and QoS 2
    /// messages a client may have unreleased (announced as Receive Maximum).
    pub max_inflight_messages: u16,
    /// Messages a session queues for its client; more are dropped.
    pub max_queued_messages: usize,
    /// Topic aliases an MQTT 5 client may use.
    pub max_topic_alias: u16,
    /// The longest keepalive granted (Server Keep Alive above it).
    pub max_keepalive: u16,
}

/// Everything `homicro serve` needs, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub broker: Option<BrokerUrl>,
    pub prefix: String,
    /// The journal and snapshot (every change is written there before it
    /// is acknowledged). `None` (`state_dir = ""`): nothing is kept.
    pub state_dir: Option<PathBuf>,
    /// A state file from before the journal, read once and migrated into
    /// `state_dir` when that holds nothing yet (`None`: none).
    pub state_file: Option<PathBuf>,
    pub log_level: String,
    pub health_concurrency: usize,
    /// How long `/svc/` waits for an instance's answer (then 504).
    pub proxy_timeout: Duration,
    /// Move the executable's code onto huge pages at start (see
    /// [`crate::hugetext`]).
    pub huge_code_pages: bool,
    /// Run the registry (false: the embedded broker alone, a benchmark
    /// baseline).
    pub registry: bool,
    pub embedded: BrokerConfig,
    pub auth: crate::auth::AuthConfig,
    /// TLS on the port (`None`: plaintext only).
    pub tls: Option<crate::bus::tls::TlsConfig>,
    /// Home Assistant discovery.
    pub home_assistant: crate::homeassistant::HomeAssistantConfig,
}

/// Values given on the command line; `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub broker: Option<String>,
    pub prefix: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    pub log_level: Option<String>,
    /// `--no-registry`.
    pub no_registry: bool,
}

pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

const TOP_KEYS: [&str; 13] = [
    "listen",
    "broker",
    "prefix",
    "state_dir",
    "state_file",
    "log_level",
    "health_concurrency",
    "proxy_timeout",
    "huge_code_pages",
    "embedded",
    "auth",
    "tls",
    "home_assistant",
];
const EMBEDDED_KEYS: [&str; 7] = [
    "max_connections",
    "max_payload_size",
    "connect_timeout",
    "max_inflight_messages",
    "max_queued_messages",
    "max_topic_alias",
    "max_keepalive",
];

impl ServeConfig {
    /// The shipped defaults, then `file` (its path and text) if given, then
    /// the flags.
    pub fn load(file: Option<(&str, &str)>, flags: &Overrides) -> Result<ServeConfig, ConfigError> {
        let mut table: Table = DEFAULT_CONFIG.parse().expect("the shipped config parses");
        if let Some((path, text)) = file {
            let user: Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
                source_name: path.to_string(),
                key: "(file)".into(),
                message: format!("not valid TOML: {}", e.message()),
            })?;
            check_keys(path, "", &user, &TOP_KEYS)?;
            if let Some(Value::Table(e)) = user.get("embedded") {
                check_keys(path, "embedded.", e, &EMBEDDED_KEYS)?;
            }
            if let Some(Value::Table(a)) = user.get("auth") {
                check_keys(path, "auth.", a, &auth::KEYS)?;
            }
            if let Some(Value::Table(a)) = user.get("tls") {
                check_keys(path, "tls.", a, &tls::KEYS)?;
            }
            if let Some(Value::Table(a)) = user.get("home_assistant") {
                check_keys(path, "home_assistant.", a, &home_assistant::KEYS)?;
            }
            merge(&mut table, user);
            return Self::from_table(path, &table, flags);
        }
        Self::from_table("defaults", &table, flags)
    }

    fn from_table(src: &str, t: &Table, flags: &Overrides) -> Result<ServeConfig, ConfigError> {
        let err = |source_name: &str, key: &str, message: String| ConfigError {
            source_name: source_name.to_string(),
            key: key.to_string(),
            message,
        };
        let pick = |key: &str, flag: &Option<String>| -> Result<(String, String), ConfigError> {
            match flag {
                Some(v) => Ok(("flag".to_string(), v.clone())),
                None => Ok((src.to_string(), get_str(src, t, key)?)),
            }
        };

        let (s, listen) = pick("listen", &flags.listen)?;
        let listen: SocketAddr = listen.parse().map_err(|_| {
            err(&s, "listen", format!(
                "{listen:?} is not an address; expected IP:PORT such as 0.0.0.0:1883 or [::]:1883"
            ))
        })?;

        let (s, broker) = pick("broker", &flags.broker)?;
        let broker = match broker.as_str() {
            "" => None,
            url => Some(BrokerUrl::parse(url).map_err(|m| err(&s, "broker", m))?),
        };

        let (s, prefix) = pick("prefix", &flags.prefix)?;
        Topics::validate_prefix(&prefix).map_err(|m| err(&s, "prefix", m))?;

        let state_dir = match &flags.state_dir {
            Some(p) => p.to_string_lossy().into_owned(),
            None => get_str(src, t, "state_dir")?,
        };
        let state_file = match &flags.state_file {
            Some(p) => p.to_string_lossy().into_owned(),
            None => get_str(src, t, "state_file")?,
        };

        let (s, log_level) = pick("log_level", &flags.log_level)?;
        if !LOG_LEVELS.contains(&log_level.as_str()) {
            return Err(err(
                &s,
                "log_level",
                format!(
                    "{log_level:?} is not a log level; expected one of {}",
                    LOG_LEVELS.join(", ")
                ),
            ));
        }

        let proxy_timeout = get_duration(src, t, "proxy_timeout")?;
        if proxy_timeout < Duration::from_millis(100) || proxy_timeout > Duration::from_secs(3600) {
            return Err(err(src, "proxy_timeout", "must be from 100ms to 1h".into()));
        }

        let health_concurrency = match t.get("health_concurrency") {
            Some(Value::Integer(n)) if (1..=100_000).contains(n) => *n as usize,
            other => {
                return Err(err(
                    src,
                    "health_concurrency",
                    format!("must be an integer from 1 to 100000, got {}", shown(other)),
                ));
            }
        };

        let huge_code_pages = match t.get("huge_code_pages") {
            Some(Value::Boolean(b)) => *b,
            other => {
                return Err(err(
                    src,
                    "huge_code_pages",
                    format!("must be true or false, got {}", shown(other)),
                ));
            }
        };

        let e = match t.get("embedded") {
            Some(Value::Table(e)) => e,
            _ => return Err(err(src, "embedded", "must be a table ([embedded])".into())),
        };
        let int = |key: &str, min: i64, max: i64| -> Result<i64, ConfigError> {
            let full = format!("embedded.{key}");
            match e.get(key) {
                Some(Value::Integer(n)) if (min..=max).contains(n) => Ok(*n),
                other => Err(err(
                    src,
                    &full,
                    format!(
                        "must be an integer from {min} to {max}, got {}",
                        shown(other)
                    ),
                )),
            }
        };
        let connect_timeout = get_duration(src, e, "connect_timeout").map_err(|mut x| {
            x.key = "embedded.connect_timeout".into();
            x
        })?;
        if connect_timeout < Duration::from_millis(100) || connect_timeout > Duration::from_secs(60)
        {
            return Err(err(
                src,
                "embedded.connect_timeout",
                "must be from 100ms to 60s".into(),
            ));
        }
        let embedded = BrokerConfig {
            max_connections: int("max_connections", 1, 1_000_000)? as usize,
            max_payload_size: int("max_payload_size", 65_536, 268_435_455)? as usize,
            connect_timeout,
            max_inflight_messages: int("max_inflight_messages", 1, 65_535)? as u16,
            max_queued_messages: int("max_queued_messages", 1, 10_000_000)? as usize,
            max_topic_alias: int("max_topic_alias", 0, 65_535)? as u16,
            max_keepalive: int("max_keepalive", 10, 65_535)? as u16,
        };

        let auth = auth::parse(src, t.get("auth"))?;
        let tls = tls::parse(src, t.get("tls"))?;
        let home_assistant = home_assistant::parse(src, t.get("home_assistant"), &prefix)?;

        Ok(ServeConfig {
            listen,
            broker,
            prefix,
            state_dir: (!state_dir.is_empty()).then(|| PathBuf::from(state_dir)),
            state_file: (!state_file.is_empty()).then(|| PathBuf::from(state_file)),
            log_level,
            health_concurrency,
            proxy_timeout,
            huge_code_pages,
            registry: !flags.no_registry,
            embedded,
            auth,
            tls,
            home_assistant,
        })
    }
}

/// Keys of rumqttd's router that homicro's own router has no use for.
const RETIRED_KEYS: [&str; 3] = ["max_retained_delivery", "segment_size", "segment_count"];

fn check_keys(src: &str, at: &str, t: &Table, accepted: &[&str]) -> Result<(), ConfigError> {
    for key in t.keys() {
        if at.is_empty() && key == "state_flush" {
            return Err(ConfigError {
                source_name: src.to_string(),
                key: key.clone(),
                message: "no longer used: every change is written to the journal in \
                          state_dir before it is acknowledged; remove the line"
                    .into(),
            });
        }
        if at == "embedded." && RETIRED_KEYS.contains(&key.as_str()) {
            return Err(ConfigError {
                source_name: src.to_string(),
                key: format!("{at}{key}"),
                message: "no longer used: homicro's own router delivers every retained \
                          message and keeps no per-filter log; remove the line"
                    .into(),
            });
        }
        if !accepted.contains(&key.as_str()) {
            return Err(ConfigError {
                source_name: src.to_string(),
                key: format!("{at}{key}"),
                message: format!("unknown key; accepted keys are {}", accepted.join(", ")),
            });
        }
    }
    Ok(())
}

fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The table `[name]` (`None` when the file has none).
fn section<'a>(
    src: &str,
    name: &str,
    v: Option<&'a Value>,
) -> Result<Option<&'a Table>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Value::Table(t)) => Ok(Some(t)),
        Some(_) => Err(ConfigError {
            source_name: src.to_string(),
            key: name.to_string(),
            message: format!("must be a table ([{name}])"),
        }),
    }
}

/// A file path (`None`: absent or empty).
fn file_path(src: &str, key: &str, v: Option<&Value>) -> Result<Option<PathBuf>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(PathBuf::from(s))),
        other => Err(ConfigError {
            source_name: src.to_string(),
            key: key.to_string(),
            message: format!("must be a file path, got {}", shown(other)),
        }),
    }
}

/// A config value as an error message quotes it.
fn shown(v: Option<&Value>) -> String {
    v.map_or("nothing".to_string(), |v| v.to_string())
}

fn get_str(src: &str, t: &Table, key: &str) -> Result<String, ConfigError> {
    match t.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        other => Err(ConfigError {
            source_name: src.to_string(),
            key: key.to_string(),
            message: format!("must be a string, got {}", shown(other)),
        }),
    }
}

fn get_duration(src: &str, t: &Table, key: &str) -> Result<Duration, ConfigError> {
    let s = get_str(src, t, key)?;
    parse_duration_str(&s).map_err(|m| ConfigError {
        source_name: src.to_string(),
        key: key.to_string(),
        message: m,
    })
}

#[cfg(test)]
mod tests;
