//! Wills on homicro's bus: a will clears the record its own session wrote
//! or refreshed last, and says so; an earlier session's will clears
//! nothing.

use super::*;
use crate::registry::state::{GateKind, Source};

/// A record without a `ttl`, kept by its connection's will.
const LAMP: &str = r#"{"host":"10.0.0.7","port":80}"#;

fn lamp_owner() -> Author {
    Author::new(Identity::address("10.0.0.7".parse().unwrap()))
}

fn put(r: &mut Registry, kind: GateKind, payload: &str, session: u64, will: bool) -> Vec<Publish> {
    let (verdict, out) = r.on_gate(
        Instant::now(),
        kind,
        "lamp",
        Bytes::from(payload.to_string()),
        &lamp_owner(),
        Source { session, will },
    );
    assert_eq!(verdict, Ok(()), "{out:?}");
    out
}

#[tokio::test(start_paused = true)]
async fn a_will_clears_its_own_sessions_record_and_says_so() {
    let mut r = reg();
    put(&mut r, GateKind::Record, LAMP, 7, false);
    let out = put(&mut r, GateKind::Record, "", 7, true);
    assert!(r.get(&name("lamp")).is_none());
    assert_eq!(find(&out, "homicro/services/lamp").payload, "");
    let ev = json(find(&out, "homicro/events/lamp"));
    assert_eq!(ev["event"], "deregistered");
    assert_eq!(ev["will"], true);
    assert_eq!(r.stats().deregistrations, 1);
}

#[tokio::test(start_paused = true)]
async fn a_deliberate_deregistration_says_no_will() {
    let mut r = reg();
    put(&mut r, GateKind::Record, LAMP, 7, false);
    let out = put(&mut r, GateKind::Record, "", 8, false);
    let ev = json(find(&out, "homicro/events/lamp"));
    assert_eq!(ev["event"], "deregistered");
    assert!(ev.get("will").is_none(), "{ev}");
}

/// The service restarted and registered again on a new connection; the
/// old one's keepalive runs out later and its will goes out.
#[tokio::test(start_paused = true)]
async fn an_earlier_sessions_will_clears_nothing() {
    let mut r = reg();
    put(&mut r, GateKind::Record, LAMP, 7, false);
    put(&mut r, GateKind::Record, LAMP, 9, false);
    let out = put(&mut r, GateKind::Record, "", 7, true);
    assert!(out.is_empty(), "nothing stored or said: {out:?}");
    assert_eq!(r.get(&name("lamp")).unwrap().payload(), LAMP.as_bytes());
    assert_eq!(r.stats().stale_wills, 1);
    assert_eq!(r.stats().deregistrations, 0);
    // The live session's own will still clears it.
    put(&mut r, GateKind::Record, "", 9, true);
    assert!(r.get(&name("lamp")).is_none());
}

/// A heartbeat is a write too: the session that keeps the record alive
/// is the one whose will may clear it.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_makes_its_session_the_writer() {
    let mut r = reg();
    let with_ttl = r#"{"host":"10.0.0.7","port":80,"ttl":60}"#;
    put(&mut r, GateKind::Record, with_ttl, 7, false);
    put(&mut r, GateKind::Heartbeat, LAMP, 9, false);
    assert!(put(&mut r, GateKind::Record, "", 7, true).is_empty());
    assert!(r.get(&name("lamp")).is_some());
    put(&mut r, GateKind::Record, "", 9, true);
    assert!(r.get(&name("lamp")).is_none());
}

/// A record written otherwise than by a bus session (over HTTP, restored
/// at start) has no writer to compare: any will of its owner clears it.
#[tokio::test(start_paused = true)]
async fn a_record_without_a_session_is_cleared_by_its_owners_will() {
    let mut r = reg();
    let (answer, _) = r.on_submit(
        Instant::now(),
        "lamp",
        Bytes::from_static(LAMP.as_bytes()),
        &lamp_owner(),
    );
    assert!(answer.is_ok());
    let out = put(&mut r, GateKind::Record, "", 3, true);
    assert_eq!(json(find(&out, "homicro/events/lamp"))["will"], true);
    assert!(r.get(&name("lamp")).is_none());
}
