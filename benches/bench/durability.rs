//! Item 10, durability: what the journal costs, and how fast what it kept
//! comes back.
//! (a) Registrations per second, item 1's workload, for homicro with the
//! journal on (a state dir in a tempdir on the machine's disk), homicro
//! with it off (`--state-dir ''`) and Mosquitto with `persistence true`
//! (its autosave at the default): the rate until a watcher saw every
//! record (homicro: and its `registered` event), as item 1, and until
//! every PUBACK came back as well (homicro with the journal: on disk).
//! (b) fsyncs per 10,000 registrations with the journal on, from
//! `homicro_journal_fsyncs_total` in /metrics before and after the burst.
//! (c) Restart: a broker filled with `n` records and `n` retained messages
//! on other topics (every PUBACK back) is stopped with SIGTERM; then the
//! time from starting it again on the same directory until it is online
//! (homicro: `homicro/registry` says "online"; Mosquitto: a CONNACK), and
//! until a newcomer subscribed to both holds all of them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::Opts;
use crate::load::{self, contains};
use crate::report::{Report, Row, int, median, ratio, verdict};
use crate::subject::{Kind, Store, Subject};
use crate::wire::{self, Client};

/// A message's topic and payload by its number.
type Message = dyn Fn(usize) -> (String, Vec<u8>);

/// The subjects of (a).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sub {
    On,
    Off,
    Persistent,
}

const SUBS: [Sub; 3] = [Sub::On, Sub::Off, Sub::Persistent];

impl Sub {
    fn label(self) -> &'static str {
        match self {
            Sub::On => "journal on",
            Sub::Off => "journal off",
            Sub::Persistent => "mosquitto persistent",
        }
    }

    fn kind(self) -> Kind {
        match self {
            Sub::Persistent => Kind::Mosquitto,
            _ => Kind::Homicro,
        }
    }
}

/// The retained messages of (c) are published here, `RETAINED{i}`.
const RETAINED: &str = "bench/retained/";

pub async fn run(o: &Opts, report: &mut Report) {
    rates(o, report).await;
    restarts(o, report).await;
}

async fn rates(o: &Opts, report: &mut Report) {
    let (n, k) = (o.n(50_000, 2_000), 50);
    println!(
        "\n## 10. Durability (a, b): {k} connected clients publish {} retained records (QoS 1), as in item 1; homicro with the journal on (state dir in {}) and off (state_dir = \"\"), Mosquitto with persistence true",
        int(n as f64),
        filesystem(&std::env::temp_dir())
    );
    // Per subject: rate until seen (and announced), rate until that and
    // every PUBACK, broker CPU ms per 1,000; fsyncs per 10,000 (journal on).
    let (mut seen, mut acked, mut cpu) = (
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
        [vec![], vec![], vec![]],
    );
    let mut fsyncs = vec![];
    for run in 0..o.runs {
        let mut order = SUBS.to_vec();
        order.rotate_left(run % SUBS.len());
        for sub in order {
            let kept = tempfile::tempdir().unwrap();
            let store = match sub {
                Sub::On => Store::At(kept.path().join("state")),
                Sub::Off => Store::Off,
                Sub::Persistent => Store::At(kept.path().to_path_buf()),
            };
            let s = Subject::start_stored(sub.kind(), store);
            let events = sub.kind().registry();
            let mut w = load::watcher(s.addr, "watch", events).await;
            let clients = wire::connect_many(s.addr, "pub", k).await;
            let tag = format!("d{run}");
            let prepared = prepare(clients, n, |i| {
                (
                    format!("{}{tag}-{i}", load::SERVICES),
                    load::record(i, "").into_bytes(),
                )
            });
            let f0 = metric_fsyncs(s.addr).await;
            let (t, cpu0) = (Instant::now(), s.cpu());
            let publish = send(prepared, Duration::from_secs(30));
            let watch = load::watch(&mut w.rd, &tag, n, events, Duration::from_secs(30));
            let (acks, visible) = tokio::join!(publish, watch);
            let used = s.cpu() - cpu0;
            let f1 = metric_fsyncs(s.addr).await;
            drop(acks.writers);
            let i = sub as usize;
            let rate = |d: Option<Duration>| d.map_or(0.0, |d| n as f64 / d.as_secs_f64());
            let until_acked = acks.last.map(|a| a - t);
            let both = visible.all.zip(until_acked).map(|(a, b)| a.max(b));
            seen[i].push(rate(visible.all));
            acked[i].push(rate(both));
            cpu[i].push(used.as_secs_f64() * 1000.0 / (n as f64 / 1000.0));
            let synced = match (sub, f0, f1) {
                (Sub::On, Some(a), Some(b)) => {
                    let per = (b - a) as f64 * 10_000.0 / n as f64;
                    fsyncs.push(per);
                    format!(", {} fsyncs ({per:.0} per 10,000)", b - a)
                }
                (Sub::On, ..) => ", fsyncs not read from /metrics".into(),
                _ => String::new(),
            };
            println!(
                "  run {run} {:<20} {:>8} /s seen{} (and acknowledged: {:>8} /s; {} of {n} PUBACKs), CPU {:.1} ms per 1,000{synced}",
                sub.label(),
                int(rate(visible.all)),
                if events { " and announced" } else { "" },
                int(rate(both)),
                acks.acks,
                cpu[i].last().unwrap()
            );
        }
    }
    let m = |v: &[Vec<f64>; 3], s: Sub| median(v[s as usize].clone());
    let figures = [
        ("until seen (homicro: and announced), as item 1", &seen),
        ("until seen and every PUBACK back", &acked),
    ];
    for (until, v) in figures {
        let (on, off, p) = (m(v, Sub::On), m(v, Sub::Off), m(v, Sub::Persistent));
        let (ok_off, ok_p) = (on >= 0.8 * off, on >= p);
        println!(
            "  median {until}: journal on {} /s, journal off {} /s, mosquitto persistent {} /s; on / off {:.2} (target ≥ 0.8: {}); on / mosquitto persistent {:.2} (target ≥ 1.0: {})",
            int(on),
            int(off),
            int(p),
            on / off,
            verdict(ok_off),
            on / p,
            verdict(ok_p)
        );
        report.add(Row {
            item: "10",
            figure: format!(
                "registrations/s {until}, {k} clients, {} records: journal on; mosquitto with persistence true",
                int(n as f64)
            ),
            homicro: int(on),
            bus: "–".into(),
            mosquitto: int(p),
            ratio: ratio(on, p),
            target: format!("≥ mosquitto persistent: **{}**", verdict(ok_p)),
        });
        report.add(Row {
            item: "10",
            figure: format!(
                "the same, journal on / journal off (state_dir = \"\": {} /s)",
                int(off)
            ),
            homicro: int(on),
            bus: "–".into(),
            mosquitto: "–".into(),
            ratio: format!("{} (on / off)", ratio(on, off)),
            target: format!("≥ 0.8 × journal off: **{}**", verdict(ok_off)),
        });
    }
    let (c_on, c_off, c_p) = (
        m(&cpu, Sub::On),
        m(&cpu, Sub::Off),
        m(&cpu, Sub::Persistent),
    );
    let f = median(fsyncs);
    println!(
        "  median broker CPU per 1,000: journal on {c_on:.1} ms, journal off {c_off:.1} ms, mosquitto persistent {c_p:.1} ms; fsyncs per 10,000 registrations (journal on): {f:.0}"
    );
    report.add(Row {
        item: "10",
        figure: format!(
            "broker CPU per 1,000 registrations, journal on (off: {c_off:.1} ms); mosquitto persistent"
        ),
        homicro: format!("{c_on:.1} ms"),
        bus: "–".into(),
        mosquitto: format!("{c_p:.1} ms"),
        ratio: ratio(c_on, c_p),
        target: String::new(),
    });
    report.add(Row {
        item: "10",
        figure: format!("fsyncs per 10,000 registrations, journal on ({k} clients pipelining)"),
        homicro: format!("{f:.0}"),
        bus: "–".into(),
        mosquitto: "–".into(),
        ratio: String::new(),
        target: String::new(),
    });
}

async fn restarts(o: &Opts, report: &mut Report) {
    let n = o.n(100_000, 5_000);
    println!(
        "\n## 10. Durability (c): restart holding {} records and as many retained messages (100 bytes, {RETAINED}N): filled (every PUBACK back), SIGTERM, started on the same directory; until online (homicro: homicro/registry \"online\"; mosquitto: CONNACK) and until a newcomer holds all",
        int(n as f64)
    );
    const KINDS: [Kind; 2] = [Kind::Homicro, Kind::Mosquitto];
    let (mut up, mut all) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    let (mut fill_rec, mut fill_ret) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    let (mut sync_rec, mut sync_ret) = (vec![], vec![]);
    for run in 0..o.runs {
        let mut order = KINDS.to_vec();
        order.rotate_left(run % KINDS.len());
        for kind in order {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            std::fs::create_dir_all(&state).unwrap();
            let s = Subject::start_stored(kind, Store::At(state.clone()));
            let [rec, ret] = fill(&s, n).await;
            let i = kind as usize;
            fill_rec[i].push(rec.rate);
            fill_ret[i].push(ret.rate);
            let synced = |f: &Filled| match f.fsyncs.is_finite() {
                true => format!(", {:.0} fsyncs per 10,000", f.fsyncs),
                false => String::new(),
            };
            let filled = format!(
                "records {} /s{}, retained {} /s{}",
                int(rec.rate),
                synced(&rec),
                int(ret.rate),
                synced(&ret)
            );
            if kind == Kind::Homicro {
                sync_rec.push(rec.fsyncs);
                sync_ret.push(ret.fsyncs);
            }
            let t = Instant::now();
            drop(s);
            let stopped = t.elapsed();
            let bytes = size(&state);
            let t0 = Instant::now();
            let s = Subject::start_stored(kind, Store::At(state.clone()));
            let back = come_back(&s, t0, n).await;
            let mut recovered = String::new();
            if kind == Kind::Homicro {
                for _ in 0..200 {
                    if let Some(line) = s.recovered() {
                        recovered = format!(
                            "; serve: records={} retained={}",
                            field(&line, "records="),
                            field(&line, "retained=")
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            drop(s);
            let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
            up[i].push(secs(back.up));
            all[i].push(secs(back.all));
            println!(
                "  run {run} {:<10} filled ({filled}); stopped in {:.2} s, {:.1} MiB on disk; online {:.3} s, all held {:.3} s ({} records, {} retained seen){recovered}",
                kind.label(),
                stopped.as_secs_f64(),
                bytes as f64 / (1 << 20) as f64,
                secs(back.up),
                secs(back.all),
                back.records,
                back.retained
            );
        }
    }
    let m = |v: &[Vec<f64>; 3], k: Kind| median(v[k as usize].clone());
    let (h, q) = (m(&up, Kind::Homicro), m(&up, Kind::Mosquitto));
    let (ha, qa) = (m(&all, Kind::Homicro), m(&all, Kind::Mosquitto));
    let ok = h < 2.0;
    println!(
        "  median restart: homicro online in {h:.3} s (target < 2 s: {}), all held in {ha:.3} s; mosquitto persistent CONNACK in {q:.3} s, all held in {qa:.3} s",
        verdict(ok)
    );
    report.add(Row {
        item: "10",
        figure: format!(
            "restart holding {} records + as many retained: start to online (homicro/registry \"online\"; mosquitto: CONNACK)",
            int(n as f64)
        ),
        homicro: format!("{h:.3} s"),
        bus: "–".into(),
        mosquitto: format!("{q:.3} s"),
        ratio: ratio(h, q),
        target: format!("< 2 s: **{}**", verdict(ok)),
    });
    report.add(Row {
        item: "10",
        figure: format!(
            "the same, start until a newcomer holds all {}",
            int(2.0 * n as f64)
        ),
        homicro: format!("{ha:.3} s"),
        bus: "–".into(),
        mosquitto: format!("{qa:.3} s"),
        ratio: ratio(ha, qa),
        target: String::new(),
    });
    let (hr, qr) = (m(&fill_rec, Kind::Homicro), m(&fill_rec, Kind::Mosquitto));
    let (ht, qt) = (m(&fill_ret, Kind::Homicro), m(&fill_ret, Kind::Mosquitto));
    let (sr, st) = (median(sync_rec), median(sync_ret));
    println!(
        "  median filling, until every PUBACK (20 clients pipelining): records: journal on {} /s ({sr:.0} fsyncs per 10,000), mosquitto persistent {} /s; retained messages: journal on {} /s ({st:.0} fsyncs per 10,000), mosquitto persistent {} /s",
        int(hr),
        int(qr),
        int(ht),
        int(qt)
    );
    for (what, h, q, f) in [
        ("records", hr, qr, sr),
        ("retained messages on other topics (100 bytes)", ht, qt, st),
    ] {
        report.add(Row {
            item: "10",
            figure: format!(
                "filling {} {what}, 20 clients pipelining, per second until every PUBACK: journal on ({f:.0} fsyncs per 10,000); mosquitto persistent",
                int(n as f64)
            ),
            homicro: int(h),
            bus: "–".into(),
            mosquitto: int(q),
            ratio: ratio(h, q),
            target: String::new(),
        });
    }
}

/// Each client's share of the retained QoS 1 messages `message(0..n)`,
/// encoded (pipelined: one write each), and how many it is.
struct Prepared(Vec<(Client, Vec<u8>, usize)>);

fn prepare(
    clients: Vec<Client>,
    n: usize,
    message: impl Fn(usize) -> (String, Vec<u8>),
) -> Prepared {
    let k = clients.len();
    Prepared(
        clients
            .into_iter()
            .enumerate()
            .map(|(c, client)| {
                let (mut buf, mut share) = (Vec::new(), 0);
                for (j, i) in (c..n).step_by(k).enumerate() {
                    let (topic, payload) = message(i);
                    wire::publish(
                        &mut buf,
                        &topic,
                        &payload,
                        true,
                        true,
                        (j % 65535 + 1) as u16,
                    );
                    share += 1;
                }
                (client, buf, share)
            })
            .collect(),
    )
}

/// What [`send`] saw: the PUBACKs and when the last came (`None`: some
/// never came); the connections, open until dropped.
struct Acked {
    writers: Vec<wire::Wr>,
    acks: usize,
    last: Option<Instant>,
}

/// Every client writes its share and reads its PUBACKs; returns once all
/// came back, or one client waited `limit` for its next.
async fn send(prepared: Prepared, limit: Duration) -> Acked {
    let tasks: Vec<_> = prepared
        .0
        .into_iter()
        .map(|(client, buf, share)| {
            let Client { mut rd, mut wr } = client;
            let reader = tokio::spawn(async move {
                let mut acks = 0;
                while acks < share {
                    match rd.next_within(limit).await {
                        Some(p) => acks += usize::from(p.kind() == wire::PUBACK),
                        None => break,
                    }
                }
                (acks, (acks == share).then(Instant::now))
            });
            tokio::spawn(async move {
                wr.write_all(&buf).await.unwrap();
                let (acks, at) = reader.await.unwrap();
                (wr, acks, at)
            })
        })
        .collect();
    let mut out = Acked {
        writers: Vec::with_capacity(tasks.len()),
        acks: 0,
        last: None,
    };
    let mut complete = true;
    for t in tasks {
        let (wr, acks, at) = t.await.unwrap();
        out.writers.push(wr);
        out.acks += acks;
        complete &= at.is_some();
        out.last = out.last.max(at);
    }
    if !complete {
        out.last = None;
    }
    out
}

/// Fills `s` with `n` records (`homicro/services/keep-i`), then `n`
/// retained messages of 100 bytes (`RETAINED{i}`), each from 20 clients
/// publishing pipelined; returns each part's messages per second until
/// every PUBACK came back (0: some never came), and homicro's fsyncs per
/// 10,000 messages.
async fn fill(s: &Subject, n: usize) -> [Filled; 2] {
    let records = |i: usize| {
        (
            format!("{}keep-{i}", load::SERVICES),
            load::record(i, "").into_bytes(),
        )
    };
    let retained = |i: usize| (format!("{RETAINED}{i}"), retained_payload(i));
    let parts: [(&str, &Message); 2] = [("records", &records), ("retained", &retained)];
    let mut out = [Filled::default(), Filled::default()];
    for (filled, (part, message)) in out.iter_mut().zip(parts) {
        let clients = wire::connect_many(s.addr, &format!("fill-{part}"), 20).await;
        let prepared = prepare(clients, n, message);
        let f0 = metric_fsyncs(s.addr).await;
        let t = Instant::now();
        let acked = send(prepared, Duration::from_secs(60)).await;
        match acked.last {
            Some(last) => filled.rate = n as f64 / (last - t).as_secs_f64(),
            None => println!("    (fill, {part}: {} of {n} PUBACKs; gave up)", acked.acks),
        }
        if let (Some(a), Some(b)) = (f0, metric_fsyncs(s.addr).await) {
            filled.fsyncs = (b - a) as f64 * 10_000.0 / n as f64;
        }
    }
    out
}

/// One part of [`fill`]: messages per second until every PUBACK, fsyncs
/// per 10,000 (NaN: none counted).
struct Filled {
    rate: f64,
    fsyncs: f64,
}

impl Default for Filled {
    fn default() -> Self {
        Filled {
            rate: 0.0,
            fsyncs: f64::NAN,
        }
    }
}

/// 100 bytes of JSON.
fn retained_payload(i: usize) -> Vec<u8> {
    let head = format!(r#"{{"n":{i},"pad":""#);
    let mut p = head.into_bytes();
    p.resize(98, b'x');
    p.extend(b"\"}");
    p
}

/// When a restarted subject was online and held everything, and what a
/// newcomer saw of it.
#[derive(Default)]
struct Back {
    up: Option<Duration>,
    all: Option<Duration>,
    records: usize,
    retained: usize,
}

/// From `t0` (the start): a client connects (serve binds its port before
/// it recovers, so a CONNECT waits in the listen queue for its CONNACK),
/// waits for `homicro/registry` to say "online" (homicro), then subscribes
/// to the records and the retained messages and counts them, each topic
/// once, until all `n` + `n` were seen (or 10 s without one).
async fn come_back(s: &Subject, t0: Instant, n: usize) -> Back {
    let mut back = Back::default();
    let mut c = loop {
        match Client::connect(s.addr, "restart").await {
            Ok(c) => break c,
            Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                println!(
                    "    ({} not reachable after a restart: {e})",
                    s.kind.label()
                );
                return back;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    if s.kind.registry() {
        c.subscribe(&["homicro/registry"]).await;
        loop {
            let Some(p) = c.rd.next_within(Duration::from_secs(30)).await else {
                println!("    (homicro/registry did not say online)");
                return back;
            };
            if let Some((topic, payload)) = p.publish()
                && topic == b"homicro/registry"
                && contains(payload, b"\"online\"")
            {
                break;
            }
        }
    }
    back.up = Some(t0.elapsed());
    c.subscribe(&["homicro/services/+", &format!("{RETAINED}+")])
        .await;
    let (mut rec, mut ret) = (vec![false; n], vec![false; n]);
    let records = format!("{}keep-", load::SERVICES);
    while back.records < n || back.retained < n {
        let Some(p) = c.rd.next_within(Duration::from_secs(10)).await else {
            return back;
        };
        let Some((topic, payload)) = p.publish() else {
            continue;
        };
        let Ok(topic) = std::str::from_utf8(topic) else {
            continue;
        };
        let index = |prefix: &str| topic.strip_prefix(prefix)?.parse::<usize>().ok();
        if payload.is_empty() {
            continue;
        }
        if let Some(i) = index(&records).filter(|&i| i < n && !rec[i]) {
            rec[i] = true;
            back.records += 1;
        } else if let Some(i) = index(RETAINED).filter(|&i| i < n && !ret[i]) {
            ret[i] = true;
            back.retained += 1;
        }
    }
    back.all = Some(t0.elapsed());
    back
}

/// `homicro_journal_fsyncs_total` from `GET /metrics` on the MQTT port;
/// `None` without a journal (or without HTTP: Mosquitto).
async fn metric_fsyncs(addr: SocketAddr) -> Option<u64> {
    let read = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()??;
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        l.strip_prefix("homicro_journal_fsyncs_total ")?
            .trim()
            .parse()
            .ok()
    })
}

/// `name=VALUE` in a log line: VALUE, or "?".
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .unwrap_or("?")
}

/// Bytes of the files under `dir`.
fn size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The file system type `dir` is on (from /proc/mounts, the longest
/// mount point that holds it).
fn filesystem(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or(dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2].to_string()))
        })
        .max()
        .map_or("?".into(), |(_, fs)| {
            format!("{} ({fs})", std::env::temp_dir().display())
        })
}
