//! Calls through the hub from Rust: [`Registration::serve_requests`] answers
//! the requests the hub hands a service, and [`Caller::call`] asks one
//! instance of a name or `role@range`. Both speak the 3.1.1 form of the
//! request topics (docs/PROTOCOL.md, "Calls through the hub"), so they
//! work over the helper's MQTT 3.1.1 connection:
//!
//! ```text
//! Caller ─ PREFIX/call/QUERY/PREFIX/answers/ID/SEQ ─▶ hub ─ PREFIX/rpc/NAME/CALL ─▶ serve_requests
//! Caller ◀─ PREFIX/answers/ID/SEQ/STATUS ─────────── hub ◀─ PREFIX/reply/CALL/STATUS ─┘
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{Broker, Connection, ConnectionError, Registration};
use crate::mqtt::Incoming;
use crate::record::{Name, Query};
use crate::topics::Topics;

/// A request handed to this service.
#[derive(Debug, Clone)]
pub struct Request {
    /// The hub's id of the call.
    pub id: String,
    pub body: Bytes,
}

/// An answer: an HTTP status (a `POST /call/` caller gets it as the
/// response's status) and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    /// 200 with `body`.
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            body: body.into(),
        }
    }

    pub fn with_status(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            body: body.into(),
        }
    }
}

/// Why a call got no reply. A reply with an error status (the hub's 404,
/// 503 or 504, or the instance's own) is a [`Reply`], not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("bad query {0:?}: give a service name or role@range, such as api@^1.2")]
    BadQuery(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

/// Serves a registration's requests until dropped (or [`RequestServer::stop`]).
pub struct RequestServer {
    task: JoinHandle<()>,
}

impl RequestServer {
    pub fn stop(self) {}
}

impl Drop for RequestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Registration {
    /// Answers every request the hub hands this service with `handler`
    /// (run as its own task per request), from its own MQTT connection;
    /// returns once the hub can reach it. A status other than 200 goes to
    /// the caller as the answer's status.
    pub async fn serve_requests<F, Fut>(&self, handler: F) -> Result<RequestServer, ConnectionError>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let filter = self.topics.request_filter(self.name.as_str());
        let mut conn = Connection::open(&self.broker, "homicro-rpc", None).await?;
        let early = conn.subscribe(std::slice::from_ref(&filter)).await?;
        let handler = Arc::new(handler);
        let topics = self.topics.clone();
        let task = tokio::spawn(async move {
            let answer = |topic: String, body: Bytes| {
                let Some(id) = topic.rsplit('/').next().map(str::to_string) else {
                    return;
                };
                let (client, topics, handler) =
                    (conn.client.clone(), topics.clone(), handler.clone());
                tokio::spawn(async move {
                    let reply = handler(Request {
                        id: id.clone(),
                        body,
                    })
                    .await;
                    let to = match reply.status {
                        200 => topics.reply(&id),
                        s => format!("{}/{s}", topics.reply(&id)),
                    };
                    if let Err(e) = client
                        .publish_bytes(to, QoS::AtLeastOnce, false, reply.body)
                        .await
                    {
                        warn!(call = %id, error = %e, "could not send the reply");
                    }
                });
            };
            for (topic, body, _) in early {
                answer(topic, body);
            }
            while let Some(m) = conn.rx.recv().await {
                match m {
                    Incoming::Message { topic, payload, .. } => answer(topic, payload),
                    // A clean session forgets its subscription.
                    Incoming::Connected => {
                        let _ = conn.client.subscribe(filter.clone(), QoS::AtMostOnce).await;
                    }
                    Incoming::Disconnected(e) => {
                        debug!(error = %e, "request server lost the broker")
                    }
                    Incoming::Closed => break,
                    Incoming::Subscribed => {}
                }
            }
        });
        Ok(RequestServer { task })
    }
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// Removes a call's entry from [`Waiting`] when the call ends.
struct Forget<'a>(&'a Waiting, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
}

/// Calls services through the hub, over one MQTT connection.
pub struct Caller {
    client: AsyncClient,
    topics: Topics,
    /// `PREFIX/answers/CLIENT-ID`: replies come to `…/SEQ/STATUS`.
    answers: String,
    next: AtomicU64,
    waiting: Waiting,
    task: JoinHandle<()>,
}

impl Caller {
    /// Connects to the bus under the default prefix.
    pub async fn connect(broker: &Broker) -> Result<Caller, ConnectionError> {
        Caller::connect_with_prefix(broker, Topics::DEFAULT_PREFIX).await
    }

    pub async fn connect_with_prefix(
        broker: &Broker,
        prefix: &str,
    ) -> Result<Caller, ConnectionError> {
        let topics = Topics::new(prefix);
        let mut conn = Connection::open(broker, "homicro-call", None).await?;
        let answers = format!("{prefix}/answers/{}", crate::mqtt::client_id("c"));
        let filter = format!("{answers}/+/+");
        conn.subscribe(std::slice::from_ref(&filter)).await?;
        let waiting: Waiting = Arc::default();
        let client = conn.client.clone();
        let task = {
            let (waiting, answers) = (waiting.clone(), answers.clone());
            tokio::spawn(async move {
                while let Some(m) = conn.rx.recv().await {
                    match m {
                        Incoming::Message { topic, payload, .. } => {
                            let Some((seq, status)) = parse_answer(&answers, &topic) else {
                                continue;
                            };
                            if let Some(tx) = waiting.lock().unwrap().remove(&seq) {
                                let _ = tx.send(Reply {
                                    status,
                                    body: payload,
                                });
                            }
                        }
                        Incoming::Connected => {
                            let _ = conn.client.subscribe(filter.clone(), QoS::AtMostOnce).await;
                        }
                        Incoming::Closed => break,
                        _ => {}
                    }
                }
            })
        };
        Ok(Caller {
            client,
            topics,
            answers,
            next: AtomicU64::new(1),
            waiting,
            task,
        })
    }

    /// Calls one instance of `query` (a name or `role@range`) with `body`
    /// and waits up to `timeout` for its reply.
    pub async fn call(
        &self,
        query: &str,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        if Name::parse(query).is_err() && Query::parse(query).is_err() {
            return Err(CallError::BadQuery(query.to_string()));
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(seq, tx);
        // However this ends (a reply, a timeout, the caller giving up).
        let _forget = Forget(&self.waiting, seq);
        let topic = format!("{}/{}/{seq}", self.topics.call(query), self.answers);
        // QoS 0: a QoS 1 publish is sent again after a reconnect, and the
        // hub would call twice.
        self.client
            .publish_bytes(topic, QoS::AtMostOnce, false, body.into())
            .await
            .map_err(|_| ConnectionError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ConnectionError::Closed.into()),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// SEQ and STATUS of `ANSWERS/SEQ/STATUS`.
fn parse_answer(answers: &str, topic: &str) -> Option<(u64, u16)> {
    let rest = topic.strip_prefix(answers)?.strip_prefix('/')?;
    let (seq, status) = rest.split_once('/')?;
    Some((
        seq.parse().ok()?,
        crate::rpc::wire::parse_status(status).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_their_topic() {
        let a = "homicro/answers/c-1";
        assert_eq!(parse_answer(a, "homicro/answers/c-1/7/200"), Some((7, 200)));
        assert_eq!(parse_answer(a, "homicro/answers/c-1/7/504"), Some((7, 504)));
        assert_eq!(parse_answer(a, "homicro/answers/c-1/x/200"), None);
        assert_eq!(parse_answer(a, "homicro/answers/c-2/7/200"), None);
        assert_eq!(parse_answer(a, "homicro/answers/c-1/7"), None);
    }
}
