//! `[home_assistant]`: the registry's services in Home Assistant, through
//! its MQTT discovery (see [`crate::homeassistant`]).

use std::time::Duration;

use toml::Value;

use super::{ConfigError, get_duration, get_str, section, shown};
use crate::homeassistant::HomeAssistantConfig;
use crate::record::MAX_DURATION;
use crate::topics::Topics;

pub(super) const KEYS: [&str; 4] = [
    "discovery",
    "discovery_prefix",
    "dashboard_url",
    "forget_after",
];

/// Reads `[home_assistant]` (`t`: the merged table, defaults included).
/// `prefix` is the registry's (the discovery prefix may not be under it).
pub(super) fn parse(
    src: &str,
    t: Option<&Value>,
    prefix: &str,
) -> Result<HomeAssistantConfig, ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        source_name: src.to_string(),
        key: format!("home_assistant.{key}"),
        message,
    };
    let named = |mut e: ConfigError| {
        e.key = format!("home_assistant.{}", e.key);
        e
    };
    let empty = toml::Table::new();
    let t = section(src, "home_assistant", t)?.unwrap_or(&empty);
    let discovery = match t.get("discovery") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        other => {
            return Err(err(
                "discovery",
                format!("must be true or false, got {}", shown(other)),
            ));
        }
    };
    let discovery_prefix = match t.get("discovery_prefix") {
        None => HomeAssistantConfig::DEFAULT_DISCOVERY_PREFIX.to_string(),
        Some(_) => get_str(src, t, "discovery_prefix").map_err(named)?,
    };
    Topics::validate_prefix(&discovery_prefix).map_err(|m| err("discovery_prefix", m))?;
    if discovery_prefix == prefix || discovery_prefix.starts_with(&format!("{prefix}/")) {
        return Err(err(
            "discovery_prefix",
            format!(
                "{discovery_prefix:?} is homicro's own prefix {prefix:?} or under it; use Home \
                 Assistant's (\"homeassistant\" unless its MQTT integration says otherwise)"
            ),
        ));
    }
    let dashboard_url = match t.get("dashboard_url") {
        None => None,
        Some(_) => match get_str(src, t, "dashboard_url").map_err(named)?.as_str() {
            "" => None,
            url if valid_url(url) => Some(url.to_string()),
            url => {
                return Err(err(
                    "dashboard_url",
                    format!(
                        "{url:?} is not an http:// or https:// URL such as \
                         \"http://nas.lan:1883/\"; empty: derived from `listen`"
                    ),
                ));
            }
        },
    };
    let forget_after = match t.get("forget_after") {
        None => Duration::from_secs(24 * 3600),
        Some(_) => get_duration(src, t, "forget_after").map_err(named)?,
    };
    if forget_after > MAX_DURATION {
        return Err(err("forget_after", "must be at most a year".into()));
    }
    Ok(HomeAssistantConfig {
        discovery,
        discovery_prefix,
        dashboard_url,
        forget_after,
    })
}

/// `http://HOST…` or `https://HOST…`, without spaces.
fn valid_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| {
        !r.is_empty() && !r.starts_with(['/', ':']) && !r.contains(char::is_whitespace)
    })
}

#[cfg(test)]
mod tests {
    use toml::Table;

    use super::*;

    fn ha(text: &str) -> Result<HomeAssistantConfig, String> {
        let t: Table = text.parse().unwrap();
        parse("f.toml", t.get("home_assistant"), "homicro").map_err(|e| e.to_string())
    }

    #[test]
    fn off_unless_discovery_is_true() {
        let off = HomeAssistantConfig {
            discovery: false,
            discovery_prefix: "homeassistant".into(),
            dashboard_url: None,
            forget_after: Duration::from_secs(86_400),
        };
        assert_eq!(ha("").unwrap(), off);
        assert_eq!(ha("[home_assistant]\ndiscovery = false").unwrap(), off);
        assert_eq!(
            ha("[home_assistant]\ndiscovery = true").unwrap(),
            HomeAssistantConfig {
                discovery: true,
                ..off
            }
        );
        let c = ha(
            "[home_assistant]\ndiscovery = true\ndiscovery_prefix = \"ha/disc\"\n\
                    dashboard_url = \"https://nas.lan:1883/\"\nforget_after = \"0s\"",
        )
        .unwrap();
        assert_eq!(c.discovery_prefix, "ha/disc");
        assert_eq!(c.dashboard_url.as_deref(), Some("https://nas.lan:1883/"));
        assert_eq!(c.forget_after, Duration::ZERO);
        let c = ha("[home_assistant]\ndiscovery = true\ndashboard_url = \"\"").unwrap();
        assert_eq!(c.dashboard_url, None, "empty: derived");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("home_assistant = 1", "home_assistant: must be a table"),
            (
                "[home_assistant]\ndiscovery = \"yes\"",
                "f.toml: home_assistant.discovery: must be true or false, got \"yes\"",
            ),
            (
                "[home_assistant]\ndiscovery_prefix = 5",
                "home_assistant.discovery_prefix: must be a string, got 5",
            ),
            (
                "[home_assistant]\ndiscovery_prefix = \"ha/#\"",
                "home_assistant.discovery_prefix: \"ha/#\" is not a topic prefix",
            ),
            (
                "[home_assistant]\ndiscovery_prefix = \"\"",
                "home_assistant.discovery_prefix: \"\" is not a topic prefix",
            ),
            (
                "[home_assistant]\ndiscovery_prefix = \"homicro/services\"",
                "home_assistant.discovery_prefix: \"homicro/services\" is homicro's own prefix",
            ),
            (
                "[home_assistant]\ndiscovery_prefix = \"homicro\"",
                "is homicro's own prefix",
            ),
            (
                "[home_assistant]\ndashboard_url = \"nas.lan:1883\"",
                "home_assistant.dashboard_url: \"nas.lan:1883\" is not an http:// or https:// URL",
            ),
            (
                "[home_assistant]\ndashboard_url = \"http://\"",
                "home_assistant.dashboard_url: \"http://\" is not",
            ),
            (
                "[home_assistant]\ndashboard_url = 80",
                "home_assistant.dashboard_url: must be a string, got 80",
            ),
            (
                "[home_assistant]\nforget_after = \"soon\"",
                "home_assistant.forget_after: \"soon\" is not a duration",
            ),
            (
                "[home_assistant]\nforget_after = 60",
                "home_assistant.forget_after: must be a string, got 60",
            ),
            (
                "[home_assistant]\nforget_after = \"400d\"",
                "home_assistant.forget_after: must be at most a year",
            ),
        ];
        for (text, want) in cases {
            let e = ha(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(ha("[home_assistant]\ndiscovery_prefix = \"homicro2\"").is_ok());
    }
}
