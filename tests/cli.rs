//! End to end: the commands for people against `homicro serve`.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn register_heartbeats_then_deregisters_on_sigterm() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let mut ev = Client::connect(&s.url).await;
    ev.subscribe("homicro/events/api").await;
    ev.subscribe("homicro/heartbeat/api").await;
    let mut reg = Proc::homicro(&[
        "register",
        "api",
        "--port",
        "9000",
        "--host",
        "10.0.0.5",
        "--ttl",
        "1s",
        "--role",
        "api",
        "--version",
        "1.4.2",
        "--scheme",
        "http",
        "--meta",
        "floor=2",
        "--health-http",
        "/health",
        "--broker",
        &b,
    ]);
    reg.wait_line(|l| l.starts_with("registered api at 10.0.0.5:9000"))
        .await;
    ev.expect("homicro/events/api", |v| v["event"] == "registered")
        .await;
    // Heartbeats at a third of the ttl keep it past several ttls.
    for _ in 0..4 {
        ev.expect("homicro/heartbeat/api", |v| v["host"] == "10.0.0.5")
            .await;
    }
    let recs = records(&s.url).await;
    let r: serde_json::Value = recs["api"].parse().unwrap();
    assert_eq!(r["meta"]["floor"], "2");
    assert_eq!(r["health"]["http"], "/health");
    assert_eq!(r["version"], "1.4.2");

    signal(reg.child.id(), "TERM");
    assert!(reg.wait_exit().await.success());
    ev.expect("homicro/events/api", |v| v["event"] == "deregistered")
        .await;
    assert!(records(&s.url).await.is_empty());
}

#[tokio::test]
async fn register_without_ttl_is_cleared_by_the_will_when_killed() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let mut ev = Client::connect(&s.url).await;
    ev.subscribe("homicro/events/tv").await;
    let mut reg = Proc::homicro(&["register", "tv", "--port", "8009", "--broker", &b]);
    let line = reg.wait_line(|l| l.starts_with("registered tv")).await;
    // Without --host: the local address of the connection to the broker.
    assert!(line.contains("at 127.0.0.1:8009"), "{line}");
    assert!(line.contains("no ttl"));
    signal(reg.child.id(), "KILL");
    let _ = reg.wait_exit().await;
    ev.expect("homicro/events/tv", |v| v["event"] == "deregistered")
        .await;
}

#[tokio::test]
async fn a_refusal_is_printed_and_exits_non_zero() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let out = homicro_cmd(&[
        "register", "db", "--port", "5432", "--host", "10.0.0.5", "--once", "--broker", &b,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("registered db at 10.0.0.5:5432"));
    let out = homicro_cmd(&[
        "register", "db", "--port", "5432", "--host", "10.0.0.6", "--once", "--broker", &b,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("owned by 10.0.0.5:5432"),
        "{}",
        stderr(&out)
    );
    // Refused without --once and without a ttl: the will it armed must not
    // clear the owner's record when it exits.
    let mut ev = Client::connect(&s.url).await;
    ev.subscribe("homicro/events/+").await;
    let out = homicro_cmd(&[
        "register", "db", "--port", "5432", "--host", "10.0.0.7", "--broker", &b,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    ev.register("marker", r#"{"host":"10.0.0.1"}"#).await;
    assert!(
        !ev.seen.iter().any(|(t, p, _)| t == "homicro/events/db"
            && String::from_utf8_lossy(p).contains("deregistered")),
        "{:?}",
        ev.seen
    );
    assert!(records(&s.url).await["db"].contains("10.0.0.5"));
    // The same owner again is an update.
    let out = homicro_cmd(&[
        "register", "db", "--port", "5432", "--host", "10.0.0.5", "--once", "--broker", &b,
    ]);
    assert!(stdout(&out).contains("updated db"), "{}", stdout(&out));
}

#[tokio::test]
async fn list_as_table_and_json_then_deregister() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    for (name, port, extra) in [
        ("web", "80", vec!["--version", "2.0.0", "--ttl", "5m"]),
        ("nas", "445", vec![]),
    ] {
        let mut args = vec![
            "register", name, "--port", port, "--host", "10.0.0.5", "--once", "--broker", &b,
        ];
        args.extend(extra);
        assert!(homicro_cmd(&args).status.success());
    }
    let out = homicro_cmd(&["list", "--broker", &b]);
    assert!(out.status.success());
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "ENDPOINT", "ROLE", "VERSION", "TTL", "HEALTH"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["nas", "10.0.0.5:445", "nas", "-", "-", "-"]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["web", "10.0.0.5:80", "web", "2.0.0", "5m", "-"]
    );
    assert_eq!(records(&s.url).await.len(), 2);

    let out = homicro_cmd(&["deregister", "web", "--broker", &b]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(records(&s.url).await.keys().collect::<Vec<_>>(), ["nas"]);
    let out = homicro_cmd(&["deregister", "web", "--broker", &b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("web is not registered"));
}

#[tokio::test]
async fn watch_prints_one_line_per_change() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let w = Proc::homicro(&["watch", "--broker", &b]);
    w.wait_line(|l| l == "registry online").await;
    mosquitto_pub(
        &s.url,
        &[
            "-t",
            "homicro/services/cam",
            "-r",
            "-m",
            r#"{"host":"10.0.0.9","port":554}"#,
        ],
    );
    w.wait_line(|l| {
        l.split_whitespace().collect::<Vec<_>>() == ["registered", "cam", "10.0.0.9:554"]
    })
    .await;
    mosquitto_pub(
        &s.url,
        &[
            "-t",
            "homicro/services/cam",
            "-r",
            "-m",
            r#"{"host":"10.0.0.8"}"#,
        ],
    );
    w.wait_line(|l| l.starts_with("rejected") && l.contains("(owned)"))
        .await;
    mosquitto_pub(&s.url, &["-t", "homicro/services/cam", "-r", "-n"]);
    w.wait_line(|l| l.starts_with("deregistered") && l.contains("cam"))
        .await;
}

#[tokio::test]
async fn client_commands_reject_bad_input_with_exit_2() {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["register", "Bad_Name", "--host", "h", "--once"],
            "bad name \"Bad_Name\"",
        ),
        (
            vec!["register", "x", "--ttl", "soon"],
            "\"soon\" is not a duration",
        ),
        (vec!["register", "x", "--port", "0"], "--port"),
        (vec!["register", "x", "--port", "70000"], "--port"),
        (
            vec!["register", "x", "--meta", "novalue"],
            "is not KEY=VALUE",
        ),
        (
            vec!["register", "x", "--host", "h", "--version", "1.x"],
            "not a semver version",
        ),
        (
            vec!["register", "x", "--host", "h", "--health-http", "health"],
            "must be a path",
        ),
        (
            vec![
                "register",
                "x",
                "--host",
                "h",
                "--health-http",
                "/h",
                "--health-tcp",
            ],
            "not both",
        ),
        (
            vec!["list", "--broker", "localhost:1883"],
            "mqtt://HOST:PORT",
        ),
        (vec!["deregister", "a/b"], "bad name"),
    ];
    for (args, want) in cases {
        let out = homicro_cmd(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{args:?}: {:?} lacks {want:?}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn without_a_broker_or_registry_commands_say_so() {
    let port = free_port().to_string();
    let out = homicro_cmd(&["list", "--broker", &format!("mqtt://127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the broker at mqtt://127.0.0.1:"),
        "{}",
        stderr(&out)
    );

    // A broker with no registry on it.
    let mosq = Mosquitto::start().await;
    let b = mosq.url.to_string();
    let out = homicro_cmd(&["register", "x", "--host", "h", "--once", "--broker", &b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the registry is offline or absent"),
        "{}",
        stderr(&out)
    );
}

/// A password file or `[auth]` that cannot be used stops `serve` at once
/// with exit 2 and a message naming the file and line (or the key).
#[test]
fn serve_refuses_a_bad_password_file_or_auth_config_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    std::fs::write(&pw, "# users\nalice:$7$101$c2FsdA==$aGFzaA==\nbob:plain\n").unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user k\ntopic read a/#\ntopic write homicro/services/kitchen-+\n",
    )
    .unwrap();
    let serve = |auth: &str| {
        let cfg = dir.path().join("homicro.toml");
        std::fs::write(&cfg, format!("listen = \"127.0.0.1:0\"\n[auth]\n{auth}\n")).unwrap();
        let state = dir.path().join("state");
        homicro_cmd(&[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ])
    };
    let cases = [
        (
            format!("password_file = {:?}", pw.to_str().unwrap()),
            format!(
                "{}:3: user \"bob\": the password is not hashed",
                pw.display()
            ),
        ),
        (
            "password_file = \"/nonexistent/passwd\"".to_string(),
            "/nonexistent/passwd:0: cannot read it".to_string(),
        ),
        (
            format!("acl_file = {:?}", acl.to_str().unwrap()),
            format!(
                "{}:3: \"homicro/services/kitchen-+\" is not a valid topic filter: '+' and '#' stand for whole topic levels",
                acl.display()
            ),
        ),
        (
            "acl_file = 7".to_string(),
            "auth.acl_file: must be a file path, got 7".to_string(),
        ),
        (
            "allow_anonymous = false".to_string(),
            "auth.allow_anonymous: false needs a password_file".to_string(),
        ),
        (
            "users = 1".to_string(),
            "auth.users: unknown key".to_string(),
        ),
    ];
    for (auth, want) in cases {
        let out = serve(&auth);
        assert_eq!(out.status.code(), Some(2), "{auth}: {}", stderr(&out));
        assert!(stderr(&out).contains(&want), "{auth}: {}", stderr(&out));
    }
}

/// `homicro passwd` takes the password from stdin (never argv), writes a
/// file Mosquitto's tools read, and refuses a bad user name.
#[test]
fn passwd_adds_users_that_mosquitto_passwd_can_update() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    let run = |args: &[&str], input: &str| {
        let mut child = std::process::Command::new(bin())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let p = pw.to_str().unwrap();
    let out = run(&["passwd", p, "alice"], "first\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("added alice in {p}\n"));
    let out = run(&["passwd", p, "alice"], "second\n");
    assert_eq!(
        stdout(&out),
        format!("changed the password of alice in {p}\n")
    );
    let out = run(&["passwd", p, "a:b"], "x\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("may not contain ':'"),
        "{}",
        stderr(&out)
    );
    let out = run(&["passwd", p, "bob"], "\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("the password is empty"));
    // Mosquitto's own tool reads and rewrites the file homicro wrote.
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-b", p, "bob", "b0b"])
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&pw).unwrap();
    assert!(
        text.contains("alice:$7$10000$") && text.contains("bob:$7$101$"),
        "{text}"
    );
    assert!(!text.contains("second"), "never the password itself");
}

/// With nothing listening at the broker's address, every client command
/// gives up at once (as curl and mosquitto_pub do, not after 10 s of
/// retries) and says what to do.
#[tokio::test]
async fn every_command_fails_fast_when_nothing_listens() {
    let port = free_port();
    let b = format!("mqtt://127.0.0.1:{port}");
    let commands: [&[&str]; 8] = [
        &["list"],
        &["list", "--json"],
        &["watch"],
        &["deregister", "api"],
        &["register", "api", "--port", "8080"],
        &["register", "api", "--port", "8080", "--once"],
        &["call", "api"],
        &["proxy", "api"],
    ];
    for args in commands {
        let start = std::time::Instant::now();
        let out = homicro_cmd(&[args, &["--broker", &b]].concat());
        let took = start.elapsed();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
        let want = format!("cannot reach the broker at {b} (connection refused)");
        assert!(err.contains(&want), "{args:?}: {err}");
        assert!(err.contains("homicro serve` running?"), "{args:?}: {err}");
        assert!(err.contains("scripts/serve"), "{args:?}: {err}");
    }
}

/// Help says what `--listen` is (the one port), and documents `--role` and
/// `deregister NAME`.
#[test]
fn help_says_what_each_flag_is() {
    let serve = stdout(&homicro_cmd(&["serve", "--help"]));
    assert!(
        serve.contains("The one port for everything, IP:PORT: MQTT 3.1.1 and 5, MQTT over"),
        "{serve}"
    );
    assert!(
        serve.contains("HTTP API [default: 0.0.0.0:1883]"),
        "{serve}"
    );
    assert!(!serve.contains("--port"), "a hidden flag: {serve}");
    let register = stdout(&homicro_cmd(&["register", "--help"]));
    assert!(register.contains("for lookups by role"), "{register}");
    let deregister = stdout(&homicro_cmd(&["deregister", "--help"]));
    assert!(
        deregister.contains("The service name whose record goes"),
        "{deregister}"
    );
}

/// `serve --port` is a natural guess: it is refused with the flag to use.
#[test]
fn serve_port_points_at_listen() {
    let out = homicro_cmd(&["serve", "--port", "1884"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(
            "serve has no --port: the port is part of --listen IP:PORT, e.g. --listen 0.0.0.0:1884"
        ),
        "{err}"
    );
}

/// The log names the socket as bound (every interface here), and the URL
/// a client on this machine uses.
#[tokio::test]
async fn the_log_names_the_address_bound() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serve::start_with(&["--listen", "0.0.0.0:0"], &dir.path().join("state")).await;
    let port = s.port();
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("homicro serving"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("listen=0.0.0.0:{port}")), "{line}");
    assert!(
        line.contains(&format!("url=mqtt://127.0.0.1:{port}")),
        "{line}"
    );
}

/// A record whose health check fails (nothing listens on its port) is
/// cleared by the registry as unhealthy and registered again by `register`,
/// which says both on stderr, with the registry's detail.
#[tokio::test]
async fn register_says_when_its_record_is_cleared_unhealthy_and_registered_again() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let dead = free_port().to_string();
    let reg = Proc::homicro_with_stderr(&[
        "register",
        "api",
        "--host",
        "127.0.0.1",
        "--port",
        &dead,
        "--health-tcp",
        "--health-interval",
        "1s",
        "--health-failures",
        "1",
        "--broker",
        &b,
    ]);
    reg.wait_line(|l| l.starts_with(&format!("registered api at 127.0.0.1:{dead}")))
        .await;
    let cleared = reg
        .wait_line(|l| l.starts_with("api: cleared by the registry as unhealthy ("))
        .await;
    assert!(
        cleared.contains(&format!("tcp 127.0.0.1:{dead}")),
        "{cleared}"
    );
    assert!(cleared.ends_with("); registering it again"), "{cleared}");
    reg.wait_line(|l| l == format!("api: registered again at 127.0.0.1:{dead}"))
        .await;
}

/// The health flags are checked like the record: a bad value or one
/// without a check is a usage error (exit 2) that says what is wrong.
#[test]
fn bad_health_flags_are_usage_errors() {
    for (args, want) in [
        (
            &["--health-interval", "1s"][..],
            "--health-interval and --health-failures need --health-http or --health-tcp",
        ),
        (
            &["--health-tcp", "--health-interval", "500ms"],
            "`health.interval` must be at least 1s",
        ),
        (
            &["--health-tcp", "--health-failures", "0"],
            "`health.failures` must be an integer from 1 to 1000",
        ),
    ] {
        let out = homicro_cmd(&[&["register", "api", "--port", "80"], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}

/// `register` whose name another endpoint now owns (an admin gave it to
/// another host) stops: exit 1, saying who owns it, and deregisters
/// nothing.
#[tokio::test]
async fn register_stops_when_another_endpoint_owns_the_name() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let mut reg = Proc::homicro_with_stderr(&[
        "register", "tv", "--host", "10.0.0.4", "--port", "8009", "--broker", &b,
    ]);
    reg.wait_line(|l| l.starts_with("registered tv at 10.0.0.4:8009"))
        .await;
    // An admin removes it and gives the name to another host, before
    // `register` re-asserts (it waits a second first).
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .expect("curl is installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let api = format!("http://127.0.0.1:{}/register", s.port());
    assert_eq!(curl(&["-X", "DELETE", &format!("{api}/tv")]), "200");
    let other = r#"{"name":"tv","host":"10.0.0.5","port":8009}"#;
    assert_eq!(curl(&["-X", "PUT", "-d", other, &api]), "201");
    reg.wait_line(|l| {
        l == "homicro: tv: the name now belongs to 10.0.0.5:8009; stopped asserting it"
    })
    .await;
    assert_eq!(reg.wait_exit().await.code(), Some(1));
    let (status, body) = http_get(s.port(), "/discover/tv").await;
    assert_eq!(status, 200);
    assert!(body.contains("10.0.0.5"), "{body}");
}
