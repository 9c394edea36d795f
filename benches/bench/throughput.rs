//! Item 1, registrations per second: K connected clients publish N retained
//! records (QoS 1, pipelined); the time until a watcher saw every record
//! and, with the registry, every `registered` event.

use std::time::Duration;

use tokio::time::Instant;

use crate::load;
use crate::report::{Report, Row, int, median, ratio, verdict};
use crate::subject::{ALL, Kind, Subject};
use crate::{Opts, wire};

pub async fn run(o: &Opts, report: &mut Report) {
    let (n, k) = (o.n(50_000, 2_000), 50);
    println!(
        "\n## 1. Registrations: {k} connected clients publish {n} retained records (QoS 1), until a watcher saw all (homicro: and every `registered` event)"
    );
    // Per subject: (rate until all visible and announced, rate until all
    // visible, serve CPU ms per 1,000).
    let mut all = [vec![], vec![], vec![]];
    let mut visible = [vec![], vec![], vec![]];
    let mut cpu = [vec![], vec![], vec![]];
    for run in 0..o.runs {
        for kind in Kind::order(&ALL, run) {
            let s = Subject::start(kind);
            let tag = format!("r{run}");
            let mut w = load::watcher(s.addr, "watch", kind.registry()).await;
            let clients = wire::connect_many(s.addr, "pub", k).await;
            let (t, cpu0) = (Instant::now(), s.cpu());
            let publishers = load::publish(clients, &tag, n, "");
            let watch = load::watch(&mut w.rd, &tag, n, kind.registry(), Duration::from_secs(30));
            let (publishers, seen) = tokio::join!(publishers, watch);
            let took = t.elapsed();
            let used = s.cpu() - cpu0;
            drop(publishers);
            let i = kind as usize;
            let rate = |d: Option<Duration>| d.map_or(0.0, |d| n as f64 / d.as_secs_f64());
            all[i].push(rate(seen.all));
            visible[i].push(rate(seen.records));
            cpu[i].push(used.as_secs_f64() * 1000.0 / (n as f64 / 1000.0));
            println!(
                "  run {run} {:<10} {:>8} /s (visible: {:>8} /s)  {:.2} s, CPU {:.1} ms per 1,000",
                kind.label(),
                int(rate(seen.all)),
                int(rate(seen.records)),
                took.as_secs_f64(),
                cpu[i].last().unwrap()
            );
        }
    }
    let m = |v: &[Vec<f64>; 3], k: Kind| median(v[k as usize].clone());
    let (h, b, q) = (
        m(&all, Kind::Homicro),
        m(&all, Kind::Bus),
        m(&all, Kind::Mosquitto),
    );
    let ok = h >= 1.5 * q;
    println!(
        "  median: homicro {} /s, bus alone {} /s, mosquitto {} /s; homicro / mosquitto {:.2}; target ≥ 1.5 × mosquitto: {}",
        int(h),
        int(b),
        int(q),
        h / q,
        verdict(ok)
    );
    report.add(Row {
        item: "1",
        figure: format!(
            "registrations/s, {k} clients, {n} records (homicro: visible and announced)"
        ),
        homicro: int(h),
        bus: int(b),
        mosquitto: int(q),
        ratio: ratio(h, q),
        target: format!("≥ 1.5 × mosquitto: **{}**", verdict(ok)),
    });
    let (hv, bv, qv) = (
        m(&visible, Kind::Homicro),
        m(&visible, Kind::Bus),
        m(&visible, Kind::Mosquitto),
    );
    report.add(Row {
        item: "1",
        figure: "the same, until every record was visible".into(),
        homicro: int(hv),
        bus: int(bv),
        mosquitto: int(qv),
        ratio: ratio(hv, qv),
        target: String::new(),
    });
    let (hc, bc, qc) = (
        m(&cpu, Kind::Homicro),
        m(&cpu, Kind::Bus),
        m(&cpu, Kind::Mosquitto),
    );
    report.add(Row {
        item: "1",
        figure: "broker CPU per 1,000 registrations".into(),
        homicro: format!("{hc:.1} ms"),
        bus: format!("{bc:.1} ms"),
        mosquitto: format!("{qc:.1} ms"),
        ratio: ratio(hc, qc),
        target: String::new(),
    });
}
