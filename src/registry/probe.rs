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
use super::probe_tls as tls;
use crate::record::is_local;
use crate::tls_client::Io;

/// The most of a health response body that is read (for its `name`).
const MAX_BODY: usize = 64 * 1024;

/// Runs one probe to completion within its timeout.
pub async fn run(probe: &Probe) -> Outcome {
    let work = async {
        match &probe.target {
            Target::Tcp { host, port } => match connect(host, *port, probe.loopback).await {
                Ok(_) => Outcome::Pass,
                Err(e) => Outcome::Fail(e),
            },
            Target::Http(url) => http(url, probe).await,
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

/// Connects to `host`:`port`, never to this machine's own addresses
/// unless `loopback` (a record aimed at a name that resolves to 127.0.0.1
/// must not make the registry a way into loopback-only services).
async fn connect(host: &str, port: u16, loopback: bool) -> Result<TcpStream, String> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .collect();
    let allowed: Vec<_> = addrs
        .iter()
        .filter(|a| loopback || !is_local(a.ip()))
        .collect();
    if allowed.is_empty() {
        let first = addrs.first().map_or(String::new(), |a| a.ip().to_string());
        return Err(format!(
            "not probed: {host} is this machine ({first}); loopback is probed only for a record \
             whose host is loopback and that was written from this machine"
        ));
    }
    let mut last = None;
    for addr in allowed {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(format!("connect: {}", last.expect("one address tried")))
}

async fn http(url: &str, probe: &Probe) -> Outcome {
    let (name, loopback) = (probe.name.as_str(), probe.loopback);
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return Outcome::Fail(format!("bad URL {url}: {e}")),
    };
    let Some(host) = uri.host() else {
        return Outcome::Fail(format!("no host in {url}"));
    };
    let host = host.trim_matches(['[', ']']);
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = match connect(host, port, loopback).await {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(e),
    };
    let _ = stream.set_nodelay(true);
    let io: Box<dyn Io> = if https {
        match tls::connect(host, stream, probe.tls_skip_verify).await {
            Ok(s) => Box::new(s),
            Err(e) => return Outcome::Fail(e),
        }
    } else {
        Box::new(stream)
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
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

    fn tcp(host: &str, port: u16, loopback: bool) -> Probe {
        Probe {
            name: crate::record::Name::parse("web").unwrap(),
            generation: 1,
            target: Target::Tcp {
                host: host.into(),
                port,
            },
            timeout: Duration::from_secs(5),
            loopback,
            tls_skip_verify: false,
        }
    }

    #[tokio::test]
    async fn this_machine_is_probed_only_for_a_record_on_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(run(&tcp("127.0.0.1", port, true)).await, Outcome::Pass);
        for host in ["127.0.0.1", "localhost", "0.0.0.0", "::ffff:127.0.0.1"] {
            let Outcome::Fail(why) = run(&tcp(host, port, false)).await else {
                panic!("{host} probed")
            };
            assert!(
                why.starts_with(&format!("not probed: {host} is this machine")),
                "{why}"
            );
        }
        let url = Probe {
            target: Target::Http(format!("http://localhost:{port}/admin")),
            ..tcp("", 0, false)
        };
        assert!(matches!(run(&url).await, Outcome::Fail(w) if w.starts_with("not probed")));
    }

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
