//! End to end: health checks against real local HTTP and TCP servers.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How a test HTTP server answers.
#[derive(Clone)]
enum Answer {
    Status(u16, &'static str),
    /// Accept and read, never answer.
    Hang,
}

/// A real HTTP server on a free port that records when it was asked.
struct HttpServer {
    port: u16,
    hits: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    async fn start(answer: Answer) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let seen = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let answer = answer.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = sock.read(&mut buf).await;
                    seen.lock().unwrap().push(Instant::now());
                    match answer {
                        Answer::Hang => std::future::pending::<()>().await,
                        Answer::Status(code, body) => {
                            let reply = format!(
                                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = sock.write_all(reply.as_bytes()).await;
                        }
                    }
                });
            }
        });
        HttpServer { port, hits, task }
    }

    fn hits(&self) -> Vec<Instant> {
        self.hits.lock().unwrap().clone()
    }

    async fn wait_hits(&self, n: usize) {
        wait_until(
            || (self.hits().len() >= n).then_some(()),
            || format!("only {} probes", self.hits().len()),
        )
        .await
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(port: u16, health: &str) -> String {
    format!(r#"{{"host":"127.0.0.1","port":{port},"health":{health}}}"#)
}

#[tokio::test]
async fn a_healthy_service_stays_and_list_shows_it() {
    let s = Serve::start().await;
    let ok = HttpServer::start(Answer::Status(200, r#"{"name":"web"}"#)).await;
    let mut c = Client::connect(&s.url).await;
    c.register(
        "web",
        &record(
            ok.port,
            r#"{"http":"/health","interval":"1s","failures":2}"#,
        ),
    )
    .await;
    c.subscribe("homicro/health/web").await;
    let st = c
        .expect("homicro/health/web", |v| v["status"] == "passing")
        .await;
    assert_eq!(
        st["check"],
        format!("GET http://127.0.0.1:{}/health", ok.port)
    );
    ok.wait_hits(6).await;
    assert!(records(&s.url).await.contains_key("web"));
    let out = homicro_cmd(&["list", "--broker", &s.url.to_string()]);
    let row = stdout(&out).lines().nth(1).unwrap().to_string();
    assert!(row.ends_with("passing"), "{row}");
}

#[tokio::test]
async fn status_500_is_cleared_after_failures() {
    let s = Serve::start().await;
    let bad = HttpServer::start(Answer::Status(500, "oops")).await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/health/api").await;
    c.register(
        "api",
        &record(bad.port, r#"{"http":"/h","interval":"1s","failures":3}"#),
    )
    .await;
    let st = c.expect("homicro/health/api", |v| v["failures"] == 1).await;
    assert_eq!(st["status"], "failing");
    assert!(st["detail"].as_str().unwrap().contains("status 500"));
    let ev = c
        .expect("homicro/events/api", |v| v["event"] == "unhealthy")
        .await;
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains("failed 3 times in a row: status 500"),
        "{ev}"
    );
    assert_eq!(bad.hits().len(), 3, "exactly `failures` probes");
    assert!(!records(&s.url).await.contains_key("api"));
    // The name is free again.
    c.register("api", r#"{"host":"10.0.0.1"}"#).await;
}

#[tokio::test]
async fn a_hanging_server_is_cleared_by_timeouts_without_slowing_a_healthy_one() {
    let s = Serve::start().await;
    let hang = HttpServer::start(Answer::Hang).await;
    let ok = HttpServer::start(Answer::Status(200, "fine")).await;
    let mut c = Client::connect(&s.url).await;
    c.register("ok", &record(ok.port, r#"{"http":"/","interval":"1s"}"#))
        .await;
    ok.wait_hits(2).await;
    let t0 = Instant::now();
    c.register(
        "stuck",
        &record(
            hang.port,
            r#"{"http":"/","interval":"1s","timeout":"1s","failures":2}"#,
        ),
    )
    .await;
    let ev = c
        .expect("homicro/events/stuck", |v| v["event"] == "unhealthy")
        .await;
    let took = t0.elapsed();
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains("no answer within 1s"),
        "{ev}"
    );
    assert!(took >= Duration::from_secs(2), "two timeouts: {took:?}");
    // Meanwhile the healthy record was probed on schedule.
    let during: Vec<Instant> = ok
        .hits()
        .into_iter()
        .filter(|t| *t >= t0 && *t <= t0 + took)
        .collect();
    let max_gap = during.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    println!(
        "healthy probes while the other hung: {} in {took:?}, max gap {max_gap:?}",
        during.len()
    );
    // Probed every second (the shortest interval a record may ask for);
    // a registry held up by the hanging probe would leave 2 s gaps.
    assert!(during.len() >= 2, "{}", during.len());
    assert!(max_gap < Duration::from_millis(1500), "{max_gap:?}");
    assert!(records(&s.url).await.contains_key("ok"));
}

#[tokio::test]
async fn a_server_answering_with_another_name_is_cleared() {
    let s = Serve::start().await;
    let other = HttpServer::start(Answer::Status(200, r#"{"name":"printer"}"#)).await;
    let mut c = Client::connect(&s.url).await;
    c.register(
        "scanner",
        &record(
            other.port,
            r#"{"http":"/health","interval":"1s","failures":1}"#,
        ),
    )
    .await;
    let ev = c
        .expect("homicro/events/scanner", |v| v["event"] == "unhealthy")
        .await;
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains("answered as \"printer\""),
        "{ev}"
    );
}

#[tokio::test]
async fn a_closed_port_is_cleared_by_a_tcp_check_and_an_open_one_stays() {
    let s = Serve::start().await;
    let closed = free_port();
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = open.local_addr().unwrap().port();
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/health/+").await;
    c.register(
        "up",
        &record(open_port, r#"{"tcp":true,"interval":"1s","failures":2}"#),
    )
    .await;
    c.register(
        "down",
        &record(closed, r#"{"tcp":true,"interval":"1s","failures":2}"#),
    )
    .await;
    let ev = c
        .expect("homicro/events/down", |v| v["event"] == "unhealthy")
        .await;
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("tcp 127.0.0.1:{closed} failed 2 times")),
        "{ev}"
    );
    c.expect("homicro/health/up", |v| v["status"] == "passing")
        .await;
    let recs = records(&s.url).await;
    assert!(recs.contains_key("up") && !recs.contains_key("down"));
}

#[tokio::test]
async fn updates_change_the_check_and_deregistration_stops_it() {
    let s = Serve::start().await;
    let bad = HttpServer::start(Answer::Status(503, "")).await;
    let ok = HttpServer::start(Answer::Status(204, "")).await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/health/svc").await;
    c.register(
        "svc",
        &record(bad.port, r#"{"http":"/","interval":"1s","failures":100}"#),
    )
    .await;
    c.expect("homicro/health/svc", |v| v["failures"] == 2).await;
    // Same owner, new health URL: the failures start over on the new check.
    let upd = format!(
        r#"{{"host":"127.0.0.1","port":{},"health":{{"http":"http://127.0.0.1:{}/","interval":"1s"}}}}"#,
        bad.port, ok.port
    );
    c.publish("homicro/services/svc", upd, true).await;
    c.expect("homicro/health/svc", |v| v["status"] == "passing")
        .await;
    let before = bad.hits().len();
    ok.wait_hits(3).await;
    assert!(bad.hits().len() <= before + 1, "the old check stopped");
    // Deregistered: probes stop at once and the status is cleared.
    c.publish("homicro/services/svc", "", true).await;
    c.expect_raw("homicro/health/svc", b"").await;
    let after = ok.hits().len();
    ok.hits.lock().unwrap().clear();
    let mut probe = Client::connect(&s.url).await;
    probe.register("marker", r#"{"host":"10.0.0.1"}"#).await;
    wait_until(
        || (ok.hits().is_empty()).then_some(()),
        || "still probed".to_string(),
    )
    .await;
    assert!(after > 0);
}

#[tokio::test]
async fn a_thousand_checked_records_keep_the_registry_responsive() {
    let s = Serve::start().await;
    let ok = HttpServer::start(Answer::Status(200, "ok")).await;
    let mut c = Client::connect(&s.url).await;
    let n = 1000;
    for i in 0..n {
        let rec = record(ok.port, r#"{"http":"/","interval":"1s"}"#);
        c.publish(&format!("homicro/services/chk-{i}"), rec, true)
            .await;
    }
    c.register(
        "chk-last",
        &record(ok.port, r#"{"http":"/","interval":"1s"}"#),
    )
    .await;
    // Every record gets probed within its interval.
    ok.wait_hits(n).await;
    // Registrations are still answered at once while probes run.
    c.subscribe("homicro/events/+").await;
    let mut times = Vec::new();
    for i in 0..21 {
        let t = Instant::now();
        c.publish(
            &format!("homicro/services/new-{i}"),
            r#"{"host":"10.0.0.1"}"#,
            true,
        )
        .await;
        let topic = format!("homicro/events/new-{i}");
        c.expect(&topic, |v: &Value| v["event"] == "registered")
            .await;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "registration answered in {:?} (median of 21) with {n} checked records, {} probes so far",
        times[10],
        ok.hits().len()
    );
    assert!(times[10] < Duration::from_millis(100), "{times:?}");
}

/// A health check cannot be turned against the house: an absolute URL to
/// another host (here a loopback-only admin endpoint), a URL with user
/// information and an interval under a second are refused as `invalid`,
/// nothing is probed, and the owner's record is kept as it was.
#[tokio::test]
async fn a_health_check_aimed_elsewhere_or_too_often_is_refused_and_nothing_probed() {
    let s = Serve::start().await;
    let admin = HttpServer::start(Answer::Status(200, "deleted everything")).await;
    let mut c = Client::connect(&s.url).await;
    let kept = r#"{"host":"10.0.0.5","port":80}"#;
    c.register("web", kept).await;
    c.subscribe("homicro/errors/web").await;
    let aimed = format!("http://127.0.0.1:{}/admin/delete?all=1", admin.port);
    let cases = [
        (
            format!(r#"{{"host":"10.0.0.5","port":80,"health":{{"http":"{aimed}"}}}}"#),
            r#"may only probe the record's own host "10.0.0.5", not "127.0.0.1""#,
        ),
        (
            format!(
                r#"{{"host":"127.0.0.1","port":80,"health":{{"http":"http://10.0.0.5@127.0.0.1:{}/"}}}}"#,
                admin.port
            ),
            "may not carry user information",
        ),
        (
            r#"{"host":"10.0.0.5","port":80,"health":{"tcp":true,"interval":"1ns"}}"#.to_string(),
            "`health.interval` must be at least 1s, got 1ns",
        ),
    ];
    for (bad, want) in cases {
        c.publish("homicro/services/web", bad.clone(), true).await;
        let err = c
            .expect("homicro/errors/web", |v| v["error"] == "invalid")
            .await;
        let detail = err["detail"].as_str().unwrap();
        assert!(detail.contains(want), "{bad}: {detail}");
    }
    // Processed in order: once a later registration is in, every refused
    // one was judged; the owner's record is intact and nothing was probed.
    c.register("marker", r#"{"host":"10.0.0.9"}"#).await;
    assert_eq!(records(&s.url).await["web"], kept);
    assert!(admin.hits().is_empty(), "{} probes", admin.hits().len());
    assert!(s.log().contains("refused"));
}

/// An HTTPS server on a free port with a certificate from a CA nobody
/// trusts (as a device's self-signed one): answers 200 and counts GETs.
async fn https_server(dir: &std::path::Path) -> (u16, Arc<Mutex<Vec<Instant>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (_, cert, key) = make_certs(dir);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut buf = [0u8; 2048];
                if tls.read(&mut buf).await.unwrap_or(0) > 0 {
                    seen.lock().unwrap().push(Instant::now());
                    let body = r#"{"name":"secure"}"#;
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (port, hits)
}

/// `https://` health checks speak TLS: a certificate the system does not
/// trust fails the check with the reason, unless the record says
/// `tls_skip_verify`; then the GET is made and the check passes.
#[tokio::test]
async fn https_checks_verify_the_certificate_unless_told_not_to() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, hits) = https_server(tmp.path()).await;
    let s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/health/+").await;
    let health = |extra: &str| {
        format!(
            r#"{{"host":"127.0.0.1","port":{port},"health":{{"http":"https://127.0.0.1:{port}/health","interval":"1s","failures":100{extra}}}}}"#
        )
    };
    c.register("strict", &health("")).await;
    let st = c
        .expect("homicro/health/strict", |v| v["status"] == "failing")
        .await;
    let detail = st["detail"].as_str().unwrap();
    assert!(detail.contains("invalid peer certificate"), "{st}");
    assert!(
        hits.lock().unwrap().is_empty(),
        "no GET without a trusted certificate"
    );
    c.register("secure", &health(r#","tls_skip_verify":true"#))
        .await;
    c.expect("homicro/health/secure", |v| v["status"] == "passing")
        .await;
    assert!(!hits.lock().unwrap().is_empty());
}
