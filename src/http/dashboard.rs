//! The dashboard: `GET /` and its files, built into the binary (no CDN,
//! works offline), and `GET /ui/stream`, the server-sent events that keep
//! it live.
//!
//! ```text
//!  registry ──feed (every publish, heartbeats)──▶ stream task ──SSE──▶ page
//!     └──board_now (records, ttl left, owner, health)──┘
//! ```
//!
//! The stream sends a `snapshot` first, then each registry event as an
//! `event` at once, each heartbeat's new countdown as a `ttl`, and a fresh
//! `snapshot` at once after any other change, at most one per 200 ms (and
//! every 10 s regardless, which also finds a closed page). Records and events the
//! caller's ACL does not let it read are left out, as MQTT would. A page
//! that stops reading holds at most one snapshot and 255 small events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::proxy::Body;
use crate::auth::Access;
use crate::bus::Bus;
use crate::record::Name;
use crate::registry::{Handle, Shown};

/// The most records a snapshot carries (by name); the page says how many
/// there are in all.
pub const MAX_SHOWN: usize = 2000;

/// Snapshots go out no closer together than this.
const SETTLE: Duration = Duration::from_millis(200);

/// A snapshot goes out at least this often (countdowns stay right when
/// heartbeats arrive through an external broker; a closed page is found).
const REFRESH: Duration = Duration::from_secs(10);

/// What one page's queue holds at most: events, and one snapshot.
const QUEUED: usize = 256;

/// One of the dashboard's files, by path.
pub fn file(path: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_bytes!("dashboard/index.html"),
        ),
        "/ui/app.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("dashboard/app.js"),
        ),
        "/ui/app.css" => (
            "text/css; charset=utf-8",
            include_bytes!("dashboard/app.css"),
        ),
        "/ui/icon.svg" => ("image/svg+xml", include_bytes!("dashboard/icon.svg")),
        _ => return None,
    })
}

/// A file's answer.
pub fn serve_file(content_type: &'static str, bytes: &'static [u8]) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(bytes)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Built into the binary: a new homicro brings new files.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    // The page runs its own script only: a record's text is never code.
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    resp
}

/// Who is watching: what their ACL lets them read.
pub struct Watcher {
    pub user: Option<Arc<str>>,
}

/// `GET /ui/stream`: the live feed, until the page goes away.
pub fn stream(shared: Arc<Bus>, watcher: Watcher) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUED);
    tokio::spawn(feed(shared, watcher, tx));
    let frames = stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut resp = Response::new(
        StreamBody::new(frames)
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Moves the registry's changes to one page until it goes away.
async fn feed(shared: Arc<Bus>, watcher: Watcher, tx: mpsc::Sender<Bytes>) {
    let may_read = |topic: &str| {
        shared
            .auth
            .allows(watcher.user.as_deref(), "", topic, Access::Read)
    };
    let prefix = shared.topics.prefix();
    let (events, heartbeats) = (format!("{prefix}/events/"), format!("{prefix}/heartbeat/"));
    // Subscribed before the first snapshot is read: nothing falls between.
    let mut changes = shared.gate.as_ref().map(Handle::feed);
    // The page reconnects 2 s after the stream ends (a restart of serve).
    if tx
        .send(Bytes::from_static(b"retry: 2000\n\n"))
        .await
        .is_err()
    {
        return;
    }
    // When the next snapshot is due: now, then after a change (no sooner
    // than SETTLE after the last).
    let mut due = Some(Instant::now());
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        if due.is_some_and(|d| d <= now) || now >= last + REFRESH {
            if tx.capacity() == tx.max_capacity() {
                let snap = snapshot(&shared, &may_read).await;
                if tx.send(sse("snapshot", &snap)).await.is_err() {
                    return;
                }
                due = None;
                last = Instant::now();
            } else {
                // The page has not read what it was sent: it holds no
                // more than one snapshot, however long it stops reading.
                due = Some(now + SETTLE);
            }
        }
        let change = async {
            match &mut changes {
                Some(c) => c.recv().await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            m = change => m,
            _ = tokio::time::sleep_until(due.unwrap_or(last + REFRESH)) => continue,
            _ = tx.closed() => return,
        };
        let p = match next {
            Ok(p) => p,
            Err(RecvError::Lagged(_)) => {
                due.get_or_insert(Instant::now());
                continue;
            }
            // Not while the server runs: the bus holds the registry.
            Err(RecvError::Closed) => return,
        };
        let sent = if p.topic.starts_with(&events) {
            // As MQTT would: a watcher sees the events its ACL lets it read.
            may_read(&p.topic)
                .then(|| sse("event", &String::from_utf8_lossy(&p.payload)))
                .map(|e| tx.try_send(e))
        } else if let Some(name) = p.topic.strip_prefix(&heartbeats) {
            // A heartbeat moves one countdown: no snapshot for it.
            ttl(&shared, name, &may_read).map(|t| tx.try_send(sse("ttl", &t)))
        } else {
            // At once, unless one went out within SETTLE: a burst of
            // changes makes one snapshot per SETTLE.
            due.get_or_insert((last + SETTLE).max(Instant::now()));
            None
        };
        // A full queue: the page is not reading; what it misses, its next
        // snapshot has.
        if let Some(Err(mpsc::error::TrySendError::Closed(_))) = sent {
            return;
        }
    }
}

/// The `ttl` event after NAME's heartbeat: `{"name","ttl_left_ms"}`.
fn ttl(shared: &Bus, name: &str, may_read: &impl Fn(&str) -> bool) -> Option<String> {
    let name = Name::parse(name).ok()?;
    if !may_read(&shared.topics.service(name.as_str())) {
        return None;
    }
    let left = shared.gate.as_ref()?.ttl_left_now(&name)?;
    Some(json!({"name": name.as_str(), "ttl_left_ms": left.as_millis() as u64}).to_string())
}

/// One server-sent event; `data` is one line of JSON.
fn sse(kind: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The `snapshot` event's JSON: the registry's state and the records the
/// watcher may read, by name.
async fn snapshot(shared: &Bus, may_read: &impl Fn(&str) -> bool) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let Some(registry) = &shared.gate else {
        let head = json!({"state": "off", "version": version, "total": 0});
        return format!(r#"{{"registry":{head},"records":[]}}"#);
    };
    let state = match registry.status().await {
        Ok(s) if s.connected => "online",
        _ => "offline",
    };
    let mut shown = registry.board_now();
    shown.retain(|s| may_read(&shared.topics.service(s.name.as_str())));
    let head = json!({"state": state, "version": version, "total": shown.len()});
    board_json(&head.to_string(), shown)
}

/// `{"registry":HEAD,"records":[…]}`, the records sorted by name, at most
/// [`MAX_SHOWN`], each with its stored bytes embedded as they are.
fn board_json(head: &str, mut shown: Vec<Shown>) -> String {
    shown.sort_by(|a, b| a.name.cmp(&b.name));
    shown.truncate(MAX_SHOWN);
    let mut out = format!(r#"{{"registry":{head},"records":["#);
    for (i, s) in shown.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let about = json!({
            "name": s.name.as_str(),
            "ttl_left_ms": s.ttl_left.map(|d| d.as_millis() as u64),
            "owner": s.owner.as_ref().map(ToString::to_string),
            "health": s.health.as_ref().map(|h| h.payload(&s.name)),
        })
        .to_string();
        // Stored as published, which may be pretty-printed.
        let record = one_line(&s.payload);
        out.push_str(&about[..about.len() - 1]);
        out.push_str(r#","record":"#);
        out.push_str(&record);
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// A stored record as one line of JSON (SSE ends a field at a line break).
fn one_line(payload: &[u8]) -> String {
    if !payload.contains(&b'\n') && !payload.contains(&b'\r') {
        return String::from_utf8_lossy(payload).into_owned();
    }
    serde_json::from_slice::<serde_json::Value>(payload)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| "null".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(name: &str, payload: &str) -> Shown {
        Shown {
            name: Name::parse(name).unwrap(),
            payload: Bytes::from(payload.to_string()),
            ttl_left: Some(Duration::from_millis(1500)),
            owner: None,
            health: None,
        }
    }

    #[test]
    fn the_board_is_one_line_of_json_sorted_by_name() {
        let board = board_json(
            r#"{"state":"online"}"#,
            vec![
                shown("web", r#"{"host":"10.0.0.5","port":80}"#),
                shown("api", "{\n  \"host\": \"10.0.0.6\"\n}"),
            ],
        );
        assert!(!board.contains('\n'), "{board}");
        let v: serde_json::Value = serde_json::from_str(&board).unwrap();
        assert_eq!(v["registry"]["state"], "online");
        assert_eq!(v["records"][0]["name"], "api");
        assert_eq!(v["records"][0]["record"]["host"], "10.0.0.6");
        assert_eq!(v["records"][1]["record"]["port"], 80);
        assert_eq!(v["records"][1]["ttl_left_ms"], 1500);
        assert!(v["records"][1]["health"].is_null());
    }

    #[test]
    fn a_board_shows_at_most_max_shown_records() {
        let many = (0..MAX_SHOWN + 5)
            .map(|i| shown(&format!("s{i:05}"), "{}"))
            .collect();
        let v: serde_json::Value = serde_json::from_str(&board_json("{}", many)).unwrap();
        assert_eq!(v["records"].as_array().unwrap().len(), MAX_SHOWN);
    }

    #[test]
    fn every_file_is_there() {
        for path in ["/", "/ui/app.js", "/ui/app.css", "/ui/icon.svg"] {
            assert!(file(path).is_some_and(|(_, b)| !b.is_empty()), "{path}");
        }
        assert!(file("/ui/nope.js").is_none());
    }
}
