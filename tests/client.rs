//! End to end: the Rust helper against `homicro serve` on a free port.

mod common;

use std::time::{Duration, Instant};

use common::*;
use homicro::client::{Broker, ConnectionError};
use homicro::client::{
    Change, Directory, DirectoryOptions, Notice, RegisterError, Registration, Strategy,
};

async fn directory(url: &Broker) -> Directory {
    let dir = Directory::connect(url).await.unwrap();
    tokio::time::timeout(WAIT, dir.ready()).await.unwrap();
    dir
}

/// Waits for a change satisfying `pred` on `rx`.
async fn change(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    pred: impl Fn(&Change) -> bool,
) -> Change {
    tokio::time::timeout(WAIT, async {
        loop {
            let c = rx.recv().await.unwrap();
            if pred(&c) {
                return c;
            }
        }
    })
    .await
    .expect("no such change")
}

fn removed(name: &str) -> impl Fn(&Change) -> bool + '_ {
    move |c| matches!(c, Change::Removed(s) if s.name.as_str() == name)
}

fn added(name: &str) -> impl Fn(&Change) -> bool + '_ {
    move |c| matches!(c, Change::Added(s) if s.name.as_str() == name)
}

#[tokio::test]
async fn a_registration_is_visible_to_a_directory_within_100ms() {
    let s = Serve::start().await;
    let dir = directory(&s.url).await;
    let start = Instant::now();
    let reg = Registration::builder("web")
        .host("10.0.0.5")
        .port(8080)
        .ttl_secs(30)
        .role("web")
        .version("1.2.0")
        .register(&s.url)
        .await
        .unwrap();
    let registered = start.elapsed();
    let svc = dir
        .wait_for("web", Duration::from_millis(100))
        .await
        .unwrap();
    println!(
        "register() returned after {registered:?}; visible to the directory after {:?}",
        start.elapsed()
    );
    assert_eq!(svc.endpoint().to_string(), "10.0.0.5:8080");
    assert_eq!(svc.record.version.as_ref().unwrap().to_string(), "1.2.0");
    assert_eq!(dir.by_role("web").len(), 1);
    assert_eq!(dir.list().len(), 1);

    let mut rx = dir.changes();
    reg.deregister().await.unwrap();
    change(&mut rx, removed("web")).await;
    assert!(dir.get("web").is_none());
}

#[tokio::test]
async fn ready_holds_all_of_ten_thousand_records() {
    let s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    let n = 10_000;
    for i in 0..n {
        let rec = format!(
            r#"{{"host":"10.3.{}.{}","role":"r{}"}}"#,
            i / 250,
            i % 250,
            i % 7
        );
        c.publish(&format!("homicro/services/s-{i}"), rec, true)
            .await;
    }
    // Registered after the others from the same client: once the registry
    // accepted it, it has all of them.
    c.register("probe", r#"{"host":"10.9.9.9"}"#).await;
    let start = Instant::now();
    let dir = directory(&s.url).await;
    println!(
        "directory ready with {} records in {:?}",
        dir.list().len(),
        start.elapsed()
    );
    assert_eq!(dir.list().len(), n + 1);
    assert_eq!(
        dir.by_role("r3").len(),
        (0..n).filter(|i| i % 7 == 3).count()
    );
}

#[tokio::test]
async fn a_killed_service_disappears_by_will_or_ttl() {
    let s = Serve::start().await;
    let dir = directory(&s.url).await;
    let mut rx = dir.changes();
    let b = s.url.to_string();
    let mut with_will = Proc::homicro(&["register", "tv", "--host", "10.0.0.7", "--broker", &b]);
    let mut with_ttl = Proc::homicro(&[
        "register", "cam", "--host", "10.0.0.8", "--ttl", "1s", "--broker", &b,
    ]);
    dir.wait_for("tv", WAIT).await.unwrap();
    dir.wait_for("cam", WAIT).await.unwrap();
    signal(with_will.child.id(), "KILL");
    signal(with_ttl.child.id(), "KILL");
    with_will.wait_exit().await;
    with_ttl.wait_exit().await;
    let t = Instant::now();
    change(&mut rx, removed("tv")).await;
    change(&mut rx, removed("cam")).await;
    println!("both gone {:?} after the kill", t.elapsed());
    assert!(dir.list().is_empty());
}

#[tokio::test]
async fn two_services_race_for_one_name_and_exactly_one_wins() {
    let s = Serve::start().await;
    let a = Registration::builder("db")
        .host("10.0.0.1")
        .port(5432)
        .register(&s.url);
    let b = Registration::builder("db")
        .host("10.0.0.2")
        .port(5432)
        .register(&s.url);
    let (a, b) = tokio::join!(a, b);
    let (winner, loser) = match (a, b) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        (a, b) => panic!("expected one winner: {:?} / {:?}", a.is_ok(), b.is_ok()),
    };
    match loser {
        RegisterError::Owned { owner, detail } => {
            assert_eq!(owner, winner.record().endpoint);
            assert!(detail.contains("owned by"));
        }
        other => panic!("expected Owned, got {other:?}"),
    }
    let dir = directory(&s.url).await;
    assert_eq!(dir.get("db").unwrap().endpoint(), &winner.record().endpoint);
}

#[tokio::test]
async fn pick_fails_over_to_another_instance() {
    let s = Serve::start().await;
    let mut regs = Vec::new();
    for (name, host, version) in [
        ("api-1", "10.0.0.1", "1.2.0"),
        ("api-2", "10.0.0.2", "1.4.1"),
        ("api-3", "10.0.0.3", "2.0.0"),
    ] {
        let r = Registration::builder(name)
            .host(host)
            .port(80)
            .role("api")
            .version(version)
            .register(&s.url)
            .await
            .unwrap();
        regs.push(r);
    }
    let options = DirectoryOptions {
        strategy: Strategy::RoundRobin,
        ..Default::default()
    };
    let dir = Directory::connect_with(&s.url, options).await.unwrap();
    dir.ready().await;
    assert_eq!(dir.find("api@^1.2").unwrap().len(), 2);
    assert_eq!(dir.find("api@*").unwrap().len(), 3);
    let first = dir.pick("api@^1.2").unwrap().unwrap();
    let second = dir.pick("api@^1.2").unwrap().unwrap();
    assert_ne!(first.name, second.name, "round robin");
    dir.report_failed(&first);
    for _ in 0..4 {
        assert_eq!(dir.pick("api@^1.2").unwrap().unwrap().name, second.name);
    }
    dir.report_failed(&second);
    assert_eq!(dir.pick("api@^1.2").unwrap(), None);
    assert_eq!(dir.pick("api@2.x").unwrap().unwrap().name.as_str(), "api-3");
    assert!(dir.pick("api@^nope").is_err());

    let random = Directory::connect_with(
        &s.url,
        DirectoryOptions {
            strategy: Strategy::Random,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    random.ready().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        seen.insert(random.pick("api").unwrap().unwrap().name);
    }
    assert_eq!(seen.len(), 3, "random picks every instance eventually");
}

#[tokio::test]
async fn a_registry_restarted_with_empty_state_gets_the_registration_back() {
    let port = free_port();
    let dir_tmp = tempfile::tempdir().unwrap();
    let state = dir_tmp.path().join("state");
    let listen = format!("127.0.0.1:{port}");
    let mut s = Serve::start_with(&["--listen", &listen], &state).await;
    let reg = Registration::builder("nas")
        .host("10.0.0.9")
        .ttl_secs(60)
        .register(&s.url)
        .await
        .unwrap();
    let dir = directory(&s.url).await;
    assert!(dir.get("nas").is_some());

    s.kill();
    let _ = std::fs::remove_file(&state);
    let s2 = Serve::start_with(&["--listen", &listen], &state).await;
    // The service reconnects and registers again (seen on the new server:
    // the directory may still hold the old record until it resyncs); the
    // directory reconnects and sees it. Nobody restarted the service.
    let mut c = Client::connect(&s2.url).await;
    c.subscribe("homicro/services/nas").await;
    c.expect("homicro/services/nas", |v| v["host"] == "10.0.0.9")
        .await;
    dir.wait_for("nas", WAIT).await.unwrap();
    c.subscribe("homicro/errors/nas").await;
    c.publish("homicro/services/nas", r#"{"host":"10.0.0.10"}"#, true)
        .await;
    c.expect("homicro/errors/nas", |v| v["error"] == "owned")
        .await;
    assert_eq!(
        reg.status(),
        homicro::client::RegistrationStatus::Registered
    );
}

#[tokio::test]
async fn a_vanished_record_is_reasserted_but_a_new_owner_is_not_fought() {
    let s = Serve::start().await;
    let dir = directory(&s.url).await;
    let mut rx = dir.changes();
    let reg = Registration::builder("hub")
        .host("10.0.0.1")
        .register(&s.url)
        .await
        .unwrap();
    change(&mut rx, added("hub")).await;
    // Someone deregisters it: the live service puts it back.
    mosquitto_pub(&s.url, &["-t", "homicro/services/hub", "-r", "-n"]);
    change(&mut rx, removed("hub")).await;
    change(&mut rx, added("hub")).await;

    // Now it is cleared and another endpoint takes the name at once: the
    // helper tries once, is refused, and gives up.
    mosquitto_pub(&s.url, &["-t", "homicro/services/hub", "-r", "-n"]);
    mosquitto_pub(
        &s.url,
        &[
            "-t",
            "homicro/services/hub",
            "-r",
            "-m",
            r#"{"host":"10.0.0.2"}"#,
        ],
    );
    let start = Instant::now();
    while !matches!(
        reg.status(),
        homicro::client::RegistrationStatus::Lost { .. }
    ) {
        assert!(start.elapsed() < WAIT, "never gave up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dir.get("hub").unwrap().endpoint().host, "10.0.0.2");
}

#[tokio::test]
async fn a_broker_that_comes_back_leaves_the_directory_correct() {
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let listen = format!("127.0.0.1:{port}");
    let mut s = Serve::start_with(&["--listen", &listen], &state).await;
    let mut c = Client::connect(&s.url).await;
    c.register("keep", r#"{"host":"10.0.0.1"}"#).await;
    c.register("gone", r#"{"host":"10.0.0.2"}"#).await;
    drop(c);
    let dir = directory(&s.url).await;
    assert_eq!(dir.list().len(), 2);
    let mut rx = dir.changes();

    // While the broker is away, "gone" leaves the state; "new" arrives.
    let (status, _) = s.terminate().await;
    assert!(status.success());
    {
        use homicro::registry::state::{Kept, ops_for};
        let (j, _) = homicro::journal::Journal::open(&state, Default::default()).unwrap();
        let new = bytes::Bytes::from_static(br#"{"host":"10.0.0.3"}"#);
        let n = |s: &str| homicro::record::Name::parse(s).unwrap();
        let ops = vec![
            ops_for(&n("gone"), None),
            ops_for(&n("new"), Some(Kept::of(&new, None))),
        ];
        j.synced(j.append(ops)).await.unwrap();
        j.close().unwrap();
    }
    let _s2 = Serve::start_with(&["--listen", &listen], &state).await;

    change(&mut rx, removed("gone")).await;
    dir.wait_for("new", WAIT).await.unwrap();
    let names: Vec<String> = dir.list().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["keep", "new"]);
}

#[tokio::test]
async fn typed_errors_callers_can_branch_on() {
    // Invalid: found before anything is sent.
    let nowhere = Broker::parse(&format!("mqtt://127.0.0.1:{}", free_port())).unwrap();
    let e = Registration::builder("x")
        .host("h")
        .version("1.x")
        .register(&nowhere)
        .await;
    assert!(
        matches!(e, Err(RegisterError::Invalid(ref d)) if d.contains("semver")),
        "{e:?}"
    );
    let e = Registration::builder("Bad")
        .host("h")
        .register(&nowhere)
        .await;
    assert!(matches!(e, Err(RegisterError::Invalid(_))), "{e:?}");
    // Nothing listening: given up at once when asked to (as the CLI does).
    let start = Instant::now();
    let e = Registration::builder("x")
        .host("h")
        .register(&nowhere.clone().with_fail_fast())
        .await;
    assert!(
        matches!(
            e,
            Err(RegisterError::Connection(ConnectionError::Unreachable { ref reason, .. }))
                if reason == "connection refused"
        ),
        "{e:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // A broker without a registry.
    let mosq = Mosquitto::start().await;
    let e = Registration::builder("x")
        .host("h")
        .register(&mosq.url)
        .await;
    assert!(matches!(e, Err(RegisterError::RegistryOffline)), "{e:?}");
}

/// A service started a moment before its broker (compose, systemd) is
/// not turned away: without `fail_fast` the helper waits for it.
#[tokio::test]
async fn a_service_started_before_its_broker_waits_for_it() {
    let port = free_port();
    let url = Broker::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap();
    let early = tokio::spawn(async move {
        Registration::builder("early")
            .host("10.0.0.4")
            .register(&url)
            .await
    });
    // The broker is late: what is tested, not a wait for readiness.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!early.is_finished(), "{:?}", early.await);
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let s = Serve::start_with(&["--listen", &listen], &dir.path().join("state")).await;
    let reg = early
        .await
        .unwrap()
        .expect("registered once the broker came up");
    let watcher = directory(&s.url).await;
    assert!(watcher.get("early").is_some());
    drop(reg);
}

#[tokio::test]
async fn dropping_the_handle_deregisters() {
    let s = Serve::start().await;
    let dir = directory(&s.url).await;
    let mut rx = dir.changes();
    let reg = Registration::builder("tmp")
        .host("10.0.0.4")
        .register(&s.url)
        .await
        .unwrap();
    change(&mut rx, added("tmp")).await;
    drop(reg);
    change(&mut rx, removed("tmp")).await;
}

/// The helper and the CLI log in with a user: the user owns its record,
/// another user is refused it, and a wrong password is a clear error.
#[tokio::test]
async fn the_helper_and_the_cli_log_in_and_users_own_their_records() {
    use homicro::auth::{Hash, Users};
    let tmp = tempfile::tempdir().unwrap();
    let mut users = Users::default();
    users.set("alice", Hash::new(b"a-pw"));
    users.set("bob", Hash::new(b"b-pw"));
    let pw = tmp.path().join("passwd");
    std::fs::write(&pw, users.to_text()).unwrap();
    let cfg = tmp.path().join("homicro.toml");
    // Anonymous allowed, so that the test's readiness probe gets in.
    let text = format!("[auth]\npassword_file = {pw:?}\nallow_anonymous = true\n");
    std::fs::write(&cfg, text).unwrap();
    let state = tmp.path().join("state");
    let args = ["--listen", "127.0.0.1:0", "--config", cfg.to_str().unwrap()];
    let s = Serve::start_with(&args, &state).await;

    let alice = s.url.clone().with_login("alice", "a-pw");
    let reg = Registration::builder("nas")
        .host("10.0.0.5")
        .port(5000)
        .ttl_secs(60)
        .register(&alice)
        .await
        .unwrap();
    // Bob publishes the same endpoint: not his record.
    let bob = s.url.clone().with_login("bob", "b-pw");
    let stolen = Registration::builder("nas")
        .host("10.0.0.5")
        .port(5000)
        .register(&bob)
        .await;
    match stolen {
        Err(RegisterError::Owned { detail, .. }) => {
            assert!(detail.contains("belongs to user alice"), "{detail}")
        }
        other => panic!("expected not_owner, got {other:?}"),
    }
    let wrong = s.url.clone().with_login("alice", "guess");
    let e = Registration::builder("web")
        .host("10.0.0.6")
        .register(&wrong)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .to_lowercase()
            .contains("bad user name or password"),
        "{e}"
    );
    // The CLI: --username, the password from HOMICRO_PASSWORD.
    let url = s.url.to_string();
    let cli = |user: &str, password: Option<&str>| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["deregister", "nas", "--broker", &url, "--username", user]);
        match password {
            Some(p) => cmd.env("HOMICRO_PASSWORD", p),
            None => cmd.env_remove("HOMICRO_PASSWORD"),
        };
        cmd.output().unwrap()
    };
    let out = cli("alice", None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("needs its password in HOMICRO_PASSWORD"));
    let out = cli("alice", Some("a-pw"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deregistered nas"),
        "{}",
        stdout(&out)
    );
    drop(reg);
}

/// The helper and the CLI over `mqtts://` with a CA file: register,
/// discover, and the CLI's admin deregistration over HTTPS on the same
/// port; a CA that did not sign the server's certificate is refused.
#[tokio::test]
async fn the_helper_and_the_cli_speak_tls() {
    use homicro::auth::{Hash, Users};
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(tmp.path());
    let mut users = Users::default();
    users.set("alice", Hash::new(b"a-pw"));
    let pw = tmp.path().join("passwd");
    std::fs::write(&pw, users.to_text()).unwrap();
    let cfg = tmp.path().join("homicro.toml");
    let text = format!(
        "[auth]\npassword_file = {pw:?}\nallow_anonymous = true\n[tls]\ncert = {cert:?}\nkey = {key:?}\n"
    );
    std::fs::write(&cfg, text).unwrap();
    let state = tmp.path().join("state");
    let s = Serve::start_with(
        &["--listen", "127.0.0.1:0", "--config", cfg.to_str().unwrap()],
        &state,
    )
    .await;
    let url = format!("mqtts://127.0.0.1:{}", s.url.port);
    let secure = Broker::parse(&url).unwrap().with_cafile(&ca);
    let alice = secure.clone().with_login("alice", "a-pw");
    let reg = Registration::builder("vault")
        .host("10.0.0.8")
        .port(8200)
        .register(&alice)
        .await
        .unwrap();
    let dir = directory(&secure).await;
    assert_eq!(
        dir.get("vault").unwrap().endpoint().to_string(),
        "10.0.0.8:8200"
    );
    // Not alice's CA: refused.
    let wrong = Broker::parse(&url)
        .unwrap()
        .with_cafile(tmp.path().join("srv.pem"));
    let e = Registration::builder("x")
        .host("10.0.0.9")
        .register(&wrong)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    // The CLI, anonymous on loopback: not alice's record, so it asks as
    // an admin over HTTPS on the same port.
    let out = std::process::Command::new(bin())
        .args([
            "deregister",
            "vault",
            "--broker",
            &url,
            "--cafile",
            ca.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("deregistered vault (as admin"),
        "{}",
        stdout(&out)
    );
    drop(reg);
}

/// The helper on both ends of a call: a service answers with
/// `serve_requests`, a `Caller` asks it by role and range; the hub's own
/// errors come back as replies with their status.
#[tokio::test]
async fn a_service_answers_calls_made_with_the_helper() {
    use homicro::client::{Caller, Reply};
    let s = Serve::start().await;
    let reg = Registration::builder("adder-1")
        .host("127.0.0.1")
        .port(9)
        .role("adder")
        .version("1.4.0")
        .register(&s.url)
        .await
        .unwrap();
    let server = reg
        .serve_requests(|req| async move {
            let text = String::from_utf8_lossy(&req.body).to_string();
            let sum: Result<Vec<i64>, _> = text.split('+').map(|n| n.trim().parse()).collect();
            match sum {
                Ok(ns) => Reply::ok(ns.iter().sum::<i64>().to_string()),
                Err(e) => Reply::with_status(400, format!("not a sum: {e}")),
            }
        })
        .await
        .unwrap();
    let caller = Caller::connect(&s.url).await.unwrap();
    let r = caller.call("adder@^1", "1 + 2 + 39", WAIT).await.unwrap();
    assert_eq!(r, Reply::ok("42"));
    let r = caller.call("adder-1", "1 + x", WAIT).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("not a sum"));
    // Many at once, over one connection.
    let calls = (0..50).map(|i| caller.call("adder", format!("{i} + 1"), WAIT));
    for (i, r) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(r.unwrap(), Reply::ok((i + 1).to_string()));
    }
    // The hub's errors are replies too.
    let r = caller.call("adder@^2", "1", WAIT).await.unwrap();
    assert_eq!(r.status, 404);
    assert!(matches!(
        caller.call("Not A Query", "1", WAIT).await,
        Err(homicro::client::CallError::BadQuery(_))
    ));
    // Stopped serving: nothing subscribes, so the hub answers 503 at once.
    server.stop();
    let deadline = Instant::now() + WAIT;
    loop {
        let r = caller.call("adder-1", "1", WAIT).await.unwrap();
        if r.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still answered after stop: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reg.deregister().await.unwrap();
}

/// `Registration::notices`: the registry clearing the record as unhealthy
/// (with its detail), then the helper registering it again, in that order;
/// then losing the broker.
#[tokio::test]
async fn notices_tell_a_registration_cleared_unhealthy_and_registered_again() {
    use homicro::client::Notice;
    use homicro::protocol::EventKind;
    let mut s = Serve::start().await;
    let dead = free_port();
    let reg = Registration::builder("flaky")
        .host("127.0.0.1")
        .port(dead)
        .field(
            "health",
            serde_json::json!({"tcp": true, "interval": "1s", "failures": 1}),
        )
        .register(&s.url)
        .await
        .unwrap();
    let mut notices = reg.notices();
    let mut next = async || {
        tokio::time::timeout(WAIT, notices.recv())
            .await
            .expect("a notice")
            .unwrap()
    };
    match next().await {
        Notice::Cleared {
            event: EventKind::Unhealthy,
            detail: Some(d),
        } => assert!(d.contains(&format!("tcp 127.0.0.1:{dead}")), "{d}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(next().await, Notice::Reasserted(EventKind::Registered));
    s.kill();
    loop {
        match next().await {
            Notice::Disconnected(_) => break,
            // The check may clear it once more before serve is gone.
            Notice::Cleared { .. } | Notice::Reasserted(_) | Notice::ReassertFailed(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// The value of `name` in serve's `/metrics`, read with a blocking socket
/// (from a thread whose runtime must not run).
fn metric_blocking(port: u16, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// When the helper announces that another endpoint took its name, its
/// DISCONNECT is out already: a service may exit at once, and its will (an
/// empty record, from the same address as the new owner here) cannot clear
/// the new owner's record. The service's runtime stops the moment it hears
/// `Lost`: the task that hears it blocks the runtime's one thread, so no
/// other task of it runs again (as at a process exit). The bus must see its
/// session end, cleanly, all the same. (The helper used to announce `Lost`
/// first and close after; `register`, exiting on it, lost that race once
/// in CI.)
#[tokio::test]
async fn when_lost_is_announced_the_helper_has_disconnected_cleanly() {
    let s = Serve::start().await;
    let dir = directory(&s.url).await;
    let mut rx = dir.changes();
    let port = s.port();
    let sessions = metric(port, "homicro_bus_sessions").await;
    let url = s.url.clone();
    let (registered, is_registered) = tokio::sync::oneshot::channel();
    let service = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let heard = rt.block_on(async {
            let reg = Registration::builder("tv")
                .host("10.0.0.4")
                .register(&url)
                .await
                .unwrap();
            let mut notices = reg.notices();
            registered.send(()).unwrap();
            // Spawned: woken by the notice before anything the helper does
            // after it, and run first.
            let hearer = tokio::spawn(async move {
                loop {
                    if let Ok(Notice::Lost { owner }) = notices.recv().await {
                        let start = Instant::now();
                        while metric_blocking(port, "homicro_bus_sessions") > sessions {
                            if start.elapsed() > WAIT {
                                return (owner, false);
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        return (owner, true);
                    }
                }
            });
            let heard = hearer.await.unwrap();
            std::mem::forget(reg);
            heard
        });
        rt.shutdown_background();
        heard
    });
    is_registered.await.unwrap();
    change(&mut rx, added("tv")).await;
    // The name is cleared and given to another endpoint at once (from the
    // same address: the registry lets that identity change it).
    mosquitto_pub(&s.url, &["-t", "homicro/services/tv", "-r", "-n"]);
    mosquitto_pub(
        &s.url,
        &[
            "-t",
            "homicro/services/tv",
            "-r",
            "-m",
            r#"{"host":"10.0.0.5"}"#,
        ],
    );
    let (owner, ended) = tokio::task::spawn_blocking(move || service.join().unwrap())
        .await
        .unwrap();
    assert_eq!(owner.host, "10.0.0.5");
    assert!(
        ended,
        "the service's session was still open when Lost was announced"
    );
    assert_eq!(metric(port, "homicro_bus_wills_total").await, 0);
    assert_eq!(dir.get("tv").unwrap().endpoint().host, "10.0.0.5");
}
