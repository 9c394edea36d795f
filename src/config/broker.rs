//! The address of an MQTT broker (`mqtt://HOST:PORT`, `mqtts://` for TLS)
//! and the login to use there: what every client, and `serve --broker`,
//! connects to. Needs no server code (see the `server` feature).

use std::fmt;
use std::path::PathBuf;

/// The address of an MQTT broker: `mqtt://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// The user to connect as (never part of the URL, never shown).
    pub login: Option<Login>,
    /// `mqtts://`: TLS, trusting `cafile` (PEM) or, without one, the
    /// system's certificate authorities.
    pub tls: bool,
    pub cafile: Option<PathBuf>,
    /// Give up on a first connection that finds nothing listening (or no
    /// such host) at once, as curl does, instead of trying for 10 s: for
    /// commands run by a person. A service started with its broker (compose,
    /// systemd) leaves it off and waits for the broker to come up.
    pub fail_fast: bool,
}

/// A user name and password for a broker.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Login({:?}, password hidden)", self.user)
    }
}

impl BrokerUrl {
    pub const ACCEPTED: &'static str = "expected mqtt://HOST:PORT or, with TLS, mqtts://HOST:PORT \
         (tcp:// and ssl:// too; the port defaults to 1883 and 8883)";

    pub fn parse(s: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(r) = s
            .strip_prefix("mqtt://")
            .or_else(|| s.strip_prefix("tcp://"))
        {
            (false, r)
        } else if let Some(r) = s
            .strip_prefix("mqtts://")
            .or_else(|| s.strip_prefix("ssl://"))
        {
            (true, r)
        } else {
            return Err(format!("{s:?} is not a broker URL: {}", Self::ACCEPTED));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{s:?} has a bad port {p:?}: {}", Self::ACCEPTED))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', '@', ' ', '?', '#']) {
            return Err(format!("{s:?} has no usable host: {}", Self::ACCEPTED));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            login: None,
            tls,
            cafile: None,
            fail_fast: false,
        })
    }

    /// The same broker, given up on at once when nothing listens there
    /// (see [`BrokerUrl::fail_fast`]).
    pub fn with_fail_fast(mut self) -> BrokerUrl {
        self.fail_fast = true;
        self
    }

    /// The same broker over TLS, trusting the certificate authorities in
    /// `cafile` (PEM) rather than the system's.
    pub fn with_cafile(mut self, cafile: impl Into<PathBuf>) -> BrokerUrl {
        self.cafile = Some(cafile.into());
        self
    }

    /// The TLS client settings for `mqtts://` (and the HTTP admin path).
    pub fn tls_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        match &self.cafile {
            Some(path) => crate::tls_client::from_cafile(path),
            None => crate::tls_client::system()
                .ok_or_else(|| "no system CA certificates found: give --cafile".into()),
        }
    }

    /// The same broker, connected to as `user` with `password`.
    pub fn with_login(mut self, user: &str, password: &str) -> BrokerUrl {
        self.login = Some(Login {
            user: user.to_string(),
            password: password.to_string(),
        });
        self
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}
