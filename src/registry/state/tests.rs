//! The protocol's rules, one test each, on paused time and without a broker.

mod health;
mod owner;
mod submit;
mod wills;

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::{Delivery, Publish, Registry};
use crate::identity::{Author, Identity};
use crate::record::{Name, Record};
use crate::topics::Topics;

const A: &str = r#"{"host":"10.0.0.5","port":8080,"ttl":30}"#;
const A2: &str = r#"{"host":"10.0.0.5","port":8080,"ttl":30,"version":"1.0.0"}"#;
const B: &str = r#"{"host":"10.0.0.6","port":8080}"#;

fn reg() -> Registry {
    Registry::new(Topics::new("homicro"), "test")
}

fn live(r: &mut Registry, topic: &str, payload: &str) -> Vec<Publish> {
    r.on_message(
        Instant::now(),
        topic,
        Bytes::from(payload.to_string()),
        Delivery::Live,
    )
}

/// Feeds the registry's own retained publishes back to it, as the broker does.
fn echo(r: &mut Registry, out: &[Publish]) {
    for p in out.iter().filter(|p| p.retain) {
        let back = r.on_message(Instant::now(), &p.topic, p.payload.clone(), Delivery::Live);
        assert!(
            back.is_empty(),
            "echo of {p:?} was taken for input: {back:?}"
        );
    }
}

fn json(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap()
}

fn find<'a>(out: &'a [Publish], topic: &str) -> &'a Publish {
    out.iter()
        .find(|p| p.topic == topic)
        .unwrap_or_else(|| panic!("no publish on {topic} in {out:?}"))
}

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

#[tokio::test(start_paused = true)]
async fn accepts_a_free_name_and_announces_it() {
    let mut r = reg();
    let out = live(&mut r, "homicro/services/web", A);
    assert_eq!(out.len(), 1, "no re-publish needed: {out:?}");
    let ev = json(find(&out, "homicro/events/web"));
    assert_eq!(ev["event"], "registered");
    assert_eq!(ev["endpoint"], "10.0.0.5:8080");
    assert_eq!(r.get(&name("web")).unwrap().payload(), A.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn same_endpoint_updates_and_refreshes() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    tokio::time::advance(Duration::from_secs(20)).await;
    let out = live(&mut r, "homicro/services/web", A2);
    let ev = json(find(&out, "homicro/events/web"));
    assert_eq!(
        (ev["event"].as_str(), ev["changed"].as_bool()),
        (Some("updated"), Some(true))
    );
    assert_eq!(r.get(&name("web")).unwrap().payload(), A2.as_bytes());
    tokio::time::advance(Duration::from_secs(20)).await;
    assert!(
        r.on_tick(Instant::now()).is_empty(),
        "refreshed at 20s, so alive at 40s"
    );
    let out = live(&mut r, "homicro/services/web", A2);
    assert_eq!(json(&out[0])["changed"], false);
}

#[tokio::test(start_paused = true)]
async fn another_endpoint_is_refused_and_the_owner_restored() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    let out = live(&mut r, "homicro/services/web", B);
    let restore = find(&out, "homicro/services/web");
    assert!(restore.retain);
    assert_eq!(restore.payload, A.as_bytes());
    let err = json(find(&out, "homicro/errors/web"));
    assert_eq!(err["error"], "owned");
    assert_eq!(err["owner"]["host"], "10.0.0.5");
    assert_eq!(err["owner"]["port"], 8080);
    assert_eq!(err["endpoint"]["host"], "10.0.0.6");
    assert!(
        err["detail"]
            .as_str()
            .unwrap()
            .contains("owned by 10.0.0.5:8080")
    );
    assert_eq!(json(find(&out, "homicro/events/web"))["event"], "rejected");
    echo(&mut r, &out);
    assert_eq!(r.get(&name("web")).unwrap().payload(), A.as_bytes());
    assert_eq!(r.stats().refusals, 1);
}

#[tokio::test(start_paused = true)]
async fn own_republish_is_never_a_refresh() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    tokio::time::advance(Duration::from_secs(25)).await;
    let out = live(&mut r, "homicro/services/web", B);
    // The restore of A comes back through the broker at 25 s...
    echo(&mut r, &out);
    tokio::time::advance(Duration::from_secs(5)).await;
    // ...and must not have moved the deadline from 30 s.
    let out = r.on_tick(Instant::now());
    assert_eq!(json(find(&out, "homicro/events/web"))["event"], "expired");
}

#[tokio::test(start_paused = true)]
async fn invalid_input_restores_or_clears() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    for (bad, code) in [
        ("not json", "invalid"),
        (r#"{"host":"h","port":"x"}"#, "invalid"),
        (
            &format!(r#"{{"host":"h","meta":"{}"}}"#, "x".repeat(70_000)),
            "too_large",
        ),
    ] {
        let out = live(&mut r, "homicro/services/web", bad);
        assert_eq!(find(&out, "homicro/services/web").payload, A.as_bytes());
        assert_eq!(json(find(&out, "homicro/errors/web"))["error"], code);
        echo(&mut r, &out);
    }
    let out = live(&mut r, "homicro/services/fresh", "[]");
    let clear = find(&out, "homicro/services/fresh");
    assert!(clear.payload.is_empty() && clear.retain);
    echo(&mut r, &out);
    assert!(r.get(&name("fresh")).is_none());
    assert_eq!(r.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn bad_names_are_refused_and_cleared() {
    let mut r = reg();
    for topic in ["Web", "a/b", "-x", ""] {
        let out = live(&mut r, &format!("homicro/services/{topic}"), A);
        let clear = find(&out, &format!("homicro/services/{topic}"));
        assert!(clear.payload.is_empty());
        assert_eq!(
            json(find(&out, &format!("homicro/errors/{topic}")))["error"],
            "bad_name"
        );
        echo(&mut r, &out);
    }
    assert!(r.is_empty());
    assert!(live(&mut r, "homicro/services/a/b", "").is_empty());
}

#[tokio::test(start_paused = true)]
async fn empty_payload_deregisters() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    let out = live(&mut r, "homicro/services/web", "");
    assert_eq!(out.len(), 1, "the empty publish cleared the topic already");
    assert_eq!(json(&out[0])["event"], "deregistered");
    assert!(r.is_empty());
    assert!(r.next_deadline().is_none());
    assert!(live(&mut r, "homicro/services/web", "").is_empty());
    live(&mut r, "homicro/services/web", B);
    assert_eq!(r.get(&name("web")).unwrap().endpoint.host, "10.0.0.6");
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_clears_and_frees_the_name() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    live(&mut r, "homicro/services/nas", B);
    assert_eq!(
        r.next_deadline(),
        Some(Instant::now() + Duration::from_secs(30))
    );
    tokio::time::advance(Duration::from_millis(29_999)).await;
    assert!(r.on_tick(Instant::now()).is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    let out = r.on_tick(Instant::now());
    let clear = find(&out, "homicro/services/web");
    assert!(clear.payload.is_empty() && clear.retain);
    assert_eq!(json(find(&out, "homicro/events/web"))["event"], "expired");
    echo(&mut r, &out);
    assert_eq!(r.len(), 1, "nas has no ttl and stays");
    assert!(r.next_deadline().is_none());
    live(&mut r, "homicro/services/web", r#"{"host":"10.0.0.9"}"#);
    assert_eq!(r.get(&name("web")).unwrap().endpoint.host, "10.0.0.9");
}

#[tokio::test(start_paused = true)]
async fn record_without_ttl_stays_with_its_owner() {
    let mut r = reg();
    live(&mut r, "homicro/services/nas", B);
    tokio::time::advance(Duration::from_secs(86_400 * 30)).await;
    assert!(r.on_tick(Instant::now()).is_empty());
    let out = live(&mut r, "homicro/services/nas", A);
    assert_eq!(json(find(&out, "homicro/errors/nas"))["error"], "owned");
}

#[tokio::test(start_paused = true)]
async fn heartbeats() {
    let mut r = reg();
    let hb = r#"{"host":"10.0.0.5","port":8080}"#;
    let out = live(&mut r, "homicro/heartbeat/web", hb);
    assert_eq!(json(find(&out, "homicro/errors/web"))["error"], "unknown");
    live(&mut r, "homicro/services/web", A);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(live(&mut r, "homicro/heartbeat/web", hb).is_empty());
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(
        r.on_tick(Instant::now()).is_empty(),
        "heartbeat at 29 s keeps it to 59 s"
    );

    let stranger = live(
        &mut r,
        "homicro/heartbeat/web",
        r#"{"host":"10.0.0.6","port":8080}"#,
    );
    let err = json(find(&stranger, "homicro/errors/web"));
    assert_eq!(err["error"], "owned");
    assert_eq!(err["owner"]["host"], "10.0.0.5");
    let bad = live(&mut r, "homicro/heartbeat/web", "ping");
    assert_eq!(json(find(&bad, "homicro/errors/web"))["error"], "invalid");
    let bad = live(&mut r, "homicro/heartbeat/Web", hb);
    assert_eq!(json(find(&bad, "homicro/errors/Web"))["error"], "bad_name");

    tokio::time::advance(Duration::from_secs(1)).await;
    let out = r.on_tick(Instant::now());
    assert_eq!(
        json(find(&out, "homicro/events/web"))["event"],
        "expired",
        "strangers don't refresh"
    );
}

#[tokio::test(start_paused = true)]
async fn restart_republishes_everything_with_fresh_ttls() {
    let mut r = reg();
    let now = Instant::now();
    let records = [("web", A), ("nas", B)].map(|(n, p)| {
        (
            name(n),
            Record::parse(&name(n), Bytes::from(p)).unwrap(),
            None,
        )
    });
    r.load(now, records.to_vec());
    let out = r.on_connected();
    // `online` last: whoever sees it finds every record already there.
    let last = out.last().unwrap();
    assert_eq!(last.topic, "homicro/registry");
    assert_eq!(json(last)["state"], "online");
    assert_eq!(find(&out, "homicro/services/web").payload, A.as_bytes());
    assert_eq!(find(&out, "homicro/services/nas").payload, B.as_bytes());
    assert_eq!(json(find(&out, "homicro/events/web"))["event"], "restored");
    assert_eq!(r.next_deadline(), Some(now + Duration::from_secs(30)));
    // A reconnect re-publishes again but announces no second restore.
    let again = r.on_connected();
    assert_eq!(again.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn retained_copies_sync_but_never_refresh() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    tokio::time::advance(Duration::from_secs(20)).await;
    let at = Instant::now();
    let same = r.on_message(
        at,
        "homicro/services/web",
        Bytes::from(A),
        Delivery::Retained,
    );
    assert!(same.is_empty());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(r.on_tick(Instant::now()).len(), 2, "expired at 30 s");
    // A record the broker held while the registry was away is taken over.
    let out = r.on_message(
        at,
        "homicro/services/tv",
        Bytes::from(B),
        Delivery::Retained,
    );
    assert_eq!(json(&out[0])["event"], "registered");
}

#[tokio::test(start_paused = true)]
async fn a_publish_racing_our_restore_is_reasserted() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    // A stranger's publish is refused: the restore of A is on its way.
    let out = live(&mut r, "homicro/services/web", B);
    // Before the echo arrives, the owner updates. The broker will apply our
    // restore of A after this update, so the registry re-asserts A2.
    let upd = live(&mut r, "homicro/services/web", A2);
    assert_eq!(find(&upd, "homicro/services/web").payload, A2.as_bytes());
    echo(&mut r, &out);
    echo(&mut r, &upd);
    assert_eq!(r.get(&name("web")).unwrap().payload(), A2.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn changes_count_what_must_be_persisted() {
    let mut r = reg();
    let c0 = r.changes();
    live(&mut r, "homicro/services/web", A);
    let c1 = r.changes();
    assert!(c1 > c0);
    live(
        &mut r,
        "homicro/heartbeat/web",
        r#"{"host":"10.0.0.5","port":8080}"#,
    );
    live(&mut r, "homicro/services/web", A);
    assert_eq!(r.changes(), c1, "a refresh changes nothing on disk");
}

#[tokio::test(start_paused = true)]
async fn clears_unconfirmed_at_a_reconnect_are_made_again() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    tokio::time::advance(Duration::from_secs(30)).await;
    let expired = r.on_tick(Instant::now());
    assert!(find(&expired, "homicro/services/web").payload.is_empty());
    // The connection drops before the clear came back.
    let out = r.on_connected();
    let clear = find(&out, "homicro/services/web");
    assert!(clear.payload.is_empty() && clear.retain);
}

#[tokio::test(start_paused = true)]
async fn retained_and_portless_heartbeats() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    tokio::time::advance(Duration::from_secs(29)).await;
    let hb = Bytes::from_static(br#"{"host":"10.0.0.5","port":8080}"#);
    let out = r.on_message(
        Instant::now(),
        "homicro/heartbeat/web",
        hb,
        Delivery::Retained,
    );
    assert!(out.is_empty());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        r.on_tick(Instant::now()).len(),
        2,
        "an old retained heartbeat is no refresh"
    );
    live(&mut r, "homicro/services/web", A);
    let out = live(&mut r, "homicro/heartbeat/web", r#"{"host":"10.0.0.5"}"#);
    let e = json(find(&out, "homicro/errors/web"));
    assert_eq!(e["error"], "invalid");
    assert!(e["detail"].as_str().unwrap().contains("needs `port`"));
}
