//! Calls over HTTP: `POST /call/QUERY` asks one instance of QUERY and
//! answers with its answer; `GET /jobs/NAME` is a long poll for NAME's
//! next request, and `POST /jobs/ID` answers it (for services without an
//! MQTT client, or behind NAT). See [`crate::rpc`].
//!
//! ```text
//! curl -X POST /call/api@^1 ─▶ hub ─▶ GET /jobs/api-1 (200, x-homicro-call: ID)
//!      ◀── status, type, body ◀─ hub ◀─ POST /jobs/ID (x-homicro-status: 201)
//! ```

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::api::Api;
use super::{ApiError, Resp, body_within};
use crate::auth::Access;
use crate::protocol::ErrorCode;
use crate::record::Name;
use crate::rpc::{Answer, CallError, NotAnswered, Request as CallRequest, wire};

/// How long a poll waits for a request unless it says `?wait=`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(25);

/// The longest a poll may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

const CALL_ID: HeaderName = HeaderName::from_static("x-homicro-call");
const STATUS: HeaderName = HeaderName::from_static("x-homicro-status");
const INSTANCE: HeaderName = HeaderName::from_static("x-homicro-instance");

/// `POST /call/QUERY[?timeout=5s]`: the body to one instance of QUERY;
/// its answer back.
pub async fn call(
    api: &Api<'_>,
    raw_query: &str,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let bus = api.shared;
    let query = super::proxy::percent_decoded(raw_query);
    let timeout = match param(req.uri().query(), "timeout") {
        None => bus.limits.proxy_timeout,
        Some(t) => wire::parse_timeout(&t).map_err(ApiError::invalid)?,
    };
    let content_type = content_type(&req);
    let body = body_within(req, bus.limits.max_payload, bus.limits.handshake_timeout).await?;
    let request = CallRequest { body, content_type };
    match bus
        .calls
        .call(bus, &query, request, timeout, |n| api.may_read(n))
        .await
    {
        Ok((instance, answer)) => Ok(answered(answer, Some(&instance))),
        Err(e) => Err(refused(&e)),
    }
}

/// `GET /jobs/NAME[?wait=25s]`: NAME's next request (200, its id in
/// `x-homicro-call`), or 204 when none came within the wait. The caller
/// needs the ACL's write on NAME's record, as for a heartbeat.
pub async fn next_job(api: &Api<'_>, raw: &str, query: Option<&str>) -> Result<Resp, ApiError> {
    let name = Name::parse(raw).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadName,
            format!("{e}: GET /jobs/NAME takes the name the service is registered as"),
        )
    })?;
    api.acl_allows(name.as_str(), Access::Write)?;
    let wait = match param(query, "wait") {
        None => DEFAULT_WAIT,
        Some(w) => match wire::parse_timeout(&w) {
            Ok(d) if d <= MAX_WAIT => d,
            Ok(_) => {
                return Err(ApiError::invalid(format!(
                    "wait {w:?} is longer than {}",
                    humantime::format_duration(MAX_WAIT)
                )));
            }
            Err(e) => return Err(ApiError::invalid(e.replace("timeout", "wait"))),
        },
    };
    let Some(job) = api.shared.calls.next_job(&name, wait).await else {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    };
    let mut resp = Response::new(Full::new(job.request.body));
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&job.id) {
        h.insert(CALL_ID, v);
    }
    let ct = job
        .request
        .content_type
        .as_deref()
        .unwrap_or("application/octet-stream");
    if let Ok(v) = HeaderValue::from_str(ct) {
        h.insert(CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// `POST /jobs/ID`: the answer to call ID (status in `x-homicro-status`,
/// default 200); 204 when it was given to the caller, 404 when no call ID
/// waits (it timed out, or was answered), 403 when the ACL does not let
/// the client write the instance's record.
pub async fn answer(api: &Api<'_>, id: &str, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let bus = api.shared;
    let status = match req.headers().get(&STATUS) {
        None => 200,
        Some(v) => wire::parse_status(v.to_str().unwrap_or("?"))
            .map_err(|e| ApiError::invalid(format!("x-homicro-status: {e}")))?,
    };
    let content_type = content_type(&req);
    let body = body_within(req, bus.limits.max_payload, bus.limits.handshake_timeout).await?;
    let answer = Answer {
        status,
        content_type,
        body,
    };
    // As for the poll: the ACL's write on the instance's record.
    match bus.calls.answer(id, answer, |n| {
        api.acl_allows(n.as_str(), Access::Write).is_ok()
    }) {
        Ok(()) => {}
        Err(NotAnswered::NoSuchCall) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!("no call {id} waits for an answer: it timed out, or was answered already"),
            ));
        }
        Err(NotAnswered::NotAllowed(name)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::NotAuthorized,
                format!("the ACL does not let this client answer for {name} (write on its record)"),
            ));
        }
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn content_type(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The value of `key` in a URL query string.
fn param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// An instance's answer as the HTTP response.
fn answered(a: Answer, instance: Option<&Name>) -> Resp {
    let mut resp = Response::new(Full::new(a.body));
    *resp.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    if let Some(ct) = a.content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(CONTENT_TYPE, ct);
    }
    if let Some(v) = instance.and_then(|n| HeaderValue::from_str(n.as_str()).ok()) {
        h.insert(INSTANCE, v);
    }
    resp
}

fn refused(e: &CallError) -> ApiError {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    ApiError::new(status, e.code(), e.to_string())
}
