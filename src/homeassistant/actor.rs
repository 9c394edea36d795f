//! The bridge's actor: moves messages between the bus and the rules in
//! `mod.rs` and keeps the clock (when gone services fall due).
//!
//! After every (re)connection it subscribes to the registry's topics and to
//! its own, and tells the rules when every retained copy has arrived: on
//! the embedded router, once its link has handed them all out; through a
//! broker, when a message to a private `PREFIX/sync/ID` topic, subscribed
//! and published after the others, comes back behind them (see
//! [`crate::mqtt::snapshot`]). It stays subscribed to its own topics, so
//! that it hears what someone else publishes there (see
//! `Bridge::changed`), its own publishes included.

use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Bridge, Bus};
use crate::bus::router::{Link, Message, now_ms};
use crate::mqtt::Incoming;
use crate::registry::Publish;

/// How the bridge reaches the bus.
enum Transport {
    Mqtt {
        client: AsyncClient,
        incoming: mpsc::UnboundedReceiver<Incoming>,
    },
    /// A link of the embedded router: "connected" from the start.
    Router {
        link: Link,
        started: bool,
        /// The sync topic to report once the retained copies are taken.
        syncing: Option<String>,
    },
}

impl Transport {
    fn new(bus: Bus) -> Transport {
        match bus {
            Bus::External(broker) => {
                let options = crate::mqtt::options(&crate::mqtt::client_id("homicro-ha"), &broker);
                let (client, incoming) = crate::mqtt::connect(options, Duration::from_millis(200));
                Transport::Mqtt { client, incoming }
            }
            Bus::Embedded(router) => Transport::Router {
                link: router.link(),
                started: false,
                syncing: None,
            },
        }
    }

    async fn next(&mut self) -> Option<Incoming> {
        match self {
            Transport::Mqtt { incoming, .. } => incoming.recv().await,
            Transport::Router { started, .. } if !*started => {
                *started = true;
                Some(Incoming::Connected)
            }
            Transport::Router { link, syncing, .. } => {
                if let Some(topic) = syncing.take_if(|_| !link.has_backlog()) {
                    return Some(Incoming::Message {
                        topic,
                        payload: bytes::Bytes::new(),
                        retained: false,
                    });
                }
                let f = link.next().await;
                Some(Incoming::Message {
                    topic: f.msg.topic.to_string(),
                    payload: f.msg.payload.clone(),
                    retained: f.from_store,
                })
            }
        }
    }

    /// Subscribes to `filters` and then to `sync_topic`, which a message
    /// reaches behind every retained copy of `filters` (see [`ping`]);
    /// whether a SUBACK will come for them.
    async fn subscribe(&mut self, filters: &[String], sync_topic: &str) -> bool {
        match self {
            Transport::Mqtt { client, .. } => {
                let filters = filters
                    .iter()
                    .map(String::as_str)
                    .chain([sync_topic])
                    .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
                if let Err(e) = client.subscribe_many(filters).await {
                    warn!(error = %e, "Home Assistant bridge: cannot subscribe");
                }
                true
            }
            Transport::Router { link, .. } => {
                for f in filters {
                    link.subscribe(f, true);
                }
                false
            }
        }
    }

    async fn unsubscribe(&mut self, filters: &[String]) {
        for f in filters {
            match self {
                Transport::Mqtt { client, .. } => {
                    let _ = client.unsubscribe(f.clone()).await;
                }
                Transport::Router { link, .. } => link.unsubscribe(f),
            }
        }
    }

    /// Disconnects once what was published has gone out.
    async fn close(&mut self) {
        let Transport::Mqtt { client, incoming } = self else {
            return;
        };
        // DISCONNECT goes after the publishes queued before it.
        let _ = client.disconnect().await;
        let closed =
            async { while !matches!(incoming.recv().await, None | Some(Incoming::Closed)) {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
    }

    /// Publishes `out` (retained ones at QoS 1).
    async fn publish(&mut self, out: Vec<Publish>) {
        for p in out {
            let qos = u8::from(p.retain);
            match self {
                Transport::Mqtt { client, .. } => {
                    let qos = if p.retain {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    if let Err(e) = client.publish(p.topic, qos, p.retain, p.payload).await {
                        warn!(error = %e, "Home Assistant bridge: cannot publish");
                    }
                }
                Transport::Router { link, .. } => link.publish(Message {
                    topic: p.topic.into(),
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    at_ms: now_ms(),
                    ..Message::default()
                }),
            }
        }
    }
}

/// Runs the bridge until its bus is gone (or the task is aborted).
pub(super) async fn run(mut bridge: Bridge, bus: Bus) {
    let mut transport = Transport::new(bus);
    let sync_topic = format!(
        "{}/sync/{}",
        bridge.layout().topics.prefix(),
        crate::mqtt::client_id("ha")
    );
    // Whether the last (re)connection is up: a broker that keeps refusing
    // is logged once, not at every retry.
    let mut up = false;
    loop {
        let deadline = bridge.next_deadline();
        let wait = deadline.map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
        let out = tokio::select! {
            incoming = transport.next() => match incoming {
                None | Some(Incoming::Closed) => break,
                Some(Incoming::Connected) => {
                    up = true;
                    debug!("Home Assistant bridge connected; reading");
                    bridge.on_connected();
                    if !transport.subscribe(&bridge.filters(), &sync_topic).await {
                        // Subscribed at once (the embedded router).
                        ping(&mut transport, &sync_topic).await;
                    }
                    Vec::new()
                }
                Some(Incoming::Subscribed) => {
                    ping(&mut transport, &sync_topic).await;
                    Vec::new()
                }
                Some(Incoming::Message { topic, .. }) if topic == sync_topic => {
                    transport.unsubscribe(std::slice::from_ref(&sync_topic)).await;
                    bridge.on_synced(SystemTime::now())
                }
                Some(Incoming::Message { topic, payload, .. }) => {
                    bridge.on_message(SystemTime::now(), &topic, &payload)
                }
                Some(Incoming::Disconnected(e)) => {
                    match std::mem::take(&mut up) {
                        true => warn!(error = %e, "Home Assistant bridge lost the broker; retrying"),
                        false => debug!(error = %e, "Home Assistant bridge: no broker yet; retrying"),
                    }
                    Vec::new()
                }
            },
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                bridge.on_tick(SystemTime::now())
            }
        };
        transport.publish(out).await;
        if bridge.finished() {
            transport.close().await;
            break;
        }
    }
    debug!("Home Assistant bridge stopped");
}

/// Asks for the sync message, which comes behind every retained copy: a
/// publish to the sync topic through a broker; on the embedded router, a
/// note to report it once the link has handed out its retained copies.
async fn ping(transport: &mut Transport, sync_topic: &str) {
    if let Transport::Router { syncing, .. } = transport {
        *syncing = Some(sync_topic.to_string());
        return;
    }
    let ping = Publish {
        topic: sync_topic.to_string(),
        payload: bytes::Bytes::from_static(b"sync"),
        retain: false,
    };
    transport.publish(vec![ping]).await;
}
