//! Health checks: probes, failures and the statuses they publish.

use super::*;

const CHECKED: &str =
    r#"{"host":"10.0.0.5","port":8080,"health":{"http":"/health","interval":"10s","failures":2}}"#;

#[tokio::test(start_paused = true)]
async fn failing_health_checks_clear_the_record() {
    use crate::registry::health::Outcome;
    let mut r = reg();
    live(&mut r, "homicro/services/web", CHECKED);
    assert_eq!(r.checked(), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    let p = r
        .take_probes(Instant::now())
        .pop()
        .expect("due within the interval");
    let out = r.on_probe(Instant::now(), &p, Outcome::Fail("status 500".into()));
    let st = json(find(&out, "homicro/health/web"));
    assert_eq!(
        (st["status"].as_str(), st["failures"].as_u64()),
        (Some("failing"), Some(1))
    );
    assert!(find(&out, "homicro/health/web").retain);
    tokio::time::advance(Duration::from_secs(10)).await;
    let p = r.take_probes(Instant::now()).pop().unwrap();
    let out = r.on_probe(Instant::now(), &p, Outcome::Fail("status 500".into()));
    let clear = find(&out, "homicro/services/web");
    assert!(clear.payload.is_empty() && clear.retain);
    assert!(find(&out, "homicro/health/web").payload.is_empty());
    let ev = json(find(&out, "homicro/events/web"));
    assert_eq!(ev["event"], "unhealthy");
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains("GET http://10.0.0.5:8080/health failed 2 times")
    );
    echo(&mut r, &out);
    assert!(r.is_empty() && r.next_probe().is_none());
    assert_eq!((r.stats().health_failures, r.stats().unhealthy), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_deregistered_record_stops_being_probed_at_once() {
    use crate::registry::health::Outcome;
    let mut r = reg();
    live(&mut r, "homicro/services/web", CHECKED);
    tokio::time::advance(Duration::from_secs(10)).await;
    let p = r.take_probes(Instant::now()).pop().unwrap();
    let out = r.on_probe(Instant::now(), &p, Outcome::Pass);
    assert_eq!(json(find(&out, "homicro/health/web"))["status"], "passing");
    let out = live(&mut r, "homicro/services/web", "");
    assert!(
        find(&out, "homicro/health/web").payload.is_empty(),
        "status cleared"
    );
    assert!(r.next_probe().is_none());
    // A result for a record that went is dropped.
    assert!(
        r.on_probe(Instant::now(), &p, Outcome::Fail("x".into()))
            .is_empty()
    );
    // An update without health stops probes too.
    live(&mut r, "homicro/services/web", CHECKED);
    assert!(r.next_probe().is_some());
    live(
        &mut r,
        "homicro/services/web",
        r#"{"host":"10.0.0.5","port":8080}"#,
    );
    assert!(r.next_probe().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_race_is_reasserted_even_when_a_health_status_is_cleared() {
    use crate::registry::health::Outcome;
    let mut r = reg();
    live(&mut r, "homicro/services/web", CHECKED);
    tokio::time::advance(Duration::from_secs(10)).await;
    let p = r.take_probes(Instant::now()).pop().unwrap();
    r.on_probe(Instant::now(), &p, Outcome::Pass);
    // A stranger is refused: the restore is on its way...
    let restore = live(&mut r, "homicro/services/web", B);
    // ...when the owner's deregistration arrives, applied before it.
    let out = live(&mut r, "homicro/services/web", "");
    assert!(find(&out, "homicro/health/web").payload.is_empty());
    let again = find(&out, "homicro/services/web");
    assert!(
        again.payload.is_empty() && again.retain,
        "the clear is asserted again: {out:?}"
    );
    echo(&mut r, &restore);
    echo(&mut r, &out);
    assert!(r.is_empty());
}
