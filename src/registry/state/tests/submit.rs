//! Records submitted through the HTTP API, judged by the same rules.

use super::*;

fn submit(r: &mut Registry, raw: &str, payload: &str) -> (Result<Value, Value>, Vec<Publish>) {
    let (answer, out) = r.on_submit(
        Instant::now(),
        raw,
        Bytes::from(payload.to_string()),
        &Author::UNKNOWN,
    );
    let parse = |b: Bytes| serde_json::from_slice::<Value>(&b).unwrap();
    (answer.map(parse).map_err(parse), out)
}

#[tokio::test(start_paused = true)]
async fn a_submission_is_published_and_its_echo_is_no_refresh() {
    let mut r = reg();
    let (answer, out) = submit(&mut r, "web", A);
    assert_eq!(answer.unwrap()["event"], "registered");
    let rec = find(&out, "homicro/services/web");
    assert!(rec.retain && rec.payload == A.as_bytes(), "{out:?}");
    assert_eq!(
        json(find(&out, "homicro/events/web"))["event"],
        "registered"
    );
    assert_eq!(r.stats().registrations, 1);
    tokio::time::advance(Duration::from_secs(25)).await;
    // The record comes back through the broker at 25 s: not a refresh...
    echo(&mut r, &out);
    tokio::time::advance(Duration::from_secs(5)).await;
    // ...so it expires at 30 s.
    let out = r.on_tick(Instant::now());
    assert_eq!(json(find(&out, "homicro/events/web"))["event"], "expired");
}

#[tokio::test(start_paused = true)]
async fn a_submission_from_another_endpoint_is_refused_with_the_owner() {
    let mut r = reg();
    live(&mut r, "homicro/services/web", A);
    let (answer, out) = submit(&mut r, "web", B);
    let err = answer.unwrap_err();
    assert_eq!(err["error"], "owned");
    assert_eq!(err["owner"]["host"], "10.0.0.5");
    assert_eq!(err["endpoint"]["host"], "10.0.0.6");
    assert!(
        !out.iter().any(|p| p.retain),
        "the broker never saw it: nothing to restore: {out:?}"
    );
    assert_eq!(json(find(&out, "homicro/errors/web"))["error"], "owned");
    assert_eq!(json(find(&out, "homicro/events/web"))["event"], "rejected");
    assert_eq!(r.get(&name("web")).unwrap().payload(), A.as_bytes());
    assert_eq!(r.stats().refusals, 1);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_submission_keeps_the_old_record() {
    let mut r = reg();
    submit(&mut r, "web", A).0.unwrap();
    for (bad, code) in [
        ("not json", "invalid"),
        (r#"{"host":"10.0.0.5","port":"x"}"#, "invalid"),
        (
            &format!(r#"{{"host":"h","meta":"{}"}}"#, "x".repeat(20_000)),
            "too_large",
        ),
    ] {
        let (answer, out) = submit(&mut r, "web", bad);
        assert_eq!(answer.unwrap_err()["error"], code, "{bad:.40}");
        assert!(!out.iter().any(|p| p.retain), "{out:?}");
        assert_eq!(json(find(&out, "homicro/errors/web"))["error"], code);
    }
    assert_eq!(r.get(&name("web")).unwrap().payload(), A.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn a_submission_updates_and_removes() {
    let mut r = reg();
    let (_, first) = submit(&mut r, "web", A);
    let (answer, out) = submit(&mut r, "web", A2);
    let ev = answer.unwrap();
    assert_eq!(
        (ev["event"].as_str(), ev["changed"].as_bool()),
        (Some("updated"), Some(true))
    );
    assert_eq!(find(&out, "homicro/services/web").payload, A2.as_bytes());
    let (answer, gone) = submit(&mut r, "web", "");
    assert_eq!(answer.unwrap()["event"], "deregistered");
    let clear = find(&gone, "homicro/services/web");
    assert!(clear.retain && clear.payload.is_empty());
    // Every publish comes back in order and none is taken for input.
    echo(&mut r, &first);
    echo(&mut r, &out);
    echo(&mut r, &gone);
    assert!(r.is_empty());
    let (answer, out) = submit(&mut r, "web", "");
    assert_eq!(answer.unwrap_err()["error"], "unknown");
    assert!(out.is_empty());
    assert_eq!(r.stats().deregistrations, 1);
}

#[tokio::test(start_paused = true)]
async fn a_submission_under_a_bad_name_publishes_nothing() {
    let mut r = reg();
    for raw in ["Web", "a/b", "a+", "#", ""] {
        let (answer, out) = submit(&mut r, raw, A);
        assert_eq!(answer.unwrap_err()["error"], "bad_name", "{raw}");
        assert!(out.is_empty(), "{raw}: {out:?}");
    }
    assert!(r.is_empty());
}
