//! End to end: the commands for people against `homicro serve`.

mod common;

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
        stderr(&out).contains("cannot connect to mqtt://127.0.0.1:"),
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
