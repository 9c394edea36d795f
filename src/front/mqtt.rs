//! The MQTT proxy between one client and rumqttd, closing the broker's
//! defects on the way (shared/RUMQTT-NOTES.md):
//!
//! - keepalive 0 (refused by rumqttd) is sent on as 65535, and the front
//!   pings the broker for such a client; TCP keepalive finds a dead peer;
//! - client ids with `/ + # $` (refused by rumqttd) are percent-escaped,
//!   one-to-one;
//! - wills are kept here, not in the broker (which fires the *new*
//!   connection's will on a takeover): a session that ends without
//!   DISCONNECT publishes its will through its own broker connection
//!   before that closes, and a newcomer with the same client id waits until
//!   the old session's will is out;
//! - SUBSCRIBE filters that reach registry topics ask for QoS 0 (rumqttd
//!   delivers at most ~100 retained messages at QoS 1/2);
//! - properties of v5 PUBLISH packets are dropped (rumqttd panics the
//!   connection of every v3.1.1 subscriber such a publish reaches);
//! - registry records and heartbeats without `host` get the client's
//!   address (the protocol's "the server can see the publisher's address").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::Shared;
use super::packet::{self, Connect, Frame, Malformed};

/// How the client reached the front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    WebSocket,
}

/// A live session's handle, for takeovers by the same client id.
pub(crate) struct SessionSlot {
    generation: u64,
    kick: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How long the broker gets to answer a CONNECT.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the front pings the broker for a client with keepalive 0.
const PING_EVERY: Duration = Duration::from_secs(3600);
/// How long a session's will and DISCONNECT may take to reach the broker.
const WILL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client: no will.
    Bye,
    /// The client went away without DISCONNECT, or broke the protocol.
    ClientGone,
    /// The broker closed the connection (keepalive timeout, say).
    BrokerGone,
    /// Another connection took the client id over.
    TakenOver,
}

/// Proxies one MQTT client connection (its CONNECT not yet read) to the
/// embedded broker until either side closes.
pub async fn serve<S>(shared: Arc<Shared>, io: S, peer: SocketAddr, via: Via)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = BytesMut::with_capacity(1024);
    let connect = match timeout(
        shared.handshake_timeout,
        read_connect(&mut rd, &mut buf, shared.max_packet),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "bad CONNECT; closed");
            if let Some(refusal) = e.refusal {
                let _ = wr.write_all(&refusal).await;
            }
            return;
        }
        Err(_) => {
            shared.metrics.silent.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "no complete CONNECT in time; closed");
            return;
        }
    };
    let _open = if connect.v5() {
        shared.metrics.mqtt_v5.enter()
    } else {
        shared.metrics.mqtt_v4.enter()
    };
    let id = connect.client_id.clone();
    let mut claim = Claim::take(&shared, &id).await;
    let Some(up) = open_upstream(&shared, &connect, &mut wr, peer).await else {
        claim.release(&shared);
        return;
    };
    let (mut up_rd, mut up_wr) = up;
    let session = Session {
        shared: &shared,
        v5: connect.v5(),
        host: peer.ip().to_canonical().to_string(),
        own_pings: AtomicU32::new(0),
        keep_alive: connect.keep_alive,
        aliases: Mutex::new(HashMap::new()),
    };
    debug!(%peer, client_id = %id, v5 = connect.v5(), ?via, "MQTT session open");
    let end = {
        let up_rd = &mut up_rd;
        let up_wr = &mut up_wr;
        let rd = &mut rd;
        let wr = &mut wr;
        let to_broker = session.client_to_broker(rd, up_wr, &mut buf);
        let to_client = session_to_client(&session, up_rd, wr);
        tokio::select! {
            e = to_broker => e,
            e = to_client => e,
            _ = claim.kicked() => End::TakenOver,
        }
    };
    if end == End::TakenOver && connect.v5() {
        // DISCONNECT, reason 0x8E: session taken over.
        let _ = wr.write_all(&[0xE0, 1, 0x8E]).await;
    }
    let _ = wr.shutdown().await;
    drop(wr);
    drop(rd);
    if end != End::Bye
        && let Some(will) = &connect.will
    {
        let upstream = (end != End::BrokerGone).then_some((&mut up_rd, &mut up_wr));
        fire_will(&shared, will, connect.v5(), upstream).await;
        info!(%peer, client_id = %id, topic = %will.topic, ?end, "will published");
    } else {
        close_upstream(&mut up_rd, &mut up_wr).await;
    }
    debug!(%peer, client_id = %id, ?end, "MQTT session closed");
    claim.release(&shared);
}

/// A CONNECT that could not be read, and the CONNACK to answer it with.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
struct ConnectError {
    error: String,
    refusal: Option<Vec<u8>>,
}

async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Connect, ConnectError> {
    let bad = |e: Malformed| {
        let refusal = matches!(&e, Malformed::Bad("unsupported protocol level"))
            .then(|| packet::connack_refusal(false, 1, 0x84));
        ConnectError {
            error: e.to_string(),
            refusal,
        }
    };
    loop {
        if let Some(f) = packet::frame(buf, max).map_err(bad)? {
            let c = packet::parse_connect(&buf[..f.len], f).map_err(bad)?;
            let _ = buf.split_to(f.len);
            return Ok(c);
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => {
                return Err(ConnectError {
                    error: "closed before CONNECT was complete".into(),
                    refusal: None,
                });
            }
            Ok(_) => {}
        }
    }
}

type Upstream = (ReadHalf<TcpStream>, WriteHalf<TcpStream>);

/// Opens the broker connection and relays its CONNACK to the client.
///
/// One attempt: a second connection with the same client id while the first
/// is still being set up is a takeover before the first CONNACK, which can
/// leave rumqttd's will table with a dead entry and poison its listener
/// (every later CONNECT panics in rumqttd). At most `CONNECTS_IN_FLIGHT`
/// CONNECTs wait for their CONNACK at once: rumqttd accepts slowly, and a
/// storm that overflows its 128-connection accept queue leaves clients
/// waiting seconds on SYN retransmits; queued here instead, they go through
/// in order.
async fn open_upstream<W: AsyncWrite + Unpin>(
    shared: &Shared,
    c: &Connect,
    client: &mut W,
    peer: SocketAddr,
) -> Option<Upstream> {
    let refuse = |v4: u8, v5: u8| packet::connack_refusal(c.v5(), v4, v5);
    let sessions = shared.metrics.mqtt_v4.open.load(Ordering::Relaxed)
        + shared.metrics.mqtt_v5.open.load(Ordering::Relaxed);
    if sessions > shared.max_sessions as u64 {
        // rumqttd's own limit fails the link after the CONNECT, which also
        // poisons its listener: refuse here (server unavailable / quota
        // exceeded).
        info!(%peer, client_id = %c.client_id, sessions, "too many MQTT connections; refused");
        let _ = client.write_all(&refuse(3, 0x97)).await;
        return None;
    }
    let addr = if c.v5() { shared.v5 } else { shared.v4 };
    let id = packet::broker_client_id(&c.client_id);
    if id.len() > usize::from(u16::MAX) {
        // Identifier rejected.
        let _ = client.write_all(&refuse(2, 0x85)).await;
        return None;
    }
    let keep_alive = if c.keep_alive == 0 {
        u16::MAX
    } else {
        c.keep_alive
    };
    let hello = packet::encode_connect(c, &id, keep_alive);
    let _permit = shared.connects.acquire().await.ok()?;
    let attempt = timeout(CONNACK_TIMEOUT, async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = tokio::io::split(stream);
        wr.write_all(&hello).await.ok()?;
        let mut ack = BytesMut::with_capacity(64);
        loop {
            if let Some(f) = packet::frame(&ack, 1 << 16).ok()? {
                return Some((rd, wr, ack, f));
            }
            if rd.read_buf(&mut ack).await.ok()? == 0 {
                return None;
            }
        }
    })
    .await;
    match attempt {
        Ok(Some((rd, wr, ack, f))) if f.kind() == packet::CONNACK => {
            shared.broker_health.answered();
            let accepted = ack.get(f.header_len + 1) == Some(&0);
            if client.write_all(&ack).await.is_err() || !accepted {
                return None;
            }
            Some((rd, wr))
        }
        Ok(_) => {
            shared.broker_health.unanswered();
            warn!(%peer, client_id = %c.client_id, "the broker closed the connection without CONNACK");
            let _ = client.write_all(&refuse(3, 0x88)).await;
            None
        }
        Err(_) => {
            shared.broker_health.unanswered();
            warn!(%peer, client_id = %c.client_id, "the broker sent no CONNACK in time");
            let _ = client.write_all(&refuse(3, 0x88)).await;
            None
        }
    }
}

/// What both directions of one session share (one task: the atomics and
/// the lock are never contended).
struct Session<'a> {
    shared: &'a Shared,
    v5: bool,
    /// The client's address, for records without `host`.
    host: String,
    /// PINGREQs the front sent for the client; their PINGRESPs are not
    /// forwarded.
    own_pings: AtomicU32,
    /// The client's keepalive (seconds; 0: none).
    keep_alive: u16,
    /// v5 topic aliases the client set (the front drops the property, so
    /// it resolves them).
    aliases: Mutex<HashMap<u16, String>>,
}

impl Session<'_> {
    async fn client_to_broker<R, W>(&self, rd: &mut R, up: &mut W, buf: &mut BytesMut) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::with_capacity(4096);
        loop {
            loop {
                let f = match packet::frame(buf, self.shared.max_packet) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %e, "client sent a malformed packet");
                        return End::ClientGone;
                    }
                };
                let mut pkt = buf.split_to(f.len);
                match f.kind() {
                    packet::PUBLISH => {
                        if let Err(e) = self.publish(&pkt, f, &mut out) {
                            debug!(error = %e, "client sent a malformed PUBLISH");
                            return End::ClientGone;
                        }
                        continue;
                    }
                    packet::SUBSCRIBE => {
                        let prefix = self.shared.topics.prefix();
                        let down = |filter: &str| packet::filter_reaches(filter, prefix);
                        if let Err(e) = packet::downgrade_subscribe(&mut pkt, f, self.v5, down) {
                            debug!(error = %e, "client sent a malformed SUBSCRIBE");
                            return End::ClientGone;
                        }
                    }
                    packet::DISCONNECT => {
                        // Not forwarded: the broker connection is closed
                        // instead (see `close_upstream`).
                        let _ = up.write_all(&out).await;
                        // v5 reason 0x04: disconnect with will message.
                        if self.v5 && packet::disconnect_reason(&pkt, f) == 0x04 {
                            return End::ClientGone;
                        }
                        return End::Bye;
                    }
                    packet::CONNECT => return End::ClientGone,
                    _ => {}
                }
                out.extend_from_slice(&pkt);
            }
            if !out.is_empty() {
                if up.write_all(&out).await.is_err() {
                    return End::BrokerGone;
                }
                out.clear();
            }
            let read = if self.keep_alive == 0 {
                match timeout(PING_EVERY, rd.read_buf(buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.own_pings.fetch_add(1, Ordering::Relaxed);
                        if up.write_all(&packet::PING).await.is_err() {
                            return End::BrokerGone;
                        }
                        continue;
                    }
                }
            } else {
                // MQTT: a client silent for 1.5 x keepalive is gone. rumqttd
                // restarts its timer whenever it writes to the client, so a
                // dead subscriber of a busy topic would never be dropped.
                let limit = Duration::from_millis(u64::from(self.keep_alive) * 1500);
                match timeout(limit, rd.read_buf(buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        debug!("client silent past 1.5 x keepalive");
                        return End::ClientGone;
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => return End::ClientGone,
                Ok(_) => {}
            }
        }
    }

    /// Appends the PUBLISH to `out`, rewritten where the broker or the
    /// registry needs it.
    fn publish(&self, pkt: &[u8], f: Frame, out: &mut BytesMut) -> Result<(), Malformed> {
        let p = packet::parse_publish(pkt, f, self.v5)?;
        let mut aliased = None;
        if self.v5
            && !p.properties.is_empty()
            && let Some(alias) = p.topic_alias()
        {
            let mut aliases = self.aliases.lock().unwrap();
            if p.topic.is_empty() {
                let t = aliases
                    .get(&alias)
                    .ok_or(Malformed::Bad("unknown topic alias"))?;
                aliased = Some(t.clone());
            } else {
                aliases.insert(alias, p.topic.to_string());
            }
        }
        let topic = aliased.as_deref().unwrap_or(p.topic);
        let completed = (!p.payload.is_empty() && self.is_registry_input(topic))
            .then(|| packet::with_host(p.payload, &self.host))
            .flatten();
        if completed.is_none() && p.properties.is_empty() {
            out.extend_from_slice(pkt);
            return Ok(());
        }
        let payload = completed.as_deref().unwrap_or(p.payload);
        packet::encode_publish(out, &p, topic, payload, self.v5);
        Ok(())
    }

    fn is_registry_input(&self, topic: &str) -> bool {
        let t = &self.shared.topics;
        topic
            .strip_prefix(t.prefix())
            .is_some_and(|rest| rest.starts_with("/services/") || rest.starts_with("/heartbeat/"))
    }
}

/// Forwards the broker's packets to the client, minus the PINGRESPs that
/// answer the front's own pings.
async fn session_to_client<R, W>(s: &Session<'_>, up: &mut R, wr: &mut W) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8192);
    loop {
        match up.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return End::BrokerGone,
            Ok(_) => {}
        }
        if s.keep_alive == 0 && s.own_pings.load(Ordering::Relaxed) > 0 {
            // Rare (hourly): drop the PINGRESPs that answer our pings.
            let mut kept = BytesMut::with_capacity(buf.len());
            while let Ok(Some(f)) = packet::frame(&buf, usize::MAX) {
                let pkt = buf.split_to(f.len);
                if f.kind() == packet::PINGRESP && s.own_pings.load(Ordering::Relaxed) > 0 {
                    s.own_pings.fetch_sub(1, Ordering::Relaxed);
                } else {
                    kept.extend_from_slice(&pkt);
                }
            }
            kept.extend_from_slice(&buf);
            buf = kept;
        }
        if wr.write_all(&buf).await.is_err() {
            return End::ClientGone;
        }
        buf.clear();
    }
}

/// Publishes a will: through the session's own broker connection while it
/// is open (the broker then handles it before that connection's close, and
/// so before a newcomer with the same client id), else through a fresh one.
async fn fire_will(
    shared: &Shared,
    will: &packet::Will,
    v5: bool,
    upstream: Option<(&mut ReadHalf<TcpStream>, &mut WriteHalf<TcpStream>)>,
) {
    if let Some((rd, wr)) = upstream
        && wr.write_all(&packet::will_publish(will, v5)).await.is_ok()
    {
        close_upstream(rd, wr).await;
        return;
    }
    // A fresh v4 connection with a one-off client id.
    let n = GENERATION.fetch_add(1, Ordering::Relaxed);
    let id = format!("homicro-front-will-{}-{n}", std::process::id());
    let hello = {
        let mut h = BytesMut::new();
        let len = 10 + 2 + id.len();
        h.extend_from_slice(&[
            0x10, len as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60,
        ]);
        h.extend_from_slice(&(id.len() as u16).to_be_bytes());
        h.extend_from_slice(id.as_bytes());
        h
    };
    let result = timeout(WILL_TIMEOUT, async {
        let stream = TcpStream::connect(shared.v4).await?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = tokio::io::split(stream);
        wr.write_all(&hello).await?;
        let mut ack = [0u8; 4];
        rd.read_exact(&mut ack).await?;
        wr.write_all(&packet::will_publish(will, false)).await?;
        close_upstream(&mut rd, &mut wr).await;
        Ok::<(), std::io::Error>(())
    })
    .await;
    if !matches!(result, Ok(Ok(()))) {
        warn!(topic = %will.topic, "will not published: the broker did not answer");
    }
}

/// Ends a broker connection: FIN, then wait (briefly) until the broker has
/// closed its side, so that what was written before is handled before a
/// newcomer with the same client id connects.
///
/// Never with a DISCONNECT packet: rumqttd then handles the disconnect
/// twice (once for the packet, once when its link ends), and the second
/// one, arriving after the connection's id was reused by a new client,
/// drops that new client, often before its CONNACK (seen as "no-connection
/// id N is already gone" in rumqttd's log, and as CONNECTs that are never
/// answered under a storm of short connections).
async fn close_upstream<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(rd: &mut R, wr: &mut W) {
    let _ = wr.shutdown().await;
    drain_until_closed(rd).await;
}

async fn drain_until_closed<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut sink = [0u8; 1024];
    let _ = timeout(WILL_TIMEOUT, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
}

/// A session's hold on its client id.
struct Claim {
    id: String,
    generation: u64,
    kick: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Claim {
    /// Takes the client id over: asks a live session with the same id to
    /// end, and waits (briefly) until it has, its will published.
    async fn take(shared: &Shared, id: &str) -> Claim {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let (kick_tx, kick_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        if id.is_empty() {
            // The broker assigns an id: nothing to take over.
            return Claim {
                id: String::new(),
                generation,
                kick: Some(kick_rx),
                done: Some(done_tx),
            };
        }
        let previous = shared.sessions.lock().unwrap().insert(
            id.to_string(),
            SessionSlot {
                generation,
                kick: kick_tx,
                done: done_rx,
            },
        );
        if let Some(prev) = previous {
            let _ = prev.kick.send(());
            if timeout(Duration::from_secs(5), prev.done).await.is_err() {
                info!(client_id = id, "previous session slow to close; going on");
            }
        }
        Claim {
            id: id.to_string(),
            generation,
            kick: Some(kick_rx),
            done: Some(done_tx),
        }
    }

    /// Resolves when another connection takes the id over.
    async fn kicked(&mut self) {
        if let Some(rx) = self.kick.as_mut()
            && rx.await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await
    }

    fn release(mut self, shared: &Shared) {
        if !self.id.is_empty() {
            let mut sessions = shared.sessions.lock().unwrap();
            if sessions
                .get(&self.id)
                .is_some_and(|s| s.generation == self.generation)
            {
                sessions.remove(&self.id);
            }
        }
        drop(self.done.take());
    }
}
