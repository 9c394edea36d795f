//! The API's handlers: discovery, registration and the registry's health
//! and metrics. Records go to the registry actor as they would arrive over
//! MQTT; the registry's answer (its event or error JSON) is the response.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use serde_json::{Map, Value, json};

use super::{ApiError, Resp, json_bytes};
use crate::auth::{Access, Verdict};
use crate::bus::{Bus, Gauge, Metrics};
use crate::identity::{Author, Identity};
use crate::protocol::{ErrorCode, ErrorPayload, EventKind, EventPayload};
use crate::record::{Name, Query, Record};
use crate::registry::{Answer, Handle, Status, Stopped};

/// One request's view of the front.
pub(super) struct Api<'a> {
    pub shared: &'a Bus,
    pub peer: SocketAddr,
    /// What the request's credentials proved.
    pub who: Verdict,
}

impl Api<'_> {
    /// `GET /discover[?role=R@range]`: matching records as name → record.
    pub async fn discover(&self, query: Option<&str>) -> Result<Resp, ApiError> {
        let filter = role_query(query.unwrap_or("")).map_err(ApiError::invalid)?;
        let mut records = self.registry()?.records().await.map_err(stopped)?;
        if let Some(q) = &filter {
            records.retain(|(n, b)| Record::parse(n, b.clone()).is_ok_and(|r| q.matches(&r)));
        }
        records.retain(|(n, _)| self.may(n.as_str(), Access::Read));
        Ok(json_bytes(StatusCode::OK, object_of(records)))
    }

    /// `GET /discover/NAME`: the record as stored, or 404 `unknown`.
    pub async fn discover_one(&self, raw: &str) -> Result<Resp, ApiError> {
        let name = Name::parse(raw)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
        self.acl_allows(name.as_str(), Access::Read)?;
        match self.registry()?.record(&name).await.map_err(stopped)? {
            Some(bytes) => Ok(json_bytes(StatusCode::OK, bytes)),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::Unknown,
                format!("{name} is not registered"),
            )),
        }
    }

    /// `PUT /self-register`: the caller's own record; its host is the
    /// caller's address.
    pub async fn self_register(&self, body: &[u8]) -> Result<Resp, ApiError> {
        let (name, record) = named_record(body).map_err(ApiError::invalid)?;
        self.acl_allows(&name, Access::Write)?;
        let record = with_peer_host(record, self.peer.ip()).map_err(ApiError::invalid)?;
        self.submit(&name, record, self.who.author(self.peer.ip()))
            .await
    }

    /// `PUT /register`: a full record on behalf of another service; from
    /// loopback only.
    pub async fn register(&self, body: &[u8]) -> Result<Resp, ApiError> {
        let admin = self.admin_only("register a record on behalf of another service")?;
        let (name, record) = named_record(body).map_err(ApiError::invalid)?;
        self.submit(&name, to_bytes(record), admin).await
    }

    /// `DELETE /register/NAME`: removes NAME; from loopback only.
    pub async fn deregister(&self, name: &str) -> Result<Resp, ApiError> {
        let admin = self.admin_only("deregister a service")?;
        self.submit(name, Bytes::new(), admin).await
    }

    /// `GET /health`: the registry's own state.
    pub async fn health(&self) -> Resp {
        let status = match &self.shared.gate {
            Some(r) => Some(r.status().await),
            None => None,
        };
        let uptime = self.shared.started.elapsed().as_secs();
        let (code, mut body) = health(status, uptime);
        if let Some(j) = &self.shared.journal {
            let st = j.status();
            body["storage"] = json!(if st.failure.is_some() {
                "failing"
            } else {
                "ok"
            });
            if let Some(f) = st.failure {
                // Serving goes on; changes are live but not acknowledged.
                if body["state"] == "online" {
                    body["state"] = json!("degraded");
                }
                body["storage_detail"] = json!(format!(
                    "{}; changes are applied but not acknowledged until the disk is written again",
                    f.reason
                ));
            }
        }
        json_bytes(code, Bytes::from(body.to_string()))
    }

    /// `GET /metrics`: Prometheus text format 0.0.4.
    pub async fn metrics(&self) -> Resp {
        let status = match &self.shared.gate {
            Some(r) => r.status().await.ok(),
            None => None,
        };
        let uptime = self.shared.started.elapsed().as_secs_f64();
        let mut text = metrics(
            status.as_ref(),
            &self.shared.metrics,
            self.shared.router.dropped(),
            self.shared.session_count(),
            self.shared.router.retained(),
            uptime,
        );
        series(
            &mut text,
            "homicro_bus_connections_open",
            "gauge",
            "Connections open now, of any kind (each holds one of max_connections).",
            &[("", self.shared.connections_open() as u64)],
        );
        let c = &self.shared.calls.metrics;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        series(
            &mut text,
            "homicro_calls_total",
            "counter",
            "Calls through the hub (POST /call/, PREFIX/call/), by how they ended.",
            &[
                ("{outcome=\"answered\"}", n(&c.answered)),
                ("{outcome=\"timed_out\"}", n(&c.timed_out)),
                ("{outcome=\"gone\"}", n(&c.gone)),
                ("{outcome=\"retried\"}", n(&c.retried)),
                ("{outcome=\"started\"}", n(&c.calls)),
            ],
        );
        series(
            &mut text,
            "homicro_calls_pending",
            "gauge",
            "Calls waiting for their instance's answer now.",
            &[("", self.shared.calls.pending() as u64)],
        );
        if let Some(j) = &self.shared.journal {
            let failing = u64::from(j.status().failure.is_some());
            series(
                &mut text,
                "homicro_journal_fsyncs_total",
                "counter",
                "fsyncs of the journal (one per group of changes written together).",
                &[("", j.fsyncs())],
            );
            series(
                &mut text,
                "homicro_journal_failing",
                "gauge",
                "1 while the disk fails and changes are not acknowledged.",
                &[("", failing)],
            );
        }
        let mut resp = json_bytes(StatusCode::OK, Bytes::from(text));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    async fn submit(&self, name: &str, record: Bytes, by: Author) -> Result<Resp, ApiError> {
        let answer = self
            .registry()?
            .submit(name, record, by)
            .await
            .map_err(stopped)?;
        Ok(answered(answer))
    }

    fn registry(&self) -> Result<&Handle, ApiError> {
        self.shared.gate.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "this server runs without a registry (--no-registry)",
            )
        })
    }

    /// Whether the ACL lets the caller read or write NAME's record (an
    /// HTTP client has no client id: `%c` patterns do not apply).
    fn may(&self, name: &str, access: Access) -> bool {
        let topic = self.shared.topics.service(name);
        let user = self.who.user();
        self.shared.auth.allows(user.as_deref(), "", &topic, access)
    }

    /// Whether the ACL lets the caller read NAME's record (and so reach
    /// the service through `/svc/`).
    pub(super) fn may_read(&self, name: &str) -> bool {
        self.may(name, Access::Read)
    }

    pub(super) fn acl_allows(&self, name: &str, access: Access) -> Result<(), ApiError> {
        if self.may(name, access) {
            return Ok(());
        }
        let what = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::NotAuthorized,
            format!(
                "the ACL does not let this client {what} {}",
                self.shared.topics.service(name)
            ),
        ))
    }

    /// The caller as an admin: a user marked admin, or any client on
    /// this machine (loopback).
    pub(super) fn admin_only(&self, what: &str) -> Result<Author, ApiError> {
        let me = self.who.author(self.peer.ip());
        if me.admin {
            return Ok(me);
        }
        if is_loopback(self.peer.ip()) {
            let identity = me.identity.unwrap_or(Identity::address(self.peer.ip()));
            return Ok(Author::admin(identity));
        }
        let detail = format!(
            "only an admin (a user listed in [auth] admins, or a client on this machine) may \
             {what}; {} is neither (use PUT /self-register)",
            self.peer.ip().to_canonical()
        );
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            detail,
        ))
    }
}

fn stopped(_: Stopped) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        "the registry has stopped",
    )
}

/// 127.0.0.0/8, ::1 and their IPv4-mapped forms.
pub(super) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The HTTP status of an error code.
pub(super) fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadName | ErrorCode::Invalid => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Owned => StatusCode::CONFLICT,
        ErrorCode::Unknown | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Forbidden | ErrorCode::NotOwner => StatusCode::FORBIDDEN,
        ErrorCode::NotAuthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The response to a submission: the registry's event (201 for
/// `registered`, else 200) or its error, as they are.
fn answered(answer: Answer) -> Resp {
    match answer {
        Ok(event) => {
            let registered = serde_json::from_slice::<EventPayload>(&event)
                .is_ok_and(|e| e.event == EventKind::Registered);
            let status = if registered {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_bytes(status, event)
        }
        Err(err) => {
            let code = serde_json::from_slice::<ErrorPayload>(&err)
                .map_or(ErrorCode::Invalid, |e| e.error);
            json_bytes(status_of(code), err)
        }
    }
}

/// Splits a body `{"name": …, …record}` into the name and the record's
/// fields (`name` is the API's, not the record's).
fn named_record(body: &[u8]) -> Result<(String, Map<String, Value>), String> {
    let mut obj = crate::record::parse_object(body, "the body").map_err(|e| e.to_string())?;
    match obj.remove("name") {
        Some(Value::String(n)) => Ok((n, obj)),
        Some(other) => Err(format!("`name` must be a string, got {other}")),
        None => Err("`name` is required: the service's name".into()),
    }
}

/// The record with `host` set to the caller's address; a `host` in the
/// body must be that address.
fn with_peer_host(mut record: Map<String, Value>, peer: IpAddr) -> Result<Bytes, String> {
    let peer = peer.to_canonical();
    if peer.is_unspecified() {
        return Err(
            "cannot tell this client's address: the trusted proxy's X-Forwarded-For names none"
                .into(),
        );
    }
    match record.get("host") {
        None => {}
        Some(Value::String(h))
            if h.parse::<IpAddr>()
                .is_ok_and(|ip| ip.to_canonical() == peer) => {}
        Some(other) => {
            return Err(format!(
                "`host` is taken from the connection ({peer}) on /self-register; the body gives \
                 {other} (leave it out, or PUT /register from loopback on another's behalf)"
            ));
        }
    }
    record.insert("host".into(), Value::String(peer.to_string()));
    Ok(to_bytes(record))
}

fn to_bytes(record: Map<String, Value>) -> Bytes {
    Bytes::from(Value::Object(record).to_string())
}

/// `role=R` or `role=R@range` from a query string; `None` without one.
fn role_query(query: &str) -> Result<Option<Query>, String> {
    let mut role = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "role" if role.is_none() => role = Some(v.into_owned()),
            "role" => return Err("give `role` once".into()),
            other => {
                return Err(format!(
                    "unknown query parameter `{other}`; /discover takes `role=ROLE[@RANGE]`"
                ));
            }
        }
    }
    role.map(|r| Query::parse(&r).map_err(|e| e.to_string()))
        .transpose()
}

/// `{"NAME": <record>, …}` by name, each record's bytes embedded as stored.
fn object_of(mut records: Vec<(Name, Bytes)>) -> Bytes {
    records.sort_by(|a, b| a.0.cmp(&b.0));
    let size: usize = records
        .iter()
        .map(|(n, b)| n.as_str().len() + b.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'{');
    for (i, (name, bytes)) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Names are `a-z 0-9 . _ -`: nothing to escape.
        out.extend_from_slice(format!("\"{name}\":").as_bytes());
        out.extend_from_slice(bytes);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// `GET /health`'s status and body: online (200) while the registry holds
/// its broker session, offline (503) otherwise; `broker-only` (200) with
/// no registry.
fn health(status: Option<Result<Status, Stopped>>, uptime_secs: u64) -> (StatusCode, Value) {
    let version = env!("CARGO_PKG_VERSION");
    match status {
        None => (
            StatusCode::OK,
            json!({"state": "broker-only", "registry": "off", "version": version,
                   "uptime_secs": uptime_secs}),
        ),
        Some(Err(Stopped)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"state": "offline", "detail": "the registry has stopped", "version": version,
                   "uptime_secs": uptime_secs, "broker_connected": false}),
        ),
        Some(Ok(s)) => (
            if s.connected {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            json!({"state": if s.connected { "online" } else { "offline" }, "records": s.records,
                   "version": version, "uptime_secs": uptime_secs,
                   "broker_connected": s.connected}),
        ),
    }
}

/// The Prometheus exposition (text format 0.0.4). The registry's series
/// are left out when it is off or has stopped.
fn metrics(
    status: Option<&Status>,
    front: &Metrics,
    router_dropped: u64,
    sessions: usize,
    retained: usize,
    uptime_secs: f64,
) -> String {
    let mut out = String::new();
    if let Some(s) = status {
        let help = "Records held by the registry.";
        series(
            &mut out,
            "homicro_records",
            "gauge",
            help,
            &[("", s.records as u64)],
        );
        let st = &s.stats;
        for (name, help, v) in [
            (
                "registrations",
                "Records accepted for a free name.",
                st.registrations,
            ),
            (
                "updates",
                "Records accepted from their owner (changes and refreshes).",
                st.updates,
            ),
            (
                "refusals",
                "Records refused (owned, invalid, too_large, bad_name).",
                st.refusals,
            ),
            ("expiries", "Records whose ttl ran out.", st.expiries),
            (
                "deregistrations",
                "Records removed by an empty publish or a DELETE.",
                st.deregistrations,
            ),
            (
                "health_failures",
                "Failed health probes.",
                st.health_failures,
            ),
            (
                "unhealthy",
                "Records cleared after failing their health check.",
                st.unhealthy,
            ),
            (
                "stale_wills",
                "Wills that changed nothing: another session's will guards the record.",
                st.stale_wills,
            ),
        ] {
            series(
                &mut out,
                &format!("homicro_{name}_total"),
                "counter",
                help,
                &[("", v)],
            );
        }
    }
    let kinds: [(&str, &Gauge); 4] = [
        ("{kind=\"mqtt_v4\"}", &front.mqtt_v4),
        ("{kind=\"mqtt_v5\"}", &front.mqtt_v5),
        ("{kind=\"websocket\"}", &front.websocket),
        ("{kind=\"http\"}", &front.http),
    ];
    let load = |pick: fn(&Gauge) -> &std::sync::atomic::AtomicU64| {
        kinds.map(|(label, g)| (label, pick(g).load(Ordering::Relaxed)))
    };
    let help = "Open connections on the public port, by kind.";
    series(
        &mut out,
        "homicro_connections",
        "gauge",
        help,
        &load(|g| &g.open),
    );
    let help = "Connections accepted on the public port, by kind.";
    series(
        &mut out,
        "homicro_connections_total",
        "counter",
        help,
        &load(|g| &g.total),
    );
    for (name, help, v) in [
        (
            "accepted",
            "Connections accepted on the public port.",
            &front.accepted,
        ),
        (
            "garbage",
            "Connections closed for sending neither MQTT nor HTTP.",
            &front.garbage,
        ),
        (
            "silent",
            "Connections closed for saying nothing in time.",
            &front.silent,
        ),
        (
            "refused_full",
            "Connections refused at the session cap (CONNACK server unavailable, HTTP 503).",
            &front.refused_full,
        ),
        (
            "refused_publishes",
            "Publishes refused: to the registry's own topics, or by the registry's gate.",
            &front.refused_publishes,
        ),
        ("wills", "Wills published.", &front.wills),
        (
            "memory_trims",
            "Times freed memory was given back to the system after sessions ended.",
            &front.trims,
        ),
    ] {
        let name = format!("homicro_bus_{name}_total");
        series(
            &mut out,
            &name,
            "counter",
            help,
            &[("", v.load(Ordering::Relaxed))],
        );
    }
    series(
        &mut out,
        "homicro_bus_dropped_total",
        "counter",
        "Messages dropped because a session's queue (or its link's) was full.",
        &[("", front.dropped.load(Ordering::Relaxed) + router_dropped)],
    );
    series(
        &mut out,
        "homicro_bus_retained",
        "gauge",
        "Retained messages held (records included).",
        &[("", retained as u64)],
    );
    series(
        &mut out,
        "homicro_bus_sessions",
        "gauge",
        "MQTT sessions alive (connected, or kept for an absent client).",
        &[("", sessions as u64)],
    );
    let _ = write!(
        out,
        "# HELP homicro_uptime_seconds Seconds since homicro started.\n\
         # TYPE homicro_uptime_seconds gauge\nhomicro_uptime_seconds {uptime_secs:.3}\n"
    );
    out
}

/// One metric: its HELP and TYPE lines and a sample per label set (`""`:
/// no labels).
fn series(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

#[cfg(test)]
mod tests;
