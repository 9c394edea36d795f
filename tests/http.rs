//! The HTTP API end to end: `homicro serve` (the real binary, its front
//! on one port), and real HTTP clients (hyper's and curl). One test needs
//! a broker it can kill: it runs the front and a real registry in the test
//! process against a Mosquitto. (The WebSocket upgrade and idle
//! connections are in tests/websocket.rs.)

mod api;
mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use api::{Api, register, request};
use common::{Client, WAIT};
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// `curl ARGS URL`: the status and the body.
async fn curl(args: &[&str], url: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl is installed");
    assert!(out.status.success(), "curl: {}", common::stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(body).unwrap())
}

/// This machine's address towards the outside, if it has one.
fn outside_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn discover_all_one_and_by_role() {
    let api = Api::start().await;
    assert_eq!(api.get("/discover").await.expect(200), json!({}));
    register(
        &api,
        "api1",
        json!({"host": "10.0.0.1", "port": 80, "role": "api", "version": "1.2.3"}),
    )
    .await;
    register(
        &api,
        "api2",
        json!({"host": "10.0.0.2", "port": 80, "role": "api", "version": "2.0.0"}),
    )
    .await;
    register(&api, "db", json!({"host": "10.0.0.3", "port": 5984})).await;

    let all = api.get("/discover").await;
    assert_eq!(all.headers["content-type"], "application/json");
    let all = all.expect(200);
    let names: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert_eq!(names, ["api1", "api2", "db"]);
    assert_eq!(all["db"], json!({"host": "10.0.0.3", "port": 5984}));

    let one = api.get("/discover/api2").await.expect(200);
    assert_eq!(one["version"], "2.0.0");
    assert!(
        one.get("name").is_none(),
        "`name` is the API's, not the record's"
    );
    let missing = api.get("/discover/nope").await.expect(404);
    assert_eq!(missing["error"], "unknown");
    assert_eq!(
        api.get("/discover/Bad").await.expect(400)["error"],
        "bad_name"
    );

    let v1 = api.get("/discover?role=api@%5E1.2").await.expect(200);
    assert_eq!(v1.as_object().unwrap().keys().collect::<Vec<_>>(), ["api1"]);
    let (code, both) = curl(
        &["-G", "--data-urlencode", "role=api"],
        &api.url("/discover"),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(both.as_object().unwrap().len(), 2);
    for bad in [
        "/discover?role=api@nope",
        "/discover?role=Api",
        "/discover?who=api",
    ] {
        let e = api.get(bad).await.expect(400);
        assert_eq!(e["error"], "invalid", "{bad}");
        assert!(e["detail"].as_str().unwrap().len() > 10, "{e}");
    }
}

#[tokio::test]
async fn self_register_takes_the_callers_address_and_reaches_mqtt() {
    let api = Api::start().await;
    let mut sub = Client::connect(&api.mqtt).await;
    sub.subscribe("homicro/services/selfie").await;
    let (code, ev) = curl(
        &[
            "-X",
            "PUT",
            "--data",
            r#"{"name":"selfie","port":8080,"ttl":"30s"}"#,
        ],
        &api.url("/self-register"),
    )
    .await;
    assert_eq!(code, 201, "{ev}");
    assert_eq!(ev["event"], "registered");
    assert_eq!(ev["endpoint"], "127.0.0.1:8080");
    let rec = sub
        .expect("homicro/services/selfie", |v| v["port"] == 8080)
        .await;
    assert_eq!(rec["host"], "127.0.0.1");
    assert_eq!(rec["ttl"], "30s");
    assert!(rec.get("name").is_none());

    // The same host in the body is fine; another one is refused.
    let same = json!({"name": "selfie", "port": 8080, "ttl": "30s", "host": "127.0.0.1"});
    let ev = api.put("/self-register", &same).await.expect(200);
    assert_eq!(
        (ev["event"].as_str(), ev["changed"].as_bool()),
        (Some("updated"), Some(false))
    );
    let other = json!({"name": "selfie", "port": 8080, "host": "10.9.9.9"});
    let e = api.put("/self-register", &other).await.expect(400);
    assert_eq!(e["error"], "invalid");
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("taken from the connection"),
        "{e}"
    );
    let e = api
        .put("/self-register", &json!({"port": 1}))
        .await
        .expect(400);
    assert!(
        e["detail"].as_str().unwrap().contains("`name` is required"),
        "{e}"
    );
}

#[tokio::test]
async fn register_on_behalf_owned_invalid_too_large_and_delete() {
    let api = Api::start().await;
    let mut events = Client::connect(&api.mqtt).await;
    events.subscribe("homicro/errors/web").await;
    register(&api, "web", json!({"host": "10.0.0.5", "port": 80})).await;

    // Another endpoint: 409 with the owner, and the error on MQTT too.
    let e = api
        .put(
            "/register",
            &json!({"name": "web", "host": "10.0.0.6", "port": 80}),
        )
        .await
        .expect(409);
    assert_eq!(e["error"], "owned");
    assert_eq!(e["owner"], json!({"host": "10.0.0.5", "port": 80}));
    events
        .expect("homicro/errors/web", |v| v["error"] == "owned")
        .await;

    // Bad input never costs the registration.
    let bad = request(api.addr, "PUT", "/register", "{not json")
        .await
        .expect(400);
    assert_eq!(bad["error"], "invalid");
    let e = api
        .put(
            "/register",
            &json!({"name": "web", "host": "10.0.0.5", "port": "80"}),
        )
        .await
        .expect(400);
    assert_eq!(e["error"], "invalid");
    assert!(e["detail"].as_str().unwrap().contains("`port`"), "{e}");
    let e = api
        .put("/register", &json!({"name": "a/b", "host": "h"}))
        .await
        .expect(400);
    assert_eq!(e["error"], "bad_name");
    // Over the record limit inside the body limit: the registry's rule...
    let big =
        json!({"name": "web", "host": "10.0.0.5", "port": 80, "meta": {"x": "y".repeat(16_500)}});
    assert_eq!(
        api.put("/register", &big).await.expect(413)["error"],
        "too_large"
    );
    // ...and over the body limit: not even read.
    let huge = json!({"name": "web", "host": "10.0.0.5", "meta": {"x": "y".repeat(40_000)}});
    assert_eq!(
        api.put("/register", &huge).await.expect(413)["error"],
        "too_large"
    );
    let kept = api.get("/discover/web").await.expect(200);
    assert_eq!(kept, json!({"host": "10.0.0.5", "port": 80}));

    // Removal.
    let ev = api.delete("/register/web").await.expect(200);
    assert_eq!(ev["event"], "deregistered");
    assert_eq!(
        api.get("/discover/web").await.expect(404)["error"],
        "unknown"
    );
    assert_eq!(
        api.delete("/register/web").await.expect(404)["error"],
        "unknown"
    );
    let none = common::records(&api.mqtt).await;
    assert!(none.is_empty(), "the broker's copy is cleared: {none:?}");
}

#[tokio::test]
async fn only_loopback_registers_for_others() {
    let api = Api::start().await;
    // 127.0.0.2 is loopback too.
    let from = |ip: [u8; 4]| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((ip, 0))).unwrap();
        sock.connect(api.addr).await.unwrap()
    };
    let stream = from([127, 0, 0, 2]).await;
    assert_eq!(stream.local_addr().unwrap().ip().to_string(), "127.0.0.2");
    drop(stream);
    let Some(outside) = outside_ip() else {
        eprintln!("no address but loopback: the 403 is covered by the unit test of is_loopback");
        return;
    };
    let there = SocketAddr::new(outside, api.addr.port());
    let body = json!({"name": "nas", "host": "10.0.0.10", "port": 5000}).to_string();
    let e = request(there, "PUT", "/register", &body).await.expect(403);
    assert_eq!(e["error"], "forbidden");
    assert!(
        e["detail"].as_str().unwrap().contains(&outside.to_string()),
        "{e}"
    );
    let e = request(there, "DELETE", "/register/nas", "")
        .await
        .expect(403);
    assert_eq!(e["error"], "forbidden");
    // Its own record it may register; the host is its address.
    let own = json!({"name": "nas", "port": 5000}).to_string();
    let ev = request(there, "PUT", "/self-register", &own)
        .await
        .expect(201);
    assert_eq!(ev["endpoint"], format!("{outside}:5000"));
    let rec = api.get("/discover/nas").await.expect(200);
    assert_eq!(rec["host"], outside.to_string());
}

#[tokio::test]
async fn health_is_online_then_offline_without_the_broker() {
    let mut api = Api::start_on_mosquitto().await;
    let h = api.get("/health").await.expect(200);
    assert_eq!(h["state"], "online");
    assert_eq!(h["broker_connected"], true);
    assert_eq!(h["records"], 0);
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_secs"].is_u64());
    register(&api, "a", json!({"host": "h"})).await;
    assert_eq!(api.get("/health").await.expect(200)["records"], 1);
    api.mosq.as_mut().unwrap().kill();
    let start = std::time::Instant::now();
    loop {
        let r = api.get("/health").await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.json()["state"], "offline");
            assert_eq!(r.json()["broker_connected"], false);
            break;
        }
        assert!(start.elapsed() < WAIT, "still {}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_move_with_registrations() {
    let api = Api::start().await;
    let sample = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let before = api.get("/metrics").await;
    assert_eq!(before.status, StatusCode::OK);
    assert_eq!(
        before.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let before = before.text();
    for name in [
        "homicro_records",
        "homicro_registrations_total",
        "homicro_updates_total",
        "homicro_refusals_total",
        "homicro_expiries_total",
        "homicro_deregistrations_total",
        "homicro_health_failures_total",
        "homicro_unhealthy_total",
        "homicro_connections{kind=\"mqtt_v4\"}",
        "homicro_connections{kind=\"mqtt_v5\"}",
        "homicro_connections{kind=\"websocket\"}",
        "homicro_connections_total{kind=\"http\"}",
        "homicro_bus_accepted_total",
        "homicro_bus_garbage_total",
        "homicro_bus_silent_total",
        "homicro_bus_refused_publishes_total",
        "homicro_bus_wills_total",
        "homicro_bus_sessions",
        "homicro_uptime_seconds",
    ] {
        sample(&before, name);
    }
    assert!(before.contains("# TYPE homicro_registrations_total counter"));
    assert_eq!(
        sample(&before, "homicro_connections{kind=\"http\"}"),
        1.0,
        "this one"
    );
    register(&api, "m", json!({"host": "h"})).await;
    api.put("/register", &json!({"name": "m", "host": "other"}))
        .await
        .expect(409);
    let after = api.get("/metrics").await.text();
    let moved = |name| sample(&after, name) - sample(&before, name);
    assert_eq!(moved("homicro_registrations_total"), 1.0);
    assert_eq!(moved("homicro_refusals_total"), 1.0);
    assert_eq!(moved("homicro_records"), 1.0);
    assert_eq!(moved("homicro_connections_total{kind=\"http\"}"), 3.0);
}

#[tokio::test]
async fn unknown_paths_methods_and_garbage() {
    let api = Api::start().await;
    let e = api.get("/nope").await.expect(404);
    assert_eq!(e["error"], "not_found");
    let r = request(api.addr, "POST", "/register", "{}").await;
    assert_eq!(r.expect(405)["error"], "method_not_allowed");
    assert_eq!(r.headers["allow"], "PUT");
    let e = api.get("/mqtt").await.expect(400);
    assert_eq!(e["error"], "invalid");
    assert!(e["detail"].as_str().unwrap().contains("WebSocket"), "{e}");

    // A request line hyper cannot parse: 400, and the next client is served.
    let mut raw = TcpStream::connect(api.addr).await.unwrap();
    raw.write_all(b"GET /a b c d\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    api.get("/health").await.expect(200);
}
