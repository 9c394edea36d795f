//! The brokers under test, each started by the bench on a free loopback
//! port and ended when dropped: homicro (`serve`, the registry as the gate),
//! the bus alone (`serve --no-registry`) and a plain Mosquitto.

#[path = "../../tests/common/certs.rs"]
mod certs;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// `homicro serve`: the bus with the registry judging every record.
    Homicro,
    /// `homicro serve --no-registry`: the same bus, nothing judged.
    Bus,
    /// Mosquitto 2 with a user's defaults (and TCP_NODELAY).
    Mosquitto,
}

pub const ALL: [Kind; 3] = [Kind::Homicro, Kind::Bus, Kind::Mosquitto];

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Homicro => "homicro",
            Kind::Bus => "bus alone",
            Kind::Mosquitto => "mosquitto",
        }
    }

    /// Whether the registry answers records (with events).
    pub fn registry(self) -> bool {
        self == Kind::Homicro
    }

    /// The subjects in the order of run `run`: rotated, so that warm-up
    /// and drift on a shared machine hit each subject alike.
    ///
    /// With HOMICRO_BENCH_KINDS (labels, comma-separated: `homicro,bus
    /// alone`), only those: for profiling one subject at a time.
    pub fn order(kinds: &[Kind], run: usize) -> Vec<Kind> {
        let mut v = kinds.to_vec();
        v.rotate_left(run % kinds.len());
        if let Ok(only) = std::env::var("HOMICRO_BENCH_KINDS") {
            v.retain(|k| only.split(',').any(|o| o.trim() == k.label()));
        }
        v
    }
}

/// Where a subject keeps its state (item 10).
#[derive(Clone, Debug, Default)]
pub enum Store {
    /// homicro: a journal in `DIR/state` of the subject's own tempdir;
    /// Mosquitto: a user's default (nothing persisted).
    #[default]
    Default,
    /// homicro: `state_dir = ""` in its config file (nothing kept,
    /// acknowledgements do not wait for a disk; `--state-dir ''` is refused
    /// by the flag parser as a missing value); Mosquitto: as `Default`.
    Off,
    /// homicro: `--state-dir DIR` (outlives the subject: restart it on the
    /// same directory); Mosquitto: `persistence true`,
    /// `persistence_location DIR/` (autosave at its default).
    At(std::path::PathBuf),
}

/// What the subject's log said that a reader of the figures should know.
#[derive(Default)]
struct Log {
    warnings: usize,
    first: Vec<String>,
    /// serve's `state recovered` line (logged with item 10's filter).
    recovered: Option<String>,
}

/// A broker under test; killed on drop.
pub struct Subject {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
    /// The broker's own process (differs from `child` under a wrapper).
    pid: u32,
    log: Arc<Mutex<Log>>,
    _dir: tempfile::TempDir,
}

/// Files for a broker with trust on: a CA and the server's certificate
/// (for 127.0.0.1), a password file (made by mosquitto_passwd: the same
/// hashes for both brokers) and an ACL file.
pub struct TrustFiles {
    pub ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    passwd: std::path::PathBuf,
    acl: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TrustFiles {
    pub fn make(user: &str, password: &str, acl: &str) -> TrustFiles {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = certs::make_certs(dir.path());
        let out = Command::new("mosquitto_passwd")
            .args(["-c", "-b", "passwd", user, password])
            .current_dir(dir.path())
            .output()
            .expect("mosquitto_passwd (apt-get install mosquitto)");
        assert!(out.status.success(), "mosquitto_passwd: {out:?}");
        std::fs::write(dir.path().join("acl"), acl).unwrap();
        let p = |f: &str| dir.path().join(f);
        TrustFiles {
            ca,
            cert,
            key,
            passwd: p("passwd"),
            acl: p("acl"),
            _dir: dir,
        }
    }
}

impl Subject {
    pub fn start(kind: Kind) -> Subject {
        Subject::start_with(kind, None)
    }

    /// The broker with a password file, an ACL file and TLS (only) on its
    /// port: Mosquitto configured the same way homicro is.
    pub fn start_secured(kind: Kind, files: &TrustFiles) -> Subject {
        Subject::start_with(kind, Some(files))
    }

    /// The broker keeping its state as `store` says (item 10). homicro
    /// logs its `state recovered` line (see [`Subject::recovered`]).
    pub fn start_stored(kind: Kind, store: Store) -> Subject {
        Subject::start_full(kind, None, &store)
    }

    fn start_with(kind: Kind, trust: Option<&TrustFiles>) -> Subject {
        Subject::start_full(kind, trust, &Store::Default)
    }

    fn start_full(kind: Kind, trust: Option<&TrustFiles>, store: &Store) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let (child, addr) = match kind {
            Kind::Mosquitto => start_mosquitto(&dir, trust, store),
            _ => start_serve(kind, &dir, log.clone(), trust, store),
        };
        let pid = match std::env::var("HOMICRO_BENCH_WRAP") {
            Ok(_) if kind != Kind::Mosquitto => {
                descendant(child.id(), "homicro").unwrap_or(child.id())
            }
            _ => child.id(),
        };
        Subject {
            kind,
            addr,
            child,
            pid,
            log,
            _dir: dir,
        }
    }

    /// With HOMICRO_BENCH_SMAPS=DIR: copies /proc/PID/smaps to
    /// DIR/KIND-LABEL.smaps, for reading where memory went.
    pub fn dump_smaps(&self, label: &str) {
        if let Ok(dir) = std::env::var("HOMICRO_BENCH_SMAPS") {
            let name = format!(
                "{dir}/{}-{label}.smaps",
                self.kind.label().replace(' ', "-")
            );
            let _ = std::fs::copy(format!("/proc/{}/smaps", self.pid), name);
        }
    }

    /// A field of /proc/PID/status in MiB (`VmRSS`, `RssAnon`, ...).
    pub fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let kb: f64 = status
            .lines()
            .find(|l| l.split(':').next() == Some(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    /// serve's `state recovered` log line, once logged (only subjects
    /// started by [`Subject::start_stored`] log it).
    pub fn recovered(&self) -> Option<String> {
        self.log.lock().unwrap().recovered.clone()
    }

    /// Resident memory in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS")
    }

    /// CPU time used so far (user + system).
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Duration::from_secs_f64(ticks as f64 / hz)
    }

    /// Waits until resident memory moved less than 1% over 500 ms (at
    /// most `limit`), then returns it in MiB.
    pub async fn settled_rss(&self, limit: Duration) -> f64 {
        let end = tokio::time::Instant::now() + limit;
        let mut last = self.rss_mib();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.rss_mib();
            if (now - last).abs() <= last * 0.01 || tokio::time::Instant::now() >= end {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        // SIGTERM to the broker itself (under a wrapper too), so that it
        // ends as a user's would and a wrapping profiler writes its data.
        // SAFETY: kill(2) on our own child's (or its descendant's) pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let mut ended = false;
        for _ in 0..1000 {
            if let Ok(Some(_)) = self.child.try_wait() {
                ended = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !ended {
            println!(
                "  ({} did not end within 10 s of SIGTERM: killed)",
                self.kind.label()
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let log = self.log.lock().unwrap();
        if log.warnings > 0 {
            println!(
                "  ({} logged {} warnings or errors; first: {})",
                self.kind.label(),
                log.warnings,
                log.first.join(" | ")
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_mosquitto(
    dir: &tempfile::TempDir,
    trust: Option<&TrustFiles>,
    store: &Store,
) -> (Child, SocketAddr) {
    let port = free_port();
    let conf = dir.path().join("m.conf");
    // A user's mosquitto: defaults, plus TCP_NODELAY as its documentation
    // recommends for latency.
    let mut text = format!("listener {port} 127.0.0.1\nset_tcp_nodelay true\n");
    match trust {
        None => text.push_str("allow_anonymous true\n"),
        Some(t) => text.push_str(&format!(
            "certfile {}\nkeyfile {}\npassword_file {}\nacl_file {}\nallow_anonymous false\n\
             user root\n",
            t.cert.display(),
            t.key.display(),
            t.passwd.display(),
            t.acl.display()
        )),
    }
    if let Store::At(kept) = store {
        // The directory is ours: as root, Mosquitto would otherwise switch
        // to its own user, who may not write there.
        text.push_str(&format!(
            "persistence true\npersistence_location {}/\n",
            kept.display()
        ));
        if trust.is_none() {
            text.push_str("user root\n");
        }
    }
    std::fs::write(&conf, text).unwrap();
    let bin = if std::path::Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto)");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn start_serve(
    kind: Kind,
    dir: &tempfile::TempDir,
    log: Arc<Mutex<Log>>,
    trust: Option<&TrustFiles>,
    store: &Store,
) -> (Child, SocketAddr) {
    let wrap = std::env::var("HOMICRO_BENCH_WRAP")
        .unwrap_or_default()
        .replace("{kind}", &kind.label().replace(' ', "-"));
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg(env!("CARGO_BIN_EXE_homicro"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_homicro")),
    };
    // The port is chosen here: serve's log filter stays its own (a
    // RUST_LOG would also let rumqttd's router spans through, which cost it
    // a fifth of its time).
    let port = free_port();
    let level = std::env::var("HOMICRO_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    cmd.arg("serve")
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            &level,
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match store {
        Store::Default => {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
        Store::At(kept) => {
            cmd.arg("--state-dir").arg(kept);
        }
        Store::Off => {}
    }
    if !matches!(store, Store::Default) {
        // The one info line of recovery, nothing else above `level`.
        cmd.env(
            "RUST_LOG",
            format!("{level},homicro::durable=info,rustls=error"),
        );
    }
    if kind == Kind::Bus {
        cmd.arg("--no-registry");
    }
    if let Some(t) = trust {
        let conf = dir.path().join("homicro.toml");
        let text = format!(
            "[auth]\npassword_file = {:?}\nacl_file = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\nrequire = true\n",
            t.passwd, t.acl, t.cert, t.key
        );
        std::fs::write(&conf, text).unwrap();
        cmd.arg("--config").arg(conf);
    } else if let Store::Off = store {
        // A top-level key: before any table of HOMICRO_BENCH_CONFIG's.
        let conf = dir.path().join("homicro.toml");
        let mut text = "state_dir = \"\"\n".to_string();
        if let Ok(extra) = std::env::var("HOMICRO_BENCH_CONFIG") {
            text.push_str(&std::fs::read_to_string(extra).unwrap());
        }
        std::fs::write(&conf, text).unwrap();
        cmd.arg("--config").arg(conf);
    } else if let Ok(conf) = std::env::var("HOMICRO_BENCH_CONFIG") {
        cmd.args(["--config", &conf]);
    }
    let mut child = cmd.spawn().expect("homicro");
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Keep reading: a full pipe would block serve's logging.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("state recovered") {
                log.lock().unwrap().recovered = Some(line.clone());
            }
            // Item 10's journal-off subject warns so by design.
            let chosen = line.contains("state_dir is empty");
            if (line.contains("WARN") || line.contains("ERROR")) && !chosen {
                let mut log = log.lock().unwrap();
                log.warnings += 1;
                if log.first.len() < 3 {
                    log.first.push(line.chars().take(300).collect());
                }
            }
        }
    });
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited at start ({status}): port {port} taken?");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The first process under `root` (itself included) whose name is `name`.
fn descendant(root: u32, name: &str) -> Option<u32> {
    for _ in 0..200 {
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == name {
                return Some(pid);
            }
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .ok()?
                .flatten()
            {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                stack.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}
