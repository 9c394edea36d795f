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

    /// Whether the host is this machine's own: a loopback or unspecified
    /// address (connecting to 0.0.0.0 reaches this machine), `localhost`
    /// or a name under `.localhost`.
    pub fn is_loopback(&self) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => is_local(ip),
            Err(_) => self.host == "localhost" || self.host.ends_with(".localhost"),
        }
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

/// A loopback or unspecified address, also IPv4-mapped.
pub fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

pub(super) fn validate_host(host: &str) -> Result<(), RecordError> {
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
