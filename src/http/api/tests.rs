//! The API's pure parts: peers, bodies, queries, health and metrics.

use super::*;
use crate::registry::Stats;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn loopback_peers() {
    for yes in [
        "127.0.0.1",
        "127.0.0.2",
        "127.255.0.9",
        "::1",
        "::ffff:127.0.0.1",
    ] {
        assert!(is_loopback(ip(yes)), "{yes}");
    }
    for no in [
        "192.0.2.2",
        "10.0.0.1",
        "0.0.0.0",
        "::",
        "fd00::2",
        "::ffff:10.0.0.1",
        "::2",
    ] {
        assert!(!is_loopback(ip(no)), "{no}");
    }
}

#[test]
fn error_codes_map_to_statuses() {
    assert_eq!(status_of(ErrorCode::BadName), StatusCode::BAD_REQUEST);
    assert_eq!(status_of(ErrorCode::Invalid), StatusCode::BAD_REQUEST);
    assert_eq!(
        status_of(ErrorCode::TooLarge),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(status_of(ErrorCode::Owned), StatusCode::CONFLICT);
    assert_eq!(status_of(ErrorCode::Unknown), StatusCode::NOT_FOUND);
}

#[test]
fn bodies_give_a_name_and_a_record() {
    let (name, rec) = named_record(br#"{"name":"web","host":"h","port":80}"#).unwrap();
    assert_eq!(name, "web");
    assert_eq!(Value::Object(rec), json!({"host": "h", "port": 80}));
    for (bad, why) in [
        (&b"nope"[..], "not JSON"),
        (b"[1]", "JSON object"),
        (br#"{"host":"h"}"#, "`name` is required"),
        (br#"{"name":1}"#, "`name` must be a string"),
    ] {
        let e = named_record(bad).unwrap_err();
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn self_registration_takes_the_peer_as_host() {
    let rec = |j: Value| j.as_object().unwrap().clone();
    let peer = ip("::ffff:192.0.2.7");
    let out = with_peer_host(rec(json!({"port": 80})), peer).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out).unwrap()["host"],
        "192.0.2.7"
    );
    let same = with_peer_host(rec(json!({"host": "192.0.2.7", "port": 80})), peer).unwrap();
    assert_eq!(same, out);
    let e = with_peer_host(rec(json!({"host": "10.0.0.9"})), peer).unwrap_err();
    assert!(
        e.contains("taken from the connection (192.0.2.7)") && e.contains("10.0.0.9"),
        "{e}"
    );
    assert!(with_peer_host(rec(json!({"host": "nas.local"})), peer).is_err());
}

#[test]
fn role_queries() {
    assert_eq!(role_query("").unwrap(), None);
    let q = role_query("role=api%40%5E1.2").unwrap().unwrap();
    assert_eq!(q, Query::parse("api@^1.2").unwrap());
    assert_eq!(
        role_query("role=api").unwrap(),
        Some(Query::parse("api").unwrap())
    );
    assert!(role_query("role=api@>=1.0,+<2").is_ok(), "'+' is a space");
    for bad in ["role=Api", "role=api@^y", "roel=api", "role=a&role=b"] {
        assert!(role_query(bad).is_err(), "{bad}");
    }
}

#[test]
fn discovery_embeds_records_by_name() {
    let n = |s: &str| Name::parse(s).unwrap();
    let body = object_of(vec![
        (n("b"), Bytes::from_static(br#"{"host":"h2"}"#)),
        (n("a"), Bytes::from_static(br#"{"port":1,"host":"h1"}"#)),
    ]);
    assert_eq!(
        &body[..],
        br#"{"a":{"port":1,"host":"h1"},"b":{"host":"h2"}}"#
    );
    assert_eq!(&object_of(Vec::new())[..], b"{}");
}

fn status(connected: bool) -> Status {
    Status {
        stats: Stats {
            registrations: 3,
            refusals: 1,
            ..Stats::default()
        },
        connected,
        records: 2,
    }
}

#[test]
fn health_follows_the_broker_session() {
    let (code, v) = health(Some(Ok(status(true))), 5);
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (
            &v["state"],
            &v["records"],
            &v["broker_connected"],
            &v["uptime_secs"]
        ),
        (&json!("online"), &json!(2), &json!(true), &json!(5))
    );
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let (code, v) = health(Some(Ok(status(false))), 5);
    assert_eq!(
        (code, &v["state"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("offline"))
    );
    let (code, v) = health(Some(Err(Stopped)), 5);
    assert_eq!(
        (code, &v["state"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("offline"))
    );
    let (code, v) = health(None, 5);
    assert_eq!(
        (code, &v["state"], &v["registry"]),
        (StatusCode::OK, &json!("broker-only"), &json!("off"))
    );
}

#[test]
fn metrics_in_prometheus_text() {
    let front = Metrics::default();
    let _a = front.http.enter();
    {
        let _b = front.websocket.enter();
    }
    front.garbage.fetch_add(4, Ordering::Relaxed);
    front.dropped.fetch_add(2, Ordering::Relaxed);
    let text = metrics(Some(&status(true)), &front, 5, 3, 7, 1.5);
    for line in [
        "# TYPE homicro_records gauge",
        "homicro_records 2",
        "# TYPE homicro_registrations_total counter",
        "homicro_registrations_total 3",
        "homicro_refusals_total 1",
        "homicro_expiries_total 0",
        "homicro_unhealthy_total 0",
        "# TYPE homicro_connections gauge",
        "homicro_connections{kind=\"http\"} 1",
        "homicro_connections{kind=\"websocket\"} 0",
        "homicro_connections_total{kind=\"websocket\"} 1",
        "homicro_connections_total{kind=\"mqtt_v5\"} 0",
        "homicro_bus_garbage_total 4",
        "homicro_bus_sessions 3",
        "homicro_bus_dropped_total 7",
        "homicro_bus_retained 7",
        "homicro_uptime_seconds 1.500",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // Every sample has its HELP and TYPE, and every line is one of the three.
    for l in text.lines() {
        let ok = l.starts_with("# HELP homicro_")
            || l.starts_with("# TYPE homicro_")
            || (l.starts_with("homicro_") && l.rsplit(' ').next().unwrap().parse::<f64>().is_ok());
        assert!(ok, "{l}");
    }
    assert!(!metrics(None, &front, 0, 0, 0, 0.0).contains("homicro_records"));
}
