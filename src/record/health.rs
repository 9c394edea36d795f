//! A record's `health`: how the registry probes it, checked as strictly as
//! the rest of the record (a check aimed elsewhere is `invalid`).

use std::time::Duration;

use serde_json::Value;

use super::{RecordError, endpoint, invalid, parse_duration};

/// How the registry probes a service (see the protocol's Health section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: u32,
    /// An `https://` check takes any certificate (a self-signed one, as
    /// many devices have); the connection is still encrypted.
    pub tls_skip_verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// A path on host:port (starting with `/`) or a full `http(s)://` URL.
    Http(String),
    Tcp,
}

impl Health {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_FAILURES: u32 = 3;

    /// Probes are never more frequent than this.
    pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

    /// `v` of a record whose host is `host`: an absolute URL may only name
    /// that host (a health check cannot be aimed at another machine).
    pub(super) fn parse(v: &Value, host: &str) -> Result<Health, RecordError> {
        let Value::Object(obj) = v else {
            return Err(invalid(format!("`health` must be an object, got {v}")));
        };
        for key in obj.keys() {
            let known = [
                "http",
                "tcp",
                "interval",
                "timeout",
                "failures",
                "tls_skip_verify",
            ];
            if !known.contains(&key.as_str()) {
                return Err(invalid(format!(
                    "`health` has unknown key `{key}`; expected {}",
                    known.join(", ")
                )));
            }
        }
        let check = match (obj.get("http"), obj.get("tcp")) {
            (Some(_), Some(_)) => return Err(invalid("`health` takes `http` or `tcp`, not both")),
            (Some(Value::String(s)), None) => {
                let is_url = s.starts_with("http://") || s.starts_with("https://");
                if !(s.starts_with('/') || is_url) || s.chars().any(char::is_whitespace) {
                    return Err(invalid(format!(
                        "`health.http` must be a path starting with '/' or an http(s):// URL, got {s:?}"
                    )));
                }
                if is_url {
                    let (h, _) = url_authority(s).map_err(invalid)?;
                    if !h.eq_ignore_ascii_case(host) {
                        return Err(invalid(format!(
                            "`health.http` may only probe the record's own host {host:?}, not {h:?} \
                             (give a path such as \"/health\")"
                        )));
                    }
                }
                HealthCheck::Http(s.clone())
            }
            (Some(other), None) => {
                return Err(invalid(format!(
                    "`health.http` must be a string, got {other}"
                )));
            }
            (None, Some(Value::Bool(true))) => HealthCheck::Tcp,
            (None, Some(other)) => {
                return Err(invalid(format!("`health.tcp` must be true, got {other}")));
            }
            (None, None) => return Err(invalid("`health` needs `http` or `tcp`")),
        };
        let duration = |key: &str, default: Duration| -> Result<Duration, RecordError> {
            match obj.get(key) {
                None => Ok(default),
                Some(v) => match parse_duration(v, &format!("health.{key}"))? {
                    d if d.is_zero() => Err(invalid(format!("`health.{key}` must be above 0"))),
                    d => Ok(d),
                },
            }
        };
        let failures = match obj.get("failures") {
            None => Self::DEFAULT_FAILURES,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=1000) => n as u32,
                _ => {
                    return Err(invalid(format!(
                        "`health.failures` must be an integer from 1 to 1000, got {v}"
                    )));
                }
            },
        };
        let interval = duration("interval", Self::DEFAULT_INTERVAL)?;
        if interval < Self::MIN_INTERVAL {
            return Err(invalid(format!(
                "`health.interval` must be at least 1s, got {}",
                humantime::format_duration(interval)
            )));
        }
        let tls_skip_verify = match obj.get("tls_skip_verify") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(invalid(format!(
                    "`health.tls_skip_verify` must be true or false, got {other}"
                )));
            }
        };
        let https = matches!(&check, HealthCheck::Http(u) if u.starts_with("https://"));
        if tls_skip_verify && !https {
            return Err(invalid(
                "`health.tls_skip_verify` is for an https:// URL in `health.http`",
            ));
        }
        Ok(Health {
            check,
            tls_skip_verify,
            interval,
            timeout: duration("timeout", Self::DEFAULT_TIMEOUT)?,
            failures,
        })
    }
}

/// The host (lower-cased, without IPv6 brackets) and port of an
/// `http(s)://` URL's authority; user information is refused (a URL such as
/// `http://10.0.0.5@127.0.0.1/` names the host after the `@`).
pub fn url_authority(url: &str) -> Result<(String, Option<u16>), String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if authority.contains('@') {
        return Err(format!(
            "`health.http` may not carry user information, got {url:?}"
        ));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err(format!("`health.http` has an unclosed '[' in {url:?}")),
        },
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`health.http` has a bad port in {url:?}"))?,
        ),
    };
    endpoint::validate_host(host)
        .map_err(|_| format!("`health.http` has a bad host in {url:?}"))?;
    Ok((host.to_ascii_lowercase(), port))
}
