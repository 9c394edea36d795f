//! Wills on homicro's bus: a record is guarded by the will of the session
//! that last wrote or refreshed it with a will that clears it; that will
//! clears it and says so, another session's will changes nothing.

use super::*;
use crate::registry::state::{GateKind, Source};

/// A record without a `ttl`, kept by its connection's will.
const LAMP: &str = r#"{"host":"10.0.0.7","port":80}"#;

fn lamp_owner() -> Author {
    Author::new(Identity::address("10.0.0.7".parse().unwrap()))
}

/// How a publish reaches the gate.
#[derive(Clone, Copy)]
enum By {
    /// A session whose will clears the lamp.
    Guard(u64),
    /// A session without such a will (`mosquitto_pub`, `register --once`).
    Plain(u64),
    /// A session's will, the client lost.
    Will(u64),
}

fn put(r: &mut Registry, kind: GateKind, payload: &str, by: By) -> Vec<Publish> {
    let from = match by {
        By::Guard(session) => Source {
            session,
            will: false,
            guards: true,
        },
        By::Plain(session) => Source {
            session,
            will: false,
            guards: false,
        },
        By::Will(session) => Source {
            session,
            will: true,
            guards: false,
        },
    };
    let (verdict, out) = r.on_gate(
        Instant::now(),
        kind,
        "lamp",
        Bytes::from(payload.to_string()),
        &lamp_owner(),
        from,
    );
    assert_eq!(verdict, Ok(()), "{out:?}");
    out
}

fn record(r: &mut Registry, payload: &str, by: By) -> Vec<Publish> {
    put(r, GateKind::Record, payload, by)
}

#[tokio::test(start_paused = true)]
async fn a_will_clears_its_own_sessions_record_and_says_so() {
    let mut r = reg();
    record(&mut r, LAMP, By::Guard(7));
    let out = record(&mut r, "", By::Will(7));
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
    record(&mut r, LAMP, By::Guard(7));
    let out = record(&mut r, "", By::Plain(8));
    let ev = json(find(&out, "homicro/events/lamp"));
    assert_eq!(ev["event"], "deregistered");
    assert!(ev.get("will").is_none(), "{ev}");
}

/// The service restarted and registered again on a new session; the old
/// one's keepalive runs out later and its will goes out.
#[tokio::test(start_paused = true)]
async fn an_earlier_sessions_will_clears_nothing() {
    let mut r = reg();
    record(&mut r, LAMP, By::Guard(7));
    record(&mut r, LAMP, By::Guard(9));
    let out = record(&mut r, "", By::Will(7));
    assert!(out.is_empty(), "nothing stored or said: {out:?}");
    assert_eq!(r.get(&name("lamp")).unwrap().payload(), LAMP.as_bytes());
    assert_eq!(r.stats().stale_wills, 1);
    assert_eq!(r.stats().deregistrations, 0);
    // The live session's own will still clears it.
    record(&mut r, "", By::Will(9));
    assert!(r.get(&name("lamp")).is_none());
}

/// A session without a will that clears the record (a one-shot publish, an
/// admin's edit) leaves the guard where it was: the keeper's will still
/// clears the record when the keeper dies.
#[tokio::test(start_paused = true)]
async fn a_publish_without_such_a_will_leaves_the_guard() {
    let mut r = reg();
    record(&mut r, LAMP, By::Guard(7));
    record(&mut r, LAMP, By::Plain(8));
    let v2 = r#"{"host":"10.0.0.7","port":80,"version":"2.0.0"}"#;
    record(&mut r, v2, By::Plain(8));
    let out = record(&mut r, "", By::Will(7));
    assert_eq!(json(find(&out, "homicro/events/lamp"))["will"], true);
    assert!(r.get(&name("lamp")).is_none());
}

/// A heartbeat from a session whose will clears the record makes it the
/// guard, as a publish of the record does.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_moves_the_guard_too() {
    let mut r = reg();
    let with_ttl = r#"{"host":"10.0.0.7","port":80,"ttl":60}"#;
    record(&mut r, with_ttl, By::Guard(7));
    put(&mut r, GateKind::Heartbeat, LAMP, By::Guard(9));
    assert!(record(&mut r, "", By::Will(7)).is_empty());
    assert!(r.get(&name("lamp")).is_some());
    record(&mut r, "", By::Will(9));
    assert!(r.get(&name("lamp")).is_none());
}

/// A will that carries a record, from a session that no longer guards it,
/// neither replaces the record nor takes the guard.
#[tokio::test(start_paused = true)]
async fn a_stale_will_carrying_a_record_changes_nothing() {
    let mut r = reg();
    record(&mut r, LAMP, By::Guard(7));
    record(&mut r, LAMP, By::Guard(9));
    let offline = r#"{"host":"10.0.0.7","port":80,"meta":{"state":"offline"}}"#;
    assert!(record(&mut r, offline, By::Will(7)).is_empty());
    assert_eq!(r.get(&name("lamp")).unwrap().payload(), LAMP.as_bytes());
    // The guard's own record will is taken, and it stays the guard.
    record(&mut r, offline, By::Will(9));
    assert_eq!(r.get(&name("lamp")).unwrap().payload(), offline.as_bytes());
    assert!(record(&mut r, "", By::Will(7)).is_empty());
    record(&mut r, "", By::Will(9));
    assert!(r.get(&name("lamp")).is_none());
}

/// A record no session guards (written over HTTP, restored at start) is
/// cleared by any will of its owner.
#[tokio::test(start_paused = true)]
async fn a_record_no_session_guards_is_cleared_by_its_owners_will() {
    let mut r = reg();
    let (answer, _) = r.on_submit(
        Instant::now(),
        "lamp",
        Bytes::from_static(LAMP.as_bytes()),
        &lamp_owner(),
    );
    assert!(answer.is_ok());
    let out = record(&mut r, "", By::Will(3));
    assert_eq!(json(find(&out, "homicro/events/lamp"))["will"], true);
    assert!(r.get(&name("lamp")).is_none());
}

/// A stranger's will is refused as any stranger's publish is, guard or not.
#[tokio::test(start_paused = true)]
async fn a_strangers_will_is_refused_not_ignored() {
    let mut r = reg();
    record(&mut r, LAMP, By::Guard(7));
    let stranger = Author::new(Identity::address("10.0.0.66".parse().unwrap()));
    let will = Source {
        session: 5,
        will: true,
        guards: false,
    };
    let (verdict, out) = r.on_gate(
        Instant::now(),
        GateKind::Record,
        "lamp",
        Bytes::new(),
        &stranger,
        will,
    );
    assert_eq!(
        verdict,
        Err(crate::protocol::ErrorCode::NotOwner),
        "{out:?}"
    );
    assert_eq!(json(find(&out, "homicro/events/lamp"))["event"], "rejected");
    assert_eq!(r.stats().stale_wills, 0);
    assert!(r.get(&name("lamp")).is_some());
}
