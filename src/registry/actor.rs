//! The registry actor: moves messages between the broker and the rules in
//! `state.rs`, keeps the clock (ttl deadlines) and the state file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, error, info, warn};

use super::health::{Outcome, Probe};
use super::probe;
use super::state::{Delivery, Publish, Registry, Stats};
use super::{Answer, Status};
use crate::bus::gate::{Gated, Submission};
use crate::bus::router::{Link, Message, now_ms};
use crate::mqtt::Incoming;
use crate::record::Name;
use crate::statefile;

/// Requests from the handle.
pub(super) enum Request {
    Stats(oneshot::Sender<Stats>),
    Status(oneshot::Sender<Status>),
    /// A record (empty: a removal) submitted through the HTTP API.
    Submit {
        name: String,
        payload: Bytes,
        respond_to: oneshot::Sender<Answer>,
    },
    /// A record or heartbeat published on the embedded bus, to be judged
    /// before the bus stores it.
    Gate {
        submission: Submission,
        respond_to: oneshot::Sender<Gated>,
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
    /// The embedded bus's router: the registry is the gate, and publishes
    /// what it accepts itself.
    Router(Link),
}

/// The submission whose publishes the registry is making: its record or
/// heartbeat goes out as its publisher sent it (origin and QoS).
#[derive(Clone, Copy)]
struct On<'a> {
    topic: &'a str,
    origin: u64,
    qos: u8,
}

pub(super) struct Actor {
    pub state: Registry,
    /// Bounds how many health probes run at once.
    pub probes_in_flight: Arc<Semaphore>,
    pub transport: Transport,
    pub requests: mpsc::Receiver<Request>,
    pub state_file: PathBuf,
    pub flush_every: Duration,
    pub persist: bool,
    /// Whether the MQTT session with the broker is up.
    pub connected: bool,
}

impl Actor {
    pub async fn run(mut self) {
        if matches!(self.transport, Transport::Router(_)) {
            self.on_incoming(Incoming::Connected).await;
        }
        let writer = Writer::spawn(self.state_file.clone(), self.persist);
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(Probe, Outcome)>();
        let mut flushed = self.state.changes();
        let mut flush_at: Option<Instant> = None;
        let shutdown = loop {
            if flush_at.is_none() && self.state.changes() != flushed {
                flush_at = Some(Instant::now() + self.flush_every);
            }
            let deadline = self.state.next_deadline();
            let probe_at = self.state.next_probe();
            tokio::select! {
                req = self.requests.recv() => match req {
                    Some(Request::Shutdown(tx)) => break Some(tx),
                    Some(req) => self.on_request(req).await,
                    None => break None,
                },
                msg = incoming(&mut self.transport) => match msg {
                    Some(m) => self.on_incoming(m).await,
                    None => { error!("mqtt event loop ended"); break None; }
                },
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    let out = self.state.on_tick(Instant::now());
                    self.publish_all(out).await;
                }
                _ = sleep_until(probe_at.unwrap_or_else(far_future)), if probe_at.is_some() => {
                    for p in self.state.take_probes(Instant::now()) {
                        self.spawn_probe(p, probe_tx.clone());
                    }
                }
                Some((p, outcome)) = probe_rx.recv() => {
                    let out = self.state.on_probe(Instant::now(), &p, outcome);
                    self.publish_all(out).await;
                }
                _ = sleep_until(flush_at.unwrap_or_else(far_future)), if flush_at.is_some() => {
                    if writer.offer(self.encode()) {
                        flushed = self.state.changes();
                    }
                    flush_at = None;
                }
            }
        };
        self.stop(writer).await;
        if let Some(tx) = shutdown {
            let _ = tx.send(());
        }
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
                let _ = tx.send(self.state.stats().clone());
            }
            Request::Status(tx) => {
                let _ = tx.send(Status {
                    stats: self.state.stats().clone(),
                    connected: self.connected,
                    records: self.state.len(),
                });
            }
            Request::Submit {
                name,
                payload,
                respond_to,
            } => {
                let (answer, out) = self.state.on_submit(Instant::now(), &name, payload);
                self.publish_all(out).await;
                let _ = respond_to.send(answer);
            }
            Request::Gate {
                submission: sub,
                respond_to,
            } => {
                let (verdict, out) =
                    self.state
                        .on_gate(Instant::now(), sub.kind, &sub.raw, sub.payload.clone());
                let topic = match sub.kind {
                    super::state::GateKind::Record => self.state.topics().service(&sub.raw),
                    super::state::GateKind::Heartbeat => self.state.topics().heartbeat(&sub.raw),
                };
                let on = On {
                    topic: &topic,
                    origin: sub.origin,
                    qos: sub.qos,
                };
                self.publish_on(out, Some(on)).await;
                let _ = respond_to.send(match verdict {
                    Ok(()) => Gated::Accepted,
                    Err(code) => Gated::Refused(code),
                });
            }
            Request::Records(tx) => {
                let records = self.state.records();
                let _ = tx.send(records.map(|(n, b)| (n.clone(), b.clone())).collect());
            }
            Request::Record(name, tx) => {
                let _ = tx.send(self.state.payload(&name).cloned());
            }
            // Handled by the loop.
            Request::Shutdown(_) => {}
        }
    }

    async fn on_incoming(&mut self, m: Incoming) {
        match m {
            Incoming::Connected => {
                self.connected = true;
                info!(records = self.state.len(), "connected to the broker");
                let out = self.state.on_connected();
                self.publish_all(out).await;
                let Transport::Mqtt { client, .. } = &self.transport else {
                    return;
                };
                let mut filters: Vec<String> = self.state.topics().registry_filters().into();
                filters.push(self.state.topics().registry());
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
                let out = self
                    .state
                    .on_message(Instant::now(), &topic, payload, delivery);
                self.publish_all(out).await;
            }
            Incoming::Disconnected(e) => {
                self.connected = false;
                warn!(error = %e, "lost the broker; reconnecting");
            }
            Incoming::Closed | Incoming::Subscribed => {}
        }
    }

    async fn publish_all(&mut self, out: Vec<Publish>) {
        self.publish_on(out, None).await
    }

    async fn publish_on(&mut self, out: Vec<Publish>, on: Option<On<'_>>) {
        let client = match &mut self.transport {
            Transport::Mqtt { client, .. } => client,
            Transport::Router(link) => {
                for p in out {
                    let (origin, qos) = match on {
                        Some(on) if on.topic == p.topic => (on.origin, on.qos),
                        _ => (0, u8::from(p.retain)),
                    };
                    // The payload as the registry holds it: a record is
                    // stored once, shared by the registry and the router.
                    link.publish(Message {
                        topic: p.topic.into(),
                        payload: p.payload,
                        qos,
                        retain: p.retain,
                        origin,
                        at_ms: now_ms(),
                        ..Message::default()
                    });
                }
                return;
            }
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

    fn encode(&self) -> Arc<Vec<u8>> {
        Arc::new(statefile::encode(self.state.records()))
    }

    /// Announces `offline`, waits (briefly) until the broker has it, writes
    /// the final state and disconnects.
    async fn stop(&mut self, writer: Writer) {
        let offline = self.state.offline();
        self.publish_all(vec![offline.clone()]).await;
        let (client, incoming) = match &mut self.transport {
            Transport::Mqtt { client, incoming } => (client, incoming),
            Transport::Router(_) => {
                // The router forwards at once; give the sessions a moment
                // to write it before the process ends.
                tokio::time::sleep(Duration::from_millis(100)).await;
                writer.finish(self.encode()).await;
                info!(records = self.state.len(), "registry stopped");
                return;
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
        writer.finish(self.encode()).await;
        info!(records = self.state.len(), "registry stopped");
    }
}

/// The next message from an external broker (never, on the router: the
/// gate brings records as requests).
async fn incoming(t: &mut Transport) -> Option<Incoming> {
    match t {
        Transport::Mqtt { incoming, .. } => incoming.recv().await,
        Transport::Router(_) => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Writes the state file off the actor's task. Holds at most one pending
/// snapshot; `offer` says whether the snapshot was taken.
struct Writer {
    tx: Option<mpsc::Sender<Arc<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn spawn(path: PathBuf, persist: bool) -> Writer {
        let (tx, mut rx) = mpsc::channel::<Arc<Vec<u8>>>(1);
        let task = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if !persist {
                    continue;
                }
                let p = path.clone();
                let result =
                    tokio::task::spawn_blocking(move || statefile::write(&p, &bytes)).await;
                match result {
                    Ok(Ok(())) => debug!(path = %path.display(), "state file written"),
                    Ok(Err(e)) => error!(error = %e, "state file not written"),
                    Err(e) => error!(error = %e, "state file writer failed"),
                }
            }
        });
        Writer { tx: Some(tx), task }
    }

    fn offer(&self, bytes: Arc<Vec<u8>>) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(bytes).is_ok())
    }

    async fn finish(mut self, last: Arc<Vec<u8>>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(last).await;
        }
        let _ = (&mut self.task).await;
    }
}
