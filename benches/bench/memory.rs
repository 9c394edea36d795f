//! Item 4, resident memory holding N records (retained registrations,
//! no client connected), and item 7, its growth after M short-lived connections
//! (CONNECT, CONNACK, DISCONNECT, closed; 50 at a time, each its own
//! client id) on the same process.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::report::{Report, Row, int, median, ratio, verdict};
use crate::subject::{ALL, Kind, Subject};
use crate::{Opts, load, wire};

pub async fn run(o: &Opts, report: &mut Report, growth: bool) {
    let n = o.n(100_000, 5_000);
    let m = o.connections.unwrap_or(o.n(100_000, 2_000));
    println!("\n## 4. Memory: resident set holding {n} records (no client connected)");
    if growth {
        println!(
            "## 7. then after {m} short-lived connections, 50 at a time, each its own client id"
        );
    }
    let (mut held, mut anon, mut grew, mut rate) = (
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
    );
    for run in 0..o.runs {
        for kind in Kind::order(&ALL, run) {
            let s = Subject::start(kind);
            let idle = s.settled_rss(Duration::from_secs(2)).await;
            load::preload(&s, "p", n).await;
            let with = s.settled_rss(Duration::from_secs(10)).await;
            s.dump_smaps(&format!("run{run}-records"));
            let i = kind as usize;
            held[i].push(with);
            anon[i].push(s.status_mib("RssAnon"));
            let mut line = format!(
                "  run {run} {:<10} idle {idle:>6.1} MiB, with {n} records {with:>6.1} MiB (anonymous {:.1})",
                kind.label(),
                s.status_mib("RssAnon")
            );
            if growth {
                let t = Instant::now();
                let ok = short_lived(&s, m).await;
                let r = ok as f64 / t.elapsed().as_secs_f64();
                let after = s.settled_rss(Duration::from_secs(10)).await;
                s.dump_smaps(&format!("run{run}-after"));
                let g = (after / with - 1.0) * 100.0;
                grew[i].push(g);
                rate[i].push(r);
                line += &format!(
                    "; after {ok} of {m} connections ({} /s) {after:.1} MiB ({g:+.1}%)",
                    int(r)
                );
            }
            println!("{line}");
        }
    }
    let md = |v: &[Vec<f64>; 3], k: Kind| median(v[k as usize].clone());
    let (h, q) = (md(&held, Kind::Homicro), md(&held, Kind::Mosquitto));
    let ok = h <= 2.0 * q;
    println!(
        "  median with records: homicro {h:.1} MiB, bus alone {:.1} MiB, mosquitto {q:.1} MiB; homicro / mosquitto {:.2}; target ≤ 2 × mosquitto: {}",
        md(&held, Kind::Bus),
        h / q,
        verdict(ok)
    );
    let mib = |v: f64| format!("{v:.0} MiB");
    report.add(Row {
        item: "4",
        figure: format!("resident memory holding {} records", int(n as f64)),
        homicro: mib(h),
        bus: mib(md(&held, Kind::Bus)),
        mosquitto: mib(q),
        ratio: ratio(h, q),
        target: format!("≤ 2 × mosquitto: **{}**", verdict(ok)),
    });
    report.add(Row {
        item: "4",
        figure: "of which anonymous (heap)".into(),
        homicro: mib(md(&anon, Kind::Homicro)),
        bus: mib(md(&anon, Kind::Bus)),
        mosquitto: mib(md(&anon, Kind::Mosquitto)),
        ratio: ratio(md(&anon, Kind::Homicro), md(&anon, Kind::Mosquitto)),
        target: String::new(),
    });
    if growth {
        let g = md(&grew, Kind::Homicro);
        let pc = |v: f64| format!("{v:+.1}%");
        report.add(Row {
            item: "7",
            figure: format!(
                "memory growth after {} short-lived connections",
                int(m as f64)
            ),
            homicro: pc(g),
            bus: pc(md(&grew, Kind::Bus)),
            mosquitto: pc(md(&grew, Kind::Mosquitto)),
            ratio: String::new(),
            // Growth is what is looked for: memory given back (the 100,000
            // records' burst buffers, purged) is no failure.
            target: format!("grows at most 10%: **{}**", verdict(g <= 10.0)),
        });
        report.add(Row {
            item: "7",
            figure: "short-lived connections/s, 50 at a time".into(),
            homicro: int(md(&rate, Kind::Homicro)),
            bus: int(md(&rate, Kind::Bus)),
            mosquitto: int(md(&rate, Kind::Mosquitto)),
            ratio: ratio(md(&rate, Kind::Homicro), md(&rate, Kind::Mosquitto)),
            target: String::new(),
        });
    }
}

/// `m` clients, 50 at a time: CONNECT, CONNACK, DISCONNECT, close (RST,
/// so that no TIME_WAIT piles up here). Returns how many got a CONNACK
/// within 5 s.
async fn short_lived(s: &Subject, m: usize) -> usize {
    let addr = s.addr;
    let tasks: Vec<_> = (0..50)
        .map(|w| {
            tokio::spawn(async move {
                let mut ok = 0;
                for i in (w..m).step_by(50) {
                    let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
                        continue;
                    };
                    let _ = c.set_nodelay(true);
                    let _ = c
                        .write_all(&wire::connect_packet(&format!("short-{i}"), 60))
                        .await;
                    let mut ack = [0u8; 4];
                    let got =
                        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut ack)).await;
                    ok += matches!(got, Ok(Ok(_)) if ack[0] == 0x20) as usize;
                    let _ = c.write_all(&[0xe0, 0]).await;
                    #[allow(deprecated)]
                    let _ = c.set_linger(Some(Duration::ZERO));
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    ok
}
