//! End to end: every protocol rule against `homicro serve` on its embedded
//! broker, driven with rumqttc and with mosquitto_pub/mosquitto_sub.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const WEB: &str = r#"{"host":"10.0.0.5","port":8080,"role":"web","version":"1.2.0"}"#;

#[tokio::test]
async fn register_discover_and_deregister_with_mosquitto_clients() {
    let s = Serve::start().await;
    let sub = Proc::mosquitto_sub(
        &s.url,
        &["-t", "homicro/services/+", "-t", "homicro/events/+"],
    )
    .await;
    mosquitto_pub(&s.url, &["-t", "homicro/services/web", "-r", "-m", WEB]);
    sub.wait_line(|l| l.starts_with("homicro/events/web") && l.contains("\"registered\""))
        .await;
    assert!(
        sub.messages()
            .iter()
            .any(|l| l == &format!("homicro/services/web {WEB}"))
    );

    // A newcomer gets the retained record at once.
    let late = Proc::mosquitto_sub(&s.url, &["-t", "homicro/services/+", "-C", "1"]).await;
    late.wait_line(|l| l == format!("homicro/services/web {WEB}"))
        .await;
    assert_eq!(records(&s.url).await.len(), 1);

    mosquitto_pub(&s.url, &["-t", "homicro/services/web", "-r", "-n"]);
    sub.wait_line(|l| l.contains("\"deregistered\"")).await;
    assert!(records(&s.url).await.is_empty());
}

#[tokio::test]
async fn a_duplicate_never_pushes_out_the_owner() {
    let s = Serve::start().await;
    let mut owner = Client::connect(&s.url).await;
    owner.subscribe("homicro/events/web").await;
    owner.publish("homicro/services/web", WEB, true).await;
    owner
        .expect("homicro/events/web", |v| v["event"] == "registered")
        .await;

    let mut watcher = Client::connect(&s.url).await;
    watcher.subscribe("homicro/errors/web").await;
    let dup = r#"{"host":"10.0.0.6","port":8080}"#;
    mosquitto_pub(&s.url, &["-t", "homicro/services/web", "-r", "-m", dup]);
    let err = watcher.expect("homicro/errors/web", |_| true).await;
    assert_eq!(err["error"], "owned");
    assert_eq!(err["owner"], json!({"host": "10.0.0.5", "port": 8080}));
    assert!(
        err["detail"]
            .as_str()
            .unwrap()
            .contains("owned by 10.0.0.5:8080")
    );

    // The registry is the bus's gate: a live watcher never sees the
    // duplicate. 21 refused duplicates, then the owner's own refresh; the
    // watcher sees the retained record and the refresh, nothing between.
    watcher.subscribe("homicro/services/web").await;
    for _ in 0..21 {
        owner.publish("homicro/services/web", dup, true).await;
    }
    owner.publish("homicro/services/web", WEB, true).await;
    let mut seen = 0;
    while seen < 2 {
        let homicro::mqtt::Incoming::Message { topic, payload, .. } = watcher.recv().await else {
            continue;
        };
        if topic == "homicro/services/web" {
            assert_eq!(payload, WEB.as_bytes(), "a watcher saw a refused record");
            seen += 1;
        }
    }
    assert_eq!(
        records(&s.url).await["web"],
        WEB.parse::<Value>().unwrap().to_string()
    );
}

#[tokio::test]
async fn updates_from_the_owner_are_accepted() {
    let s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/events/web").await;
    c.publish("homicro/services/web", WEB, true).await;
    c.expect("homicro/events/web", |v| v["event"] == "registered")
        .await;
    let v2 = r#"{"host":"10.0.0.5","port":8080,"role":"web","version":"1.3.0"}"#;
    c.publish("homicro/services/web", v2, true).await;
    c.expect("homicro/events/web", |v| {
        v["event"] == "updated" && v["changed"] == true
    })
    .await;
    assert!(records(&s.url).await["web"].contains("1.3.0"));
}

/// Every kind of bad input: a specific error, the serve process alive, and
/// the existing registration untouched.
#[tokio::test]
async fn bad_input_gets_a_specific_error_and_loses_nothing() {
    let mut s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/errors/#").await;
    c.subscribe("homicro/events/web").await;
    c.publish("homicro/services/web", WEB, true).await;
    c.expect("homicro/events/web", |v| v["event"] == "registered")
        .await;

    let big = format!(
        r#"{{"host":"h","meta":{{"pad":"{}"}}}}"#,
        "x".repeat(64 * 1024)
    );
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "homicro/services/web",
            "not json".into(),
            "invalid",
            "not JSON",
        ),
        (
            "homicro/services/web",
            "[1,2]".into(),
            "invalid",
            "must be a JSON object",
        ),
        (
            "homicro/services/web",
            r#"{"host":"10.0.0.5","port":"8080"}"#.into(),
            "invalid",
            "`port` must be an integer",
        ),
        (
            "homicro/services/web",
            r#"{"host":"10.0.0.5","ttl":"soon"}"#.into(),
            "invalid",
            "not a duration",
        ),
        (
            "homicro/services/web",
            r#"{"host":7,"port":1}"#.into(),
            "invalid",
            "`host` must be a string",
        ),
        (
            "homicro/services/web",
            r#"{"host":"10.0.0.5","version":"one"}"#.into(),
            "invalid",
            "semver",
        ),
        (
            "homicro/services/web",
            big.clone(),
            "too_large",
            "limit is 16384",
        ),
        (
            "homicro/services/Web",
            WEB.into(),
            "bad_name",
            "must start with a-z",
        ),
        ("homicro/services/a/b", WEB.into(), "bad_name", "only a-z"),
        (
            "homicro/heartbeat/web",
            r#"{"host":"10.0.0.9","port":1}"#.into(),
            "owned",
            "owned by 10.0.0.5:8080",
        ),
        (
            "homicro/heartbeat/web",
            "beat".into(),
            "invalid",
            "heartbeat is not JSON",
        ),
        (
            "homicro/heartbeat/nobody",
            r#"{"host":"10.0.0.9"}"#.into(),
            "unknown",
            "not registered",
        ),
    ];
    for (topic, payload, code, detail) in &cases {
        c.publish(topic, payload.clone(), topic.contains("/services/"))
            .await;
        let err_topic = topic
            .replace("/services/", "/errors/")
            .replace("/heartbeat/", "/errors/");
        let e = c.expect(&err_topic, |v| v["error"] == *code).await;
        assert!(
            e["detail"].as_str().unwrap().contains(detail),
            "{topic} {code}: {e}"
        );
    }
    assert!(s.running());
    let recs = records(&s.url).await;
    assert_eq!(
        recs.len(),
        1,
        "bad names and refused records were cleared: {recs:?}"
    );
    assert_eq!(recs["web"], WEB.parse::<Value>().unwrap().to_string());
}

#[tokio::test]
async fn ttl_expires_heartbeats_keep_alive() {
    let s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/events/+").await;
    c.publish(
        "homicro/services/short",
        r#"{"host":"10.0.0.7","ttl":1}"#,
        true,
    )
    .await;
    c.publish(
        "homicro/services/kept",
        r#"{"host":"10.0.0.8","ttl":1}"#,
        true,
    )
    .await;
    c.expect("homicro/events/short", |v| v["event"] == "registered")
        .await;
    c.expect("homicro/events/kept", |v| v["event"] == "registered")
        .await;
    let started = Instant::now();
    let beat = c.client.clone();
    let beats = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(300));
        loop {
            t.tick().await;
            let hb = r#"{"host":"10.0.0.8"}"#;
            beat.publish(
                "homicro/heartbeat/kept",
                rumqttc::QoS::AtMostOnce,
                false,
                hb,
            )
            .await
            .unwrap();
        }
    });
    c.expect("homicro/events/short", |v| v["event"] == "expired")
        .await;
    let late = started.elapsed();
    assert!(
        late >= Duration::from_millis(900),
        "expired early: {late:?}"
    );
    // 2 ttls later the heartbeated record is still there, the other gone.
    let mut sub = Client::connect(&s.url).await;
    tokio::time::sleep_until((started + Duration::from_secs(2)).into()).await;
    let snap = sub.snapshot("homicro/services/+").await;
    let names: Vec<&str> = snap.iter().map(|(t, ..)| t.as_str()).collect();
    assert_eq!(names, ["homicro/services/kept"]);
    beats.abort();
    c.expect("homicro/events/kept", |v| v["event"] == "expired")
        .await;
}

#[tokio::test]
async fn ten_thousand_records_reach_a_qos0_newcomer() {
    let s = Serve::start().await;
    let n = 10_000;
    fill(&s.url, n).await;

    let mut newcomer = Client::connect(&s.url).await;
    newcomer.subscribe("homicro/services/#").await;
    let mut got = newcomer.seen.len();
    while got < n + 1 {
        if let homicro::mqtt::Incoming::Message { retained, .. } = newcomer.recv().await {
            assert!(retained);
            got += 1;
        }
    }
    assert_eq!(got, n + 1);
    // And mosquitto_sub (QoS 0) counts the same.
    assert_eq!(mosquitto_sub_records(&s.url, "mqttv311", 0, n + 1), n + 1);
}

#[tokio::test]
async fn publishing_where_nobody_listens_keeps_the_connection() {
    let s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.publish("nobody/listens/here", "x", false).await;
    c.publish("homicro/nothing", "y", true).await;
    c.subscribe("homicro/events/web").await;
    c.publish("homicro/services/web", WEB, true).await;
    c.expect("homicro/events/web", |v| v["event"] == "registered")
        .await;
    // Still the same connection: no reconnect was reported.
    while let Ok(m) = c.rx.try_recv() {
        assert!(
            !matches!(
                m,
                homicro::mqtt::Incoming::Connected | homicro::mqtt::Incoming::Disconnected(_)
            ),
            "{m:?}"
        );
    }
}

#[tokio::test]
async fn one_port_and_one_descriptor_per_client() {
    let s = Serve::start().await;
    let ports = listening_ports(s.child.id());
    assert_eq!(ports, vec![s.port()], "the one public port, nothing else");
    let before = sockets(s.child.id());
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = Client::connect(&s.url).await;
        c.subscribe("fd/test").await;
        clients.push(c);
    }
    let after = sockets(s.child.id());
    assert_eq!(after - before, 50, "one socket per MQTT client");
}

/// How many sockets a process holds.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

/// The TCP ports a process listens on, from /proc.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let mut ports = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols[3] == "0A" && inodes.iter().any(|i| i == cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort();
    ports
}

#[tokio::test]
async fn a_stranger_using_a_registry_like_client_id_changes_nothing() {
    let s = Serve::start().await;
    for id in ["homicro-registry", "homicro-registry-0000000000000000"] {
        let mut o = homicro::mqtt::options(id, &s.url);
        o.set_keep_alive(Duration::from_secs(5));
        let c = Client::connect_with(o).await;
        c.client.disconnect().await.unwrap();
    }
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/events/web").await;
    c.publish("homicro/services/web", WEB, true).await;
    c.expect("homicro/events/web", |v| v["event"] == "registered")
        .await;
}
