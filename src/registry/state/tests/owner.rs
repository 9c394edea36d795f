//! Ownership by identity: only a record's writer (or an admin) changes it.

use super::*;
use crate::protocol::ErrorCode;
use crate::registry::state::{GateKind, Source};

/// A record whose host is a name, not an address.
const NAS: &str = r#"{"host":"nas.local","port":5000}"#;

fn at(ip: &str) -> Author {
    Author::new(Identity::address(ip.parse().unwrap()))
}

fn user(name: &str) -> Author {
    Author::new(Identity::user(name))
}

fn gate(
    r: &mut Registry,
    kind: GateKind,
    raw: &str,
    payload: &str,
    by: &Author,
) -> (Result<(), ErrorCode>, Vec<Publish>) {
    r.on_gate(
        Instant::now(),
        kind,
        raw,
        Bytes::from(payload.to_string()),
        by,
        Source {
            session: 1,
            will: false,
            guards: false,
        },
    )
}

fn record(r: &mut Registry, raw: &str, payload: &str, by: &Author) -> Result<(), ErrorCode> {
    gate(r, GateKind::Record, raw, payload, by).0
}

/// The error published with a refusal.
fn refusal(r: &mut Registry, kind: GateKind, payload: &str, by: &Author) -> Value {
    let (verdict, out) = gate(r, kind, "web", payload, by);
    assert_eq!(verdict, Err(ErrorCode::NotOwner), "{out:?}");
    assert!(
        !out.iter().any(|p| p.topic == "homicro/services/web"),
        "nothing stored: {out:?}"
    );
    json(find(&out, "homicro/errors/web"))
}

#[tokio::test(start_paused = true)]
async fn a_stranger_can_neither_update_nor_deregister_nor_heartbeat() {
    let mut r = reg();
    let owner = at("10.0.0.5");
    assert_eq!(record(&mut r, "web", A, &owner), Ok(()));
    let deadline = r.next_deadline();
    tokio::time::advance(Duration::from_secs(10)).await;
    let stranger = at("6.6.6.6");
    // The same endpoint with other fields (a forged `meta`).
    let forged = r#"{"host":"10.0.0.5","port":8080,"ttl":30,"meta":{"x":1}}"#;
    let err = refusal(&mut r, GateKind::Record, forged, &stranger);
    assert_eq!(err["error"], "not_owner");
    let detail = err["detail"].as_str().unwrap();
    assert!(
        detail.contains("10.0.0.5") && detail.contains("6.6.6.6"),
        "{detail}"
    );
    assert_eq!(err["owner"]["host"], "10.0.0.5");
    refusal(&mut r, GateKind::Record, "", &stranger);
    refusal(
        &mut r,
        GateKind::Heartbeat,
        r#"{"host":"10.0.0.5","port":8080}"#,
        &stranger,
    );
    assert_eq!(r.payload(&name("web")).unwrap(), A.as_bytes(), "intact");
    assert_eq!(r.next_deadline(), deadline, "no refresh from a stranger");
    assert_eq!(r.owner(&name("web")), owner.identity.as_ref());
    assert_eq!(r.stats().refusals, 3);
    // The owner still can.
    assert_eq!(record(&mut r, "web", A2, &owner), Ok(()));
    let beat = r#"{"host":"10.0.0.5","port":8080}"#;
    assert_eq!(
        gate(&mut r, GateKind::Heartbeat, "web", beat, &owner).0,
        Ok(())
    );
    assert_eq!(record(&mut r, "web", "", &owner), Ok(()));
    assert!(r.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_admin_may_change_any_record_and_the_owner_stays() {
    let mut r = reg();
    let owner = at("10.0.0.5");
    record(&mut r, "web", A, &owner).unwrap();
    let admin = Author::admin(Identity::address("127.0.0.1".parse().unwrap()));
    assert_eq!(record(&mut r, "web", A2, &admin), Ok(()));
    assert_eq!(
        r.owner(&name("web")),
        owner.identity.as_ref(),
        "still 10.0.0.5's"
    );
    assert_eq!(record(&mut r, "web", "", &admin), Ok(()));
    assert!(r.is_empty());
}

#[tokio::test(start_paused = true)]
async fn users_own_by_name_not_by_address() {
    let mut r = reg();
    record(&mut r, "web", A, &user("alice")).unwrap();
    assert_eq!(record(&mut r, "web", A2, &user("alice")), Ok(()));
    let err = refusal(&mut r, GateKind::Record, A, &user("bob"));
    assert!(
        err["detail"].as_str().unwrap().contains("user alice"),
        "{err}"
    );
    // Anonymous from the record's own address is not alice either.
    refusal(&mut r, GateKind::Record, A, &at("10.0.0.5"));
    assert_eq!(r.payload(&name("web")).unwrap(), A2.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn another_endpoint_from_the_owner_is_still_a_duplicate() {
    let mut r = reg();
    let owner = at("10.0.0.5");
    record(&mut r, "web", A, &owner).unwrap();
    let moved = r#"{"host":"10.0.0.5","port":9090}"#;
    assert_eq!(record(&mut r, "web", moved, &owner), Err(ErrorCode::Owned));
}

#[tokio::test(start_paused = true)]
async fn a_restored_record_keeps_its_owner_and_an_unowned_one_is_claimed() {
    let mut r = reg();
    let parsed = |n: &str, p: &'static str| Record::parse(&name(n), Bytes::from(p)).unwrap();
    let alice = Identity::user("alice");
    r.load(
        Instant::now(),
        vec![
            (name("web"), parsed("web", A), Some(alice.clone())),
            (name("nas"), parsed("nas", NAS), None),
            (name("web2"), parsed("web2", B), None),
        ],
    );
    // Unowned with an IP host: that address owns it.
    assert_eq!(r.owner(&name("web2")), at("10.0.0.6").identity.as_ref());
    assert_eq!(
        record(&mut r, "web", A2, &at("10.0.0.5")),
        Err(ErrorCode::NotOwner)
    );
    // Written before owners were kept: its next accepted writer owns it,
    // and the journal learns that.
    r.set_journaled();
    r.take_changes();
    let claimant = at("10.0.0.6");
    assert_eq!(record(&mut r, "nas", NAS, &claimant), Ok(()));
    assert_eq!(r.owner(&name("nas")), claimant.identity.as_ref());
    let log = r.take_changes();
    assert_eq!(log.len(), 1);
    let mut state = crate::journal::State::new();
    crate::journal::apply(&mut state, log[0].clone());
    let got = super::super::recovered(&state);
    assert_eq!(got[0].2, claimant.identity);
    assert_eq!(
        record(&mut r, "nas", "", &at("10.0.0.7")),
        Err(ErrorCode::NotOwner)
    );
}

#[tokio::test(start_paused = true)]
async fn through_an_external_broker_no_identity_is_enforced() {
    let mut r = reg();
    record(&mut r, "web", A, &at("10.0.0.5")).unwrap();
    assert_eq!(record(&mut r, "web", A2, &Author::UNKNOWN), Ok(()));
}
