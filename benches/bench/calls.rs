//! Item 12, calls through the hub (issue 12): the round trip of a call at
//! 1,000 calls/s, against the same request/response made by hand, in the
//! same run.
//!
//! (a) MQTT: a caller publishes `homicro/call/bench-rpc/bench/answers/SEQ`
//!     (the 3.1.1 form) every millisecond; a responder subscribed to
//!     `homicro/rpc/bench-rpc/+` answers on `homicro/reply/ID`; the caller
//!     gets `bench/answers/SEQ/200`. By hand: the caller publishes
//!     `bench/req/SEQ`, the responder answers on `bench/answers/SEQ/200`,
//!     on homicro's bus and on Mosquitto. Same clients, same legs
//!     (caller → broker → responder → broker → caller).
//! (b) Long poll: `POST /call/bench-poll` every millisecond on one
//!     keep-alive connection, answered by two pollers (`GET /jobs/…`,
//!     `POST /jobs/ID`), against the same POST to an HTTP server directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};

use crate::report::{Report, Row, median, pct, verdict};
use crate::subject::{Kind, Subject};
use crate::{Opts, hub, wire};

pub async fn run(o: &Opts, report: &mut Report) {
    let n = o.n(10_000, 1_000);
    println!(
        "\n## 12. Calls: {n} calls at 1,000/s through the hub (MQTT and long poll) and by hand"
    );
    let http = hub::http_upstream().await;
    // p50s and p99s: hub over MQTT, by hand on homicro, by hand on
    // Mosquitto, long poll, direct HTTP.
    let mut fig: [(Vec<f64>, Vec<f64>); 5] = Default::default();
    let label = [
        "hub, MQTT",
        "by hand, homicro",
        "by hand, mosquitto",
        "hub, long poll",
        "HTTP, direct",
    ];
    for run in 0..o.runs {
        let s = Subject::start(Kind::Homicro);
        let m = Subject::start(Kind::Mosquitto);
        hub::register(s.addr, "bench-rpc", http).await;
        hub::register(s.addr, "bench-poll", http).await;
        let pollers: Vec<_> = (0..2).map(|_| tokio::spawn(poller(s.addr))).collect();
        let order: Vec<usize> = if run % 2 == 0 {
            vec![0, 1, 2, 3, 4]
        } else {
            vec![4, 3, 2, 1, 0]
        };
        for i in order {
            let mut lat = match i {
                0 => mqtt_round_trips(s.addr, true, n).await,
                1 => mqtt_round_trips(s.addr, false, n).await,
                2 => mqtt_round_trips(m.addr, false, n).await,
                3 => hub::latencies_of(s.addr, &post("/call/bench-poll"), n).await,
                _ => hub::latencies_of(http, &post("/x"), n).await,
            };
            let (a, b) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
            println!("  run {run} {:<20} p50 {a:.3} ms  p99 {b:.3} ms", label[i]);
            fig[i].0.push(a);
            fig[i].1.push(b);
        }
        for p in pollers {
            p.abort();
        }
    }
    let med: Vec<(f64, f64)> = fig
        .iter()
        .map(|(a, b)| (median(a.clone()), median(b.clone())))
        .collect();
    let mqtt_ratio = med[0].1 / med[2].1;
    let mqtt_ok = mqtt_ratio <= 1.5;
    let poll_added = med[3].1 - med[4].1;
    let poll_ok = med[3].1 <= 1.0;
    for (i, (a, b)) in med.iter().enumerate() {
        println!("  median {:<20} p50 {a:.3} ms  p99 {b:.3} ms", label[i]);
    }
    println!(
        "  hub MQTT p99 / by hand on mosquitto {mqtt_ratio:.2} (target ≤ 1.5: {}); long poll p99 {:.3} ms, {poll_added:+.3} ms over direct HTTP (target ≤ 1 ms: {})",
        verdict(mqtt_ok),
        med[3].1,
        verdict(poll_ok)
    );
    let ms = |v: f64| format!("{v:.3} ms");
    report.add(Row {
        item: "12",
        figure: format!(
            "call round trip p99 over MQTT, 1,000/s (p50 {}; by hand on homicro's bus {})",
            ms(med[0].0),
            ms(med[1].1)
        ),
        homicro: ms(med[0].1),
        bus: "–".into(),
        mosquitto: format!("{} (by hand)", ms(med[2].1)),
        ratio: format!("{mqtt_ratio:.2}"),
        target: format!("≤ 1.5: **{}**", verdict(mqtt_ok)),
    });
    report.add(Row {
        item: "12",
        figure: format!(
            "call round trip p99 over the long poll, 1,000/s (p50 {}; direct HTTP p99 {})",
            ms(med[3].0),
            ms(med[4].1)
        ),
        homicro: ms(med[3].1),
        bus: "–".into(),
        mosquitto: "–".into(),
        ratio: format!("{poll_added:+.3} ms"),
        target: format!("≤ 1 ms: **{}**", verdict(poll_ok)),
    });
}

fn post(path: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n")
}

/// `n` calls, one a millisecond, from one connection; the round trip of
/// each in ms. `hub`: through `homicro/call/`; otherwise by hand.
async fn mqtt_round_trips(addr: SocketAddr, hub: bool, n: usize) -> Vec<f64> {
    let tag = if hub { "hub" } else { "hand" };
    let mut responder = wire::Client::connect(addr, &format!("bench-{tag}-responder"))
        .await
        .unwrap();
    let filter = if hub {
        "homicro/rpc/bench-rpc/+"
    } else {
        "bench/req/+"
    };
    responder.subscribe(&[filter]).await;
    let respond = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(p) = responder.rd.next().await {
            let Some((topic, _)) = p.publish() else {
                continue;
            };
            let last = topic.rsplit(|b| *b == b'/').next().unwrap_or(b"");
            let last = String::from_utf8_lossy(last);
            let reply = if hub {
                format!("homicro/reply/{last}")
            } else {
                format!("bench/answers/{last}/200")
            };
            out.clear();
            wire::publish(&mut out, &reply, b"ok", false, false, 0);
            if responder.wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let mut caller = wire::Client::connect(addr, &format!("bench-{tag}-caller"))
        .await
        .unwrap();
    caller.subscribe(&["bench/answers/+/+"]).await;
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let mut wr = caller.wr;
    let send = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut out = Vec::new();
            for (i, at) in sent.iter().enumerate() {
                tick.tick().await;
                let topic = if hub {
                    format!("homicro/call/bench-rpc/bench/answers/{i}")
                } else {
                    format!("bench/req/{i}")
                };
                out.clear();
                wire::publish(&mut out, &topic, b"x", false, false, 0);
                at.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                wr.write_all(&out).await.unwrap();
            }
            wr
        })
    };
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        let Some(p) = caller.rd.next_within(Duration::from_secs(10)).await else {
            panic!("{tag}: {} of {n} answers came", lat.len());
        };
        let Some((topic, _)) = p.publish() else {
            continue;
        };
        let now = epoch.elapsed().as_nanos() as u64;
        let seq: usize = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| t.split('/').nth(2))
            .and_then(|s| s.parse().ok())
            .expect("bench/answers/SEQ/STATUS");
        let at = sent[seq].load(Ordering::Relaxed);
        lat.push(now.saturating_sub(at) as f64 / 1e6);
    }
    let _ = send.await;
    respond.abort();
    lat
}

/// A long-polling instance of `bench-poll`: takes a job, answers `ok`,
/// polls again, on one keep-alive connection.
async fn poller(serve: SocketAddr) {
    let s = TcpStream::connect(serve).await.unwrap();
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        w.write_all(b"GET /jobs/bench-poll?wait=25s HTTP/1.1\r\nhost: h\r\n\r\n")
            .await
            .unwrap();
        let (status, id, len) = head(&mut r, &mut line).await;
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
        if status != 200 {
            continue;
        }
        let answer = format!(
            "POST /jobs/{id} HTTP/1.1\r\nhost: h\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
        );
        w.write_all(answer.as_bytes()).await.unwrap();
        let (_, _, len) = head(&mut r, &mut line).await;
        let mut body = vec![0; len];
        r.read_exact(&mut body).await.unwrap();
    }
}

/// A response's status, `x-homicro-call` and content length.
async fn head(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &mut String,
) -> (u16, String, usize) {
    let (mut status, mut id, mut len) = (0, String::new(), 0);
    loop {
        line.clear();
        if r.read_line(line).await.unwrap() == 0 {
            panic!("serve closed the poller's connection");
        }
        if line == "\r\n" {
            return (status, id, len);
        }
        let lower = line.to_ascii_lowercase();
        if let Some(s) = lower.strip_prefix("http/1.1 ") {
            status = s[..3].parse().unwrap_or(0);
        } else if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        } else if let Some(v) = lower.strip_prefix("x-homicro-call:") {
            id = v.trim().to_string();
        }
    }
}
