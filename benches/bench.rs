//! What homicro costs, side by side with a plain Mosquitto and with the
//! embedded broker alone (registry off), measured in one run.
//!
//! ```sh
//! cargo bench --bench bench              # the full run (about 6 minutes)
//! cargo bench --bench bench -- --quick   # small N, every item, ~30 s
//! cargo bench --bench bench -- --runs 5 --only 1,3
//! cargo bench --bench bench -- --only 7 --runs 5   # the front vs direct
//! cargo bench --bench bench -- --only 5 --connections 1000
//! HOMICRO_BENCH_CONFIG=my.toml cargo bench --bench bench   # serve --config
//! ```
//!
//! Each figure is the median of `--runs` runs (default 3). Ratios compare
//! subjects measured in this same run. Targets are printed as met / not met;
//! nothing here asserts.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use homicro::config::BrokerUrl;
use homicro::mqtt::{self, Incoming};
use rumqttc::{AsyncClient, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Homicro,
    BrokerOnly,
    Mosquitto,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Homicro => "homicro",
            Kind::BrokerOnly => "rumqttd alone",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

const ALL: [Kind; 3] = [Kind::Homicro, Kind::BrokerOnly, Kind::Mosquitto];

/// A broker under test, started by the bench; killed on drop.
struct Subject {
    kind: Kind,
    child: Child,
    url: BrokerUrl,
    /// homicro only: rumqttd's own MQTT 3.1.1 listener behind the front.
    direct: Option<BrokerUrl>,
    /// homicro only: CONNECTs the front retried because rumqttd sent no
    /// CONNACK (counted from its log).
    front_retries: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

impl Subject {
    fn start(kind: Kind) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        match kind {
            Kind::Mosquitto => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let conf = dir.path().join("m.conf");
                // A user's mosquitto: defaults, plus TCP_NODELAY as its
                // documentation recommends for latency.
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    ),
                )
                .unwrap();
                let child = Command::new(which_mosquitto())
                    .arg("-c")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("mosquitto (apt-get install mosquitto)");
                while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Subject {
                    kind,
                    child,
                    url: BrokerUrl {
                        host: "127.0.0.1".into(),
                        port,
                    },
                    direct: None,
                    front_retries: Arc::default(),
                    _dir: dir,
                }
            }
            _ => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_homicro"));
                cmd.args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--log-level",
                    "warn",
                    "--state-file",
                ])
                .arg(dir.path().join("state.json"))
                .env(
                    "RUST_LOG",
                    "warn,homicro::serve=info,homicro::front=info,rumqttd=off",
                )
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
                if kind == Kind::BrokerOnly {
                    cmd.arg("--no-registry");
                }
                if let Ok(conf) = std::env::var("HOMICRO_BENCH_CONFIG") {
                    cmd.args(["--config", &conf]);
                }
                let mut child = cmd.spawn().expect("homicro");
                let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
                // The front's line comes first: `listen=… v4=… v5=…`.
                let field = |line: &str, key: &str| {
                    let addr = line.split(key).nth(1)?.split_whitespace().next()?;
                    let addr: std::net::SocketAddr = addr.parse().ok()?;
                    Some(BrokerUrl {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                    })
                };
                let (url, direct) = loop {
                    let line = lines.next().expect("serve exited").unwrap();
                    if let Some(url) = field(&line, " listen=") {
                        break (url, field(&line, " v4="));
                    }
                };
                let front_retries = Arc::new(AtomicU64::new(0));
                let retries = front_retries.clone();
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        if line.contains("broker sent no CONNACK") {
                            retries.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                Subject {
                    kind,
                    child,
                    url,
                    direct,
                    front_retries,
                    _dir: dir,
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    /// CPU time used so far (user + system).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let hz = unsafe_clk_tck();
        Duration::from_secs_f64(ticks as f64 / hz)
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        // SIGTERM first, so that a profiler wrapping serve writes its data.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn which_mosquitto() -> &'static str {
    if std::path::Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// A connected rumqttc client.
struct Conn {
    client: AsyncClient,
    rx: UnboundedReceiver<Incoming>,
}

async fn connect(url: &BrokerUrl) -> Conn {
    let (client, mut rx) = mqtt::connect(
        mqtt::options(&mqtt::client_id("bench"), url),
        Duration::from_millis(100),
    );
    loop {
        match rx.recv().await.expect("connect") {
            Incoming::Connected => return Conn { client, rx },
            Incoming::Disconnected(e) => panic!("cannot connect to {url}: {e}"),
            _ => {}
        }
    }
}

impl Conn {
    async fn subscribe(&mut self, filters: &[&str]) {
        for f in filters {
            self.client.subscribe(*f, QoS::AtMostOnce).await.unwrap();
        }
        let mut acks = 0;
        while acks < filters.len() {
            if let Incoming::Subscribed = self.rx.recv().await.unwrap() {
                acks += 1;
            }
        }
    }
}

fn record(i: usize, extra: &str) -> String {
    format!(
        r#"{{"host":"10.{}.{}.{}","port":8080{extra}}}"#,
        i / 65536 % 256,
        i / 256 % 256,
        i % 256
    )
}

/// Publishes N retained records from K clients as fast as they go; returns
/// when every publish has been handed to its client.
async fn publish_records(url: &BrokerUrl, names: Vec<String>, k: usize, extra: &'static str) {
    let per = names.len().div_ceil(k);
    let mut tasks = Vec::new();
    for (c, chunk) in names.chunks(per.max(1)).enumerate() {
        let chunk = chunk.to_vec();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let conn = connect(&url).await;
            for (i, n) in chunk.iter().enumerate() {
                let payload = Bytes::from(record(c * per + i, extra));
                conn.client
                    .publish_bytes(
                        format!("homicro/services/{n}"),
                        QoS::AtLeastOnce,
                        true,
                        payload,
                    )
                    .await
                    .unwrap();
            }
            // Keep the connection until the watcher is done (dropped by caller).
            conn
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    // Let the clients drain their queues in the background.
    tokio::spawn(async move {
        let mut conns = conns;
        for c in &mut conns {
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(30), c.rx.recv()).await
            {
            }
        }
    });
}

/// Waits until `watcher` has seen every name in `want` on services/+ (and,
/// when `events`, a `registered` event for each). Returns false on timeout.
async fn watch_all(
    watcher: &mut Conn,
    want: &HashSet<String>,
    events: bool,
    limit: Duration,
) -> bool {
    let mut seen = HashSet::new();
    let mut registered = HashSet::new();
    let deadline = tokio::time::Instant::now() + limit;
    while seen.len() < want.len() || (events && registered.len() < want.len()) {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, watcher.rx.recv()).await else {
            return false;
        };
        if let Incoming::Message { topic, payload, .. } = m {
            if let Some(n) = topic.strip_prefix("homicro/services/") {
                if !payload.is_empty() && want.contains(n) {
                    seen.insert(n.to_string());
                }
            } else if let Some(n) = topic.strip_prefix("homicro/events/")
                && payload.windows(12).any(|w| w == b"\"registered\"")
                && want.contains(n)
            {
                registered.insert(n.to_string());
            }
        }
    }
    true
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn target(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

struct Opts {
    quick: bool,
    runs: usize,
    only: Option<Vec<u32>>,
    connections: Option<usize>,
}

impl Opts {
    fn wants(&self, item: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&item))
    }
    fn n(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let opts = Opts {
        quick,
        runs: arg("--runs")
            .and_then(|r| r.parse().ok())
            .unwrap_or(if quick { 1 } else { 3 }),
        only: arg("--only").map(|o| o.split(',').filter_map(|x| x.parse().ok()).collect()),
        connections: arg("--connections").and_then(|c| c.parse().ok()),
    };
    println!(
        "# homicro bench: {} cores, {} runs per figure (median){}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        opts.runs,
        if quick {
            ", --quick (small N: checks that it works; not the targets' N)"
        } else {
            ""
        }
    );
    if opts.wants(1) {
        registration_throughput(&opts).await;
    }
    if opts.wants(2) {
        snapshot(&opts).await;
    }
    if opts.wants(3) {
        propagation(&opts).await;
    }
    if opts.wants(4) {
        expiry(&opts).await;
    }
    if opts.wants(5) {
        memory(&opts).await;
    }
    if opts.wants(6) {
        churn(&opts).await;
    }
    if opts.wants(7) {
        front_cost(&opts).await;
    }
    println!("\n# done");
}

/// 1. K clients register N distinct names; time until a watcher saw all.
async fn registration_throughput(o: &Opts) {
    let (n, k) = (o.n(20_000, 2_000), 50);
    println!("\n## 1. Registration throughput: {k} clients register {n} names (retained, QoS 1)");
    let mut rates = Vec::new();
    for kind in ALL {
        let mut per_run = Vec::new();
        for run in 0..o.runs {
            let s = Subject::start(kind);
            let mut watcher = connect(&s.url).await;
            watcher
                .subscribe(&["homicro/services/+", "homicro/events/+"])
                .await;
            let names: Vec<String> = (0..n).map(|i| format!("r{run}-s{i}")).collect();
            let want: HashSet<String> = names.iter().cloned().collect();
            let t = Instant::now();
            publish_records(&s.url, names, k, "").await;
            let ok = watch_all(
                &mut watcher,
                &want,
                kind == Kind::Homicro,
                Duration::from_secs(120),
            )
            .await;
            let took = t.elapsed();
            if !ok {
                println!("  {}: run {run} did not complete", kind.label());
            }
            per_run.push(n as f64 / took.as_secs_f64());
        }
        let m = median(per_run);
        println!(
            "  {:<14} {:>9.0} registrations/s{}",
            kind.label(),
            m,
            if kind == Kind::Homicro {
                " (visible and accepted by the registry)"
            } else {
                " (visible)"
            }
        );
        rates.push(m);
    }
    println!(
        "  ratio homicro / mosquitto: {:.2}; homicro / rumqttd alone: {:.2}",
        rates[0] / rates[2],
        rates[0] / rates[1]
    );
    println!(
        "  target ≥ 20,000/s: {} ; target ≥ 0.5 × mosquitto: {}",
        target(rates[0] >= 20_000.0),
        target(rates[0] >= 0.5 * rates[2])
    );
}

/// Preloads N records; for homicro waits until the registry accepted all.
async fn preload(s: &Subject, n: usize) {
    let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let mut watcher = connect(&s.url).await;
    watcher
        .subscribe(&["homicro/services/+", "homicro/events/+"])
        .await;
    let want: HashSet<String> = names.iter().cloned().collect();
    publish_records(&s.url, names, 20, "").await;
    assert!(
        watch_all(
            &mut watcher,
            &want,
            s.kind == Kind::Homicro,
            Duration::from_secs(300)
        )
        .await,
        "preload"
    );
}

/// 2. A newcomer subscribes: time until it holds all N, and how many it got.
async fn snapshot(o: &Opts) {
    println!("\n## 2. Snapshot: a newcomer subscribes to homicro/services/+ (QoS 0)");
    let sizes: Vec<usize> = if o.quick {
        vec![1_000]
    } else {
        vec![1_000, 10_000, 100_000]
    };
    let mut homicro_100k = None;
    for n in sizes {
        let mut times = Vec::new();
        for kind in ALL {
            let s = Subject::start(kind);
            preload(&s, n).await;
            let mut per_run = Vec::new();
            let mut got_min = usize::MAX;
            for _ in 0..o.runs {
                let mut c = connect(&s.url).await;
                let t = Instant::now();
                c.client
                    .subscribe("homicro/services/+", QoS::AtMostOnce)
                    .await
                    .unwrap();
                let (mut got, mut last) = (0usize, t.elapsed());
                // Until all arrived, or 2 s without a message.
                while got < n {
                    match tokio::time::timeout(Duration::from_secs(2), c.rx.recv()).await {
                        Ok(Some(Incoming::Message { .. })) => {
                            got += 1;
                            last = t.elapsed();
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
                got_min = got_min.min(got);
                per_run.push(last.as_secs_f64() * 1000.0);
            }
            let m = median(per_run);
            println!(
                "  N={n:<7} {:<14} {:>8.1} ms, got {got_min} of {n}",
                kind.label(),
                m
            );
            if kind == Kind::Homicro && n == 100_000 {
                homicro_100k = Some((m, got_min));
            }
            times.push(m);
        }
        println!(
            "  N={n:<7} ratio homicro / mosquitto: {:.2}; homicro / rumqttd alone: {:.2}",
            times[0] / times[2],
            times[0] / times[1]
        );
    }
    if let Some((ms, got)) = homicro_100k {
        println!(
            "  target 100,000 of 100,000 in < 2 s: {}",
            target(got == 100_000 && ms < 2000.0)
        );
    }
}

/// 3. Registration publish → watcher, under 1,000 heartbeats/s of load.
async fn propagation(o: &Opts) {
    let samples = o.n(1000, 200);
    println!(
        "\n## 3. Propagation: record publish → watcher, {samples} samples under 1,000 msg/s background load"
    );
    let mut p99s = Vec::new();
    for kind in ALL {
        let (mut p50s, mut p99v) = (Vec::new(), Vec::new());
        for run in 0..o.runs {
            let s = Subject::start(kind);
            preload(&s, 100).await;
            let mut lat = propagation_once(&s.url, &format!("lat{run}"), samples).await;
            p50s.push(pct(&mut lat, 0.5));
            p99v.push(pct(&mut lat, 0.99));
        }
        let (p50, p99) = (median(p50s), median(p99v));
        println!(
            "  {:<14} p50 {:>6.3} ms   p99 {:>6.3} ms",
            kind.label(),
            p50,
            p99
        );
        p99s.push(p99);
    }
    println!(
        "  p99 ratio homicro / mosquitto: {:.2}; homicro / rumqttd alone: {:.2}",
        p99s[0] / p99s[2],
        p99s[0] / p99s[1]
    );
    println!("  target p99 < 5 ms: {}", target(p99s[0] < 5.0));
}

/// One propagation measurement on `url` (publisher, watcher and the
/// background load all there): the latency of each of `samples` retained
/// records `TAG-i`, in ms. Clears the records afterwards, so that the next
/// measurement on the same process starts alike.
async fn propagation_once(url: &BrokerUrl, tag: &str, samples: usize) -> Vec<f64> {
    let stop = Arc::new(AtomicU64::new(0));
    let load = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let c = connect(&url).await;
            let mut sink = connect(&url).await;
            sink.subscribe(&["homicro/heartbeat/+"]).await;
            let drain = tokio::spawn(async move { while sink.rx.recv().await.is_some() {} });
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut i = 0usize;
            while stop.load(Ordering::Relaxed) == 0 {
                tick.tick().await;
                let hb = record(i % 100, "");
                let _ = c
                    .client
                    .publish(
                        format!("homicro/heartbeat/p{}", i % 100),
                        QoS::AtMostOnce,
                        false,
                        hb,
                    )
                    .await;
                i += 1;
            }
            drain.abort();
        })
    };
    let mut watcher = connect(url).await;
    watcher.subscribe(&["homicro/services/+"]).await;
    quiet(&mut watcher).await;
    let publisher = connect(url).await;
    let mut lat = Vec::new();
    let mut names = HashSet::new();
    for i in 0..samples {
        let name = format!("{tag}-{i}");
        let topic = format!("homicro/services/{name}");
        let t = Instant::now();
        publisher
            .client
            .publish(topic.clone(), QoS::AtLeastOnce, true, record(i, ""))
            .await
            .unwrap();
        loop {
            if let Some(Incoming::Message { topic: got, .. }) = watcher.rx.recv().await
                && got == topic
            {
                break;
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        names.insert(name);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(1, Ordering::Relaxed);
    let _ = load.await;
    for n in &names {
        publisher
            .client
            .publish(format!("homicro/services/{n}"), QoS::AtLeastOnce, true, "")
            .await
            .unwrap();
    }
    watch_clears(&mut watcher, &names, false, Duration::from_secs(30)).await;
    lat
}

/// Reads until nothing arrived for 50 ms (a retained snapshot, say).
async fn quiet(c: &mut Conn) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), c.rx.recv()).await {}
}

/// Waits until `watcher` has seen every name in `names` cleared (an empty
/// publish on services/NAME) and, when `events`, its `deregistered` event.
async fn watch_clears(
    watcher: &mut Conn,
    names: &HashSet<String>,
    events: bool,
    limit: Duration,
) -> bool {
    let (mut cleared, mut gone) = (HashSet::new(), HashSet::new());
    let deadline = tokio::time::Instant::now() + limit;
    while cleared.len() < names.len() || (events && gone.len() < names.len()) {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, watcher.rx.recv()).await else {
            return false;
        };
        if let Incoming::Message { topic, payload, .. } = m {
            if let Some(n) = topic.strip_prefix("homicro/services/") {
                if payload.is_empty() && names.contains(n) {
                    cleared.insert(n.to_string());
                }
            } else if let Some(n) = topic.strip_prefix("homicro/events/")
                && payload.windows(14).any(|w| w == b"\"deregistered\"")
                && names.contains(n)
            {
                gone.insert(n.to_string());
            }
        }
    }
    true
}

/// 4. N records with ttl 2 s: how late each clear arrives after its deadline.
async fn expiry(o: &Opts) {
    let n = o.n(10_000, 1_000);
    println!("\n## 4. Expiry precision: {n} records with ttl 2 s, no refresh (homicro only)");
    let (mut p50s, mut p99s, mut maxs) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..o.runs {
        let s = Subject::start(Kind::Homicro);
        let mut w = connect(&s.url).await;
        w.subscribe(&["homicro/events/+"]).await;
        let names: Vec<String> = (0..n).map(|i| format!("e{run}-{i}")).collect();
        publish_records(&s.url, names, 20, r#","ttl":2"#).await;
        // The registry's `registered` event marks when each deadline started.
        let mut accepted = std::collections::HashMap::new();
        let mut late = Vec::new();
        while late.len() < n {
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(30), w.rx.recv()).await
            else {
                println!("  run {run}: only {} of {n} expiries seen", late.len());
                break;
            };
            let Incoming::Message { topic, payload, .. } = m else {
                continue;
            };
            let name = topic.trim_start_matches("homicro/events/").to_string();
            let now = Instant::now();
            if payload.windows(12).any(|w| w == b"\"registered\"") {
                accepted.insert(name, now);
            } else if payload.windows(9).any(|w| w == b"\"expired\"")
                && let Some(t) = accepted.get(&name)
            {
                let lateness = now.saturating_duration_since(*t + Duration::from_secs(2));
                late.push(lateness.as_secs_f64() * 1000.0);
            }
        }
        p50s.push(pct(&mut late, 0.5));
        p99s.push(pct(&mut late, 0.99));
        maxs.push(pct(&mut late, 1.0));
    }
    let p99 = median(p99s);
    println!(
        "  lateness p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        median(p50s),
        p99,
        median(maxs)
    );
    println!("  target p99 < 100 ms: {}", target(p99 < 100.0));
}

/// A minimal MQTT 3.1.1 CONNECT with client id `id`, keepalive 10 s.
fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    body.extend((id.len() as u16).to_be_bytes());
    body.extend(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// One short-lived client: CONNECT, CONNACK, DISCONNECT, closed with RST so
/// that no TIME_WAIT piles up on this side. Returns the time from the TCP
/// connect to the CONNACK, `None` when none came within 5 s.
async fn touch(port: u16, id: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let _ = s.set_nodelay(true);
    s.write_all(&connect_packet(id)).await.ok()?;
    let mut ack = [0u8; 4];
    let ok = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
        .await
        .is_ok_and(|r| r.is_ok())
        && ack[0] == 0x20;
    let took = t.elapsed();
    let _ = s.write_all(&[0xe0, 0]).await;
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    ok.then_some(took)
}

/// 5. Resident memory holding N records, and after many short-lived clients.
async fn memory(o: &Opts) {
    let (n, conns) = (
        o.n(100_000, 5_000),
        o.connections.unwrap_or(o.n(100_000, 5_000)),
    );
    println!(
        "\n## 5. Memory: resident set holding {n} records, then after {conns} distinct short-lived connections"
    );
    let mut held = Vec::new();
    for kind in ALL {
        let s = Subject::start(kind);
        let idle = s.rss_mib();
        preload(&s, n).await;
        let with_records = s.rss_mib();
        let port = s.url.port;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..50 {
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for i in (w..conns).step_by(50) {
                    ok += touch(port, &format!("short-{i}")).await.is_some() as usize;
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        let after = s.rss_mib();
        let growth = (after / with_records - 1.0) * 100.0;
        println!(
            "  {:<14} idle {idle:>6.1} MiB   with {n} records {with_records:>6.1} MiB   after {ok} connections ({:.1} s) {after:>6.1} MiB ({growth:+.1}%)",
            kind.label(),
            t.elapsed().as_secs_f64()
        );
        held.push((with_records, growth));
    }
    println!(
        "  ratio homicro / mosquitto with records: {:.2}; homicro / rumqttd alone: {:.2}",
        held[0].0 / held[2].0,
        held[0].0 / held[1].0
    );
    println!(
        "  target < 100 MB with {n} records: {} ; target flat within 10% across connections: {}",
        target(held[0].0 * 1.048_576 < 100.0),
        target(held[0].1.abs() <= 10.0)
    );
}

/// 6. M services re-register every second for T seconds: CPU and lost events.
async fn churn(o: &Opts) {
    let (m, secs) = (o.n(1000, 100), o.n(60, 5) as u64);
    println!("\n## 6. Churn: {m} services re-register every second for {secs} s");
    let mut cpu_share = Vec::new();
    for kind in [Kind::Homicro, Kind::BrokerOnly] {
        let s = Subject::start(kind);
        preload(&s, 0).await;
        let names: Vec<String> = (0..m).map(|i| format!("c{i}")).collect();
        let mut w = connect(&s.url).await;
        w.subscribe(&["homicro/events/+"]).await;
        let counter = tokio::spawn(async move {
            let mut events = 0u64;
            while let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_secs(3), w.rx.recv()).await
            {
                if matches!(msg, Incoming::Message { .. }) {
                    events += 1;
                }
            }
            events
        });
        let cpu0 = s.cpu();
        let t0 = Instant::now();
        let pubs = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for chunk in names.chunks(m.div_ceil(10)) {
            let (chunk, url, pubs) = (chunk.to_vec(), s.url.clone(), pubs.clone());
            tasks.push(tokio::spawn(async move {
                let c = connect(&url).await;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                for _ in 0..secs {
                    tick.tick().await;
                    for (i, n) in chunk.iter().enumerate() {
                        c.client
                            .publish(
                                format!("homicro/services/{n}"),
                                QoS::AtLeastOnce,
                                true,
                                record(i, ""),
                            )
                            .await
                            .unwrap();
                        pubs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let wall = t0.elapsed();
        let cpu = s.cpu() - cpu0;
        let events = counter.await.unwrap();
        let published = pubs.load(Ordering::Relaxed);
        let share = cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
        cpu_share.push(share);
        if kind == Kind::Homicro {
            println!(
                "  {:<14} CPU {share:>5.1}% of one core; {published} publishes, {events} events (registered + updated), lost {}",
                kind.label(),
                published.saturating_sub(events)
            );
        } else {
            println!(
                "  {:<14} CPU {share:>5.1}% of one core (the broker's share of the same traffic)",
                kind.label()
            );
        }
    }
    println!(
        "  the registry's own share: {:.1}% of one core",
        cpu_share[0] - cpu_share[1]
    );
}

/// The two ways to the embedded broker that item 7 compares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The public port: the front, then rumqttd's v4 listener.
    Front,
    /// rumqttd's v4 listener itself, on loopback.
    Direct,
}

impl Path {
    /// Part of names and client ids (registry names are lower case).
    fn tag(self) -> &'static str {
        match self {
            Path::Front => "front",
            Path::Direct => "direct",
        }
    }

    /// The order within run `run`: alternating, so that warm-up and drift
    /// within a run hit both paths alike.
    fn order(run: usize) -> [Path; 2] {
        if run.is_multiple_of(2) {
            [Path::Front, Path::Direct]
        } else {
            [Path::Direct, Path::Front]
        }
    }
}

/// One figure per run on each path.
#[derive(Default)]
struct Pair {
    front: Vec<f64>,
    direct: Vec<f64>,
}

impl Pair {
    fn push(&mut self, path: Path, v: f64) {
        match path {
            Path::Front => self.front.push(v),
            Path::Direct => self.direct.push(v),
        }
    }

    /// Medians over the runs: (front, direct, front / direct).
    fn medians(&self) -> (f64, f64, f64) {
        let (f, d) = (median(self.front.clone()), median(self.direct.clone()));
        (f, d, f / d)
    }

    /// front / direct run by run, for the spread.
    fn per_run(&self) -> String {
        let r: Vec<String> = self
            .front
            .iter()
            .zip(&self.direct)
            .map(|(f, d)| format!("{:.2}", f / d))
            .collect();
        r.join(" ")
    }

    fn line(&self, what: &str, unit: &str, decimals: usize) {
        let (f, d, r) = self.medians();
        println!(
            "    {what:<34} front {f:>9.decimals$}{unit}   direct {d:>9.decimals$}{unit}   front/direct {r:.2} (runs: {})",
            self.per_run()
        );
    }
}

/// 7. The one-port front against rumqttd's own v4 listener behind it.
///
/// One `serve` process, the same workloads, front and direct interleaved.
async fn front_cost(o: &Opts) {
    let (n, k) = (o.n(20_000, 2_000), 50);
    let (samples, one_by_one, storm) = (o.n(1000, 100), o.n(500, 50), o.n(2_000, 200));
    println!(
        "\n## 7. Front vs direct: one serve process, through the public port vs straight to rumqttd's v4 listener, interleaved"
    );
    println!(
        "  (a) {k} connected clients register {n} names with host, until a watcher saw all; (b) propagation, {samples} samples under 1,000 msg/s; (c) connect → CONNACK, {one_by_one} one by one, then {storm} by 50 at a time"
    );
    let mut verdicts = Vec::new();
    for kind in [Kind::BrokerOnly, Kind::Homicro] {
        let s = Subject::start(kind);
        let direct = s
            .direct
            .clone()
            .expect("serve logs the front's v4= address");
        let url = |p: Path| match p {
            Path::Front => s.url.clone(),
            Path::Direct => direct.clone(),
        };
        println!(
            "  {}",
            if kind == Kind::Homicro {
                "registry on (homicro as shipped):"
            } else {
                "--no-registry (the front alone: the headline):"
            }
        );
        // Heartbeats of (b)'s load refresh these.
        preload(&s, 100).await;
        for p in [Path::Front, Path::Direct] {
            registrations(&s, &url(p), &format!("w{}", p.tag()), n / 10, k).await;
        }
        let (mut rate, mut cpu) = (Pair::default(), Pair::default());
        for run in 0..o.runs {
            for p in Path::order(run) {
                let (r, c) = registrations(&s, &url(p), &format!("t{run}{}", p.tag()), n, k).await;
                rate.push(p, r);
                cpu.push(p, c);
            }
        }
        let (mut p50, mut p99) = (Pair::default(), Pair::default());
        for run in 0..o.runs {
            for p in Path::order(run) {
                let mut lat =
                    propagation_once(&url(p), &format!("l{run}{}", p.tag()), samples).await;
                p50.push(p, pct(&mut lat, 0.5));
                p99.push(p, pct(&mut lat, 0.99));
            }
        }
        let (mut setup, mut rate_storm) = (Pair::default(), Pair::default());
        let (mut late, mut lost) = ([0usize; 2], [0usize; 2]);
        let retries0 = s.front_retries.load(Ordering::Relaxed);
        for run in 0..o.runs {
            for p in Path::order(run) {
                let port = url(p).port;
                let mut times = Vec::new();
                for i in 0..one_by_one {
                    if let Some(t) = touch(port, &format!("c{run}{}-{i}", p.tag())).await {
                        times.push(t.as_secs_f64() * 1000.0);
                    }
                }
                setup.push(p, median(times));
                let t = Instant::now();
                let mut tasks = Vec::new();
                for w in 0..50 {
                    tasks.push(tokio::spawn(async move {
                        let mut got = Vec::new();
                        for i in (w..storm).step_by(50) {
                            got.push(touch(port, &format!("s{run}{}-{i}", p.tag())).await);
                        }
                        got
                    }));
                }
                for task in tasks {
                    for got in task.await.unwrap() {
                        late[p as usize] += got.is_none_or(|t| t > Duration::from_secs(2)) as usize;
                        lost[p as usize] += got.is_none() as usize;
                    }
                }
                rate_storm.push(p, storm as f64 / t.elapsed().as_secs_f64());
            }
        }
        let retries = s.front_retries.load(Ordering::Relaxed) - retries0;
        rate.line("registrations/s", "", 0);
        cpu.line("serve CPU per 1,000 registrations", " ms", 1);
        p50.line("propagation p50", " ms", 3);
        p99.line("propagation p99", " ms", 3);
        setup.line("connect → CONNACK, median", " ms", 3);
        rate_storm.line("connections/s, 50 at a time", "", 0);
        println!(
            "    CONNACK not within 2 s (of which none within 5 s): front {} ({}), direct {} ({}); the front retried {retries} CONNECTs rumqttd left unanswered",
            late[0], lost[0], late[1], lost[1]
        );
        let ok = rate.medians().2 >= 0.9 && p99.medians().2 <= 1.1;
        verdicts.push(ok);
    }
    println!(
        "  target throughput and p99 within 10% through the front: {} (--no-registry, the headline); {} (registry on)",
        target(verdicts[0]),
        target(verdicts[1])
    );
}

/// Item 1's workload on `url`, on a process that lives on: `k` connected
/// clients publish `n` retained records `TAG-sI`, each with its own host
/// (so that the front completes nothing), as fast as they go. Returns
/// registrations/s until a watcher saw all (with the registry: and their
/// `registered` events) and the serve process's CPU ms per 1,000; then
/// clears them.
async fn registrations(s: &Subject, url: &BrokerUrl, tag: &str, n: usize, k: usize) -> (f64, f64) {
    let events = s.kind == Kind::Homicro;
    let mut watcher = connect(url).await;
    watcher
        .subscribe(&["homicro/services/+", "homicro/events/+"])
        .await;
    quiet(&mut watcher).await;
    let mut clients = Vec::new();
    for task in (0..k)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { connect(&url).await })
        })
        .collect::<Vec<_>>()
    {
        clients.push(task.await.unwrap());
    }
    let names: Vec<String> = (0..n).map(|i| format!("{tag}-s{i}")).collect();
    let want: HashSet<String> = names.iter().cloned().collect();
    let per = n.div_ceil(k);
    let (cpu0, t) = (s.cpu(), Instant::now());
    for (c, (j, chunk)) in clients.iter().zip(names.chunks(per).enumerate()) {
        let (client, chunk) = (c.client.clone(), chunk.to_vec());
        tokio::spawn(async move {
            for (i, name) in chunk.iter().enumerate() {
                client
                    .publish_bytes(
                        format!("homicro/services/{name}"),
                        QoS::AtLeastOnce,
                        true,
                        Bytes::from(record(j * per + i, "")),
                    )
                    .await
                    .unwrap();
            }
        });
    }
    let ok = watch_all(&mut watcher, &want, events, Duration::from_secs(120)).await;
    let took = t.elapsed();
    let cpu = s.cpu() - cpu0;
    if !ok {
        println!("    {tag}: did not complete");
    }
    for (c, chunk) in clients.iter().zip(names.chunks(per)) {
        for name in chunk {
            c.client
                .publish(
                    format!("homicro/services/{name}"),
                    QoS::AtLeastOnce,
                    true,
                    "",
                )
                .await
                .unwrap();
        }
    }
    watch_clears(&mut watcher, &want, events, Duration::from_secs(120)).await;
    (
        n as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / (n as f64 / 1000.0),
    )
}
