//! rumqttd's router, in-process: it stores retained messages, matches
//! topics and fans messages out to links. homicro uses it for that alone:
//! every link is a clean session subscribed at QoS 0, so the router never
//! tracks acknowledgements (no in-flight cap, no cut retained delivery);
//! QoS, sessions, wills and properties are the session layer's.
//!
//! What the router cannot keep for us travels in one user property
//! ([`Meta`]) that is added on the way in and removed on the way out: the
//! publisher's QoS (the router overwrites it with the subscription's), the
//! retain flag (live forwards lose it), the publishing session (NoLocal),
//! when it was published and its message expiry (the router's own expiry
//! is wrong), and whether the payload is really empty (the router clears a
//! retained message on any empty payload, retained or not).
//!
//! Sharp edges handled here, each read from rumqttd 0.20's source:
//! `LinkTx::send` blocks on the router's channel (1,000 slots), so sends
//! are coalesced (one wake-up per batch) and wait while it is full; a link
//! must end with a DISCONNECT or the router keeps it forever ([`Link`]'s
//! drop sends it); the router keeps a small record per client id it has
//! seen, so links take ids from a pool ([`Router`]); a link paused with
//! `Unschedule` must be woken.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, QoS, RetainForwardRule, Subscribe,
    Unsubscribe,
};
use rumqttd::{Notification, RouterConfig};
use tokio::sync::oneshot;
use tracing::{debug, warn};

mod carry;

pub use carry::{Expired, Forwarded, Meta, RoutedPublish, now_ms};

/// The user property key that carries [`Meta`] through the router.
pub const META_KEY: &str = "$homicro";

/// The router is gone (its thread panicked).
#[derive(Debug, thiserror::Error)]
#[error("the message router has stopped")]
pub struct RouterGone;

type Build = dyn Fn(&str) -> Option<(LinkTx, LinkRx)> + Send + Sync;
type Check = dyn Fn() -> bool + Send + Sync;
type Reply = oneshot::Sender<Result<Link, RouterGone>>;

/// Links the factory keeps built ahead of demand.
const READY_LINKS: usize = 16;

/// The running router: builds links with pooled client ids.
#[derive(Clone)]
pub struct Router {
    build: Arc<Build>,
    full: Arc<Check>,
    gone: Arc<Check>,
    ids: Arc<Mutex<IdPool>>,
    /// The link factory's requests (see [`Router::link`]).
    factory: std_mpsc::Sender<Reply>,
}

/// Router client ids for links: reused, so the router's per-id records
/// stay as many as links ever open at once.
#[derive(Default)]
struct IdPool {
    free: Vec<u32>,
    next: u32,
}

impl Router {
    /// Starts rumqttd's router on its own thread, and the link factory on
    /// another.
    pub fn start(config: RouterConfig) -> Router {
        let tx = rumqttd::Router::new(0, config).spawn();
        let full_tx = tx.clone();
        let gone_tx = tx.clone();
        let (factory, requests) = std_mpsc::channel();
        let router = Router {
            build: Arc::new(move |id: &str| {
                LinkBuilder::new(id, tx.clone())
                    .clean_session(true)
                    .build()
                    .ok()
                    .map(|(ltx, lrx, _ack)| (ltx, lrx))
            }),
            full: Arc::new(move || full_tx.is_full()),
            gone: Arc::new(move || gone_tx.is_disconnected()),
            ids: Arc::default(),
            factory,
        };
        let r = router.clone();
        std::thread::Builder::new()
            .name("homicro-links".into())
            .spawn(move || factory_loop(r, requests))
            .expect("spawn the link factory thread");
        router
    }

    /// Whether the router's thread has ended (it only ends by panicking).
    pub fn is_gone(&self) -> bool {
        (self.gone)()
    }

    /// A new link (blocks the calling thread for a round trip to the
    /// router: call from `spawn_blocking` or a thread of its own).
    pub fn link_blocking(&self) -> Result<Link, RouterGone> {
        let n = {
            let mut ids = self.ids.lock().unwrap();
            ids.free.pop().unwrap_or_else(|| {
                ids.next += 1;
                ids.next
            })
        };
        match (self.build)(&format!("%link-{n}")) {
            Some((tx, rx)) => Ok(Link {
                tx: Some(tx),
                rx,
                id: n,
                router: self.clone(),
                paused: false,
            }),
            None => {
                self.ids.lock().unwrap().free.push(n);
                Err(RouterGone)
            }
        }
    }

    /// A new link, from the factory thread: building one is a blocking
    /// round trip to the router, so one thread builds them all (a few
    /// ahead), and a storm of CONNECTs neither blocks the executor nor
    /// grows a pool of blocking threads.
    pub async fn link(&self) -> Result<Link, RouterGone> {
        let (tx, rx) = oneshot::channel();
        self.factory.send(tx).map_err(|_| RouterGone)?;
        rx.await.map_err(|_| RouterGone)?
    }
}

/// The link factory: answers requests with a ready link, and builds up to
/// [`READY_LINKS`] ahead while idle.
fn factory_loop(router: Router, requests: std_mpsc::Receiver<Reply>) {
    let mut ready: VecDeque<Link> = VecDeque::with_capacity(READY_LINKS);
    let mut refused_at: Option<std::time::Instant> = None;
    loop {
        let request = if ready.len() < READY_LINKS {
            match requests.try_recv() {
                Ok(r) => Some(r),
                Err(std_mpsc::TryRecvError::Empty) => None,
                Err(std_mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match requests.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            }
        };
        match request {
            Some(reply) => {
                let link = match ready.pop_front() {
                    Some(l) => Ok(l),
                    None => router.link_blocking(),
                };
                if link.is_err() && refused_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1))
                {
                    warn!("the router refused a link (at max_connections, or stopped)");
                    refused_at = Some(std::time::Instant::now());
                }
                // A requester that went away drops the link (DISCONNECT).
                let _ = reply.send(link);
            }
            None => match router.link_blocking() {
                Ok(l) => ready.push_back(l),
                // Full (or gone): build ahead again only when asked.
                Err(RouterGone) => match requests.recv() {
                    Ok(reply) => {
                        let _ = reply.send(router.link_blocking());
                    }
                    Err(_) => return,
                },
            },
        }
    }
}

/// One link to the router: a clean session whose subscriptions are all
/// QoS 0. Ended with a DISCONNECT when dropped.
pub struct Link {
    tx: Option<LinkTx>,
    rx: LinkRx,
    id: u32,
    router: Router,
    /// The router sent `Unschedule` and waits for a wake-up.
    paused: bool,
}

impl Link {
    /// Hands a packet to the router: appended to the batch the router has
    /// not taken yet, or sent with a wake-up when there is none.
    async fn send(&mut self, packet: Packet) -> Result<(), RouterGone> {
        let tx = self.tx.as_mut().ok_or(RouterGone)?;
        {
            // The router takes the whole buffer at once under this lock: if
            // it is not empty, the wake-up sent with its first packet is
            // still to come, and will take this one too.
            let mut buf = tx.buffer();
            if !buf.is_empty() {
                buf.push_back(packet);
                return Ok(());
            }
        }
        while (self.router.full)() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tx.send(packet).await.map(|_| ()).map_err(|_| RouterGone)
    }

    pub async fn publish(&mut self, p: RoutedPublish) -> Result<(), RouterGone> {
        let publish = rumqttd::protocol::Publish::new(p.topic, p.payload, p.retain);
        self.send(Packet::Publish(publish, Some(p.props))).await
    }

    /// Subscribes `filter` at QoS 0; the router sends the retained
    /// messages of a filter new to this link.
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), RouterGone> {
        let f = Filter {
            path: filter.to_string(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        let s = Subscribe {
            pkid: 1,
            filters: vec![f],
        };
        self.send(Packet::Subscribe(s, None)).await
    }

    pub async fn unsubscribe(&mut self, filter: &str) -> Result<(), RouterGone> {
        let u = Unsubscribe {
            pkid: 1,
            filters: vec![filter.to_string()],
        };
        self.send(Packet::Unsubscribe(u, None)).await
    }

    /// The next message the router forwards to this link.
    pub async fn next(&mut self) -> Result<Forwarded, RouterGone> {
        loop {
            if self.paused {
                // Cleared only once the wake-up is sent: this future may be
                // dropped at the await (a session's select).
                self.rx.wake().await.map_err(|_| RouterGone)?;
                self.paused = false;
            }
            match self.rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    return Ok(Forwarded::from_router(f.publish, f.properties));
                }
                Ok(Some(Notification::Unschedule)) => self.paused = true,
                Ok(Some(other)) => debug!(link = self.id, ?other, "router notification ignored"),
                Ok(None) => {}
                Err(_) => return Err(RouterGone),
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(mut tx) = self.tx.take() {
            let d = Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            };
            // A blocking send: the router must hear of every ended link or
            // it keeps it (and its buffers) for good.
            let pushed = {
                let mut buf = tx.buffer();
                let pending = !buf.is_empty();
                if pending {
                    buf.push_back(Packet::Disconnect(d.clone(), None));
                }
                pending
            };
            if !pushed {
                let _ = futures_util::FutureExt::now_or_never(tx.send(Packet::Disconnect(d, None)));
            }
            // The DISCONNECT is ahead of any later CONNECT with this id in
            // the router's one channel: the id may be reused at once.
            self.router.ids.lock().unwrap().free.push(self.id);
        }
    }
}
