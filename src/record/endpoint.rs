//! Where a service is reached: the owner of a name, as records, heartbeats
//! and error payloads carry it. Part of `record.rs`'s pure rules.

use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use super::{RecordError, invalid, parse_object, parse_port};

/// Where a service is reached; the owner of a name. The host is lower-cased,
/// and "no port" is a value of its own. Its JSON form is `{"host","port"}`,
/// read by [`Endpoint::new`]'s rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "EndpointJson")]
pub struct Endpoint {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// An endpoint as it arrives, before validation.
#[derive(serde::Deserialize)]
struct EndpointJson {
    host: String,
    port: Option<u16>,
}

impl TryFrom<EndpointJson> for Endpoint {
    type Error = RecordError;
    fn try_from(e: EndpointJson) -> Result<Endpoint, RecordError> {
        Endpoint::new(&e.host, e.port)
    }
}

impl Endpoint {
    pub fn new(host: &str, port: Option<u16>) -> Result<Endpoint, RecordError> {
        validate_host(host)?;
        Ok(Endpoint {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Parses a heartbeat payload: `{"host": …, "port": …}`.
    pub fn from_heartbeat(payload: &[u8]) -> Result<Endpoint, RecordError> {
        let obj = parse_object(payload, "heartbeat")?;
        let host = match obj.get("host") {
            Some(Value::String(h)) => h.as_str(),
            Some(other) => return Err(invalid(format!("`host` must be a string, got {other}"))),
            None => return Err(invalid("heartbeat needs `host`")),
        };
        Endpoint::new(host, parse_port(&obj)?)
    }

    /// The JSON form used in heartbeats and error payloads.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("an endpoint is a JSON object")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host: &str = &self.host;
        match (self.port, host.contains(':')) {
            (Some(p), true) => write!(f, "[{host}]:{p}"),
            (Some(p), false) => write!(f, "{host}:{p}"),
            (None, _) => f.write_str(host),
        }
    }
}

fn validate_host(host: &str) -> Result<(), RecordError> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "`host` {host:?} is neither an IP address nor a host name"
        )))
    }
}
