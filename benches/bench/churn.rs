//! Item 8, churn: M services re-publish their record every second for T
//! seconds (10 connections, QoS 1, retained) while a watcher follows
//! `services/+` (and, with the registry, `events/+`): the broker's CPU, and
//! for homicro the events that never came. One run per subject.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::load::{self, SERVICES, record};
use crate::report::{Report, Row, int, ratio};
use crate::subject::{ALL, Subject};
use crate::{Opts, wire};

pub async fn run(o: &Opts, report: &mut Report) {
    let (m, secs) = (o.n(1000, 100), o.n(30, 3) as u64);
    println!("\n## 8. Churn: {m} services re-register every second for {secs} s (one run each)");
    let mut share = [0.0; 3];
    let mut lost = 0;
    for kind in ALL {
        let s = Subject::start(kind);
        let mut w = load::watcher(s.addr, "watch", kind.registry()).await;
        let counter = tokio::spawn(async move {
            let mut events = 0u64;
            while let Some(p) = w.rd.next_within(Duration::from_secs(3)).await {
                if let Some((topic, _)) = p.publish() {
                    events += topic.starts_with(b"homicro/events/") as u64;
                }
            }
            events
        });
        let clients = wire::connect_many(s.addr, "churn", 10).await;
        let (cpu0, t0) = (s.cpu(), Instant::now());
        let published = Arc::new(AtomicU64::new(0));
        let per = m.div_ceil(10);
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, client)| {
                let published = published.clone();
                tokio::spawn(async move {
                    let (mut wr, acks) = client.drain_acks();
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    let mut pkid = 0u16;
                    for _ in 0..secs {
                        tick.tick().await;
                        let mut buf = Vec::new();
                        for i in c * per..((c + 1) * per).min(m) {
                            pkid = pkid % 65535 + 1;
                            let topic = format!("{SERVICES}c{i}");
                            wire::publish(
                                &mut buf,
                                &topic,
                                record(i, "").as_bytes(),
                                true,
                                true,
                                pkid,
                            );
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                        wr.write_all(&buf).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    acks.abort();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (wall, cpu) = (t0.elapsed(), s.cpu() - cpu0);
        let events = counter.await.unwrap();
        let pubs = published.load(Ordering::Relaxed);
        share[kind as usize] = cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
        if kind.registry() {
            lost = pubs.saturating_sub(events);
            println!(
                "  {:<10} CPU {:>5.1}% of one core; {pubs} publishes, {events} events (registered + updated), lost {lost}",
                kind.label(),
                share[kind as usize]
            );
        } else {
            println!(
                "  {:<10} CPU {:>5.1}% of one core",
                kind.label(),
                share[kind as usize]
            );
        }
    }
    let pc = |v: f64| format!("{v:.1}%");
    report.add(Row {
        item: "8",
        figure: format!(
            "churn: {m} services re-registering every second, CPU of one core (homicro: {} events lost)",
            int(lost as f64)
        ),
        homicro: pc(share[0]),
        bus: pc(share[1]),
        mosquitto: pc(share[2]),
        ratio: ratio(share[0], share[2]),
        target: String::new(),
    });
}
