//! Names, endpoints, records, durations and queries: what is accepted and
//! how each refusal reads.

use super::*;

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

fn parse(json: &str) -> Result<Record, RecordError> {
    Record::parse(&name("svc"), Bytes::from(json.to_string()))
}

fn err(json: &str) -> String {
    parse(json).unwrap_err().to_string()
}

#[test]
fn names() {
    for ok in ["a", "0", "printer-2", "nas.local", "a_b", &"x".repeat(63)] {
        assert!(Name::parse(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "-a",
        ".a",
        "_a",
        "A",
        "a/b",
        "a+",
        "#",
        "a b",
        "é",
        &"x".repeat(64),
    ] {
        let e = Name::parse(bad).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadName, "{bad}");
    }
}

#[test]
fn full_record() {
    let r = parse(
        r#"{"host":"NAS.Local","port":8080,"ttl":"1m","role":"web","version":"1.2.3",
            "scheme":"http","health":{"http":"/health","interval":"10s","failures":2},
            "meta":{"k":"v"},"idempotent":true,"future":[1]}"#,
    )
    .unwrap();
    assert!(r.idempotent);
    assert!(!parse(r#"{"host":"h"}"#).unwrap().idempotent);
    assert_eq!(r.endpoint.to_string(), "nas.local:8080");
    assert_eq!(r.ttl, Some(Duration::from_secs(60)));
    assert_eq!(r.role.as_str(), "web");
    assert_eq!(r.version.as_ref().unwrap().to_string(), "1.2.3");
    let h = r.health.clone().unwrap();
    assert_eq!(h.check, HealthCheck::Http("/health".into()));
    assert_eq!(h.interval, Duration::from_secs(10));
    assert_eq!(h.timeout, Health::DEFAULT_TIMEOUT);
    assert_eq!(h.failures, 2);
    assert_eq!(r.meta["k"], "v");
    assert_eq!(r.to_json()["future"][0], 1);
}

#[test]
fn defaults() {
    let r = parse(r#"{"host":"10.0.0.5"}"#).unwrap();
    assert_eq!(r.endpoint.port, None);
    assert_eq!(r.ttl, None);
    assert_eq!(r.role.as_str(), "svc");
    assert_eq!(parse(r#"{"host":"h","ttl":0}"#).unwrap().ttl, None);
    assert_eq!(
        parse(r#"{"host":"h","expire":30}"#).unwrap().ttl,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        parse(r#"{"host":"::1","port":1}"#)
            .unwrap()
            .endpoint
            .to_string(),
        "[::1]:1"
    );
}

#[test]
fn invalid_records_say_what_is_wrong() {
    let cases = [
        ("not json", "record is not JSON"),
        ("[1]", "must be a JSON object, got an array"),
        (
            r#"{"host":"10.0.0.5","port":80,"host":"6.6.6.6"}"#,
            "record has a duplicate key `host`",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"interval":"1s","interval":"1ns"}}"#,
            "duplicate key `interval`",
        ),
        ("{}", "`host` is required"),
        (r#"{"host":5}"#, "`host` must be a string"),
        (r#"{"host":"a b"}"#, "neither an IP address nor a host name"),
        (
            r#"{"host":"h","port":0}"#,
            "`port` must be an integer from 1",
        ),
        (r#"{"host":"h","port":"80"}"#, "`port` must be an integer"),
        (r#"{"host":"h","port":70000}"#, "`port` must be an integer"),
        (r#"{"host":"h","ttl":-1}"#, "`ttl` must be whole seconds"),
        (r#"{"host":"h","ttl":1.5}"#, "`ttl` must be whole seconds"),
        (
            r#"{"host":"h","ttl":"soon"}"#,
            "`ttl`: \"soon\" is not a duration",
        ),
        (r#"{"host":"h","ttl":true}"#, "`ttl` must be seconds"),
        (r#"{"host":"h","ttl":1,"expire":1}"#, "not both"),
        (r#"{"host":"h","ttl":"400d"}"#, "longer than a year"),
        (
            r#"{"host":"h","role":"Bad"}"#,
            "`role` \"Bad\" is not a valid name",
        ),
        (r#"{"host":"h","role":1}"#, "`role` must be a string"),
        (r#"{"host":"h","version":"1.2"}"#, "not a semver version"),
        (
            r#"{"host":"h","version":1}"#,
            "`version` must be a semver string",
        ),
        (
            r#"{"host":"h","scheme":""}"#,
            "`scheme` must be a URI scheme",
        ),
        (r#"{"host":"h","meta":[]}"#, "`meta` must be an object"),
        (
            r#"{"host":"h","idempotent":"yes"}"#,
            "`idempotent` must be true or false",
        ),
        (r#"{"host":"h","health":1}"#, "`health` must be an object"),
        (r#"{"host":"h","health":{}}"#, "needs `http` or `tcp`"),
        (r#"{"host":"h","health":{"http":"x"}}"#, "must be a path"),
        (
            r#"{"host":"h","health":{"tcp":false}}"#,
            "`health.tcp` must be true",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"http":"/"}}"#,
            "not both",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"x":1}}"#,
            "unknown key `x`",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"interval":0}}"#,
            "above 0",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"failures":0}}"#,
            "`health.failures`",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"interval":"1ns"}}"#,
            "`health.interval` must be at least 1s, got 1ns",
        ),
        (
            r#"{"host":"h","health":{"tcp":true,"interval":"999ms"}}"#,
            "at least 1s",
        ),
        (
            r#"{"host":"10.0.0.5","health":{"http":"http://127.0.0.1:8080/admin/delete?all=1"}}"#,
            "may only probe the record's own host \"10.0.0.5\", not \"127.0.0.1\"",
        ),
        (
            r#"{"host":"nas","health":{"http":"https://router/x"}}"#,
            "own host \"nas\", not \"router\"",
        ),
        (
            r#"{"host":"127.0.0.1","health":{"http":"http://10.0.0.5@127.0.0.1/"}}"#,
            "may not carry user information",
        ),
        (
            r#"{"host":"::1","health":{"http":"http://[::1/x"}}"#,
            "unclosed '['",
        ),
        (
            r#"{"host":"h","health":{"http":"http://h:0/x"}}"#,
            "bad port",
        ),
        (
            r#"{"host":"h","health":{"http":"http://h/x","tls_skip_verify":true}}"#,
            "`health.tls_skip_verify` is for an https:// URL",
        ),
        (
            r#"{"host":"h","health":{"http":"https://h/x","tls_skip_verify":1}}"#,
            "`health.tls_skip_verify` must be true or false, got 1",
        ),
    ];
    for (json, want) in cases {
        let got = err(json);
        assert!(got.contains(want), "{json}: {got:?} lacks {want:?}");
        assert_eq!(parse(json).unwrap_err().code(), ErrorCode::Invalid);
    }
    assert!(
        Record::parse(&name("a"), Bytes::from_static(b"\xff"))
            .unwrap_err()
            .to_string()
            .contains("not UTF-8")
    );
}

#[test]
fn a_health_url_may_name_the_records_own_host_on_any_port() {
    for json in [
        r#"{"host":"nas","port":80,"health":{"http":"https://NAS:5001/x","interval":"1s"}}"#,
        r#"{"host":"::1","health":{"http":"http://[::1]:8080/health"}}"#,
        r#"{"host":"10.0.0.5","health":{"http":"http://10.0.0.5/"}}"#,
    ] {
        assert!(parse(json).is_ok(), "{json}: {:?}", parse(json).err());
    }
}

#[test]
fn size_limit() {
    let pad = "x".repeat(MAX_RECORD_SIZE);
    let e = parse(&format!(r#"{{"host":"h","meta":{{"p":"{pad}"}}}}"#)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::TooLarge);
    let fits = "x".repeat(MAX_RECORD_SIZE - 40);
    assert!(parse(&format!(r#"{{"host":"h","meta":{{"p":"{fits}"}}}}"#)).is_ok());
}

#[test]
fn queries() {
    let rec = |json: &str| Record::parse(&name("x"), Bytes::from(json.to_string())).unwrap();
    let v12 = rec(r#"{"host":"h","role":"api","version":"1.2.5"}"#);
    let v2 = rec(r#"{"host":"h","role":"api","version":"2.0.0"}"#);
    let none = rec(r#"{"host":"h","role":"api"}"#);
    let db = rec(r#"{"host":"h","role":"couchdb","version":"3.1.0"}"#);
    let m = |q: &str, r: &Record| Query::parse(q).unwrap().matches(r);
    assert!(m("api@^1.2", &v12) && !m("api@^1.2", &v2) && !m("api@^1.2", &none));
    assert!(m("api", &none) && m("api@*", &none) && m("api@*", &v2));
    assert!(m("couchdb@3.x", &db) && !m("couchdb@2.x", &db));
    assert!(!m("api", &db));
    for bad in ["Api", "api@", "api@^x", "@1", ""] {
        assert!(Query::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn heartbeats() {
    let e = Endpoint::from_heartbeat(br#"{"host":"H","port":1}"#).unwrap();
    assert_eq!(e, Endpoint::new("h", Some(1)).unwrap());
    assert!(Endpoint::from_heartbeat(b"").is_err());
    assert!(Endpoint::from_heartbeat(br#"{"port":1}"#).is_err());
    assert!(Endpoint::from_heartbeat(br#"{"host":"h","port":-1}"#).is_err());
}
