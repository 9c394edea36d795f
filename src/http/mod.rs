//! The HTTP side of the one-port front: homicro's HTTP API (`api.rs`) and
//! the WebSocket upgrade of `GET /mqtt` (`websocket.rs`), on hyper's
//! HTTP/1.1 server. Registrations go to the same registry actor, and through
//! the same rules, as MQTT publishes.
//!
//! ```text
//!  GET /, /ui/… ──▶ the dashboard's files; GET /ui/stream ──▶ its live feed (SSE)
//!  GET /mqtt + Upgrade ──▶ 101 ──▶ websocket pump ──▶ mqtt::serve (Via::WebSocket)
//!  GET /discover[/NAME][?role=R@range], /health, /metrics ──▶ registry (read)
//!  PUT /self-register, PUT /register, DELETE /register/NAME ──▶ registry.submit
//!  ANY /svc/QUERY/rest ──▶ proxy: one instance of QUERY, streamed both ways
//!  POST /call/QUERY, GET /jobs/NAME, POST /jobs/ID ──▶ calls (crate::rpc)
//! ```

mod api;
mod calls;
pub mod dashboard;
pub mod proxy;
mod websocket;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpStream;
use tracing::debug;

use crate::auth::Verdict;
use crate::bus::Bus;
use crate::protocol::ErrorCode;
use crate::record::MAX_RECORD_SIZE;

/// The largest request body read: a record plus room for `name` and the
/// JSON around it. A larger record inside the limit is refused by the
/// registry's own size rule, with the same `too_large`.
pub const MAX_BODY: usize = MAX_RECORD_SIZE + 1024;

/// The largest request head (request line and headers) taken.
pub const MAX_HEAD: usize = 64 * 1024;

type Resp = Response<Full<Bytes>>;

/// Serves HTTP/1.1 on `stream` until the client closes it, stays idle for
/// the handshake timeout between requests, or upgrades `/mqtt`.
pub async fn serve<S>(shared: Arc<Bus>, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_as(shared, stream, peer, None, false).await
}

/// [`serve`], for a client whose TLS certificate names `cert` (its user,
/// without Basic credentials); `tls`: the connection is TLS.
pub async fn serve_as<S>(
    shared: Arc<Bus>,
    stream: S,
    peer: SocketAddr,
    cert: Option<Arc<str>>,
    tls: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = shared.metrics.http.enter();
    let svc = {
        let shared = shared.clone();
        service_fn(move |req| {
            let (shared, cert) = (shared.clone(), cert.clone());
            async move { Ok::<_, Infallible>(handle(shared, req, peer, cert, tls).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.handshake_timeout)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// Answers a connection that came when the server was full: 503 with a
/// JSON error, then closes.
pub async fn unavailable(mut stream: TcpStream, deadline: tokio::time::Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout_at(deadline, stream.read(&mut head)).await;
    let body = json!({"error": "unavailable", "detail": "homicro is at its connection limit; try again later"})
        .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// What a request asks for, from its method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Mqtt,
    Discover,
    DiscoverOne(String),
    SelfRegister,
    Register,
    Deregister(String),
    Health,
    Metrics,
    /// `/svc/QUERY/...`, any method.
    Svc,
    /// `POST /call/QUERY`.
    Call(String),
    /// `GET /jobs/NAME`.
    NextJob(String),
    /// `POST /jobs/ID`.
    Answer(String),
    /// One of the dashboard's files.
    File(String),
    /// `GET /ui/stream`: the dashboard's live feed.
    Stream,
}

/// Why a request has no route.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoRoute {
    NotFound,
    /// The path exists with other methods, listed for `Allow`.
    Method(&'static str),
}

fn route(method: &Method, path: &str) -> Result<Route, NoRoute> {
    if proxy::split(path).is_some() {
        return Ok(Route::Svc);
    }
    let (allow, route) = match path {
        "/mqtt" => ("GET", Route::Mqtt),
        "/discover" => ("GET", Route::Discover),
        "/self-register" => ("PUT", Route::SelfRegister),
        "/register" => ("PUT", Route::Register),
        "/health" => ("GET", Route::Health),
        "/metrics" => ("GET", Route::Metrics),
        "/ui/stream" => ("GET", Route::Stream),
        _ if dashboard::file(path).is_some() => ("GET", Route::File(path.to_string())),
        _ => match path.split_once('/').map(|(_, p)| p.split_once('/')) {
            Some(Some(("discover", name))) if !name.is_empty() => {
                ("GET", Route::DiscoverOne(name.to_string()))
            }
            Some(Some(("register", name))) if !name.is_empty() => {
                ("DELETE", Route::Deregister(name.to_string()))
            }
            Some(Some(("call", query))) if !query.is_empty() => {
                ("POST", Route::Call(query.to_string()))
            }
            Some(Some(("jobs", rest))) if !rest.is_empty() => {
                return match method.as_str() {
                    "GET" => Ok(Route::NextJob(rest.to_string())),
                    "POST" => Ok(Route::Answer(rest.to_string())),
                    _ => Err(NoRoute::Method("GET, POST")),
                };
            }
            _ => return Err(NoRoute::NotFound),
        },
    };
    if method.as_str() == allow {
        Ok(route)
    } else {
        Err(NoRoute::Method(allow))
    }
}

/// A whole answer as a body like the proxy's streamed ones.
fn boxed(r: Resp) -> Response<proxy::Body> {
    r.map(|b| b.map_err(|never| match never {}).boxed())
}

async fn handle(
    shared: Arc<Bus>,
    req: Request<Incoming>,
    peer: SocketAddr,
    cert: Option<Arc<str>>,
    tls: bool,
) -> Response<proxy::Body> {
    // Behind a trusted reverse proxy, the client is who it forwarded.
    // Every header line, in order (a proxy may add its own line), read as
    // bytes: a client's non-ASCII hop must not make the header unreadable.
    let lines: Vec<String> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let forwarded = (!lines.is_empty()).then(|| lines.join(","));
    let peer = SocketAddr::new(
        shared.auth.client_address(peer.ip(), forwarded.as_deref()),
        peer.port(),
    );
    // hyper bounds the head by its read buffer, which one large read can
    // pass (hyperium/hyper#4081): the limit is checked here as well.
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().to_string().len();
    if head > MAX_HEAD {
        let detail = format!("the request's head is larger than {MAX_HEAD} bytes");
        return boxed(error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::TooLarge,
            &detail,
        ));
    }
    let route = match route(req.method(), req.uri().path()) {
        Ok(r) => r,
        Err(NoRoute::NotFound) => {
            let detail = format!("no such path: {}", req.uri().path());
            return boxed(error(StatusCode::NOT_FOUND, ErrorCode::NotFound, &detail));
        }
        Err(NoRoute::Method(allow)) => {
            let detail = format!("{} takes {allow}, not {}", req.uri().path(), req.method());
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                &detail,
            );
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            return boxed(resp);
        }
    };
    // MQTT over WebSocket authenticates in its CONNECT, and `/health`
    // answers monitors without credentials.
    let who = match route {
        Route::Mqtt => return boxed(websocket::upgrade(shared.clone(), req, peer)),
        Route::Health => Verdict::Anonymous,
        _ => match cert {
            Some(name) => shared.auth.certified(name),
            None => match authenticate(&shared, &req, peer).await {
                Ok(who) => who,
                Err(resp) => return boxed(resp),
            },
        },
    };
    let api = api::Api {
        shared: &shared,
        peer,
        who,
    };
    if route == Route::Svc {
        let mut req = req;
        if shared.auth.enabled() {
            // The credentials were homicro's, not the service's.
            req.headers_mut().remove(AUTHORIZATION);
        }
        return proxy::forward(&shared, req, peer, tls, |name| api.may_read(name)).await;
    }
    if route == Route::Stream {
        let watcher = dashboard::Watcher {
            user: api.who.user(),
        };
        return dashboard::stream(shared.clone(), watcher);
    }
    let answer = match route {
        Route::Mqtt | Route::Svc | Route::Stream => unreachable!("answered above"),
        Route::File(path) => match dashboard::file(&path) {
            Some((kind, bytes)) => Ok(dashboard::serve_file(kind, bytes)),
            None => unreachable!("routed by dashboard::file"),
        },
        Route::Call(query) => calls::call(&api, &query, req).await,
        Route::NextJob(name) => calls::next_job(&api, &name, req.uri().query()).await,
        Route::Answer(id) => calls::answer(&api, &id, req).await,
        Route::Discover => api.discover(req.uri().query()).await,
        Route::DiscoverOne(name) => api.discover_one(&name).await,
        Route::SelfRegister => match body(req, shared.limits.handshake_timeout).await {
            Ok(b) => api.self_register(&b).await,
            Err(e) => Err(e),
        },
        // Loopback is checked before the body is read.
        Route::Register => match api.admin_only("register a record on behalf of another service") {
            Ok(_) => match body(req, shared.limits.handshake_timeout).await {
                Ok(b) => api.register(&b).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        Route::Deregister(name) => api.deregister(&name).await,
        Route::Health => Ok(api.health().await),
        Route::Metrics => Ok(api.metrics().await),
    };
    boxed(answer.unwrap_or_else(ApiError::response))
}

/// The request's Basic credentials checked against the users (none: an
/// anonymous client, when those are let in). Refused: 401 with a
/// `WWW-Authenticate` challenge, after the same delay as a refused CONNECT.
async fn authenticate(
    shared: &Bus,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Verdict, Resp> {
    if !shared.auth.enabled() {
        return Ok(Verdict::Anonymous);
    }
    let header = req.headers().get(AUTHORIZATION);
    let basic = header.map(|h| basic_credentials(h.as_bytes()));
    let verdict = match &basic {
        None => shared.auth.check(peer.ip(), None, None).await,
        Some(Some((user, password))) => {
            shared
                .auth
                .check(peer.ip(), Some(user), Some(password.as_bytes()))
                .await
        }
        // Not Basic, or not base64 of USER:PASSWORD.
        Some(None) => Verdict::BadCredentials,
    };
    if verdict.admitted() {
        return Ok(verdict);
    }
    let detail = match verdict {
        Verdict::AnonymousRefused => {
            "credentials required: HTTP Basic auth with a user of the password file"
        }
        _ => "wrong user name or password",
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, ErrorCode::NotAuthorized, detail);
    resp.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"homicro\", charset=\"UTF-8\""),
    );
    Err(resp)
}

/// USER and PASSWORD of an `Authorization: Basic base64(USER:PASSWORD)`.
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    use base64::Engine as _;
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Reads a request body of at most [`MAX_BODY`] bytes within `within` (a
/// client that trickles its body holds a connection no longer than one
/// that sends nothing).
async fn body(req: Request<Incoming>, within: Duration) -> Result<Bytes, ApiError> {
    body_within(req, MAX_BODY, within).await
}

/// Reads a request body of at most `limit` bytes within `within`.
async fn body_within(
    req: Request<Incoming>,
    limit: usize,
    within: Duration,
) -> Result<Bytes, ApiError> {
    let read = Limited::new(req.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(within, read).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Invalid,
            format!("the body did not arrive within {within:?}"),
        ));
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            if limit == MAX_BODY {
                format!(
                    "the body is larger than {MAX_BODY} bytes (a record is at most {MAX_RECORD_SIZE})"
                )
            } else {
                format!("the body is larger than {limit} bytes (the largest MQTT payload here)")
            },
        )),
        Err(e) => Err(ApiError::invalid(format!("could not read the body: {e}"))),
    }
}

/// A refusal on the HTTP side, answered like `PREFIX/errors/NAME`:
/// `{"error": CODE, "detail": …}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }

    fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::Invalid, detail)
    }

    fn response(self) -> Resp {
        error(self.status, self.code, &self.detail)
    }
}

/// A JSON response with `body` as it is.
fn json_bytes(status: StatusCode, body: Bytes) -> Resp {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An error in the form of `PREFIX/errors/NAME`: `{"error", "detail"}`.
fn error(status: StatusCode, code: ErrorCode, detail: &str) -> Resp {
    let body = json!({"error": code, "detail": detail}).to_string();
    json_bytes(status, Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = Method::GET;
        let put = Method::PUT;
        let del = Method::DELETE;
        assert_eq!(route(&get, "/discover"), Ok(Route::Discover));
        assert_eq!(
            route(&get, "/discover/web"),
            Ok(Route::DiscoverOne("web".into()))
        );
        assert_eq!(route(&put, "/self-register"), Ok(Route::SelfRegister));
        assert_eq!(route(&put, "/register"), Ok(Route::Register));
        assert_eq!(
            route(&del, "/register/web"),
            Ok(Route::Deregister("web".into()))
        );
        assert_eq!(route(&get, "/mqtt"), Ok(Route::Mqtt));
        assert_eq!(route(&get, "/health"), Ok(Route::Health));
        assert_eq!(route(&get, "/metrics"), Ok(Route::Metrics));
        assert_eq!(
            route(&Method::POST, "/register"),
            Err(NoRoute::Method("PUT"))
        );
        assert_eq!(route(&get, "/register/web"), Err(NoRoute::Method("DELETE")));
        assert_eq!(route(&put, "/discover"), Err(NoRoute::Method("GET")));
        assert_eq!(route(&get, "/"), Ok(Route::File("/".into())));
        assert_eq!(route(&get, "/ui/stream"), Ok(Route::Stream));
        assert_eq!(route(&put, "/"), Err(NoRoute::Method("GET")));
        for missing in [
            "/ui/",
            "/ui/x.js",
            "/discover/",
            "/register/",
            "/nope",
            "/health/x",
            "",
        ] {
            assert_eq!(route(&get, missing), Err(NoRoute::NotFound), "{missing}");
        }
        // A name with a slash is passed on whole, for the registry to refuse.
        assert_eq!(
            route(&get, "/discover/a/b"),
            Ok(Route::DiscoverOne("a/b".into()))
        );
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::basic_credentials;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any Authorization header value: credentials or none, never a panic.
        #[test]
        fn any_authorization_header(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = basic_credentials(&bytes);
            let mut basic = b"Basic ".to_vec();
            basic.extend(&bytes);
            let _ = basic_credentials(&basic);
        }
    }

    #[test]
    fn basic_credentials_are_read() {
        assert_eq!(
            basic_credentials(b"Basic YWxpY2U6czNjcjp0"),
            Some(("alice".into(), "s3cr:t".into()))
        );
        assert_eq!(basic_credentials(b"Bearer abc"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        assert_eq!(basic_credentials(b"Basic YWxpY2U="), None, "no colon");
    }
}
