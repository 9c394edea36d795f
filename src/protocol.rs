//! The registry's wire contract as types: the payloads it publishes on
//! `PREFIX/registry`, `PREFIX/events/NAME`, `PREFIX/errors/NAME` and
//! `PREFIX/health/NAME`, and the codes in them (see `docs/PROTOCOL.md`).
//!
//! Struct fields are declared in alphabetical order, so a payload's bytes
//! are those of the sorted-key `serde_json::Value` it used to be built as.
//! Unknown fields are ignored when reading, for forward compatibility.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::record::Endpoint;

/// Whether the registry enforces the rules: `state` on `PREFIX/registry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryState {
    Online,
    Offline,
}

/// The retained `PREFIX/registry` payload: `{"state","version"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryStatus {
    pub state: RegistryState,
    /// The registry's homicro version.
    pub version: String,
}

/// What happened to a name: `event` on `PREFIX/events/NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Registered,
    Updated,
    Deregistered,
    Expired,
    Rejected,
    Restored,
    Unhealthy,
}

/// The `PREFIX/events/NAME` payload; the optional fields come with one kind each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPayload {
    /// `updated` only: whether the record's bytes changed (`false`: a refresh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// `unhealthy` only: what failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `HOST:PORT` (or `HOST`): the owner, or for `rejected` the refused
    /// publisher where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `rejected` only: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    pub event: EventKind,
    pub name: String,
    /// `deregistered` only: `true` when the record was cleared by its
    /// publisher's MQTT will (the broker lost the client), not by a
    /// deliberate deregistration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub will: bool,
}

impl EventPayload {
    /// An event with none of the optional fields but `endpoint`.
    pub fn new(name: &str, event: EventKind, endpoint: Option<&Endpoint>) -> EventPayload {
        EventPayload {
            changed: None,
            detail: None,
            endpoint: endpoint.map(Endpoint::to_string),
            error: None,
            event,
            name: name.to_string(),
            will: false,
        }
    }
}

/// Why something was refused: `error` on `PREFIX/errors/NAME` and in HTTP
/// answers (`not_authorized` and the four after it only over HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadName,
    Invalid,
    TooLarge,
    Owned,
    Unknown,
    /// Not the record's owner (nor an admin): the record is kept as it is.
    NotOwner,
    /// No or wrong credentials, or an ACL denies it.
    NotAuthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Unavailable,
}

/// The `PREFIX/errors/NAME` payload (and a refused HTTP registration's answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPayload {
    pub detail: String,
    /// The refused publisher's endpoint, where it could be parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    pub error: ErrorCode,
    /// The name as published (possibly not a valid one).
    pub name: String,
    /// `owned` only: the owner's endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Endpoint>,
}

/// A health check's last result: `status` on `PREFIX/health/NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Passing,
    Failing,
}

/// The retained `PREFIX/health/NAME` payload: the registry's last probe of NAME.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// What is probed: `GET http://…` or `tcp host:port`.
    pub check: String,
    /// `ok`, or what failed.
    pub detail: String,
    /// Failures in a row so far.
    pub failures: u32,
    pub name: String,
    /// Failures in a row that clear the record.
    pub of: u32,
    pub status: HealthState,
}

impl fmt::Display for HealthStatus {
    /// `passing`, or `failing 1/3` while failures add up.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures == 0 {
            write!(f, "{}", self.status)
        } else {
            write!(f, "{} {}/{}", self.status, self.failures, self.of)
        }
    }
}

/// `as_str` (the wire name) and a `Display` that pads it like a `str`.
macro_rules! wire_names {
    ($($t:ident { $($v:ident => $s:literal),* $(,)? })*) => {$(
        impl $t {
            /// The name on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s,)*
                }
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
    )*};
}

wire_names! {
    RegistryState { Online => "online", Offline => "offline" }
    EventKind {
        Registered => "registered",
        Updated => "updated",
        Deregistered => "deregistered",
        Expired => "expired",
        Rejected => "rejected",
        Restored => "restored",
        Unhealthy => "unhealthy",
    }
    ErrorCode {
        BadName => "bad_name",
        Invalid => "invalid",
        TooLarge => "too_large",
        Owned => "owned",
        Unknown => "unknown",
        NotOwner => "not_owner",
        NotAuthorized => "not_authorized",
        Forbidden => "forbidden",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
        Unavailable => "unavailable",
    }
    HealthState { Passing => "passing", Failing => "failing" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    /// `value` serialises to exactly `json` and reads back as itself.
    fn pinned<T>(value: T, json: &str)
    where
        T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    {
        assert_eq!(serde_json::to_string(&value).unwrap(), json);
        assert_eq!(serde_json::from_str::<T>(json).unwrap(), value);
    }

    fn ep(host: &str, port: Option<u16>) -> Endpoint {
        Endpoint::new(host, port).unwrap()
    }

    #[test]
    fn registry_status() {
        pinned(
            RegistryStatus {
                state: RegistryState::Online,
                version: "0.1.0".into(),
            },
            r#"{"state":"online","version":"0.1.0"}"#,
        );
        pinned(
            RegistryStatus {
                state: RegistryState::Offline,
                version: "0.1.0".into(),
            },
            r#"{"state":"offline","version":"0.1.0"}"#,
        );
    }

    #[test]
    fn events() {
        let web = ep("10.0.0.5", Some(8080));
        pinned(
            EventPayload::new("web", EventKind::Registered, Some(&web)),
            r#"{"endpoint":"10.0.0.5:8080","event":"registered","name":"web"}"#,
        );
        pinned(
            EventPayload {
                changed: Some(false),
                ..EventPayload::new("web", EventKind::Updated, Some(&web))
            },
            r#"{"changed":false,"endpoint":"10.0.0.5:8080","event":"updated","name":"web"}"#,
        );
        pinned(
            EventPayload {
                error: Some(ErrorCode::BadName),
                ..EventPayload::new("Bad", EventKind::Rejected, None)
            },
            r#"{"error":"bad_name","event":"rejected","name":"Bad"}"#,
        );
        pinned(
            EventPayload {
                detail: Some("GET http://[::1]:8/h failed 3 times in a row: status 500".into()),
                ..EventPayload::new("v6", EventKind::Unhealthy, Some(&ep("::1", Some(8))))
            },
            r#"{"detail":"GET http://[::1]:8/h failed 3 times in a row: status 500","endpoint":"[::1]:8","event":"unhealthy","name":"v6"}"#,
        );
        pinned(
            EventPayload::new("tv", EventKind::Expired, Some(&ep("TV.local", None))),
            r#"{"endpoint":"tv.local","event":"expired","name":"tv"}"#,
        );
        pinned(
            EventPayload {
                will: true,
                ..EventPayload::new("tv", EventKind::Deregistered, Some(&web))
            },
            r#"{"endpoint":"10.0.0.5:8080","event":"deregistered","name":"tv","will":true}"#,
        );
    }

    #[test]
    fn errors() {
        pinned(
            ErrorPayload {
                detail: "owned by 10.0.0.5:8080; refused 10.0.0.6".into(),
                endpoint: Some(ep("10.0.0.6", None)),
                error: ErrorCode::Owned,
                name: "web".into(),
                owner: Some(ep("10.0.0.5", Some(8080))),
            },
            r#"{"detail":"owned by 10.0.0.5:8080; refused 10.0.0.6","endpoint":{"host":"10.0.0.6"},"error":"owned","name":"web","owner":{"host":"10.0.0.5","port":8080}}"#,
        );
        pinned(
            ErrorPayload {
                detail: "record is not JSON".into(),
                endpoint: None,
                error: ErrorCode::Invalid,
                name: "web".into(),
                owner: None,
            },
            r#"{"detail":"record is not JSON","error":"invalid","name":"web"}"#,
        );
        // An endpoint is read by the record's rules: lower-cased, validated.
        let e: ErrorPayload = serde_json::from_str(
            r#"{"detail":"","error":"unknown","name":"a","endpoint":{"host":"NAS","port":1}}"#,
        )
        .unwrap();
        assert_eq!(e.endpoint, Some(ep("nas", Some(1))));
        let bad_host = r#"{"detail":"","error":"owned","name":"a","owner":{"host":"a b"}}"#;
        assert!(serde_json::from_str::<ErrorPayload>(bad_host).is_err());
    }

    #[test]
    fn health_status() {
        let failing = HealthStatus {
            check: "GET http://10.0.0.5:8080/health".into(),
            detail: "status 500".into(),
            failures: 1,
            name: "web".into(),
            of: 3,
            status: HealthState::Failing,
        };
        assert_eq!(failing.to_string(), "failing 1/3");
        pinned(
            failing,
            r#"{"check":"GET http://10.0.0.5:8080/health","detail":"status 500","failures":1,"name":"web","of":3,"status":"failing"}"#,
        );
        let passing = HealthStatus {
            check: "tcp nas:80".into(),
            detail: "ok".into(),
            failures: 0,
            name: "nas".into(),
            of: 3,
            status: HealthState::Passing,
        };
        assert_eq!(passing.to_string(), "passing");
    }

    /// Every code and kind, as serde writes it and as `Display` shows it.
    #[test]
    fn wire_names_are_snake_case() {
        fn same<T>(cases: &[(T, &str)])
        where
            T: Serialize + DeserializeOwned + fmt::Display + PartialEq + fmt::Debug + Copy,
        {
            for (v, s) in cases {
                assert_eq!(v.to_string(), *s);
                pinned(*v, &format!("\"{s}\""));
            }
        }
        use ErrorCode::*;
        use EventKind::*;
        same(&[
            (BadName, "bad_name"),
            (Invalid, "invalid"),
            (TooLarge, "too_large"),
            (Owned, "owned"),
            (Unknown, "unknown"),
            (NotOwner, "not_owner"),
            (NotAuthorized, "not_authorized"),
            (Forbidden, "forbidden"),
            (NotFound, "not_found"),
            (MethodNotAllowed, "method_not_allowed"),
            (Unavailable, "unavailable"),
        ]);
        same(&[
            (Registered, "registered"),
            (Updated, "updated"),
            (Deregistered, "deregistered"),
            (Expired, "expired"),
            (Rejected, "rejected"),
            (Restored, "restored"),
            (Unhealthy, "unhealthy"),
        ]);
        same(&[
            (RegistryState::Online, "online"),
            (RegistryState::Offline, "offline"),
        ]);
        same(&[
            (HealthState::Passing, "passing"),
            (HealthState::Failing, "failing"),
        ]);
        assert_eq!(format!("{:<12}|", Registered), "registered  |");
    }

    /// Payloads the registry never writes are errors to read, not panics.
    #[test]
    fn forged_payloads_do_not_parse() {
        for bad in [
            &b"offline"[..],
            b"",
            b"\xff",
            br#"{"state":"maybe","version":"1"}"#,
            br#"{"state":"online"}"#,
            br#"["online"]"#,
        ] {
            assert!(serde_json::from_slice::<RegistryStatus>(bad).is_err());
        }
        assert!(
            serde_json::from_str::<EventPayload>(r#"{"event":"hijacked","name":"a"}"#).is_err()
        );
        assert!(serde_json::from_str::<ErrorPayload>(r#"{"error":"owned"}"#).is_err());
    }
}
