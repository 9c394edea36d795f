//! The request/response topics and their rules, pure: what a call's topic
//! asks for, what a reply's topic answers, which reply topics the hub may
//! write, call ids and timeouts.
//!
//! ```text
//! caller ─ PREFIX/call/QUERY[/REPLY-TOPIC] ─▶ hub ─ PREFIX/rpc/NAME/ID ─▶ instance
//! caller ◀─ REPLY-TOPIC[/STATUS] ─────────── hub ◀─ PREFIX/reply/ID[/STATUS] ─┘
//! ```

use std::time::Duration;

use crate::topics::Topics;

/// The longest a call may wait for its answer.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// A fresh call id: 128 random bits in hex. Whoever knows it may answer
/// the call, so it is not guessable.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the system's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A call's topic after `PREFIX/call/`: QUERY, and the reply topic a
/// 3.1.1 caller names in the levels after it (`None`: none given).
pub fn split_call(rest: &str) -> (&str, Option<&str>) {
    match rest.split_once('/') {
        Some((q, reply)) => (q, Some(reply)),
        None => (rest, None),
    }
}

/// A reply's topic after `PREFIX/reply/`: the call id and the status a
/// 3.1.1 instance names in the level after it.
pub fn split_reply(rest: &str) -> Result<(&str, Option<u16>), String> {
    match rest.split_once('/') {
        None => Ok((rest, None)),
        Some((id, status)) => Ok((id, Some(parse_status(status)?))),
    }
}

/// A final HTTP status code, 200 to 599 (a 1xx is not an answer).
pub fn parse_status(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if (200..=599).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not the HTTP status code of an answer (a number from 200 to 599)"
        )),
    }
}

/// A call's timeout: a duration such as `5s`, `1m` or `500ms`, or whole
/// seconds; more than zero and at most [`MAX_TIMEOUT`].
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| {
            format!("timeout {s:?} is not a duration such as \"5s\" or \"500ms\": {e}")
        })?,
    };
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(format!(
            "timeout {s:?} must be more than 0 and at most {}",
            humantime::format_duration(MAX_TIMEOUT)
        ));
    }
    Ok(d)
}

/// Whether the hub may publish a caller's answer to `topic`: a topic name
/// (no wildcard, not `$`), and none of the registry's or the hub's own.
pub fn reply_topic_ok(topics: &Topics, topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) || topic.starts_with('$') {
        return Err(format!(
            "reply topic {topic:?} must be a topic name: not empty, no '+' or '#', no leading '$'"
        ));
    }
    let own = topic
        .strip_prefix(topics.prefix())
        .and_then(|r| r.strip_prefix('/'))
        .map(|r| r.split('/').next().unwrap_or(""));
    if let Some(kind) = own
        && matches!(
            kind,
            "services"
                | "heartbeat"
                | "events"
                | "errors"
                | "health"
                | "registry"
                | "rpc"
                | "call"
                | "reply"
        )
    {
        return Err(format!(
            "reply topic {topic:?} is one of homicro's own; use one of yours, such as \
             {}/answers/CLIENT-ID/1",
            topics.prefix()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn call_topics_split_into_query_and_reply() {
        assert_eq!(split_call("api@^1"), ("api@^1", None));
        assert_eq!(
            split_call("api/me/replies/1"),
            ("api", Some("me/replies/1"))
        );
        assert_eq!(split_call("api/"), ("api", Some("")));
    }

    #[test]
    fn reply_topics_carry_an_optional_status() {
        assert_eq!(split_reply("abc"), Ok(("abc", None)));
        assert_eq!(split_reply("abc/404"), Ok(("abc", Some(404))));
        for bad in [
            "abc/99",
            "abc/101",
            "abc/600",
            "abc/ok",
            "abc/",
            "abc/200/x",
        ] {
            assert!(split_reply(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7"), Ok(Duration::from_secs(7)));
        for bad in ["0", "0s", "2h", "soon", "", "-1"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reply_topics_are_the_callers_own() {
        let t = Topics::new("homicro");
        for ok in ["me/replies", "homicro/answers/c1/7", "homicro-x/rpc"] {
            assert_eq!(reply_topic_ok(&t, ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a/+",
            "a/#",
            "$SYS/x",
            "homicro/services/web",
            "homicro/rpc/web/1",
            "homicro/reply/1",
            "homicro/call/web",
            "homicro/registry",
            "homicro/events/x",
        ] {
            assert!(reply_topic_ok(&t, bad).is_err(), "{bad}");
        }
    }
}
