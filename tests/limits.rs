//! Issue 9, "Limits", shown against the real `homicro serve`:
//!
//! - Under a file-descriptor limit of 2,048 the session cap is derived from
//!   the limit; clients beyond it are refused cleanly (CONNACK "server
//!   unavailable": 3 in 3.1.1, 0x88 in 5; HTTP 503), everyone already
//!   connected keeps working, the log stays under a line a second, and room
//!   made is room taken again.
//! - Memory comes back: after rounds of clients connecting, subscribing,
//!   receiving registrations and leaving, serve's idle RSS stays within 20%
//!   of the first round's. The records of a round are deregistered at its
//!   end, so every round starts from the same state, as in the issue's
//!   measurement ("no client and no record left"): growth is then memory
//!   not given back, not data kept.
//!
//! The test process holds as many sockets as serve: it raises its own soft
//! limit on open files to the hard limit, and fails saying so when the hard
//! limit is too low.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use common::raw::{Hello, Raw};
use common::{Serve, WAIT, http_get, metric};
use homicro::bus::listener::{FD_RESERVE, REFUSAL_ROOM};
use homicro::config::{Overrides, ServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// serve's file-descriptor limit in the first test (soft and hard).
const NOFILE: u64 = 2048;
/// Clients connecting at once while filling up.
const PARALLEL: usize = 64;
/// A subscriber's longest wait for its next record under load.
const ROUND_WAIT: Duration = Duration::from_secs(60);
const SERVICES: Option<&str> = Some("homicro/services/+");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_2048_descriptors_clients_beyond_the_cap_are_refused_and_the_rest_carry_on() {
    raise_fd_limit(NOFILE + 1024);
    let mut s = Serve::start_with_fd_limit(NOFILE).await;
    let port = s.port();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.child.id())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files"));
    let soft_hard: Vec<&str> = open_files
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(soft_hard, ["2048", "2048"], "serve's limit:\n{limits}");

    // The cap as src/bus/listener.rs::caps derives it: the limit less the
    // reserve, the health-check slots and the room for refusals (2,048 -
    // 64 - 256 - 32 = 1,696 sessions with the shipped configuration).
    let defaults = ServeConfig::load(None, &Overrides::default()).unwrap();
    let usable = (NOFILE - FD_RESERVE) as usize - defaults.health_concurrency;
    let cap = usable - REFUSAL_ROOM;
    s.wait_log(&format!(
        "limits from the file-descriptor limit max_sessions={cap} max_connections={usable}"
    ))
    .await;
    // The start-up check's client stays connected (rumqttc keeps its
    // connection after its client is dropped): it counts against the cap.
    let before = metric(port, "homicro_bus_sessions").await as usize;

    // Early clients (a watcher, a publisher), then fillers up to the cap.
    let (mut watcher, rc) = Raw::connect(port, &hello(false, "early-watcher", 60)).await;
    assert_eq!(rc, 0);
    watcher.subscribe("limits/#", 0).await;
    watcher.subscribe("homicro/events/limits-probe", 0).await;
    let (mut early, rc) = Raw::connect(port, &hello(true, "early-publisher", 60)).await;
    assert_eq!(rc, 0);
    let started = Instant::now();
    let mut fillers = connect_many(port, "filler", cap - before - 2, None).await;
    println!(
        "{} fillers connected in {:?}",
        fillers.len(),
        started.elapsed()
    );
    assert_eq!(metric(port, "homicro_bus_sessions").await, cap as u64);

    // Refusal phase: clients beyond the cap, alone, in a burst larger than
    // the descriptors left, and retrying for 3 s as reconnecting clients do.
    let log_from = s.log_lines();
    let phase = Instant::now();
    refused(port, false, "over-v4").await;
    refused(port, true, "over-v5").await;
    let (status, body) = http_get(port, "/health").await;
    assert_eq!(status, 503, "GET /health at the cap: {body}");
    let mut burst = JoinSet::new();
    for i in 0..512 {
        burst.spawn(async move { refused(port, i % 2 == 1, &format!("burst-{i}")).await });
    }
    burst.join_all().await;
    let mut retries = 0;
    while phase.elapsed() < Duration::from_secs(3) {
        refused(port, retries % 2 == 1, &format!("retry-{retries}")).await;
        retries += 1;
    }
    let (status, _) = http_get(port, "/health").await;
    assert_eq!(status, 503, "GET /health at the cap, after the burst");
    let secs = phase.elapsed().as_secs_f64();
    let lines = s.log_since(log_from);
    println!(
        "refusal phase: {} clients refused in {secs:.1} s; {} log lines: {lines:#?}",
        2 + 512 + retries,
        lines.len()
    );
    assert!(
        lines.len() as f64 <= 1.0 + secs,
        "more than a line a second while refusing: {lines:#?}"
    );
    assert!(s.running(), "serve died:\n{}", s.log());
    // Every refusal is counted: the MQTT clients and the two 503s.
    let refused_total = metric(port, "homicro_bus_refused_full_total").await;
    assert_eq!(refused_total, 2 + 512 + retries as u64 + 2);

    // Everyone already connected keeps working: the early publisher's
    // message and registration reach the early watcher; every filler
    // answers a ping.
    early
        .publish("limits/hello", b"still here", false, true, &[])
        .await;
    let (topic, payload, _) = watcher.next_publish().await.expect("the publish");
    assert_eq!(
        (topic.as_str(), &payload[..]),
        ("limits/hello", &b"still here"[..])
    );
    let record = br#"{"host":"10.7.7.7","port":7}"#;
    early
        .publish("homicro/services/limits-probe", record, true, true, &[])
        .await;
    let (topic, payload, _) = watcher.next_publish().await.expect("the event");
    assert_eq!(topic, "homicro/events/limits-probe");
    assert!(String::from_utf8_lossy(&payload).contains(r#""event":"registered""#));
    for f in &mut fillers {
        f.send(&[0xC0, 0]).await;
        let (first, _) = f.read_packet().await.expect("PINGRESP");
        assert_eq!(first, 0xD0);
    }

    // The descriptors left are not all taken by connections that say
    // nothing (max_connections bounds open sockets): watched for a second,
    // serve never reaches its limit.
    let mut quiet = Vec::new();
    for _ in 0..400 {
        quiet.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let silent = Instant::now();
    let mut most = 0;
    while silent.elapsed() < Duration::from_secs(1) {
        most = most.max(
            std::fs::read_dir(format!("/proc/{}/fd", s.child.id()))
                .unwrap()
                .count(),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(quiet);
    println!("with 400 silent connections beyond the cap, serve held up to {most} descriptors");
    assert!(
        most < NOFILE as usize,
        "serve ran out of descriptors:\n{}",
        s.log()
    );

    // Room made is room taken again, and no more.
    for f in fillers.drain(..10) {
        f.disconnect().await;
    }
    wait_metric(port, "homicro_bus_sessions", cap as u64 - 10).await;
    let (status, body) = http_get(port, "/health").await;
    assert_eq!(status, 200, "GET /health below the cap: {body}");
    // The silent connections dropped above hold their slots until their
    // tasks see the end (on a busy machine, a moment after): wait until
    // what is left is the sessions' and a couple more (this request's own,
    // and one that outlives its session by a moment).
    let settled = cap as u64 - 10 + 2;
    let start = Instant::now();
    while metric(port, "homicro_bus_connections_open").await > settled {
        assert!(start.elapsed() < ROUND_WAIT, "connections never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _again = connect_many(port, "again", 10, None).await;
    refused(port, true, "over-again").await;
    assert!(s.running());
}

/// The issue's size: about 7 minutes in a debug build on 2 cores, too long
/// for `cargo test` (2 in release): run it with
/// `cargo test --release --test limits -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the issue's full size: minutes; run it in release"]
async fn memory_comes_back_after_20_rounds_of_2000_clients_and_1000_registrations() {
    memory_comes_back(20, 2000, 1000).await;
}

/// The same at half the rounds, a quarter of the clients and a fifth of
/// the records (part of every test run: 20 rounds cost CI 80 s; a leak
/// per round shows in 10 as well).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_comes_back_after_10_rounds_of_500_clients_and_200_registrations() {
    memory_comes_back(10, 500, 200).await;
}

/// `rounds` of `clients` subscribers to `homicro/services/+` (one in four
/// at QoS 1, the rest at QoS 0; 3.1.1 and 5 in turn), a registrar
/// registering `records` records at QoS 1, every subscriber receiving all
/// of them and leaving, the records deregistered; serve's RSS is read
/// once no session and no record is left. The last round's must be within
/// 20% of the first's.
async fn memory_comes_back(rounds: usize, clients: usize, records: usize) {
    raise_fd_limit(clients as u64 + 256);
    let s = Serve::start().await;
    let (port, pid) = (s.port(), s.child.id());
    // Sessions left from the start-up check (see above).
    let before = metric(port, "homicro_bus_sessions").await;
    let mut rss = Vec::new();
    for round in 0..rounds {
        let started = Instant::now();
        let trims = metric(port, "homicro_bus_memory_trims_total").await;
        let subscribers = connect_many(port, &format!("r{round}-sub"), clients, SERVICES).await;
        let mut receivers = JoinSet::new();
        for raw in subscribers {
            receivers.spawn(receive(raw, records));
        }
        let msgs: Vec<(String, Vec<u8>)> = (0..records)
            .map(|n| {
                let host = format!("10.{}.{}.{}", round, n / 250, n % 250);
                let rec = format!(r#"{{"host":"{host}","port":{}}}"#, 1000 + n);
                (format!("homicro/services/r{round}-{n}"), rec.into_bytes())
            })
            .collect();
        let (mut registrar, rc) =
            Raw::connect(port, &hello(true, &format!("r{round}-reg"), 60)).await;
        assert_eq!(rc, 0);
        registrar.publish_all(&msgs, true, ROUND_WAIT).await;
        receivers.join_all().await;
        let cleared: Vec<_> = msgs.into_iter().map(|(t, _)| (t, Vec::new())).collect();
        registrar.publish_all(&cleared, true, ROUND_WAIT).await;
        registrar.disconnect().await;
        wait_metric(port, "homicro_records", 0).await;
        wait_metric(port, "homicro_bus_sessions", before).await;
        // Serve gives freed memory back once the sessions have gone and
        // their number held still for a second: wait for that.
        while metric(port, "homicro_bus_memory_trims_total").await <= trims {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rss.push(settled_rss_mib(pid).await);
        println!(
            "round {:2}: {:6.1} MiB idle, {:?}",
            round + 1,
            rss[round],
            started.elapsed()
        );
    }
    let (first, last) = (rss[0], rss[rounds - 1]);
    println!(
        "RSS by round (MiB): {rss:.1?}; last/first = {:.3}",
        last / first
    );
    assert!(
        last <= first * 1.2,
        "RSS grew from {first:.1} MiB after round 1 to {last:.1} MiB after round {rounds}: {rss:.1?}"
    );
    assert_eq!(metric(port, "homicro_bus_dropped_total").await, 0);
}

fn hello(v5: bool, client_id: &str, keep_alive: u16) -> Hello<'_> {
    Hello {
        v5,
        client_id,
        keep_alive,
        will: None,
    }
}

/// `n` clients `PREFIX-I` (3.1.1 and 5 in turn, keepalive 60), `PARALLEL`
/// connecting at a time; each must be accepted. With a `filter`, each
/// subscribes to it (one in four at QoS 1, the rest at QoS 0).
async fn connect_many(port: u16, prefix: &str, n: usize, filter: Option<&'static str>) -> Vec<Raw> {
    let gate = Arc::new(Semaphore::new(PARALLEL));
    let mut set = JoinSet::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let id = format!("{prefix}-{i}");
        set.spawn(async move {
            let (mut raw, rc) = Raw::connect(port, &hello(i % 2 == 1, &id, 60)).await;
            assert_eq!(rc, 0, "{id} refused");
            if let Some(filter) = filter {
                let qos = u8::from(i % 4 == 0);
                assert_eq!(raw.subscribe(filter, qos).await, qos, "{id}'s SUBACK");
            }
            drop(permit);
            raw
        });
    }
    set.join_all().await
}

/// A client beyond the cap: CONNACK "server unavailable", then closed.
async fn refused(port: u16, v5: bool, id: &str) {
    let (mut raw, rc) = Raw::connect(port, &hello(v5, id, 0)).await;
    assert_eq!(rc, if v5 { 0x88 } else { 3 }, "{id} beyond the cap");
    assert!(raw.closed_within(WAIT).await, "{id} not closed");
}

/// Reads until `want` records (non-empty PUBLISHes) have arrived on
/// `raw`, acknowledging QoS 1, then leaves with a DISCONNECT.
async fn receive(raw: Raw, want: usize) {
    let v5 = raw.v5;
    let (mut stream, leftover) = raw.into_parts();
    let mut buf = BytesMut::from(&leftover[..]);
    let (mut got, mut acks) = (0, Vec::new());
    while got < want {
        while let Some((first, mut body)) = frame(&mut buf) {
            if first >> 4 != 3 {
                continue;
            }
            let topic_len = body.get_u16() as usize;
            body.advance(topic_len);
            if (first >> 1) & 3 == 1 {
                acks.extend_from_slice(&[0x40, 2, body[0], body[1]]);
                body.advance(2);
            }
            if v5 {
                let props = varint(&mut body);
                body.advance(props);
            }
            got += usize::from(!body.is_empty());
        }
        if !acks.is_empty() {
            stream.write_all(&acks).await.unwrap();
            acks.clear();
        }
        if got < want {
            let read = tokio::time::timeout(ROUND_WAIT, stream.read_buf(&mut buf)).await;
            let n = read.unwrap_or_else(|_| panic!("{got} of {want} records, then silence"));
            assert!(n.unwrap() > 0, "closed after {got} of {want} records");
        }
    }
    // Leave, and let serve close first: the TIME_WAIT is then its socket's,
    // not one of the ephemeral ports the next tests need.
    stream.write_all(&[0xE0, 0]).await.unwrap();
    let closed = tokio::time::timeout(WAIT, async {
        while stream.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    assert!(
        closed.await.is_ok(),
        "serve kept the connection after DISCONNECT"
    );
}

/// The next whole packet in `buf`: (first byte, body).
fn frame(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let mut len = 0usize;
    for i in 1..buf.len().min(5) {
        len |= ((buf[i] & 0x7f) as usize) << (7 * (i - 1));
        if buf[i] & 0x80 == 0 {
            if buf.len() < i + 1 + len {
                return None;
            }
            let mut packet = buf.split_to(i + 1 + len);
            let first = packet[0];
            packet.advance(i + 1);
            return Some((first, packet));
        }
    }
    None
}

fn varint(b: &mut BytesMut) -> usize {
    let (mut n, mut shift) = (0, 0);
    loop {
        let byte = b.get_u8();
        n |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return n;
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit; fails
/// the test, saying so, when the hard limit is below `need`.
fn raise_fd_limit(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write a live local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        let hard = lim.rlim_max as u64;
        assert!(
            hard >= need,
            "this test holds about {need} sockets, but the hard limit on open files is \
             {hard}: raise it (ulimit -Hn, or LimitNOFILE) to run it"
        );
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// Polls `/metrics` until `name` is `want`.
async fn wait_metric(port: u16, name: &str, want: u64) {
    let start = Instant::now();
    loop {
        let v = metric(port, name).await;
        if v == want {
            return;
        }
        assert!(
            start.elapsed() < ROUND_WAIT,
            "{name} stayed {v}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// serve's resident set, in MiB.
/// RSS held, not passing: the least of five readings over half a second
/// (a reading can catch a transient buffer, such as a state file write).
async fn settled_rss_mib(pid: u32) -> f64 {
    let mut least = f64::MAX;
    for _ in 0..5 {
        least = least.min(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    least
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmRSS");
    kib / 1024.0
}
