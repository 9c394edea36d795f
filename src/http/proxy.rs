//! `/svc/QUERY/rest/of/path`: a reverse proxy to a registered service, on
//! the one port. QUERY is a name or `role[@range]`; each request goes to
//! one instance, picked round-robin among those registered, skipping
//! instances that failed a moment ago. Bodies stream both ways (never
//! held whole); a WebSocket upgrade passes through.
//!
//! ```text
//! client ──/svc/api@^1/users?id=3──▶ pick(api@^1) ──GET /users?id=3──▶ instance
//!        ◀──── status, headers, body (streamed) ◀─────────────────────┘
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::bus::Bus;
use crate::protocol::ErrorCode;
use crate::record::{Name, Query};

/// A streamed body either way.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// How long an instance that failed is skipped.
const FAILED_FOR: Duration = Duration::from_secs(10);

/// How long connecting to an instance may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The proxy's memory: whose turn it is, and who failed lately.
#[derive(Default)]
pub struct Hub {
    next: AtomicUsize,
    failed: Mutex<HashMap<Name, Instant>>,
}

/// One instance to try.
#[derive(Debug, Clone)]
struct Instance {
    name: Name,
    host: String,
    port: u16,
    tls: bool,
}

/// Why a request could not be forwarded: answered as JSON in the
/// registry's style.
struct Refusal {
    status: StatusCode,
    code: ErrorCode,
    detail: String,
}

fn refusal(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        detail: detail.into(),
    }
}

/// Where a request under `/svc/` goes: QUERY and the rest of the path
/// (`/` when there is none).
pub fn split(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/svc/")?;
    Some(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// The request in, forwarded; what the instance answered (or why not).
/// `may_read` says whether the caller may reach NAME (the ACL's read on
/// its record); `tls`: the client came over TLS.
pub async fn forward(
    bus: &Bus,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
    may_read: impl Fn(&str) -> bool,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some((raw_query, rest)) = split(&path) else {
        return error(refusal(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such path",
        ));
    };
    // `api@^1.2` arrives as `api@%5E1.2` from most clients.
    let decoded = percent_decoded(raw_query);
    let query = decoded.as_str();
    let instances = match candidates(bus, query) {
        Ok(i) => i,
        Err(r) => return error(r),
    };
    let instances: Vec<Instance> = instances
        .into_iter()
        .filter(|i| may_read(i.name.as_str()))
        .collect();
    if instances.is_empty() {
        return error(refusal(
            StatusCode::FORBIDDEN,
            ErrorCode::NotAuthorized,
            format!("the ACL does not let this client reach {query}"),
        ));
    }
    let timeout = bus.limits.proxy_timeout;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let prefix = format!("/svc/{raw_query}");
    let tries = if idempotent { 2 } else { 1 };
    let mut tried = 0;
    let mut last = refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!("no live instance of {query}: every one failed a moment ago"),
    );
    let mut req = Some(req);
    while tried < tries {
        let Some(inst) = pick(bus, &instances) else {
            break;
        };
        tried += 1;
        let stream = match connect(&inst).await {
            Ok(s) => s,
            Err(e) => {
                debug!(instance = %inst.name, error = %e, "proxy: connect failed");
                bus.hub
                    .failed
                    .lock()
                    .unwrap()
                    .insert(inst.name.clone(), Instant::now());
                last = refusal(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    format!("{} ({}:{}) refused: {e}", inst.name, inst.host, inst.port),
                );
                continue;
            }
        };
        let out = upstream_request(
            req.take().expect("sent once"),
            &inst,
            rest,
            &prefix,
            peer,
            tls,
        );
        let answer = tokio::time::timeout(timeout, send(stream, out)).await;
        let mut resp = match answer {
            Err(_) => {
                return error(refusal(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorCode::Unavailable,
                    format!("{} did not answer within {timeout:?}", inst.name),
                ));
            }
            Ok(Err(e)) => {
                bus.hub
                    .failed
                    .lock()
                    .unwrap()
                    .insert(inst.name.clone(), Instant::now());
                return error(refusal(
                    StatusCode::BAD_GATEWAY,
                    ErrorCode::Unavailable,
                    format!("{} failed: {e}", inst.name),
                ));
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    let (Ok(c), Ok(u)) = (client.await, upstream.await) else {
                        return;
                    };
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                });
            }
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, empty());
        }
        strip_hop_by_hop(resp.headers_mut(), false);
        return resp.map(|b| b.map_err(Into::into).boxed());
    }
    error(last)
}

/// `s` with its `%XX` escapes decoded (a bad escape, or bytes that are not
/// UTF-8, are left as they are).
pub(super) fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// The instances QUERY names: one record by name, or every instance of a
/// role (and range). Unknown: 404; not a name or `role@range`: 400.
fn candidates(bus: &Bus, query: &str) -> Result<Vec<Instance>, Refusal> {
    let Some(registry) = &bus.gate else {
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this server runs without a registry (--no-registry)",
        ));
    };
    let q = Query::parse(query).map_err(|e| {
        refusal(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadName,
            format!("{e}: /svc/ takes a service name or role@range, such as /svc/api@^1.2/path"),
        )
    })?;
    let found = registry.matching(query, &q);
    if found.is_empty() {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no service named {query} and no instance of role {query}"),
        ));
    }
    let mut out = Vec::new();
    for (name, record) in found {
        let tls = match record.scheme.as_deref() {
            None | Some("http") => false,
            Some("https") => true,
            Some(other) => {
                debug!(instance = %name, scheme = other, "proxy: not an HTTP service");
                continue;
            }
        };
        let port = record.endpoint.port.unwrap_or(if tls { 443 } else { 80 });
        out.push(Instance {
            name,
            host: record.endpoint.host.clone(),
            port,
            tls,
        });
    }
    if out.is_empty() {
        return Err(refusal(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Unavailable,
            format!(
                "no instance of {query} speaks HTTP (its records' scheme is neither http nor https)"
            ),
        ));
    }
    Ok(out)
}

/// The next instance in turn that has not failed lately.
fn pick(bus: &Bus, instances: &[Instance]) -> Option<Instance> {
    let now = Instant::now();
    let mut failed = bus.hub.failed.lock().unwrap();
    failed.retain(|_, t| now.duration_since(*t) < FAILED_FOR);
    let live: Vec<&Instance> = instances
        .iter()
        .filter(|i| !failed.contains_key(&i.name))
        .collect();
    if live.is_empty() {
        return None;
    }
    let i = bus.hub.next.fetch_add(1, Ordering::Relaxed);
    Some(live[i % live.len()].clone())
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

async fn connect(inst: &Instance) -> std::io::Result<Box<dyn Stream>> {
    let addr = (inst.host.as_str(), inst.port);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = tcp.set_nodelay(true);
    if !inst.tls {
        return Ok(Box::new(tcp));
    }
    let config = crate::tls_client::system().ok_or_else(|| {
        std::io::Error::other("https upstream: this system has no CA certificates")
    })?;
    let name = rustls::pki_types::ServerName::try_from(inst.host.clone())
        .map_err(|e| std::io::Error::other(format!("https upstream: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Box::new(tls))
}

/// Sends `req` on `stream` and returns the answer's head (its body
/// streams on).
async fn send(
    stream: Box<dyn Stream>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, hyper::Error> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "proxy: upstream connection ended");
        }
    });
    sender.send_request(req).await
}

/// The client's request as the instance gets it: the rest of the path,
/// hop-by-hop headers gone, `X-Forwarded-*` set.
fn upstream_request(
    req: Request<Incoming>,
    inst: &Instance,
    rest: &str,
    prefix: &str,
    peer: SocketAddr,
    tls: bool,
) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    parts.uri = Uri::builder()
        .path_and_query(path_and_query)
        .build()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = hyper::Version::HTTP_11;
    let upgrade = is_upgrade(&parts.headers);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let h = &mut parts.headers;
    let authority = if (inst.tls && inst.port == 443) || (!inst.tls && inst.port == 80) {
        inst.host.clone()
    } else {
        format!("{}:{}", inst.host, inst.port)
    };
    if let Ok(v) = HeaderValue::from_str(&authority) {
        h.insert(header::HOST, v);
    }
    let xff = HeaderName::from_static("x-forwarded-for");
    let chain = match h.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&chain) {
        h.insert(xff, v);
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_str(prefix) {
        h.insert(HeaderName::from_static("x-forwarded-prefix"), v);
    }
    Request::from_parts(parts, body)
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Removes the headers that are the connection's, not the message's (RFC
/// 9110 7.6.1), those `Connection` names included; an upgrade keeps
/// `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

fn error(r: Refusal) -> Response<Body> {
    let body = serde_json::json!({"error": r.code, "detail": r.detail}).to_string();
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_decoded() {
        assert_eq!(percent_decoded("api@%5E1.2"), "api@^1.2");
        assert_eq!(percent_decoded("api@%3E%3D1%2C%20%3C2"), "api@>=1, <2");
        assert_eq!(percent_decoded("web"), "web");
        assert_eq!(percent_decoded("bad%zz%"), "bad%zz%");
        assert_eq!(percent_decoded("a%2"), "a%2");
        assert_eq!(percent_decoded("%ff"), "%ff", "not UTF-8: as it was");
    }

    #[test]
    fn svc_paths_split_into_query_and_rest() {
        assert_eq!(split("/svc/api@^1.2/users"), Some(("api@^1.2", "/users")));
        assert_eq!(split("/svc/web"), Some(("web", "/")));
        assert_eq!(split("/svc/web/"), Some(("web", "/")));
        assert_eq!(split("/svc/web/a/b"), Some(("web", "/a/b")));
        assert_eq!(split("/svcx/web"), None);
        assert_eq!(split("/svc/"), Some(("", "/")));
    }

    #[test]
    fn hop_by_hop_headers_go_and_an_upgrade_keeps_its_own() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
