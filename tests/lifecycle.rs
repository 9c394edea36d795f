//! End to end: flags and config, the state directory across restarts,
//! shutdown, and `serve --broker` against a real mosquitto.

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
    // A port in use is refused before anything else starts, with a guess
    // at why and what to do.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
        ])
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let want = format!(
        "port {port} is in use (another broker, or homicro already running?): \
         pick another with --listen 127.0.0.1:{}",
        port + 1
    );
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
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
async fn sigterm_goes_offline_writes_state_and_exits_quickly() {
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
    assert!(s.log().contains("state written"), "{}", s.log());
    let saved = stored(&s.state);
    assert!(saved.contains("10.0.0.5"), "{saved}");
}

/// What the journal in `dir` holds, as text (serve must have stopped).
fn stored(dir: &std::path::Path) -> String {
    let (j, rec) = homicro::journal::Journal::open(dir, Default::default()).unwrap();
    j.close().unwrap();
    rec.state
        .iter()
        .map(|((space, k), v)| {
            format!("{space:?} {k} {}\n", String::from_utf8_lossy(&v.to_bytes()))
        })
        .collect()
}

/// Returns once everything serve accepted so far is on disk: a retained
/// publish is acknowledged only once the journal has it, and the journal
/// writes in order.
async fn on_disk(s: &Serve) {
    let hello = raw::Hello {
        client_id: "barrier",
        ..Default::default()
    };
    let (mut r, code) = raw::Raw::connect(s.port(), &hello).await;
    assert_eq!(code, 0);
    r.publish("test/barrier", b"x", true, true, &[]).await;
}

#[tokio::test]
async fn a_kill_loses_no_acknowledged_registration() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut s, c) = serve_web_and_nas(&state).await;
    s.kill();
    drop(c);

    let s2 = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let recs = records(&s2.url).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs["web"].contains("10.0.0.5"));
    assert!(s2.log().contains("records restored"), "{}", s2.log());
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

/// `serve` on `state` with `web` and `nas` registered, on disk.
async fn serve_web_and_nas(state: &std::path::Path) -> (Serve, Client) {
    let s = Serve::start_with(&["--listen", "127.0.0.1:0"], state).await;
    let mut c = Client::connect(&s.url).await;
    c.register("web", WEB).await;
    c.register("nas", NAS).await;
    on_disk(&s).await;
    (s, c)
}

/// Removals reach the disk, and records recovered at start stay there
/// when later changes are written (across two kills).
#[tokio::test]
async fn the_journal_follows_removals_and_keeps_what_was_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut s, mut c) = serve_web_and_nas(&state).await;
    c.publish("homicro/services/nas", "", true).await;
    c.register("db", r#"{"host":"db.local"}"#).await;
    on_disk(&s).await;
    s.kill();
    drop(c);

    let mut s2 = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let mut c = Client::connect(&s2.url).await;
    c.register("cam", r#"{"host":"cam.local"}"#).await;
    on_disk(&s2).await;
    s2.kill();
    drop(c);
    let s3 = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let recs = records(&s3.url).await;
    assert_eq!(
        recs.keys().collect::<Vec<_>>(),
        ["cam", "db", "web"],
        "{recs:?}"
    );
}

/// A state file from before the journal is read once, written to the
/// journal, and renamed; the next start reads the journal alone.
#[tokio::test]
async fn an_old_state_file_is_migrated_once() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("homicro-state.json");
    std::fs::write(
        &old,
        r#"{"version":1,"records":{"web":"{\"host\":\"10.0.0.5\",\"port\":8080}"},"owners":{"web":"user:alice"}}"#,
    )
    .unwrap();
    let state = dir.path().join("state");
    let old_s = old.to_str().unwrap();
    let args = ["--listen", "127.0.0.1:0", "--state-file", old_s];
    let mut s = Serve::start_with(&args, &state).await;
    assert!(
        s.log().contains("old state file migrated into the journal"),
        "{}",
        s.log()
    );
    assert!(records(&s.url).await["web"].contains("10.0.0.5"));
    assert!(!old.exists());
    assert!(dir.path().join("homicro-state.json.migrated").exists());
    s.kill();
    let mut s = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    assert!(records(&s.url).await["web"].contains("10.0.0.5"));
    s.kill();
    let saved = stored(&state);
    assert!(
        saved.contains("Records web") && saved.contains("user:alice"),
        "{saved}"
    );
    // Never twice: with the old file back (a rename that failed, say) and
    // the record since deregistered, it does not come back.
    let mut s = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let out = homicro_cmd(&["deregister", "web", "--broker", &s.url.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    on_disk(&s).await;
    s.kill();
    std::fs::copy(dir.path().join("homicro-state.json.migrated"), &old).unwrap();
    let s = Serve::start_with(&args, &state).await;
    assert!(
        !s.log().contains("migrated into the journal"),
        "{}",
        s.log()
    );
    assert!(records(&s.url).await.is_empty());
}

#[tokio::test]
async fn a_second_serve_on_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _s = Serve::start_with(&["--listen", "127.0.0.1:0"], &state).await;
    let state = state.to_str().unwrap();
    let out = homicro_cmd(&["serve", "--listen", "127.0.0.1:0", "--state-dir", state]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another homicro serve is using this directory"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn an_old_state_file_naming_a_record_twice_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.json");
    std::fs::write(
        &old,
        r#"{"version":1,"records":{"web":"{\"host\":\"10.0.0.5\"}","web":"{\"host\":\"10.0.0.6\"}"}}"#,
    )
    .unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--state-file",
        old.to_str().unwrap(),
    ];
    let s = Serve::start_with(&args, &dir.path().join("state")).await;
    let log = s.log();
    assert!(
        log.contains("names something twice; the last one is kept")
            && log.contains("duplicate key `web`"),
        "{log}"
    );
    assert!(records(&s.url).await["web"].contains("10.0.0.6"));
}

#[tokio::test]
async fn a_corrupt_old_state_file_is_moved_aside_and_serve_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("state.json");
    std::fs::write(&old, "{\"version\":1,\"records\":").unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--state-file",
        old.to_str().unwrap(),
    ];
    let s = Serve::start_with(&args, &dir.path().join("state")).await;
    assert!(
        s.log().contains("old state file unusable; not migrated"),
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
    let state = dir.path().join("state");
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
    let state = dir.path().join("state");
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

/// Registrations that arrive together share one fsync (group commit):
/// 3,000 in a row from one client take far fewer than 3,000.
#[tokio::test]
async fn registrations_in_a_row_share_fsyncs() {
    let s = Serve::start().await;
    let c = Client::connect(&s.url).await;
    let fsyncs = || async { metric(s.port(), "homicro_journal_fsyncs_total").await };
    let before = fsyncs().await;
    let n = 3000;
    for i in 0..n {
        let rec = format!(r#"{{"host":"10.2.{}.{}","ttl":60}}"#, i / 250, i % 250);
        c.publish(&format!("homicro/services/load-{i}"), rec, true)
            .await;
    }
    let mut ev = Client::connect(&s.url).await;
    ev.register("last", NAS).await;
    on_disk(&s).await;
    let used = fsyncs().await - before;
    println!("{n} registrations: {used} fsyncs");
    assert!(
        used > 0 && used < n / 3,
        "{used} fsyncs for {n} registrations"
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
    let s = Serve::start_with(&args, &tmp.path().join("state")).await;
    let (own, _) = own_mappings(&s);
    assert!(own.iter().any(|p| p == "r-xp"), "{own:?}");
    assert!(!s.log().contains("huge pages"), "{}", s.log());
}
