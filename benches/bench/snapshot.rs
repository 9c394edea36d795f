//! Item 5, snapshot: a newcomer subscribes to `homicro/services/+` (QoS 0) on a
//! broker holding N records: the time until it holds all of them.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::report::{Report, Row, int, median, ratio, verdict};
use crate::subject::{ALL, Kind, Subject};
use crate::{Opts, load, wire};

pub async fn run(o: &Opts, report: &mut Report) {
    let sizes: &[usize] = if o.quick {
        &[1_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    println!("\n## 5. Snapshot: a newcomer subscribes to homicro/services/+ (QoS 0)");
    for &n in sizes {
        // All three hold the records at once, so that runs interleave.
        let mut subjects = Vec::new();
        for kind in ALL {
            let s = Subject::start(kind);
            load::preload(&s, "p", n).await;
            subjects.push(s);
        }
        let (mut ms, mut got_min) = ([vec![], vec![], vec![]], [usize::MAX; 3]);
        for run in 0..o.runs {
            for kind in Kind::order(&ALL, run) {
                let s = &subjects[kind as usize];
                let (took, got) = newcomer(s, run, n).await;
                ms[kind as usize].push(took.as_secs_f64() * 1000.0);
                got_min[kind as usize] = got_min[kind as usize].min(got);
            }
        }
        let md = |k: Kind| median(ms[k as usize].clone());
        for k in ALL {
            println!(
                "  N={n:<7} {:<10} {:>8.1} ms, got {} of {n}",
                k.label(),
                md(k),
                got_min[k as usize]
            );
        }
        let complete = got_min.iter().all(|g| *g == n);
        let h = md(Kind::Homicro);
        report.add(Row {
            item: "5",
            figure: format!(
                "snapshot of {} records{}",
                int(n as f64),
                if complete {
                    ""
                } else {
                    " (INCOMPLETE somewhere: see above)"
                }
            ),
            homicro: format!("{h:.1} ms"),
            bus: format!("{:.1} ms", md(Kind::Bus)),
            mosquitto: format!("{:.1} ms", md(Kind::Mosquitto)),
            ratio: ratio(h, md(Kind::Mosquitto)),
            target: if n == 100_000 {
                let ok = got_min[0] == n && h < 2000.0;
                format!("complete in < 2 s: **{}**", verdict(ok))
            } else {
                String::new()
            },
        });
    }
}

/// Subscribes a new client; (time to the last record, records got). Ends
/// at all N, or after 2 s without a message.
async fn newcomer(s: &Subject, run: usize, n: usize) -> (Duration, usize) {
    let mut c = wire::Client::connect(s.addr, &format!("new{run}"))
        .await
        .unwrap();
    let t = Instant::now();
    c.wr.write_all(&wire::subscribe_packet(&["homicro/services/+"]))
        .await
        .unwrap();
    let (mut got, mut last) = (0, Duration::ZERO);
    while got < n
        && let Some(p) = c.rd.next_within(Duration::from_secs(2)).await
    {
        if p.kind() == wire::PUBLISH {
            got += 1;
            last = t.elapsed();
        }
    }
    (last, got)
}
