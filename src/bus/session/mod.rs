//! One MQTT session: a task that owns the session's state and its router
//! link, and serves the connection attached to it. The task outlives its
//! connections while the session has not expired: it keeps the
//! subscriptions, queues QoS 1 and 2 messages for the absent client, and
//! holds its will until the will delay or the session's end. A CONNECT
//! with the same client id is attached to it (a takeover, and a resume
//! unless it starts clean).

mod deliver;
mod inbound;
pub mod outbound;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep, sleep_until};
use tracing::debug;

use super::codec::{self, AckKind, Properties, Publish, Version, Will, reason};
use super::connect::{self, Conn, Reader, Writer};
use super::router::{After, Forwarded, Link};
use super::{Bus, sessions};
use crate::identity::Author;
use outbound::Outbound;

/// Session expiry meaning "never" (3.1.1 persistent sessions).
const FOREVER: u32 = u32::MAX;

/// How much written-but-unsent data a connection may hold before the
/// session stops taking messages from the router for it.
const WRITE_HIGH: usize = 64 * 1024;

/// Records and heartbeats a session puts to the gate before it waits for
/// their verdicts.
const MAX_PENDING: usize = 256;

/// A publish put to the gate whose verdict is still to come.
struct Pending {
    verdict: Verdict,
    qos: u8,
    pkid: u16,
    /// Its success is acknowledged only once the journal has it on disk.
    durable: bool,
}

/// Acknowledgements decided, waiting for the journal to have the changes
/// they promise on disk (`seq`: the journal's append to wait for; 0: none,
/// they only wait their turn behind others).
struct Unsynced {
    seq: u64,
    acks: Vec<Ack>,
}

/// One acknowledgement to write: PUBACK (QoS 1) or PUBREC (QoS 2).
struct Ack {
    qos: u8,
    pkid: u16,
    /// Its success promises the change is on disk.
    durable: bool,
    code: u8,
}

/// A publish's outcome, or where it comes from.
enum Verdict {
    /// The registry's (`None`: the registry had stopped).
    Gate(Option<tokio::sync::oneshot::Receiver<super::gate::Gated>>),
    /// Known: this reason code.
    Known(u8),
}

/// One subscription's options.
#[derive(Debug, Clone)]
struct Sub {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    id: Option<u32>,
    /// Retained messages delivered at subscribe time are not wanted
    /// (Retain Handling 2).
    suppress_retained: bool,
}

/// The connection a session serves now.
struct Live {
    version: Version,
    reader: Reader,
    writer: Writer,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Granted keepalive in seconds (0: none).
    keep_alive: u16,
    last_rx: Instant,
    /// Fires at or before the keepalive deadline (`None`: no keepalive).
    /// Armed once and moved on only when it fires early: a timer set
    /// anew for every packet cost a timer-wheel insert and removal each.
    keepalive_timer: Option<Pin<Box<Sleep>>>,
    /// QoS 1 and 2 messages the client takes unacknowledged.
    receive_max: u16,
    /// The largest packet the client takes.
    max_packet: usize,
    /// Topic aliases the client set.
    aliases: HashMap<u16, String>,
    will: Option<Will>,
    peer: SocketAddr,
    /// The connection's place under the connection cap.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Live {
    fn keepalive_deadline(&self) -> Option<Instant> {
        (self.keep_alive > 0)
            .then(|| self.last_rx + Duration::from_millis(self.keep_alive as u64 * 1500))
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT 0: no will.
    Normal,
    /// Anything else: the will goes out. `Some(code)`: an MQTT 5 client is
    /// told why with a DISCONNECT first.
    Abnormal(Option<u8>),
}

pub(super) struct Session {
    bus: Arc<Bus>,
    client_id: String,
    number: u64,
    link: Link,
    subs: HashMap<String, Sub>,
    out: Outbound,
    /// QoS 2 messages received and not yet released by the client: held
    /// until PUBREL (`None`: already judged by the registry).
    unreleased: HashMap<u16, Option<Box<Publish>>>,
    /// Publishes put to the gate, verdicts to come (in order).
    pending: std::collections::VecDeque<Pending>,
    /// Acknowledgements waiting for the disk (in order, after `pending`'s
    /// in time: written before any of those).
    unsynced: std::collections::VecDeque<Unsynced>,
    /// Seconds the session outlives its connection.
    expiry: u32,
    conn: Option<Live>,
    /// A will waiting for its delay to pass, or the session to end.
    pending_will: Option<(Instant, Will)>,
    /// When the session ends while no client is connected.
    expires_at: Option<Instant>,
    /// The session holds state from an earlier connection (a resume gets
    /// session present).
    has_state: bool,
    /// The session is over: the task ends.
    over: bool,
    /// The address of the last client connected (for a record or
    /// heartbeat will without `host`).
    last_peer: Option<SocketAddr>,
    /// Who the last client connected is, as a record's owner.
    author: Author,
    /// Its authenticated user, for the ACL.
    user: Option<Arc<str>>,
    /// The token the publishes being handled hand to the subscribers they
    /// wake; let go when they are handled.
    after: Option<After>,
    /// The connection's writes wait for those subscribers' turns.
    hold: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Runs session `number` of `client_id`, serving the connections `rx`
/// brings, until it ends.
pub async fn run(
    bus: Arc<Bus>,
    client_id: String,
    number: u64,
    mut rx: mpsc::UnboundedReceiver<Box<Conn>>,
) {
    let link = bus.router.link();
    let mut s = Session {
        bus: bus.clone(),
        client_id: client_id.clone(),
        number,
        link,
        subs: HashMap::new(),
        out: Outbound::default(),
        unreleased: HashMap::new(),
        pending: Default::default(),
        unsynced: Default::default(),
        expiry: 0,
        conn: None,
        pending_will: None,
        expires_at: None,
        has_state: false,
        over: false,
        last_peer: None,
        author: Author::UNKNOWN,
        user: None,
        after: None,
        hold: None,
    };
    s.serve(&mut rx).await;
    if let Some((_, will)) = s.pending_will.take() {
        s.publish_will(will).await;
    }
    sessions::remove(&bus, &client_id, number, rx);
    debug!(client_id, "session ended");
}

enum Event {
    Attach(Option<Box<Conn>>),
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Forward(Box<Forwarded>),
    /// The keepalive timer fired (the deadline may have moved since).
    KeepaliveDue,
    WillDue,
    Expired,
    /// The subscribers the connection's writes waited for took their
    /// turns.
    Released,
    /// The journal wrote what the first acknowledgements waiting for it
    /// promise (or could not).
    Synced(Result<(), String>),
}

impl Session {
    /// The work of each event is boxed: held inline, it made every idle
    /// session's task 8.4 KB instead of 3.5 KB.
    async fn serve(&mut self, rx: &mut mpsc::UnboundedReceiver<Box<Conn>>) {
        while !self.over {
            self.pump();
            match self.next_event(rx).await {
                Event::Attach(Some(conn)) => Box::pin(self.attach(*conn)).await,
                Event::Attach(None) => self.over = true,
                Event::Read(Ok(n)) if n > 0 => {
                    if let Some(live) = &mut self.conn {
                        live.last_rx = Instant::now();
                    }
                    if let Err(end) = Box::pin(self.on_bytes()).await {
                        Box::pin(self.close(end)).await;
                    }
                }
                Event::Read(_) | Event::Wrote(Err(_)) => {
                    Box::pin(self.close(End::Abnormal(None))).await
                }
                Event::Wrote(Ok(n)) => {
                    if let Some(live) = &mut self.conn {
                        live.wbuf.advance(n);
                        if live.wbuf.is_empty() && live.wbuf.capacity() > 4 * WRITE_HIGH {
                            live.wbuf = BytesMut::new();
                        }
                    }
                }
                Event::Forward(f) => self.on_forward(*f),
                Event::KeepaliveDue => {
                    if let Some(live) = &mut self.conn
                        && let Some(deadline) = live.keepalive_deadline()
                        && deadline > Instant::now()
                        && let Some(timer) = &mut live.keepalive_timer
                    {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    debug!(client_id = %self.client_id, "keepalive timed out");
                    Box::pin(self.close(End::Abnormal(Some(reason::KEEP_ALIVE_TIMEOUT)))).await;
                }
                Event::WillDue => {
                    if let Some((_, will)) = self.pending_will.take() {
                        Box::pin(self.publish_will(will)).await;
                    }
                }
                Event::Expired => self.over = true,
                Event::Released => self.hold = None,
                Event::Synced(r) => self.on_synced(r),
            }
        }
    }

    /// Whether to take more messages from the router now: not while the
    /// client's queue is full or its connection has much unsent.
    fn wants_forwards(&self) -> bool {
        if self.out.queued() >= self.bus.limits.max_queued {
            return self.conn.is_none();
        }
        self.conn.as_ref().is_none_or(|c| c.wbuf.len() < WRITE_HIGH)
    }

    async fn next_event(&mut self, rx: &mut mpsc::UnboundedReceiver<Box<Conn>>) -> Event {
        // The publishes handled so far are handed on: the hold ends when
        // their subscribers have taken them.
        self.after = None;
        let held = self.hold.is_some();
        let pull = self.wants_forwards();
        // Publishers waiting for this session's turn go on.
        self.link.turn(pull);
        let will_at = self.pending_will.as_ref().map(|(t, _)| *t);
        let expires_at = self.expires_at.filter(|_| self.conn.is_none());
        let synced = self
            .unsynced
            .front()
            .map(|u| (self.bus.journal.clone(), u.seq));
        let (read, write, keepalive) = match &mut self.conn {
            Some(c) => (
                Some((&mut c.reader, &mut c.rbuf)),
                Some((&mut c.writer, &c.wbuf)),
                c.keepalive_timer.as_mut(),
            ),
            None => (None, None, None),
        };
        tokio::select! {
            c = rx.recv() => Event::Attach(c),
            r = read_some(read) => Event::Read(r),
            w = write_some(write), if !held => Event::Wrote(w),
            _ = released(&mut self.hold) => Event::Released,
            r = disk(synced) => Event::Synced(r),
            f = self.link.next(), if pull => Event::Forward(Box::new(f)),
            _ = fired(keepalive) => Event::KeepaliveDue,
            _ = sleep_at(will_at) => Event::WillDue,
            _ = sleep_at(expires_at) => Event::Expired,
        }
    }

    /// A connection for this session: takes over from the one it has,
    /// resumes or starts the session afresh, and answers CONNACK.
    async fn attach(&mut self, conn: Conn) {
        // Another user (or a user where there was none, or none where
        // there was one) gets no one else's session: neither its queued
        // messages nor its subscriptions, and the old will goes out.
        let stranger = self.has_state && self.user != conn.user;
        if stranger {
            debug!(client_id = %self.client_id, "client id taken by another user: a fresh session");
        }
        if let Some(old) = &mut self.conn {
            debug!(client_id = %self.client_id, peer = %conn.peer, "session taken over");
            // As Mosquitto: the old will goes out only when the old session
            // ends with it (a clean start, or a session without expiry).
            if !conn.connect.clean_start && self.expiry > 0 && !stranger {
                old.will = None;
            }
            self.close(End::Abnormal(Some(reason::SESSION_TAKEN_OVER)))
                .await;
        }
        let c = &conn.connect;
        let resume = !c.clean_start && self.has_state && !self.over && !stranger;
        if !resume {
            self.reset().await;
        } else if self.pending_will.take().is_some() {
            debug!(client_id = %self.client_id, "reconnected within the will delay; will dropped");
        }
        self.over = false;
        self.has_state = true;
        self.expires_at = None;
        self.expiry = match c.version {
            Version::V4 if c.clean_start => 0,
            Version::V4 => FOREVER,
            Version::V5 => c.props.session_expiry.unwrap_or(0),
        };
        let version = c.version;
        let props = connect::connack_properties(&self.bus, c, conn.assigned);
        let keep_alive = connect::granted_keepalive(self.bus.limits.max_keepalive, c);
        let receive_max = match version {
            Version::V4 => self.bus.limits.max_inflight,
            Version::V5 => c.props.receive_maximum.unwrap_or(u16::MAX),
        };
        let max_packet = c.props.max_packet_size.map_or(usize::MAX, |m| m as usize);
        let gauge = match version {
            Version::V4 => &self.bus.metrics.mqtt_v4,
            Version::V5 => &self.bus.metrics.mqtt_v5,
        };
        gauge.open.fetch_add(1, Ordering::Relaxed);
        gauge.total.fetch_add(1, Ordering::Relaxed);
        let mut live = Live {
            version,
            reader: conn.reader,
            writer: conn.writer,
            rbuf: conn.rbuf,
            wbuf: BytesMut::with_capacity(256),
            keep_alive,
            last_rx: Instant::now(),
            keepalive_timer: None,
            receive_max,
            max_packet,
            aliases: HashMap::new(),
            will: conn.connect.will,
            peer: conn.peer,
            _permit: conn.permit,
        };
        live.keepalive_timer = live.keepalive_deadline().map(|t| Box::pin(sleep_until(t)));
        self.last_peer = Some(conn.peer);
        self.author = conn.author.clone();
        self.user = conn.user.clone();
        codec::write_connack(&mut live.wbuf, version, resume, 0, &props);
        if resume {
            for out in self.out.resend() {
                match out {
                    outbound::Out::Publish(p) => codec::write_publish(&mut live.wbuf, version, &p),
                    outbound::Out::Release(pkid) => {
                        codec::write_ack(&mut live.wbuf, version, AckKind::PubRel, pkid, 0)
                    }
                }
            }
        }
        self.conn = Some(live);
        // Packets that came right behind the CONNECT.
        if let Err(end) = self.on_bytes().await {
            self.close(end).await;
        }
    }

    /// Discards the session's state: a clean start, or the end of a
    /// session whose connection is replaced.
    async fn reset(&mut self) {
        if let Some((_, will)) = self.pending_will.take() {
            self.publish_will(will).await;
        }
        // A new link: the old one's subscriptions end with it, and what it
        // still held for them goes too.
        self.subs.clear();
        self.link = self.bus.router.link();
        self.out = Outbound::default();
        self.unreleased.clear();
    }

    /// Ends the connection. The will goes out now, or after its delay
    /// while the session lives on; a session with no expiry ends.
    async fn close(&mut self, end: End) {
        // Publishes already put to the gate are acknowledged first.
        self.settle().await;
        self.after = None;
        self.hold = None;
        // The last write below may wait (up to a second for a client that
        // reads nothing): publishers do not wait for this session meanwhile.
        self.link.turn(false);
        let Some(mut live) = self.conn.take() else {
            return;
        };
        let gauge = match live.version {
            Version::V4 => &self.bus.metrics.mqtt_v4,
            Version::V5 => &self.bus.metrics.mqtt_v5,
        };
        gauge.open.fetch_sub(1, Ordering::Relaxed);
        if let End::Abnormal(Some(code)) = end
            && live.version == Version::V5
        {
            codec::write_disconnect(&mut live.wbuf, code, &Properties::default());
        }
        let wbuf = std::mem::take(&mut live.wbuf);
        let mut writer = live.writer;
        // Bounded: a client that reads nothing must not hold the session.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            writer.write_all(&wbuf).await?;
            writer.shutdown().await
        })
        .await;
        if let (End::Abnormal(_), Some(will)) = (end, live.will.take()) {
            let delay = will.props.will_delay.unwrap_or(0);
            if delay == 0 || self.expiry == 0 {
                self.publish_will(will).await;
            } else {
                let at = Instant::now() + Duration::from_secs(delay.min(self.expiry) as u64);
                self.pending_will = Some((at, will));
            }
        }
        match self.expiry {
            0 => self.over = true,
            FOREVER => {}
            secs => self.expires_at = Some(Instant::now() + Duration::from_secs(secs as u64)),
        }
    }

    /// Publishes a will the way its client would have published it.
    async fn publish_will(&mut self, will: Will) {
        self.bus.metrics.wills.fetch_add(1, Ordering::Relaxed);
        let mut props = will.props;
        props.will_delay = None;
        let p = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            pkid: 0,
            payload: will.payload,
            props,
        };
        if !self.may_write(&p.topic) {
            debug!(client_id = %self.client_id, topic = %p.topic, "will not published: the ACL denies its topic");
            return;
        }
        let code = self.route(&p, self.last_peer, true).await;
        debug!(client_id = %self.client_id, topic = %p.topic, code, "will published");
    }
}

async fn read_some(io: Option<(&mut Reader, &mut BytesMut)>) -> std::io::Result<usize> {
    match io {
        Some((r, buf)) => {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(if buf.capacity() >= 4096 {
                    32 * 1024
                } else {
                    4096
                });
            }
            r.read_buf(buf).await
        }
        None => std::future::pending().await,
    }
}

async fn write_some(io: Option<(&mut Writer, &BytesMut)>) -> std::io::Result<usize> {
    match io {
        Some((w, buf)) if !buf.is_empty() => w.write(buf).await,
        _ => std::future::pending().await,
    }
}

/// Resolves when the journal has append `seq` on disk (or cannot write it,
/// or does not answer in time); never without one to wait for.
async fn disk(wait: Option<(Option<crate::journal::Journal>, u64)>) -> Result<(), String> {
    match wait {
        Some((Some(j), seq)) if seq > 0 => j.synced_within(seq, crate::journal::PATIENCE).await,
        Some(_) => Ok(()),
        None => std::future::pending().await,
    }
}

async fn released(hold: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    match hold {
        Some(rx) => {
            let _ = rx.await;
        }
        None => std::future::pending().await,
    }
}

async fn fired(timer: Option<&mut Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn sleep_at(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}
