//! Item 2, propagation at 1,000 msg/s: one connection publishes a record every
//! millisecond (retained, QoS 1, cycling over 1,000 names: registrations,
//! then updates), another watches `homicro/services/+`; the latency of
//! each message from its write to its arrival.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::load::{self, SERVICES};
use crate::report::{Report, Row, median, pct, ratio, verdict};
use crate::subject::{ALL, Kind, Subject};
use crate::{Opts, wire};

pub async fn run(o: &Opts, report: &mut Report) {
    let secs = o.n(10, 1);
    let n = secs * 1000;
    println!(
        "\n## 2. Propagation: {n} records at 1,000 msg/s from one connection to a watcher on another"
    );
    let (mut p50, mut p99) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    for run in 0..o.runs {
        for kind in Kind::order(&ALL, run) {
            let s = Subject::start(kind);
            let (mut lat, lost) = once(&s, n).await;
            dump(kind, run, &lat);
            let i = kind as usize;
            p50[i].push(pct(&mut lat, 0.5));
            p99[i].push(pct(&mut lat, 0.99));
            println!(
                "  run {run} {:<10} p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms{}",
                kind.label(),
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.99),
                pct(&mut lat, 1.0),
                if lost > 0 {
                    format!("  ({lost} never arrived)")
                } else {
                    String::new()
                }
            );
        }
    }
    let m = |v: &[Vec<f64>; 3], k: Kind| median(v[k as usize].clone());
    let (h, q) = (m(&p99, Kind::Homicro), m(&p99, Kind::Mosquitto));
    let ok = h <= q;
    println!(
        "  median p99: homicro {h:.3} ms, bus alone {:.3} ms, mosquitto {q:.3} ms; homicro / mosquitto {:.2}; target p99 ≤ mosquitto's: {}",
        m(&p99, Kind::Bus),
        h / q,
        verdict(ok)
    );
    let ms = |v: f64| format!("{v:.2} ms");
    for (what, v, target) in [
        ("p50", &p50, String::new()),
        ("p99", &p99, format!("≤ mosquitto: **{}**", verdict(ok))),
    ] {
        report.add(Row {
            item: "2",
            figure: format!("propagation {what}, 1,000 msg/s"),
            homicro: ms(m(v, Kind::Homicro)),
            bus: ms(m(v, Kind::Bus)),
            mosquitto: ms(m(v, Kind::Mosquitto)),
            ratio: ratio(m(v, Kind::Homicro), m(v, Kind::Mosquitto)),
            target,
        });
    }
}

/// Latencies in ms of `n` records, and how many never arrived.
async fn once(s: &Subject, n: usize) -> (Vec<f64>, usize) {
    let mut w = load::watcher(s.addr, "watch", false).await;
    let publisher = wire::Client::connect(s.addr, "pub").await.unwrap();
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let pubs = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let (mut wr, acks) = publisher.drain_acks();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut buf = Vec::new();
            for seq in 0..n {
                tick.tick().await;
                buf.clear();
                let payload = format!(r#"{{"host":"10.0.0.1","port":8080,"seq":{seq}}}"#);
                let topic = format!("{SERVICES}lat-{}", seq % 1000);
                wire::publish(
                    &mut buf,
                    &topic,
                    payload.as_bytes(),
                    true,
                    true,
                    (seq % 65535 + 1) as u16,
                );
                sent[seq].store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                tokio::io::AsyncWriteExt::write_all(&mut wr, &buf)
                    .await
                    .unwrap();
            }
            (wr, acks)
        })
    };
    // The watcher reads on a runtime worker, as the publisher writes: read
    // in `block_on`'s own thread, each delivery cost one more thread hop
    // in the bench (the I/O worker waking that thread), for every subject.
    let watch = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        let mut got = vec![false; n];
        while lat.len() < n {
            let Some(p) = w.rd.next_within(Duration::from_secs(2)).await else {
                break;
            };
            let at = epoch.elapsed().as_nanos() as u64;
            let Some((topic, payload)) = p.publish() else {
                continue;
            };
            if !topic.starts_with(b"homicro/services/lat-") {
                continue;
            }
            let Some(seq) = seq_of(payload).filter(|s| *s < n && !got[*s]) else {
                continue;
            };
            got[seq] = true;
            let t = sent[seq].load(Ordering::Relaxed);
            lat.push(at.saturating_sub(t) as f64 / 1e6);
        }
        (lat, w)
    });
    let (lat, _w) = watch.await.unwrap();
    let _ = pubs.await;
    let lost = n - lat.len();
    (lat, lost)
}

/// With HOMICRO_BENCH_DUMP=DIR, each run's latencies in send order, one
/// per line (ms), to DIR/propagation-KIND-RUN.txt: where the tail sits in
/// time tells a periodic stall (a timer, a flush) from random ones.
fn dump(kind: Kind, run: usize, lat: &[f64]) {
    let Ok(dir) = std::env::var("HOMICRO_BENCH_DUMP") else {
        return;
    };
    let text: String = lat.iter().map(|l| format!("{l:.4}\n")).collect();
    let path = format!(
        "{dir}/propagation-{}-{run}.txt",
        kind.label().replace(' ', "-")
    );
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("HOMICRO_BENCH_DUMP: {path}: {e}");
    }
}

/// The `"seq":N` of a payload.
fn seq_of(payload: &[u8]) -> Option<usize> {
    let at = payload.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}
