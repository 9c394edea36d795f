//! `[auth]`: who may connect (see [`crate::auth`]).

use toml::Value;

use super::{ConfigError, file_path, section, shown};
use crate::auth::{AuthConfig, passwd};

pub(super) const KEYS: [&str; 5] = [
    "password_file",
    "allow_anonymous",
    "admins",
    "acl_file",
    "trusted_proxies",
];

/// Reads `[auth]` (`t`: the merged table, defaults included).
pub(super) fn parse(src: &str, t: Option<&Value>) -> Result<AuthConfig, ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        source_name: src.to_string(),
        key: format!("auth.{key}"),
        message,
    };
    let t = section(src, "auth", t)?;
    let get = |key: &str| t.and_then(|t| t.get(key));
    let password_file = file_path(src, "auth.password_file", get("password_file"))?;
    let allow_anonymous = match get("allow_anonymous") {
        // As Mosquitto 2: anonymous clients only while there are no users.
        None => password_file.is_none(),
        Some(Value::Boolean(b)) => *b,
        other => {
            return Err(err(
                "allow_anonymous",
                format!("must be true or false, got {}", shown(other)),
            ));
        }
    };
    if !allow_anonymous && password_file.is_none() {
        return Err(err(
            "allow_anonymous",
            "false needs a password_file: without users nobody could connect".into(),
        ));
    }
    let admins = match get("admins") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => passwd::valid_user(s).map(|_| s.clone()),
                other => Err(format!("{other} is not a user name")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| err("admins", format!("must be a list of user names: {m}")))?,
        other => {
            return Err(err(
                "admins",
                format!("must be a list of user names, got {}", shown(other)),
            ));
        }
    };
    if !admins.is_empty() && password_file.is_none() {
        return Err(err(
            "admins",
            "needs a password_file: an admin is a user who proves it".into(),
        ));
    }
    let acl_file = file_path(src, "auth.acl_file", get("acl_file"))?;
    let trusted_proxies = match get("trusted_proxies") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(|s| s.parse::<std::net::IpAddr>().ok())
                    .map(|ip| ip.to_canonical())
                    .ok_or_else(|| format!("{v} is not an IP address"))
            })
            .collect::<Result<_, _>>()
            .map_err(|m| {
                err(
                    "trusted_proxies",
                    format!("must be a list of IP addresses: {m}"),
                )
            })?,
        other => {
            return Err(err(
                "trusted_proxies",
                format!("must be a list of IP addresses, got {}", shown(other)),
            ));
        }
    };
    Ok(AuthConfig {
        password_file,
        allow_anonymous,
        admins,
        acl_file,
        trusted_proxies,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use toml::Table;

    use super::*;

    fn auth(text: &str) -> Result<AuthConfig, String> {
        let t: Table = text.parse().unwrap();
        parse("f.toml", t.get("auth")).map_err(|e| e.to_string())
    }

    #[test]
    fn anonymous_by_default_only_without_a_password_file() {
        assert_eq!(
            auth("").unwrap(),
            AuthConfig {
                allow_anonymous: true,
                ..Default::default()
            }
        );
        let c = auth("[auth]\npassword_file = \"pw\"\nadmins = [\"root\"]").unwrap();
        assert_eq!(c.password_file, Some(PathBuf::from("pw")));
        assert!(!c.allow_anonymous);
        assert_eq!(c.admins, ["root"]);
        let c = auth("[auth]\npassword_file = \"pw\"\nallow_anonymous = true").unwrap();
        assert!(c.allow_anonymous);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                "[auth]\npassword_file = 5",
                "auth.password_file: must be a file path, got 5",
            ),
            (
                "[auth]\nallow_anonymous = \"no\"",
                "auth.allow_anonymous: must be true or false",
            ),
            (
                "[auth]\nallow_anonymous = false",
                "false needs a password_file",
            ),
            (
                "[auth]\npassword_file = \"pw\"\nadmins = \"root\"",
                "auth.admins: must be a list",
            ),
            (
                "[auth]\npassword_file = \"pw\"\nadmins = [\"a:b\"]",
                "may not contain ':'",
            ),
            (
                "[auth]\nadmins = [\"root\"]",
                "auth.admins: needs a password_file",
            ),
            ("auth = 1", "auth: must be a table"),
            (
                "[auth]\ntrusted_proxies = [\"proxy\"]",
                "auth.trusted_proxies: must be a list of IP addresses: \"proxy\"",
            ),
        ];
        for (text, want) in cases {
            let e = auth(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
