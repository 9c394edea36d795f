//! Item 3, connection storm: N clients connect at once (a task each, all
//! started together: as concurrent as the machine allows), each sends a
//! CONNECT (3.1.1, clean session, keepalive 60 s, its own client id) and
//! waits for its CONNACK; every client stays connected until all are done.
//! Connections per second = CONNACKs / time until the last one.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::report::{Report, Row, int, median, pct, ratio, verdict};
use crate::subject::{ALL, Kind, Subject};
use crate::{Opts, wire};

/// How one client fared.
enum Outcome {
    /// CONNACK 0 after this long from the storm's start.
    Accepted(Duration, TcpStream),
    /// TCP connect failed.
    NoConnection,
    /// Connected, but no CONNACK (or a refusal) before the limit.
    NoConnack,
}

pub async fn run(o: &Opts, report: &mut Report) {
    let n = o.storm.unwrap_or(o.n(10_000, 1_000));
    let limit = Duration::from_secs(o.n(30, 10) as u64);
    println!(
        "\n## 3. Connection storm: {n} clients connect at once; CONNACKs per second until the last, and CONNECTs not answered within {} s",
        limit.as_secs()
    );
    let mut rates = [vec![], vec![], vec![]];
    let mut missing = [vec![], vec![], vec![]];
    for run in 0..o.runs {
        for kind in Kind::order(&ALL, run) {
            let s = Subject::start(kind);
            let (cpu0, kernel0) = (s.cpu(), tcp_counters());
            let (rate, answered, no_conn, p50, p99, took) = storm(s.addr, n, limit, run).await;
            let cpu = s.cpu() - cpu0;
            let (overflows, retrans) = match (kernel0, tcp_counters()) {
                (Some([o0, r0]), Some([o, r])) => (o - o0, r - r0),
                _ => (0, 0),
            };
            let i = kind as usize;
            rates[i].push(rate);
            missing[i].push((n - answered) as f64);
            println!(
                "  run {run} {:<10} {:>7} /s  {answered} of {n} CONNACKs in {:.2} s (half by {:.0} ms, 99% by {:.0} ms); not answered {} (TCP connect failed: {no_conn}); broker CPU {:.2} s; kernel: {overflows} listen-queue overflows, {retrans} SYN retransmits",
                kind.label(),
                int(rate),
                took.as_secs_f64(),
                p50,
                p99,
                n - answered,
                cpu.as_secs_f64()
            );
        }
    }
    let m = |v: &[Vec<f64>; 3], k: Kind| median(v[k as usize].clone());
    let (h, q) = (m(&rates, Kind::Homicro), m(&rates, Kind::Mosquitto));
    let ok = h >= q;
    println!(
        "  median: homicro {} /s, bus alone {} /s, mosquitto {} /s; homicro / mosquitto {:.2}; target ≥ mosquitto: {}",
        int(h),
        int(m(&rates, Kind::Bus)),
        int(q),
        h / q,
        verdict(ok)
    );
    report.add(Row {
        item: "3",
        figure: format!("connection storm: {n} at once, connections/s"),
        homicro: int(h),
        bus: int(m(&rates, Kind::Bus)),
        mosquitto: int(q),
        ratio: ratio(h, q),
        target: format!("≥ mosquitto: **{}**", verdict(ok)),
    });
    report.add(Row {
        item: "3",
        figure: format!("CONNECTs not answered within {} s", limit.as_secs()),
        homicro: int(m(&missing, Kind::Homicro)),
        bus: int(m(&missing, Kind::Bus)),
        mosquitto: int(m(&missing, Kind::Mosquitto)),
        ratio: String::new(),
        target: String::new(),
    });
}

/// The kernel's `ListenOverflows` and `TCPSynRetrans` counters (all of
/// the machine's TCP: other work shows up too).
fn tcp_counters() -> Option<[u64; 2]> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let get = |key: &str| {
        let i = names.split_whitespace().position(|n| n == key)?;
        values.split_whitespace().nth(i)?.parse().ok()
    };
    Some([get("ListenOverflows")?, get("TCPSynRetrans")?])
}

/// (connections/s, CONNACKs, failed TCP connects, p50 and p99 ms, time to
/// the last CONNACK).
async fn storm(
    addr: SocketAddr,
    n: usize,
    limit: Duration,
    run: usize,
) -> (f64, usize, usize, f64, f64, Duration) {
    let t0 = Instant::now();
    let deadline = t0 + limit;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let connect = wire::connect_packet(&format!("storm{run}-{i}"), 60);
            tokio::spawn(async move {
                let Ok(Ok(mut s)) =
                    tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await
                else {
                    return Outcome::NoConnection;
                };
                let _ = s.set_nodelay(true);
                if s.write_all(&connect).await.is_err() {
                    return Outcome::NoConnack;
                }
                let mut ack = [0u8; 4];
                match tokio::time::timeout_at(deadline, s.read_exact(&mut ack)).await {
                    Ok(Ok(_)) if ack[0] == 0x20 && ack[3] == 0 => {
                        Outcome::Accepted(t0.elapsed(), s)
                    }
                    _ => Outcome::NoConnack,
                }
            })
        })
        .collect();
    let (mut times, mut conns, mut no_conn) = (Vec::with_capacity(n), Vec::with_capacity(n), 0);
    for t in tasks {
        match t.await.unwrap() {
            Outcome::Accepted(d, s) => {
                times.push(d.as_secs_f64() * 1000.0);
                conns.push(s);
            }
            Outcome::NoConnection => no_conn += 1,
            Outcome::NoConnack => {}
        }
    }
    let answered = times.len();
    if answered == 0 {
        return (0.0, 0, no_conn, f64::NAN, f64::NAN, limit);
    }
    let last = Duration::from_secs_f64(pct(&mut times, 1.0) / 1000.0);
    let (p50, p99) = (pct(&mut times, 0.5), pct(&mut times, 0.99));
    // Close with RST: no TIME_WAIT piles up across runs.
    for s in &conns {
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
    }
    drop(conns);
    (
        answered as f64 / last.as_secs_f64(),
        answered,
        no_conn,
        p50,
        p99,
        last,
    )
}
