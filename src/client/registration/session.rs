//! The background side of a registration: asserts the record, waits for the
//! registry's answer, then keeps it alive (heartbeats, re-assertion after a
//! reconnect or a clear) until told to deregister. `Registration` is its
//! handle.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{Command, Notice, RegisterError, Status};
use crate::client::{ANSWER_TIMEOUT, Connection, ConnectionError, registry_state};
use crate::mqtt::Incoming;
use crate::protocol::{ErrorCode, ErrorPayload, EventKind, EventPayload, RegistryState};
use crate::record::{Endpoint, Name, Record};
use crate::topics::Topics;

/// The background side of a registration.
pub(super) struct Session {
    topics: Topics,
    name: Name,
    record: Record,
    /// The record's topic.
    pub(super) topic: String,
    filters: [String; 4],
    /// Messages that arrived while waiting for an answer.
    backlog: VecDeque<Incoming>,
}

impl Session {
    pub(super) fn new(topics: Topics, name: Name, record: Record) -> Session {
        let n = name.as_str();
        let filters = [
            topics.error(n),
            topics.event(n),
            topics.registry(),
            topics.service(n),
        ];
        Session {
            topic: topics.service(n),
            topics,
            name,
            record,
            filters,
            backlog: VecDeque::new(),
        }
    }

    /// Subscribes, publishes the record and waits for the registry's answer:
    /// `registered` or `updated`. With `check_registry`, refuses to
    /// publish when the registry is known to be offline or absent.
    pub(super) async fn assert(
        &mut self,
        c: &mut Connection,
        check_registry: bool,
    ) -> Result<EventKind, RegisterError> {
        let filters = self.filters.clone();
        // What arrives meanwhile (an `unhealthy` event behind the clear that
        // made us register again, say) is looked at afterwards.
        let early = c.subscribe(&filters[..3]).await?;
        self.keep_for_later(early);
        if check_registry {
            let snap = c.snapshot(&self.topics, &filters[2]).await?;
            let state = snap
                .iter()
                .find(|(t, ..)| *t == filters[2])
                .and_then(|(_, p, _)| registry_state(p));
            if state != Some(RegistryState::Online) {
                return Err(RegisterError::RegistryOffline);
            }
        }
        c.publish(self.topic.clone(), self.record.payload().clone(), true)
            .await?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let m = match c.next(deadline).await {
                Ok(m) => m,
                Err(ConnectionError::Timeout { .. }) => return Err(RegisterError::RegistryOffline),
                Err(e) => return Err(e.into()),
            };
            let Incoming::Message {
                topic,
                payload,
                retained,
            } = m
            else {
                continue;
            };
            if let Some(answer) = self.answer(&topic, &payload) {
                // Watch our own topic only now: the registry has spoken.
                let early = c.subscribe(&filters[3..]).await?;
                self.keep_for_later(early);
                return answer;
            }
            // Not the answer: the keep-alive loop looks at it afterwards (a
            // clear of our record that raced this publish, say).
            self.keep_for_later([(topic, payload, retained)]);
        }
    }

    fn keep_for_later(&mut self, messages: impl IntoIterator<Item = crate::mqtt::Message>) {
        self.backlog
            .extend(
                messages
                    .into_iter()
                    .map(|(topic, payload, retained)| Incoming::Message {
                        topic,
                        payload,
                        retained,
                    }),
            );
    }

    /// The registry's answer to our publish, if this message is one.
    fn answer(&self, topic: &str, payload: &[u8]) -> Option<Result<EventKind, RegisterError>> {
        if topic == self.filters[0] {
            let e = serde_json::from_slice::<ErrorPayload>(payload).ok()?;
            return self.is_about(&e).then(|| Err(refusal(e)));
        }
        if topic == self.filters[1] {
            let ev = serde_json::from_slice::<EventPayload>(payload).ok()?;
            let ours = ev.endpoint == Some(self.record.endpoint.to_string());
            return match ev.event {
                EventKind::Registered | EventKind::Updated if ours => Some(Ok(ev.event)),
                _ => None,
            };
        }
        None
    }

    /// Whether an error payload is about our publish (not someone else's).
    fn is_about(&self, e: &ErrorPayload) -> bool {
        e.endpoint
            .as_ref()
            .is_none_or(|ep| *ep == self.record.endpoint)
    }

    /// Keeps the registration alive until told to deregister.
    pub(super) async fn keep(
        mut self,
        mut c: Connection,
        mut commands: mpsc::Receiver<Command>,
        status: watch::Sender<Status>,
        notices: broadcast::Sender<Notice>,
    ) {
        // Nobody listening is fine: notices are for whoever wants them.
        let notify = |n: Notice| {
            let _ = notices.send(n);
        };
        let every = self
            .record
            .ttl
            .map(|t| (t / 3).max(Duration::from_millis(50)));
        let mut beat = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        beat.tick().await;
        let heartbeat = Bytes::from(self.record.endpoint.to_json().to_string());
        let mut last_assert = Instant::now();
        // Another endpoint owns the name: stop, announce it once the
        // connection is closed.
        let mut lost: Option<Endpoint> = None;
        let ended = loop {
            if let Some(owner) = lost.take() {
                break Ended::Lost(owner);
            }
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Deregister(reply)) => break Ended::Deregister(reply),
                    None => break Ended::Deregister(None),
                },
                _ = beat.tick(), if every.is_some() => {
                    let _ = c.publish(self.topics.heartbeat(self.name.as_str()), heartbeat.clone(), false).await;
                }
                m = next_message(&mut self.backlog, &mut c.rx) => {
                    let Some(m) = m else { break Ended::Closed };
                    let reassert = match m {
                        // A new session: subscriptions are gone and the broker
                        // may have lost the record (a restarted registry).
                        Incoming::Connected => {
                            debug!(name = %self.name, "reconnected; registering again");
                            true
                        }
                        Incoming::Message { topic, payload, retained } => {
                            match self.on_message(&topic, &payload, retained) {
                                Seen::Nothing => false,
                                Seen::Vanished => true,
                                Seen::Cleared(event, detail) => {
                                    notify(Notice::Cleared { event, detail });
                                    false
                                }
                                Seen::Lost(owner) => {
                                    lost = Some(owner);
                                    false
                                }
                            }
                        }
                        Incoming::Disconnected(e) => {
                            warn!(name = %self.name, error = %e, "lost the broker; reconnecting");
                            notify(Notice::Disconnected(e));
                            false
                        }
                        _ => false,
                    };
                    if reassert && lost.is_none() {
                        // At most once a second, so that a deliberate
                        // deregistration loop cannot make us spin.
                        let wait = (last_assert + Duration::from_secs(1)).saturating_duration_since(Instant::now());
                        tokio::time::sleep(wait).await;
                        last_assert = Instant::now();
                        match self.assert(&mut c, false).await {
                            Ok(how) => {
                                info!(name = %self.name, "registration re-asserted");
                                // Why it was cleared, if the registry said so
                                // meanwhile: it came after the clear itself.
                                for (event, detail) in self.take_cleared() {
                                    notify(Notice::Cleared { event, detail });
                                }
                                notify(Notice::Reasserted(how));
                            }
                            Err(RegisterError::Owned { owner, .. }) => lost = Some(owner),
                            Err(e) => {
                                warn!(name = %self.name, error = %e, "re-registration failed; will retry");
                                notify(Notice::ReassertFailed(e.to_string()));
                            }
                        }
                    }
                }
            }
        };
        let reply = match ended {
            Ended::Deregister(reply) => reply,
            Ended::Lost(owner) => {
                // Disconnect cleanly first, so that our will (an empty
                // record) never clears the new owner's record, even when
                // whoever hears `Lost` exits at once.
                c.close().await;
                warn!(name = %self.name, owner = %owner, "name taken by another endpoint; giving up");
                let _ = status.send(Status::Lost {
                    owner: owner.clone(),
                });
                notify(Notice::Lost { owner });
                return answer_deregisters(commands).await;
            }
            Ended::Closed => {
                c.close().await;
                return answer_deregisters(commands).await;
            }
        };
        let result = c
            .publish(self.topic.clone(), Bytes::new(), true)
            .await
            .map_err(RegisterError::from);
        info!(name = %self.name, "deregistered");
        let _ = status.send(Status::Deregistered);
        c.close().await;
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    /// Takes the announcements of our record's removal out of the backlog.
    fn take_cleared(&mut self) -> Vec<(EventKind, Option<String>)> {
        let mut cleared = Vec::new();
        let backlog = std::mem::take(&mut self.backlog);
        for m in backlog {
            if let Incoming::Message {
                topic,
                payload,
                retained,
            } = &m
                && let Seen::Cleared(event, detail) = self.on_message(topic, payload, *retained)
            {
                cleared.push((event, detail));
                continue;
            }
            self.backlog.push_back(m);
        }
        cleared
    }

    /// What a message while registered means.
    fn on_message(&self, topic: &str, payload: &[u8], retained: bool) -> Seen {
        debug!(name = %self.name, topic, len = payload.len(), retained, "message");
        if topic == self.topic {
            // Our record vanished (expired, cleared by a restarted registry,
            // or deregistered by someone): assert it again. A record from
            // another endpoint is not fought: the registry decides.
            return match payload.is_empty() && !retained {
                true => Seen::Vanished,
                false => Seen::Nothing,
            };
        }
        if topic == self.filters[2] {
            // A registry that comes (back) online may not know us.
            return match !retained && registry_state(payload) == Some(RegistryState::Online) {
                true => Seen::Vanished,
                false => Seen::Nothing,
            };
        }
        if topic == self.filters[1]
            && let Ok(ev) = serde_json::from_slice::<EventPayload>(payload)
        {
            // The registry removed our record: say why (the clear itself,
            // on our topic, makes us register again).
            let ours = ev
                .endpoint
                .as_ref()
                .is_none_or(|ep| *ep == self.record.endpoint.to_string());
            return match ev.event {
                EventKind::Unhealthy | EventKind::Expired | EventKind::Deregistered if ours => {
                    Seen::Cleared(ev.event, ev.detail)
                }
                _ => Seen::Nothing,
            };
        }
        if topic == self.filters[0]
            && let Ok(e) = serde_json::from_slice::<ErrorPayload>(payload)
        {
            match e.error {
                ErrorCode::Unknown => return Seen::Vanished,
                ErrorCode::Owned | ErrorCode::NotOwner if self.is_about(&e) => {
                    if let RegisterError::Owned { owner, .. } = refusal(e) {
                        return Seen::Lost(owner);
                    }
                }
                _ => {}
            }
        }
        Seen::Nothing
    }
}

/// Why [`Session::keep`] stopped keeping the record.
enum Ended {
    /// Told to deregister (and whom to answer).
    Deregister(Option<oneshot::Sender<Result<(), RegisterError>>>),
    /// Another endpoint owns the name.
    Lost(Endpoint),
    /// The connection's task is gone.
    Closed,
}

/// Once nothing is left to deregister: a later `deregister` gets `Ok`.
async fn answer_deregisters(mut commands: mpsc::Receiver<Command>) {
    while let Some(Command::Deregister(reply)) = commands.recv().await {
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
    }
}

/// What a message seen while registered means.
enum Seen {
    Nothing,
    /// The record is gone (or the registry may not know it): assert again.
    Vanished,
    /// The registry announced that it removed the record, and why.
    Cleared(EventKind, Option<String>),
    /// Another endpoint owns the name now.
    Lost(Endpoint),
}

/// The error a refusal is to the caller.
fn refusal(e: ErrorPayload) -> RegisterError {
    match (e.error, e.owner) {
        (ErrorCode::Owned | ErrorCode::NotOwner, owner) => RegisterError::Owned {
            owner: owner.unwrap_or_else(|| Endpoint {
                host: "unknown".into(),
                port: None,
            }),
            detail: e.detail,
        },
        (code, _) => RegisterError::Invalid(format!("{code}: {}", e.detail)),
    }
}

/// The next message: from the backlog first, then from the connection.
async fn next_message(
    backlog: &mut VecDeque<Incoming>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Incoming>,
) -> Option<Incoming> {
    match backlog.pop_front() {
        Some(m) => Some(m),
        None => rx.recv().await,
    }
}
