//! `[tls]`: TLS on the one port (see [`crate::bus::tls`]).

use toml::Value;

use super::{ConfigError, file_path, section, shown};
use crate::bus::tls::TlsConfig;

pub(super) const KEYS: [&str; 4] = ["cert", "key", "require", "client_ca"];

/// Reads `[tls]`; `None` when no certificate is set.
pub(super) fn parse(src: &str, t: Option<&Value>) -> Result<Option<TlsConfig>, ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        source_name: src.to_string(),
        key: format!("tls.{key}"),
        message,
    };
    let t = section(src, "tls", t)?;
    let get = |key: &str| t.and_then(|t| t.get(key));
    let cert = file_path(src, "tls.cert", get("cert"))?;
    let key = file_path(src, "tls.key", get("key"))?;
    let client_ca = file_path(src, "tls.client_ca", get("client_ca"))?;
    let require = match get("require") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        other => {
            return Err(err(
                "require",
                format!("must be true or false, got {}", shown(other)),
            ));
        }
    };
    match (cert, key) {
        (None, None) if client_ca.is_some() => Err(err(
            "client_ca",
            "needs a cert and key: client certificates come with TLS".into(),
        )),
        (None, None) if require => Err(err(
            "require",
            "true needs a cert and key: without them nobody could connect but loopback".into(),
        )),
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(TlsConfig {
            cert,
            key,
            require,
            client_ca,
        })),
        (Some(_), None) => Err(err("key", "is needed with cert".into())),
        (None, Some(_)) => Err(err("cert", "is needed with key".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use toml::Table;

    use super::*;

    fn tls(text: &str) -> Result<Option<TlsConfig>, String> {
        let t: Table = text.parse().unwrap();
        parse("f.toml", t.get("tls")).map_err(|e| e.to_string())
    }

    #[test]
    fn cert_and_key_together_or_not_at_all() {
        assert_eq!(tls("").unwrap(), None);
        let c = tls("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nrequire = true")
            .unwrap()
            .unwrap();
        assert_eq!(c.cert, PathBuf::from("c.pem"));
        assert!(c.require);
        for (text, want) in [
            ("[tls]\ncert = \"c.pem\"", "tls.key: is needed with cert"),
            ("[tls]\nkey = \"k.pem\"", "tls.cert: is needed with key"),
            (
                "[tls]\nrequire = true",
                "tls.require: true needs a cert and key",
            ),
            (
                "[tls]\ncert = 1\nkey = \"k\"",
                "tls.cert: must be a file path, got 1",
            ),
            (
                "[tls]\ncert = \"c\"\nkey = \"k\"\nrequire = \"yes\"",
                "tls.require: must be true or false",
            ),
        ] {
            let e = tls(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
