//! What Home Assistant reads: the discovery config of a service's
//! `binary_sensor`, its state and its attributes. Pure. Keys are Home
//! Assistant's full names (no abbreviations), struct fields in
//! alphabetical order so that the bytes are stable.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Layout, Service};
use crate::record::{Name, Record};

/// A service's standing, as its entity's `status` attribute says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Status {
    /// Registered: the entity is on.
    Registered,
    /// Its `ttl` ran out (event `expired`).
    Expired,
    /// It failed its health check (event `unhealthy`).
    Unhealthy,
    /// Its client was lost: its MQTT will cleared the record (event
    /// `deregistered` with `will`).
    Lost,
    /// Its record went without an event saying why (or before the event
    /// came), or while homicro was not watching.
    Gone,
}

/// What a device shows of its service, kept from its last record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Info {
    /// `HOST:PORT` (or `HOST`).
    pub endpoint: Option<String>,
    pub role: String,
    pub version: Option<String>,
    pub scheme: Option<String>,
}

impl Info {
    pub fn of(record: &Record) -> Info {
        Info {
            endpoint: Some(record.endpoint.to_string()),
            role: record.role.to_string(),
            version: record.version.as_ref().map(|v| v.to_string()),
            scheme: record.scheme.clone(),
        }
    }
}

/// The discovery config (`DISCOVERY/binary_sensor/NODE/OBJECT/config`).
#[derive(Serialize)]
struct Discovery<'a> {
    availability_template: &'static str,
    availability_topic: String,
    device: Device<'a>,
    device_class: &'static str,
    json_attributes_topic: String,
    origin: Origin<'a>,
    payload_available: &'static str,
    payload_not_available: &'static str,
    payload_off: &'static str,
    payload_on: &'static str,
    qos: u8,
    state_topic: String,
    unique_id: String,
}

/// One device per service.
#[derive(Serialize)]
struct Device<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    configuration_url: Option<String>,
    identifiers: [String; 1],
    manufacturer: &'static str,
    model: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sw_version: Option<&'a str>,
}

/// Who made the config (Home Assistant logs it).
#[derive(Serialize)]
struct Origin<'a> {
    name: &'static str,
    sw_version: &'a str,
}

pub(super) const ON: &str = "ON";
pub(super) const OFF: &str = "OFF";

/// NAME's discovery config: a connectivity `binary_sensor` named by its
/// device class, on a device named NAME whose model is the service's role
/// and software version its `version`, available while the registry says
/// `online`; its link is the dashboard showing NAME (`DASHBOARD#NAME`).
pub(super) fn config(
    layout: &Layout,
    name: &Name,
    info: &Info,
    dashboard_url: Option<&str>,
    version: &str,
) -> Bytes {
    let id = layout.unique_id(name);
    let config = Discovery {
        availability_template: "{{ value_json.state }}",
        availability_topic: layout.topics.registry(),
        device: Device {
            // The dashboard, its search set to the service's name.
            configuration_url: dashboard_url.map(|u| format!("{u}#{name}")),
            identifiers: [id.clone()],
            manufacturer: "homicro",
            model: &info.role,
            name: name.as_str(),
            sw_version: info.version.as_deref(),
        },
        device_class: "connectivity",
        json_attributes_topic: layout.attributes(name),
        origin: Origin {
            name: "homicro",
            sw_version: version,
        },
        payload_available: "online",
        payload_not_available: "offline",
        payload_off: OFF,
        payload_on: ON,
        qos: 1,
        state_topic: layout.state(name),
        unique_id: id,
    };
    Bytes::from(serde_json::to_vec(&config).expect("a config serialises"))
}

/// `ON` while registered, else `OFF`.
pub(super) fn state(status: Status) -> Bytes {
    Bytes::from_static(match status {
        Status::Registered => ON.as_bytes(),
        _ => OFF.as_bytes(),
    })
}

/// The entity's attributes (`PREFIX/ha/NAME/attributes`), also what a
/// restarted homicro reads back to know since when a service is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct Attributes {
    /// What failed (unhealthy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// When a gone service's entity will be removed (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forget_at: Option<String>,
    /// `passing`, or `failing 1/3` (its health check's last result).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Since when it is not registered (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A moment as the attributes say it: `2024-05-01T12:00:00.250Z` (to the
/// millisecond: a restart counts `forget_after` from the moment it went).
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn attributes(s: &Service, forget_after: Duration) -> Bytes {
    let health = s.health.as_ref();
    let a = Attributes {
        detail: s.detail.clone(),
        endpoint: s.info.endpoint.clone(),
        forget_at: s.since.map(|t| rfc3339(t + forget_after)),
        health: health.map(|h| h.to_string()),
        health_check: health.map(|h| h.check.clone()),
        health_detail: health.map(|h| h.detail.clone()),
        role: Some(s.info.role.clone()),
        scheme: s.info.scheme.clone(),
        since: s.since.map(rfc3339),
        status: Some(s.status),
        version: s.info.version.clone(),
    };
    Bytes::from(serde_json::to_vec(&a).expect("attributes serialise"))
}

impl Attributes {
    /// NAME as its attributes on the broker left it, now that it has no
    /// record: gone since they say (when they say it was gone), else
    /// since `now`.
    pub fn gone_service(self, name: &Name, now: SystemTime) -> Service {
        let info = Info {
            endpoint: self.endpoint,
            role: self.role.unwrap_or_else(|| name.to_string()),
            version: self.version,
            scheme: self.scheme,
        };
        let since = self.since.and_then(|s| humantime::parse_rfc3339(&s).ok());
        let (status, since, detail) = match (self.status, since) {
            (Some(status), Some(since)) if status != Status::Registered => {
                (status, since, self.detail)
            }
            _ => (Status::Gone, now, None),
        };
        Service {
            info,
            health: None,
            status,
            since: Some(since),
            detail,
        }
    }
}
