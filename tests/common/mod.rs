//! The one shared test helper: starts `homicro serve` (the real binary) on a
//! free port and waits until the registry announces itself online; starts a
//! real `mosquitto` on a free port; and wraps rumqttc and the mosquitto
//! command-line clients. No sleeps: every wait is for a message or a line.

#![allow(dead_code)]

pub mod certs;
mod client;
pub mod raw;

pub use client::Client;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use homicro::config::BrokerUrl;
use homicro::mqtt::Incoming;
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(10);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_homicro")
}

/// A running `homicro serve` child process; killed on drop.
pub struct Serve {
    pub child: Child,
    pub url: BrokerUrl,
    pub dir: PathBuf,
    /// `--state-dir`.
    pub state: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Serve {
    /// `serve` on 127.0.0.1 with a free port and a fresh state directory.
    pub async fn start() -> Serve {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let mut s = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
        s._tmp = Some(tmp);
        s
    }

    /// `serve` with `args` and the state directory `state`; waits until
    /// online.
    pub async fn start_with(args: &[&str], state: &Path) -> Serve {
        Serve::spawn(args, state, None).await
    }

    /// `start`, with the file-descriptor limit (soft and hard, so serve
    /// cannot raise it) set to `nofile` in the child before it runs, as
    /// `prlimit --nofile=N:N` would.
    pub async fn start_with_fd_limit(nofile: u64) -> Serve {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let args = ["--listen", "127.0.0.1:0"];
        let mut s = Serve::spawn(&args, &state, Some(nofile)).await;
        s._tmp = Some(tmp);
        s
    }

    async fn spawn(args: &[&str], state: &Path, nofile: Option<u64>) -> Serve {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args(args)
            .arg("--state-dir")
            .arg(state)
            .env("RUST_LOG", log_filter(args))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and reads a copied
            // local; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &lim) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn homicro serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("homicro serving") {
                    let url = line
                        .split("url=")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next());
                    let _ = tx.send(url.map(str::to_string));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let url = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT))
            .await
            .unwrap()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("serve did not start: {:?}", log.lock().unwrap()));
        let url = BrokerUrl::parse(&url).unwrap();
        let s = Serve {
            child,
            url,
            dir: state.parent().unwrap().to_path_buf(),
            state: state.to_path_buf(),
            log,
            _tmp: None,
        };
        s.wait_online().await;
        s
    }

    /// Waits until `PREFIX/registry` says online (retained).
    pub async fn wait_online(&self) {
        let mut c = Client::connect(&self.url).await;
        c.subscribe("homicro/registry").await;
        c.expect("homicro/registry", |v| v["state"] == "online")
            .await;
    }

    pub fn port(&self) -> u16 {
        self.url.port
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// How many lines serve has logged so far.
    pub fn log_lines(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Lines logged from the `from`th on.
    pub fn log_since(&self, from: usize) -> Vec<String> {
        self.log.lock().unwrap()[from..].to_vec()
    }

    /// Waits for a log line containing `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < WAIT,
                "no log line with {needle:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits (up to `WAIT`) for serve to exit by itself.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < WAIT,
                "serve did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then wait; returns the status and how long it took.
    pub async fn terminate(&mut self) -> (ExitStatus, Duration) {
        let start = Instant::now();
        signal(self.child.id(), "TERM");
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st, start.elapsed());
            }
            assert!(start.elapsed() < WAIT, "serve did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let log = self.log();
            assert!(!log.contains("panicked at"), "serve panicked:\n{log}");
        }
    }
}

/// RUST_LOG for a serve started with `args` (honours `--log-level`).
fn log_filter(args: &[&str]) -> String {
    let level = args
        .iter()
        .position(|a| *a == "--log-level")
        .and_then(|i| args.get(i + 1))
        .unwrap_or(&"info");
    std::env::var("SERVE_LOG").unwrap_or(level.to_string())
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A free TCP port on 127.0.0.1 (for processes that cannot take port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real `mosquitto` on a free port; killed on drop.
pub struct Mosquitto {
    pub child: Child,
    pub url: BrokerUrl,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        Mosquitto::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 set_tcp_nodelay true\n"
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (scripts/test installs it)");
        let url = BrokerUrl {
            host: "127.0.0.1".into(),
            port,
            login: None,
            tls: false,
            cafile: None,
            fail_fast: false,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < WAIT, "mosquitto did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Mosquitto {
            child,
            url,
            _dir: dir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Registers `n` records `svc-I` and a last one, `probe`, from one client;
/// returns once the registry has accepted `probe` (and so every record
/// before it: one client's publishes arrive in order).
pub async fn fill(url: &BrokerUrl, n: usize) {
    let c = Client::connect(url).await;
    for i in 0..n {
        let rec = format!(r#"{{"host":"10.1.{}.{}","port":80}}"#, i / 250, i % 250);
        c.publish(&format!("homicro/services/svc-{i}"), rec, true)
            .await;
    }
    let mut ev = Client::connect(url).await;
    ev.subscribe("homicro/events/probe").await;
    c.publish("homicro/services/probe", r#"{"host":"10.9.9.9"}"#, true)
        .await;
    // The registry judges every record first: a debug build takes ~10 s
    // for 100,000.
    let waited = std::time::Instant::now();
    let within = WAIT + Duration::from_millis(n as u64 / 2);
    tokio::time::timeout(within, async {
        while let Some(m) = ev.rx.recv().await {
            if let Incoming::Message { topic, .. } = m
                && topic == "homicro/events/probe"
            {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} records not registered within {within:?}"));
    println!(
        "fill: {n} records registered {:?} after the last publish",
        waited.elapsed()
    );
}

/// Every retained record a fresh rumqttc subscriber at QoS 0 receives,
/// as name → payload, complete (see `homicro list`).
pub async fn records(url: &BrokerUrl) -> std::collections::BTreeMap<String, String> {
    let out = homicro_cmd(&["list", "--json", "--broker", &url.to_string()]);
    assert!(out.status.success(), "list failed: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

/// `GET path` over HTTP/1.1 on a fresh connection: (status, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .unwrap();
    let mut resp = String::new();
    let read = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut resp),
    )
    .await;
    read.unwrap_or_else(|_| panic!("no answer to GET {path} in {WAIT:?}"))
        .unwrap();
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let status = status.unwrap_or_else(|| panic!("not HTTP: {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// The value of the unlabelled series `name` in `GET /metrics`.
pub async fn metric(port: u16, name: &str) -> u64 {
    let (status, body) = http_get(port, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    let value = |l: &str| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok();
    body.lines()
        .find_map(value)
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// Runs `homicro ARGS` to completion.
pub fn homicro_cmd(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `mosquitto_pub -p PORT ARGS`.
pub fn mosquitto_pub(url: &BrokerUrl, args: &[&str]) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", &url.host, "-p", &url.port.to_string()])
        .args(args)
        .output()
        .expect("mosquitto_pub is installed");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {}",
        stderr(&out)
    );
}

/// How many retained records a fresh `mosquitto_sub -V version -q qos` on
/// `homicro/services/+` prints, waiting for `n` of them (at most 20 s).
pub fn mosquitto_sub_records(url: &BrokerUrl, version: &str, qos: u8, n: usize) -> usize {
    let out = Command::new("mosquitto_sub")
        .args(["-h", &url.host, "-p", &url.port.to_string()])
        .args(["-V", version, "-q", &qos.to_string()])
        .args(["-t", "homicro/services/+", "-C", &n.to_string(), "-W", "20"])
        .output()
        .expect("mosquitto_sub is installed");
    assert!(
        out.status.success(),
        "mosquitto_sub {version} got fewer than {n}: {}",
        stderr(&out)
    );
    stdout(&out).lines().count()
}

/// A child process whose stdout lines are collected; killed on drop.
pub struct Proc {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    /// `homicro ARGS`.
    pub fn homicro(args: &[&str]) -> Proc {
        Proc::spawn(Command::new(bin()).args(args))
    }

    /// `homicro ARGS`, its stderr lines collected with its stdout's.
    pub fn homicro_with_stderr(args: &[&str]) -> Proc {
        let mut p = Proc::spawn(Command::new(bin()).args(args).stderr(Stdio::piped()));
        let err = p.child.stderr.take().unwrap();
        let sink = p.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        p
    }

    /// `mosquitto_sub -v -d ARGS`; waits until subscribed (its SUBACK line).
    pub async fn mosquitto_sub(url: &BrokerUrl, args: &[&str]) -> Proc {
        // stdbuf: mosquitto_sub block-buffers its output into a pipe.
        let p = Proc::spawn(
            Command::new("stdbuf")
                .args(["-oL", "mosquitto_sub", "-h", &url.host])
                .args(["-p", &url.port.to_string(), "-v", "-d"])
                .args(args)
                .stderr(Stdio::null()),
        );
        p.wait_line(|l| l.contains("SUBACK")).await;
        p
    }

    /// Waits for a line satisfying `pred`; returns it.
    pub async fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let found = || self.lines.lock().unwrap().iter().find(|l| pred(l)).cloned();
        wait_until(&found, || {
            format!("no such line in {:?}", self.lines.lock().unwrap())
        })
        .await
    }

    /// Output lines so far, without mosquitto_sub's debug lines.
    pub fn messages(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        let debug = |l: &&String| l.starts_with("Client ") || l.starts_with("Subscribed");
        lines.iter().filter(|l| !debug(l)).cloned().collect()
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let mut status = || child.try_wait().unwrap();
        let mut last = None;
        let start = Instant::now();
        while last.is_none() {
            last = status();
            assert!(start.elapsed() < WAIT, "did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        last.unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` every 10 ms until it returns a value; fails after `WAIT`.
pub async fn wait_until<T>(probe: impl Fn() -> Option<T>, why: impl Fn() -> String) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "{}", why());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[allow(unused_imports)] // used by the TLS tests only
pub use certs::make_certs;
