//! Item 11, the hub (issue 12): what reaching a service through homicro
//! costs against reaching it directly, in the same run.
//!
//! (a) `/svc/NAME/` on serve's port against the upstream's own port: one
//!     keep-alive client sending a GET every millisecond (1,000 req/s),
//!     the latency of each from its write to the end of its answer;
//! (b) `homicro proxy` (a local port forward) against a direct connection:
//!     the rate at which 100 MB from the upstream arrive.
//!
//! The upstream is this process: a tiny HTTP/1.1 server answering every
//! request with 2 bytes (keep-alive), and a TCP server that writes 100 MB
//! and closes.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, MissedTickBehavior};

use crate::Opts;
use crate::report::{Report, Row, median, pct, verdict};
use crate::subject::{Kind, Subject};

pub async fn run(o: &Opts, report: &mut Report) {
    let n = o.n(10_000, 1_000);
    let mb = o.n(100, 10);
    println!(
        "\n## 11. The hub: {n} GETs at 1,000/s through /svc/ and directly; {mb} MB through `homicro proxy` and directly"
    );
    let http = http_upstream().await;
    let bulk = bulk_upstream(mb << 20).await;
    let (mut p50, mut p99, mut direct50, mut direct99) = (vec![], vec![], vec![], vec![]);
    let (mut via, mut straight) = (vec![], vec![]);
    for run in 0..o.runs {
        let s = Subject::start(Kind::Homicro);
        register(s.addr, "bench-web", http).await;
        register(s.addr, "bench-bulk", bulk).await;
        // Taking turns: which goes first alternates by run.
        let order = if run % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for proxied in order {
            let (target, path) = if proxied {
                (s.addr, "/svc/bench-web/x")
            } else {
                (http, "/x")
            };
            let mut lat = latencies(target, path, n).await;
            let (a, b) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
            println!(
                "  run {run} {:<14} p50 {a:.3} ms  p99 {b:.3} ms",
                if proxied { "through /svc/" } else { "direct" }
            );
            if proxied {
                p50.push(a);
                p99.push(b);
            } else {
                direct50.push(a);
                direct99.push(b);
            }
        }
        let mut fwd = LocalProxy::start(s.addr, "bench-bulk");
        let port = fwd.port().await;
        for proxied in order {
            let addr = if proxied {
                SocketAddr::from(([127, 0, 0, 1], port))
            } else {
                bulk
            };
            let rate = drain(addr).await / f64::from(1 << 20);
            println!(
                "  run {run} {:<14} {rate:.0} MB/s",
                if proxied { "homicro proxy" } else { "direct" }
            );
            if proxied {
                via.push(rate);
            } else {
                straight.push(rate);
            }
        }
        fwd.stop();
    }
    let (p50, p99, d50, d99) = (median(p50), median(p99), median(direct50), median(direct99));
    let added = p50 - d50;
    let ok = added <= 0.3;
    println!(
        "  median: through /svc/ p50 {p50:.3} ms p99 {p99:.3} ms; direct p50 {d50:.3} ms p99 {d99:.3} ms; added p50 {added:.3} ms (target ≤ 0.3 ms: {})",
        verdict(ok)
    );
    let (via, straight) = (median(via), median(straight));
    let r = via / straight;
    println!(
        "  median: homicro proxy {via:.0} MB/s, direct {straight:.0} MB/s: {r:.2} (target ≥ 0.8: {})",
        verdict(r >= 0.8)
    );
    let ms = |v: f64| format!("{v:.3} ms");
    report.add(Row {
        item: "11",
        figure: format!(
            "/svc/ proxy p50 at 1,000 req/s (direct {}; p99 {} against {})",
            ms(d50),
            ms(p99),
            ms(d99)
        ),
        homicro: ms(p50),
        bus: "–".into(),
        mosquitto: "–".into(),
        ratio: format!("+{} ms", ms(added).trim_end_matches(" ms")),
        target: format!("≤ +0.3 ms: **{}**", verdict(ok)),
    });
    report.add(Row {
        item: "11",
        figure: format!("{mb} MB through `homicro proxy`, MB/s (direct {straight:.0})"),
        homicro: format!("{via:.0}"),
        bus: "–".into(),
        mosquitto: "–".into(),
        ratio: format!("{r:.2} (proxy / direct)"),
        target: format!("≥ 0.8: **{}**", verdict(r >= 0.8)),
    });
}

/// An HTTP/1.1 server answering every request with `ok` (keep-alive).
pub async fn http_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                loop {
                    // A request: lines up to the empty one (no bodies).
                    line.clear();
                    match r.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if w.write_all(resp).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}

/// A TCP server writing `bytes` to each connection, then closing it.
async fn bulk_upstream(bytes: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 1 << 16];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    addr
}

/// Registers NAME at `at` through serve's HTTP API (from loopback: admin).
pub async fn register(serve: SocketAddr, name: &str, at: SocketAddr) {
    let body = format!(
        r#"{{"name":"{name}","host":"127.0.0.1","port":{},"scheme":"http"}}"#,
        at.port()
    );
    let req = format!(
        "PUT /register HTTP/1.1\r\nhost: h\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(serve).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 20"), "register {name}: {resp}");
}

/// `n` GETs of `path` on one keep-alive connection, one a millisecond; the
/// latency of each in ms.
async fn latencies(addr: SocketAddr, path: &str, n: usize) -> Vec<f64> {
    latencies_of(addr, &format!("GET {path} HTTP/1.1\r\nhost: h\r\n\r\n"), n).await
}

/// `n` times the request `req` (without a body) on one keep-alive
/// connection, one a millisecond; the latency of each in ms.
pub async fn latencies_of(addr: SocketAddr, req: &str, n: usize) -> Vec<f64> {
    let s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(n);
    let mut line = String::new();
    for _ in 0..n {
        tick.tick().await;
        let t = Instant::now();
        w.write_all(req.as_bytes()).await.unwrap();
        let mut len = 0;
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// Bytes per second read from `addr` until it closes.
async fn drain(addr: SocketAddr) -> f64 {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    total as f64 / t.elapsed().as_secs_f64()
}

/// `homicro proxy QUERY` against serve at `serve`.
struct LocalProxy {
    child: Child,
}

impl LocalProxy {
    fn start(serve: SocketAddr, query: &str) -> LocalProxy {
        let child = Command::new(env!("CARGO_BIN_EXE_homicro"))
            .args(["proxy", "--broker", &format!("mqtt://{serve}"), query])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("homicro proxy");
        LocalProxy { child }
    }

    /// The port it printed ("proxying 127.0.0.1:PORT -> QUERY").
    async fn port(&mut self) -> u16 {
        let out = self.child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
            line
        })
        .await
        .unwrap();
        line.split_whitespace()
            .nth(1)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("homicro proxy said {line:?}"))
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
