//! The registry actor: moves messages between the broker and the rules in
//! `state.rs` and keeps the clock (ttl deadlines, health probes). On the embedded bus, records are judged in the sessions' own tasks
//! (`shared.rs`); the actor is woken when that moves a deadline.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::identity::Author;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{error, info, warn};

use super::health::{Outcome, Probe};
use super::probe;
use super::shared::Shared;
use super::state::{Delivery, Publish, Registry, Stats};
use super::{Answer, Status};
use crate::mqtt::Incoming;
use crate::record::Name;

/// Requests from the handle.
pub(super) enum Request {
    Stats(oneshot::Sender<Stats>),
    Status(oneshot::Sender<Status>),
    /// A record (empty: a removal) submitted through the HTTP API.
    Submit {
        name: String,
        payload: Bytes,
        by: Author,
        respond_to: oneshot::Sender<Answer>,
    },
    Records(oneshot::Sender<Vec<(Name, Bytes)>>),
    Record(Name, oneshot::Sender<Option<Bytes>>),
    Shutdown(oneshot::Sender<()>),
}

/// How the registry reaches the bus.
pub(super) enum Transport {
    /// An external broker, through rumqttc: records are judged after the
    /// broker stored them, and refusals are repaired.
    Mqtt {
        client: AsyncClient,
        incoming: mpsc::UnboundedReceiver<Incoming>,
    },
    /// The embedded bus: the registry is the gate, and publishes what it
    /// accepts itself, on the router (`Shared::route`).
    Router,
}

pub(super) struct Actor {
    pub shared: Arc<Shared>,
    /// Bounds how many health probes run at once.
    pub probes_in_flight: Arc<Semaphore>,
    pub transport: Transport,
    pub requests: mpsc::Receiver<Request>,
    /// Whether the MQTT session with the broker is up.
    pub connected: bool,
}

impl Actor {
    pub async fn run(mut self) {
        if matches!(self.transport, Transport::Router) {
            self.on_incoming(Incoming::Connected).await;
        }
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(Probe, Outcome)>();
        let shared = self.shared.clone();
        let shutdown = loop {
            let (deadline, probe_at) = {
                let mut l = shared.lock();
                let (deadline, probe_at) = (l.reg.next_deadline(), l.reg.next_probe());
                l.armed.deadline = deadline;
                l.armed.probe_at = probe_at;
                (deadline, probe_at)
            };
            tokio::select! {
                req = self.requests.recv() => match req {
                    Some(Request::Shutdown(tx)) => break Some(tx),
                    Some(req) => self.on_request(req).await,
                    None => break None,
                },
                // A session's verdict moved a deadline.
                _ = shared.wake.notified() => {}
                msg = incoming(&mut self.transport) => match msg {
                    Some(m) => self.on_incoming(m).await,
                    None => { error!("mqtt event loop ended"); break None; }
                },
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    self.change(|r| r.on_tick(Instant::now())).await;
                }
                _ = sleep_until(probe_at.unwrap_or_else(far_future)), if probe_at.is_some() => {
                    let probes = shared.lock().reg.take_probes(Instant::now());
                    for p in probes {
                        self.spawn_probe(p, probe_tx.clone());
                    }
                }
                Some((p, outcome)) = probe_rx.recv() => {
                    self.change(|r| r.on_probe(Instant::now(), &p, outcome)).await;
                }
            }
        };
        self.stop().await;
        if let Some(tx) = shutdown {
            let _ = tx.send(());
        }
    }

    /// Applies a change to the registry and publishes what it says: on the
    /// router under the registry's lock (the sessions change it too), or to
    /// the external broker afterwards (only the actor changes it there).
    async fn change(&mut self, f: impl FnOnce(&mut Registry) -> Vec<Publish>) {
        if matches!(self.transport, Transport::Router) {
            let mut l = self.shared.lock();
            let out = f(&mut l.reg);
            self.shared.route(out, None);
            self.shared.journal(&mut l);
            return;
        }
        let out = {
            let mut l = self.shared.lock();
            let out = f(&mut l.reg);
            self.shared.journal(&mut l);
            out
        };
        self.publish_mqtt(out).await;
    }

    /// Runs a probe off the actor's task: a hanging endpoint only holds its
    /// own task (and one permit) until its timeout.
    fn spawn_probe(&self, p: Probe, results: mpsc::UnboundedSender<(Probe, Outcome)>) {
        let permits = self.probes_in_flight.clone();
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let outcome = probe::run(&p).await;
            let _ = results.send((p, outcome));
        });
    }

    async fn on_request(&mut self, req: Request) {
        match req {
            Request::Stats(tx) => {
                let _ = tx.send(self.shared.lock().reg.stats().clone());
            }
            Request::Status(tx) => {
                let l = self.shared.lock();
                let _ = tx.send(Status {
                    stats: l.reg.stats().clone(),
                    connected: self.connected,
                    records: l.reg.len(),
                });
            }
            Request::Submit {
                name,
                payload,
                by,
                respond_to,
            } => {
                let mut answer = None;
                self.change(|r| {
                    let (a, out) = r.on_submit(Instant::now(), &name, payload, &by);
                    answer = Some(a);
                    out
                })
                .await;
                if let Some(a) = answer {
                    let _ = respond_to.send(a);
                }
            }
            Request::Records(tx) => {
                let l = self.shared.lock();
                let records = l.reg.records().map(|(n, b)| (n.clone(), b.clone()));
                let _ = tx.send(records.collect());
            }
            Request::Record(name, tx) => {
                let _ = tx.send(self.shared.lock().reg.payload(&name).cloned());
            }
            // Handled by the loop.
            Request::Shutdown(_) => {}
        }
    }

    async fn on_incoming(&mut self, m: Incoming) {
        match m {
            Incoming::Connected => {
                self.connected = true;
                info!(
                    records = self.shared.lock().reg.len(),
                    "connected to the broker"
                );
                self.change(|r| r.on_connected()).await;
                let Transport::Mqtt { client, .. } = &self.transport else {
                    return;
                };
                let (mut filters, registry) = {
                    let l = self.shared.lock();
                    let filters: Vec<String> = l.reg.topics().registry_filters().into();
                    (filters, l.reg.topics().registry())
                };
                filters.push(registry);
                for f in filters {
                    if let Err(e) = client.subscribe(f, QoS::AtMostOnce).await {
                        error!(error = %e, "subscribe failed");
                    }
                }
            }
            Incoming::Message {
                topic,
                payload,
                retained,
            } => {
                let delivery = if retained {
                    Delivery::Retained
                } else {
                    Delivery::Live
                };
                self.change(|r| r.on_message(Instant::now(), &topic, payload, delivery))
                    .await;
            }
            Incoming::Disconnected(e) => {
                self.connected = false;
                warn!(error = %e, "lost the broker; reconnecting");
            }
            Incoming::Closed | Incoming::Subscribed => {}
        }
    }

    /// Publishes `out` to the external broker.
    async fn publish_mqtt(&mut self, out: Vec<Publish>) {
        self.shared.tap(&out);
        let Transport::Mqtt { client, .. } = &mut self.transport else {
            return;
        };
        for p in out {
            // QoS 1 for what must not be lost (records, clears, online
            // state); errors and events are advisory.
            let qos = if p.retain {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            if let Err(e) = client
                .publish_bytes(p.topic, qos, p.retain, p.payload)
                .await
            {
                error!(error = %e, "publish failed: mqtt client closed");
            }
        }
    }

    /// Announces `offline`, waits (briefly) until the broker has it and
    /// disconnects.
    async fn stop(&mut self) {
        // Sessions judge no more records from here on.
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::Release);
        let offline = self.shared.lock().reg.offline();
        let sent = offline.clone();
        self.change(move |_| vec![sent]).await;
        let (client, incoming) = match &mut self.transport {
            Transport::Mqtt { client, incoming } => (client, incoming),
            Transport::Router => {
                // The router forwards at once; give the sessions a moment
                // to write it before the process ends.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return self.stopped();
            }
        };
        let seen = timeout(Duration::from_millis(800), async {
            while let Some(m) = incoming.recv().await {
                if let Incoming::Message { topic, payload, .. } = m
                    && topic == offline.topic
                    && payload == offline.payload
                {
                    return;
                }
            }
        })
        .await;
        if seen.is_err() {
            warn!("offline state not confirmed by the broker");
        }
        let _ = client.disconnect().await;
        let _ = timeout(Duration::from_millis(300), async {
            while let Some(m) = incoming.recv().await {
                if matches!(m, Incoming::Closed) {
                    return;
                }
            }
        })
        .await;
        self.stopped();
    }

    fn stopped(&self) {
        info!(records = self.shared.lock().reg.len(), "registry stopped");
    }
}

/// The next message from an external broker (never, on the router: the
/// gate brings records as requests).
async fn incoming(t: &mut Transport) -> Option<Incoming> {
    match t {
        Transport::Mqtt { incoming, .. } => incoming.recv().await,
        Transport::Router => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
