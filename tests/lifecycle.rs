//! End to end: flags and config, the state file across restarts, shutdown,
//! and `serve --broker` against a real mosquitto.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const WEB: &str = r#"{"host":"10.0.0.5","port":8080,"ttl":60}"#;
const NAS: &str = r#"{"host":"nas.local"}"#;

#[test]
fn bad_flags_and_config_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad_key = dir.path().join("bad.toml");
    std::fs::write(&bad_key, "listen = \"127.0.0.1:0\"\ncolour = \"blue\"\n").unwrap();
    let bad_value = dir.path().join("value.toml");
    std::fs::write(&bad_value, "[embedded]\nmax_connections = -1\n").unwrap();
    let bad_key = bad_key.to_str().unwrap();
    let bad_value = bad_value.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--listen", "1883"],
            "listen: \"1883\" is not an address; expected IP:PORT",
        ),
        (
            vec!["--log-level", "loud"],
            "log_level: \"loud\" is not a log level; expected one of error, warn",
        ),
        (
            vec!["--broker", "http://x"],
            "broker: \"http://x\" is not a broker URL: expected mqtt://HOST:PORT",
        ),
        (
            vec!["--prefix", "a/+"],
            "prefix: \"a/+\" is not a topic prefix",
        ),
        (
            vec!["--config", bad_key],
            "colour: unknown key; accepted keys are listen, broker",
        ),
        (
            vec!["--config", bad_value],
            "embedded.max_connections: must be an integer from 1 to 1000000, got -1",
        ),
        (
            vec!["--config", "/nonexistent.toml"],
            "--config /nonexistent.toml: cannot read",
        ),
        (vec!["--lisen", "x"], "unexpected argument '--lisen'"),
    ];
    for (args, want) in cases {
        let out = Command::new(bin())
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{args:?}: {:?} lacks {want:?}",
            stderr(&out)
        );
    }
    // A port in use is refused before anything else starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(bin())
        .args(["serve", "--listen", &addr, "--state-file"])
        .arg(dir.path().join("s.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("cannot listen on {addr}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn config_prints_the_shipped_defaults_and_serve_reads_them() {
    let out = homicro_cmd(&["config"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("listen = \"0.0.0.0:1883\""));
    assert!(text.contains("[embedded]"));
    homicro::config::ServeConfig::load(Some(("printed", &text)), &Default::default())
        .expect("the printed config is valid");
}

#[tokio::test]
async fn sigterm_goes_offline_flushes_state_and_exits_quickly() {
    let mut s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.register("web", WEB).await;
    c.subscribe("homicro/registry").await;
    c.expect("homicro/registry", |v| v["state"] == "online")
        .await;
    let (status, took) = s.terminate().await;
    assert_eq!(status.code(), Some(0), "{}", s.log());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    c.expect("homicro/registry", |v| v["state"] == "offline")
        .await;
    let saved = std::fs::read_to_string(&s.state_file).unwrap();
    assert!(saved.contains("10.0.0.5"), "{saved}");
}

#[tokio::test]
async fn a_restart_loses_no_registration() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let (mut s, c) = serve_web_and_nas(&state).await;
    s.kill();
    drop(c);

    let s2 = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let recs = records(&s2.url).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs["web"].contains("10.0.0.5"));
    assert!(s2.log().contains("restored from state file"));
    // The restored owner still owns its name.
    let mut c = Client::connect(&s2.url).await;
    c.subscribe("homicro/errors/web").await;
    c.publish(
        "homicro/services/web",
        r#"{"host":"10.0.0.6","port":8080}"#,
        true,
    )
    .await;
    c.expect("homicro/errors/web", |v| v["error"] == "owned")
        .await;
}

/// `serve` on `state` with `web` and `nas` registered and written to the
/// state file (soon after the change, without a shutdown).
async fn serve_web_and_nas(state: &std::path::Path) -> (Serve, Client) {
    let s = Serve::start_with(&["--listen", "127.0.0.1:0"], state).await;
    let mut c = Client::connect(&s.url).await;
    c.register("web", WEB).await;
    c.register("nas", NAS).await;
    state_with(state, "nas.local").await;
    (s, c)
}

/// Waits until the state file says `has` (and returns it).
async fn state_with(state: &std::path::Path, has: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(state).unwrap_or_default();
        if text.contains(has) {
            return text;
        }
        assert!(start.elapsed() < WAIT, "state file never had {has}: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state file's writer keeps its own copy of the records, kept up to
/// date by the registry's log of changes: removals reach the file, and
/// records loaded at start stay in it when later changes are written.
#[tokio::test]
async fn the_state_file_follows_removals_and_keeps_what_was_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let (mut s, mut c) = serve_web_and_nas(&state).await;
    c.publish("homicro/services/nas", "", true).await;
    c.register("db", r#"{"host":"db.local"}"#).await;
    let saved = state_with(&state, "db.local").await;
    assert!(
        !saved.contains("nas"),
        "a deregistration is written: {saved}"
    );
    s.kill();
    drop(c);

    let s2 = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let mut c = Client::connect(&s2.url).await;
    c.register("cam", r#"{"host":"cam.local"}"#).await;
    let saved = state_with(&state, "cam.local").await;
    for kept in ["10.0.0.5", "db.local"] {
        assert!(
            saved.contains(kept),
            "{kept} was loaded and is kept: {saved}"
        );
    }
    assert!(!saved.contains("nas"), "{saved}");
}

#[tokio::test]
async fn a_corrupt_state_file_is_moved_aside_and_serve_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{\"version\":1,\"records\":").unwrap();
    let s = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    assert!(
        s.log().contains("state file unusable; moved aside"),
        "{}",
        s.log()
    );
    assert!(s.log().contains("is corrupt"));
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.bad-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read_to_string(aside[0].path()).unwrap(),
        "{\"version\":1,\"records\":"
    );
    let mut c = Client::connect(&s.url).await;
    c.register("web", WEB).await;
    assert_eq!(records(&s.url).await.len(), 1);
}

#[tokio::test]
async fn external_broker_mode_against_mosquitto() {
    let mosq = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let broker = mosq.url.to_string();
    let mut s = Serve::start_with(&["--broker", &broker], &state).await;
    assert_eq!(s.url, mosq.url);

    let mut c = Client::connect(&mosq.url).await;
    c.register("web", WEB).await;
    c.subscribe("homicro/errors/web").await;
    mosquitto_pub(
        &mosq.url,
        &[
            "-t",
            "homicro/services/web",
            "-r",
            "-m",
            r#"{"host":"10.0.0.6"}"#,
        ],
    );
    c.expect("homicro/errors/web", |v| v["error"] == "owned")
        .await;
    mosquitto_pub(
        &mosq.url,
        &["-t", "homicro/services/web", "-r", "-m", "nope"],
    );
    c.expect("homicro/errors/web", |v| v["error"] == "invalid")
        .await;
    assert!(records(&mosq.url).await["web"].contains("10.0.0.5"));

    // The will: a registry that dies leaves `offline` behind.
    c.subscribe("homicro/registry").await;
    s.kill();
    c.expect("homicro/registry", |v| v["state"] == "offline")
        .await;
}

#[tokio::test]
async fn external_broker_restart_gets_every_record_back() {
    let mut mosq = Mosquitto::start().await;
    let port = mosq.url.port;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let s = Serve::start_with(&["--broker", &mosq.url.to_string()], &state).await;
    let mut c = Client::connect(&mosq.url).await;
    c.register("web", WEB).await;
    c.register("nas", NAS).await;
    drop(c);

    // mosquitto without persistence forgets every retained message.
    mosq.kill();
    let mosq = Mosquitto::start_on(port).await;
    // The registry reconnects, re-publishes, resubscribes.
    s.wait_online().await;
    let recs = records(&mosq.url).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    let mut c = Client::connect(&mosq.url).await;
    c.subscribe("homicro/errors/web").await;
    c.publish("homicro/services/web", r#"{"host":"10.0.0.6"}"#, true)
        .await;
    c.expect("homicro/errors/web", |v| v["error"] == "owned")
        .await;
}

#[tokio::test]
async fn external_broker_snapshot_is_taken_over() {
    // Records retained on the broker before the registry starts are adopted,
    // and invalid ones cleared.
    let mosq = Mosquitto::start().await;
    mosquitto_pub(&mosq.url, &["-t", "homicro/services/old", "-r", "-m", NAS]);
    mosquitto_pub(
        &mosq.url,
        &["-t", "homicro/services/junk", "-r", "-m", "junk"],
    );
    let dir = tempfile::tempdir().unwrap();
    let _s = Serve::start_with(
        &["--broker", &mosq.url.to_string()],
        &dir.path().join("s.json"),
    )
    .await;
    let mut c = Client::connect(&mosq.url).await;
    c.subscribe("homicro/errors/old").await;
    c.publish("homicro/services/old", r#"{"host":"intruder"}"#, true)
        .await;
    c.expect("homicro/errors/old", |v| v["error"] == "owned")
        .await;
    let recs = records(&mosq.url).await;
    assert_eq!(recs.keys().collect::<Vec<_>>(), ["old"]);
}

#[tokio::test]
async fn the_state_file_is_not_written_once_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    // Count writes through the actor's debug log.
    let s = Serve::start_with(&["--listen", "127.0.0.1:0", "--log-level", "debug"], &state).await;
    let c = Client::connect(&s.url).await;
    let start = std::time::Instant::now();
    let n = 3000;
    for i in 0..n {
        let rec = format!(r#"{{"host":"10.2.{}.{}","ttl":60}}"#, i / 250, i % 250);
        c.publish(&format!("homicro/services/load-{i}"), rec, true)
            .await;
    }
    let mut ev = Client::connect(&s.url).await;
    ev.register("last", NAS).await;
    let took = start.elapsed();
    let saved = loop {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        if text.contains("\"last\"") {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(saved.contains("load-2999"));
    let writes = s.log().matches("state file written").count();
    println!("{n} registrations in {took:?}: {writes} state file writes");
    assert!(
        writes as u64 <= took.as_secs() + 3,
        "{writes} writes for {n} registrations in {took:?}"
    );
}

/// The binary's own mappings in serve's `/proc/PID/maps`, and its
/// `AnonHugePages` in kB.
fn own_mappings(s: &Serve) -> (Vec<String>, u64) {
    let pid = s.child.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let own = maps
        .lines()
        .filter(|l| l.ends_with(&*exe.to_string_lossy()))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let huge = rollup
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (own, huge)
}

#[tokio::test]
async fn serve_runs_its_code_from_huge_pages_unless_told_not_to() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let s = Serve::start().await;
    let (own, huge) = own_mappings(&s);
    if thp.contains("[never]") || thp.is_empty() {
        // Nothing to move onto: said, and left as mapped.
        assert!(s.log().contains("code left on small pages"), "{}", s.log());
        assert!(own.iter().any(|p| p == "r-xp"), "{own:?}");
    } else {
        assert!(
            s.log().contains("code and constants on huge pages"),
            "{}",
            s.log()
        );
        // The code and constants are anonymous copies now: only the
        // writable data is still mapped from the file.
        assert!(own.iter().all(|p| p.starts_with("rw")), "{own:?}");
        assert!(huge >= 2048, "AnonHugePages {huge} kB");
    }
    // And the moved code runs the bus and the registry.
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/events/web").await;
    c.publish("homicro/services/web", WEB, true).await;
    c.expect("homicro/events/web", |v| v["event"] == "registered")
        .await;
    drop(s);

    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("homicro.toml");
    std::fs::write(&config, "huge_code_pages = false\n").unwrap();
    let args = ["--listen", "127.0.0.1:0", "--config"];
    let mut args = args.map(String::from).to_vec();
    args.push(config.to_string_lossy().into_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Serve::start_with(&args, &tmp.path().join("state.json")).await;
    let (own, _) = own_mappings(&s);
    assert!(own.iter().any(|p| p == "r-xp"), "{own:?}");
    assert!(!s.log().contains("huge pages"), "{}", s.log());
}
