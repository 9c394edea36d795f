//! Item 6, expiry: N records with `ttl` 2 s, never refreshed: how late each
//! `expired` event comes after its record's `registered` event + 2 s
//! (homicro only: nothing else expires records).

use std::time::Duration;

use tokio::time::Instant;

use crate::load::{self, EVENTS, contains};
use crate::report::{Report, Row, median, pct, verdict};
use crate::subject::{Kind, Subject};
use crate::{Opts, wire};

pub async fn run(o: &Opts, report: &mut Report) {
    let n = o.n(10_000, 1_000);
    println!("\n## 6. Expiry: {n} records with ttl 2 s, no refresh (homicro only)");
    let (mut p50s, mut p99s, mut maxs) = (vec![], vec![], vec![]);
    for run in 0..o.runs {
        let s = Subject::start(Kind::Homicro);
        let mut w = wire::Client::connect(s.addr, "watch").await.unwrap();
        w.subscribe(&["homicro/events/+"]).await;
        let clients = wire::connect_many(s.addr, "pub", 20).await;
        let tag = format!("e{run}");
        let publishers = load::publish(clients, &tag, n, r#","ttl":2"#).await;
        let prefix = format!("{EVENTS}{tag}-");
        let mut registered: Vec<Option<Instant>> = vec![None; n];
        let mut late = Vec::with_capacity(n);
        while late.len() < n {
            let Some(p) = w.rd.next_within(Duration::from_secs(10)).await else {
                println!("  run {run}: only {} of {n} expiries seen", late.len());
                break;
            };
            let now = Instant::now();
            let Some((topic, payload)) = p.publish() else {
                continue;
            };
            let Some(i) = std::str::from_utf8(topic)
                .ok()
                .and_then(|t| t.strip_prefix(&prefix))
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < n)
            else {
                continue;
            };
            if contains(payload, b"\"registered\"") {
                registered[i] = Some(now);
            } else if contains(payload, b"\"expired\"")
                && let Some(t) = registered[i]
            {
                let after = now.duration_since(t).as_secs_f64() * 1000.0;
                late.push(after - 2000.0);
            }
        }
        drop(publishers);
        let (p50, p99, max) = (
            pct(&mut late, 0.5),
            pct(&mut late, 0.99),
            pct(&mut late, 1.0),
        );
        println!(
            "  run {run} lateness min {:.1} p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms",
            pct(&mut late, 0.0)
        );
        p50s.push(p50);
        p99s.push(p99);
        maxs.push(max);
    }
    let (p50, p99, max) = (median(p50s), median(p99s), median(maxs));
    let ok = p99 < 100.0;
    println!(
        "  median lateness p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms; target p99 < 100 ms: {}",
        verdict(ok)
    );
    report.add(Row {
        item: "6",
        figure: format!("expiry lateness p50 / p99 / max, {n} records, ttl 2 s"),
        homicro: format!("{p50:.1} / {p99:.1} / {max:.1} ms"),
        bus: "–".into(),
        mosquitto: "–".into(),
        ratio: String::new(),
        target: format!("p99 < 100 ms: **{}**", verdict(ok)),
    });
}
