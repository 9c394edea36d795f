//! Runs health probes: HTTP GET (hyper, HTTP/1.1 over a plain TCP
//! connection) and TCP connect, each bounded by its timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::health::{Outcome, Probe, Target};

/// The most of a health response body that is read (for its `name`).
const MAX_BODY: usize = 64 * 1024;

/// Runs one probe to completion within its timeout.
pub async fn run(probe: &Probe) -> Outcome {
    let work = async {
        match &probe.target {
            Target::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
                .await
                .map(|_| Outcome::Pass)
                .unwrap_or_else(|e| Outcome::Fail(format!("connect: {e}"))),
            Target::Http(url) => http(url, probe.name.as_str()).await,
        }
    };
    match tokio::time::timeout(probe.timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Fail(format!("no answer within {}", fmt(probe.timeout))),
    }
}

fn fmt(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

async fn http(url: &str, name: &str) -> Outcome {
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return Outcome::Fail(format!("bad URL {url}: {e}")),
    };
    let Some(host) = uri.host() else {
        return Outcome::Fail(format!("no host in {url}"));
    };
    let host = host.trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(80);
    let stream = match TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(format!("connect: {e}")),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return Outcome::Fail(format!("http: {e}")),
    };
    let driver = tokio::spawn(conn);
    let authority = uri.authority().map_or(host.to_string(), |a| a.to_string());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("homicro/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let outcome = match sender.send_request(req).await {
        Err(e) => Outcome::Fail(format!("http: {e}")),
        Ok(resp) if !resp.status().is_success() => {
            Outcome::Fail(format!("status {}", resp.status()))
        }
        Ok(resp) => match Limited::new(resp.into_body(), MAX_BODY).collect().await {
            Ok(body) => judge_body(&body.to_bytes(), name),
            // A 2xx whose body is too long or cut off still passes: only a
            // JSON object naming someone else fails.
            Err(_) => Outcome::Pass,
        },
    };
    driver.abort();
    outcome
}

/// A 2xx passes unless the body is a JSON object whose `name` is another.
fn judge_body(body: &[u8], name: &str) -> Outcome {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => match m.get("name").and_then(Value::as_str) {
            Some(other) if other != name => {
                Outcome::Fail(format!("answered as {other:?}, not {name:?}"))
            }
            _ => Outcome::Pass,
        },
        _ => Outcome::Pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        assert_eq!(judge_body(b"ok", "a"), Outcome::Pass);
        assert_eq!(judge_body(br#"{"status":"up"}"#, "a"), Outcome::Pass);
        assert_eq!(judge_body(br#"{"name":"a"}"#, "a"), Outcome::Pass);
        assert_eq!(judge_body(br#"["name"]"#, "a"), Outcome::Pass);
        assert!(
            matches!(judge_body(br#"{"name":"b"}"#, "a"), Outcome::Fail(d) if d.contains("answered as \"b\""))
        );
    }
}
