//! Names, endpoints and registration records: parsing and validation.
//!
//! Pure code shared by the registry, the CLI and the Rust helper, so that a
//! value is judged the same way wherever it is checked.

mod endpoint;
mod health;
pub(crate) mod strict;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::protocol::ErrorCode;
pub use endpoint::{Endpoint, is_local};
pub use health::{Health, HealthCheck, url_authority};

/// The largest record the registry accepts, in bytes (protocol: 16 KiB).
pub const MAX_RECORD_SIZE: usize = 16 * 1024;

/// The longest `ttl` or health duration accepted (a year); longer values
/// would only overflow deadlines.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why a name, record or heartbeat was refused. The variants map onto the
/// protocol's error codes (see [`RecordError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("bad name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("record is {size} bytes, the limit is {MAX_RECORD_SIZE}")]
    TooLarge { size: usize },
    #[error("{0}")]
    Invalid(String),
}

impl RecordError {
    /// The protocol's error code: `bad_name`, `too_large` or `invalid`.
    pub fn code(&self) -> ErrorCode {
        match self {
            RecordError::BadName { .. } => ErrorCode::BadName,
            RecordError::TooLarge { .. } => ErrorCode::TooLarge,
            RecordError::Invalid(_) => ErrorCode::Invalid,
        }
    }
}

fn invalid(msg: impl Into<String>) -> RecordError {
    RecordError::Invalid(msg.into())
}

/// A service name (and role): one topic level of 1 to 63 characters of
/// `a-z 0-9 . _ -`, starting with a letter or digit.
/// Cheap to clone (shared): the registry keeps a name in its map, its
/// deadlines and its state file writer's copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(std::sync::Arc<str>);

impl Name {
    pub fn parse(s: &str) -> Result<Name, RecordError> {
        let bad = |reason| {
            Err(RecordError::BadName {
                name: s.to_string(),
                reason,
            })
        };
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > 63 {
            return bad("longer than 63 characters");
        }
        let first = s.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return bad("must start with a-z or 0-9");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return bad("only a-z, 0-9, '.', '_' and '-' are allowed");
        }
        Ok(Name(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, shared (no copy).
    pub fn shared(&self) -> std::sync::Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = RecordError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::parse(s)
    }
}

/// A validated registration record. The payload's bytes are kept exactly as
/// published (unknown fields included), so a re-publish is byte-identical.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub endpoint: Endpoint,
    pub ttl: Option<Duration>,
    pub role: Name,
    pub version: Option<semver::Version>,
    pub scheme: Option<String>,
    pub health: Option<Health>,
    pub meta: Map<String, Value>,
    /// The service answers the same request twice the same way: a call
    /// whose instance died mid-request may be retried on another.
    pub idempotent: bool,
    payload: Bytes,
}

impl Record {
    /// Validates a payload published for `name`.
    pub fn parse(name: &Name, payload: Bytes) -> Result<Record, RecordError> {
        if payload.len() > MAX_RECORD_SIZE {
            return Err(RecordError::TooLarge {
                size: payload.len(),
            });
        }
        let obj = parse_object(&payload, "record")?;
        let host = match obj.get("host") {
            Some(Value::String(h)) => h.as_str(),
            Some(other) => return Err(invalid(format!("`host` must be a string, got {other}"))),
            None => return Err(invalid("`host` is required")),
        };
        let endpoint = Endpoint::new(host, parse_port(&obj)?)?;
        let ttl = match (obj.get("ttl"), obj.get("expire")) {
            (Some(_), Some(_)) => {
                return Err(invalid("give `ttl` or its synonym `expire`, not both"));
            }
            (Some(v), None) => parse_duration(v, "ttl")?,
            (None, Some(v)) => parse_duration(v, "expire")?,
            (None, None) => Duration::ZERO,
        };
        let role = match obj.get("role") {
            None => name.clone(),
            Some(Value::String(r)) => Name::parse(r).map_err(|e| match e {
                RecordError::BadName { reason, .. } => {
                    invalid(format!("`role` {r:?} is not a valid name: {reason}"))
                }
                other => other,
            })?,
            Some(other) => return Err(invalid(format!("`role` must be a string, got {other}"))),
        };
        let version =
            match obj.get("version") {
                None => None,
                Some(Value::String(v)) => Some(semver::Version::parse(v).map_err(|e| {
                    invalid(format!("`version` {v:?} is not a semver version: {e}"))
                })?),
                Some(other) => {
                    return Err(invalid(format!(
                        "`version` must be a semver string, got {other}"
                    )));
                }
            };
        let scheme = match obj.get("scheme") {
            None => None,
            Some(Value::String(s)) if valid_scheme(s) => Some(s.clone()),
            Some(other) => {
                return Err(invalid(format!(
                    "`scheme` must be a URI scheme such as \"http\" or \"mqtt\", got {other}"
                )));
            }
        };
        let health = obj
            .get("health")
            .map(|h| Health::parse(h, &endpoint.host))
            .transpose()?;
        let meta = match obj.get("meta") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => return Err(invalid(format!("`meta` must be an object, got {other}"))),
        };
        let idempotent = match obj.get("idempotent") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(invalid(format!(
                    "`idempotent` must be true or false, got {other}"
                )));
            }
        };
        Ok(Record {
            endpoint,
            ttl: (!ttl.is_zero()).then_some(ttl),
            role,
            version,
            scheme,
            health,
            meta,
            idempotent,
            // A copy: the payload arrives as a slice of the MQTT client's
            // read buffer, and keeping the slice would pin the whole buffer
            // for as long as the record lives (measured: the registry held
            // 2.5x its records' size).
            payload: Bytes::copy_from_slice(&payload),
        })
    }

    /// The record exactly as published.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The record as a JSON object.
    pub fn to_json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("a record's payload is a validated object")
    }
}

/// A `role` or `role@range` query over records, e.g. `api`, `api@^1.2`,
/// `couchdb@3.x`, `db@*`: the record's `role` and, with a range, its
/// `version` (a record without `version` matches only `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    role: Name,
    range: Option<semver::VersionReq>,
}

/// A query that is not `role` or `role@range`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad query {query:?}: {reason}")]
pub struct BadQuery {
    pub query: String,
    pub reason: String,
}

impl Query {
    pub fn parse(q: &str) -> Result<Query, BadQuery> {
        let bad = |reason: String| BadQuery {
            query: q.to_string(),
            reason,
        };
        let (role, range) = match q.split_once('@') {
            Some((r, range)) => {
                let req = semver::VersionReq::parse(range)
                    .map_err(|e| bad(format!("{range:?} is not a semver range: {e}")))?;
                (r, Some(req))
            }
            None => (q, None),
        };
        let role = Name::parse(role).map_err(|e| bad(e.to_string()))?;
        Ok(Query { role, range })
    }

    pub fn matches(&self, r: &Record) -> bool {
        if r.role != self.role {
            return false;
        }
        match (&self.range, &r.version) {
            (None, _) => true,
            (Some(req), Some(v)) => req.matches(v),
            (Some(req), None) => *req == semver::VersionReq::STAR,
        }
    }
}

fn valid_scheme(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"+.-".contains(c))
}

/// `payload` as a JSON object, read strictly (no key twice at any depth).
pub(crate) fn parse_object(payload: &[u8], what: &str) -> Result<Map<String, Value>, RecordError> {
    let text =
        std::str::from_utf8(payload).map_err(|e| invalid(format!("{what} is not UTF-8: {e}")))?;
    match serde_json::from_str::<strict::Strict>(text).map(|s| s.0) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(invalid(format!(
            "{what} must be a JSON object, got {}",
            json_kind(&other)
        ))),
        Err(e) if e.to_string().starts_with(strict::DUPLICATE) => Err(invalid(format!(
            "{what} has a {e}: refused, as readers may take either value"
        ))),
        Err(e) => Err(invalid(format!("{what} is not JSON: {e}"))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_port(obj: &Map<String, Value>) -> Result<Option<u16>, RecordError> {
    match obj.get("port") {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(p @ 1..=65535) => Ok(Some(p as u16)),
            _ => Err(invalid(format!(
                "`port` must be an integer from 1 to 65535, got {v}"
            ))),
        },
    }
}

/// A duration given as integer seconds or as a string such as `"30s"`.
pub fn parse_duration(v: &Value, key: &str) -> Result<Duration, RecordError> {
    let d = match v {
        Value::Number(n) => match n.as_u64() {
            Some(s) => Duration::from_secs(s),
            None => {
                return Err(invalid(format!(
                    "`{key}` must be whole seconds (0 or more) or a duration such as \"30s\", got {n}"
                )));
            }
        },
        Value::String(s) => parse_duration_str(s).map_err(|e| invalid(format!("`{key}`: {e}")))?,
        other => {
            return Err(invalid(format!(
                "`{key}` must be seconds or a duration string such as \"30s\", got {other}"
            )));
        }
    };
    if d > MAX_DURATION {
        return Err(invalid(format!("`{key}` is longer than a year")));
    }
    Ok(d)
}

/// Parses `"30s"`, `"5m"`, `"1h 30m"` (humantime) or plain seconds `"30"`.
pub fn parse_duration_str(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"30s\" or \"5m\" ({e})"))
}

/// A valid record for the server's tests: NAME and its JSON, parsed.
#[cfg(all(test, feature = "server"))]
pub(crate) fn parsed(name: &str, json: &str) -> (Name, Record) {
    let n = Name::parse(name).unwrap();
    let r = Record::parse(&n, Bytes::from(json.to_string())).unwrap();
    (n, r)
}

#[cfg(test)]
mod tests;
