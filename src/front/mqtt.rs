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
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

use super::Shared;
use super::claim::{Claim, PooledId};
use super::packet::{self, Connect, Frame, Malformed};
use super::will::{WILL_TIMEOUT, close_upstream, fire_will};

/// How the client reached the front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    WebSocket,
}

/// How long the broker gets to answer a CONNECT, and a CONNECT may wait for
/// its turn (`CONNECTS_IN_FLIGHT`).
const CONNACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the front pings the broker for a client with keepalive 0.
const PING_EVERY: Duration = Duration::from_secs(3600);
/// How much the client-to-broker buffer makes room for before a read, once
/// a read filled what it had.
const BURST_ROOM: usize = 32 * 1024;
/// The topic aliases rumqttd announces in its CONNACK (Topic Alias Maximum).
const TOPIC_ALIAS_MAX: u16 = 4096;

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
/// embedded broker until either side closes; the CONNECT must be complete
/// within the handshake timeout.
pub async fn serve<S>(shared: Arc<Shared>, io: S, peer: SocketAddr, via: Via)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = Instant::now() + shared.handshake_timeout;
    serve_until(shared, io, peer, via, deadline).await;
}

/// `serve`, with the CONNECT due by `deadline` (the front's accept counts
/// the time it waited for the first byte).
pub(crate) async fn serve_until<S>(
    shared: Arc<Shared>,
    io: S,
    peer: SocketAddr,
    via: Via,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = BytesMut::with_capacity(1024);
    let read = read_connect(&mut rd, &mut buf, shared.max_packet);
    let connect = match timeout_at(deadline, read).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "bad CONNECT; closed");
            if let Some(refusal) = e.refusal {
                let _ = timeout(WILL_TIMEOUT, wr.write_all(&refusal)).await;
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
    let refuse = packet::connack_refusal(connect.v5(), 3, 0x88);
    let Ok(mut claim) = Claim::take(&shared, &id).await else {
        warn!(%peer, client_id = %id, "the session with this client id did not end; refused");
        let _ = timeout(WILL_TIMEOUT, wr.write_all(&refuse)).await;
        return;
    };
    // A clean session goes to the broker under a pooled id; the broker
    // keeps a persistent one under the client's own (escaped) id.
    let pooled = (!connect.persistent()).then(|| PooledId::take(&shared));
    let broker_id = match &pooled {
        Some(p) => p.broker_id().into(),
        None => packet::broker_client_id(&connect.client_id),
    };
    let Some(up) = open_upstream(&shared, &connect, &broker_id, &mut wr, peer).await else {
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
    let end = if claim.is_kicked() {
        // Taken over while waiting for the CONNACK.
        End::TakenOver
    } else {
        let up_rd = &mut up_rd;
        let up_wr = &mut up_wr;
        let rd = &mut rd;
        let wr = &mut wr;
        let to_broker = session.client_to_broker(rd, up_wr, &mut buf);
        let to_client = session.broker_to_client(up_rd, wr);
        tokio::select! {
            e = to_broker => e,
            e = to_client => e,
            _ = claim.kicked() => End::TakenOver,
        }
    };
    // Every step from here is bounded: a client that does not read cannot
    // hold its will, or a newcomer waiting for it, back.
    if end == End::TakenOver && connect.v5() {
        // DISCONNECT, reason 0x8E: session taken over.
        let _ = timeout(WILL_TIMEOUT, wr.write_all(&[0xE0, 1, 0x8E])).await;
    }
    let _ = timeout(WILL_TIMEOUT, wr.shutdown()).await;
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
    // `claim` (the client id) and `pooled` (the broker id) are given back
    // as they drop, now that the broker connection is closed.
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

type Upstream = (OwnedReadHalf, OwnedWriteHalf);

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
    id: &str,
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
        let _ = timeout(WILL_TIMEOUT, client.write_all(&refuse(3, 0x97))).await;
        return None;
    }
    let addr = if c.v5() { shared.v5 } else { shared.v4 };
    if id.len() > usize::from(u16::MAX) {
        // Identifier rejected.
        let _ = timeout(WILL_TIMEOUT, client.write_all(&refuse(2, 0x85))).await;
        return None;
    }
    let keep_alive = if c.keep_alive == 0 {
        u16::MAX
    } else {
        c.keep_alive
    };
    let hello = packet::encode_connect(c, id, keep_alive);
    let Ok(Ok(_permit)) = timeout(CONNACK_TIMEOUT, shared.connects.acquire()).await else {
        info!(%peer, client_id = %c.client_id, "too many CONNECTs waiting for the broker; refused");
        let _ = timeout(WILL_TIMEOUT, client.write_all(&refuse(3, 0x88))).await;
        return None;
    };
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            // Local (out of descriptors, typically), not the broker's fault.
            warn!(%peer, error = %e, "cannot connect to the embedded broker; refused");
            let _ = timeout(WILL_TIMEOUT, client.write_all(&refuse(3, 0x88))).await;
            return None;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let attempt = timeout(CONNACK_TIMEOUT, async {
        wr.write_all(&hello).await.ok()?;
        let mut ack = BytesMut::with_capacity(64);
        loop {
            if let Some(f) = packet::frame(&ack, 1 << 16).ok()? {
                return Some((ack, f));
            }
            if rd.read_buf(&mut ack).await.ok()? == 0 {
                return None;
            }
        }
    })
    .await;
    match attempt {
        Ok(Some((ack, f))) if f.kind() == packet::CONNACK => {
            shared.broker_health.answered();
            let accepted = ack.get(f.header_len + 1) == Some(&0);
            let relayed = timeout(WILL_TIMEOUT, client.write_all(&ack)).await;
            if !matches!(relayed, Ok(Ok(()))) || !accepted {
                close_upstream(&mut rd, &mut wr).await;
                return None;
            }
            Some((rd, wr))
        }
        Ok(_) => {
            shared.broker_health.unanswered();
            warn!(%peer, client_id = %c.client_id, "the broker closed the connection without CONNACK");
            let _ = timeout(WILL_TIMEOUT, client.write_all(&refuse(3, 0x88))).await;
            None
        }
        Err(_) => {
            shared.broker_health.unanswered();
            warn!(%peer, client_id = %c.client_id, "the broker sent no CONNACK in time");
            let _ = timeout(WILL_TIMEOUT, client.write_all(&refuse(3, 0x88))).await;
            close_upstream(&mut rd, &mut wr).await;
            None
        }
    }
}

/// What both directions of one session share. Both run in one task, so the
/// atomics and the lock are never contended; they are there because the
/// task must be `Send`.
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
        let mut room = 1024;
        loop {
            loop {
                let f = match packet::frame(buf, self.shared.max_packet) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %e, "client sent a malformed packet");
                        return self.flush_and_end(up, &mut out).await;
                    }
                };
                let mut pkt = buf.split_to(f.len);
                match f.kind() {
                    packet::PUBLISH => {
                        if let Err(e) = self.publish(&pkt, f, &mut out) {
                            debug!(error = %e, "client sent a malformed PUBLISH");
                            return self.flush_and_end(up, &mut out).await;
                        }
                        continue;
                    }
                    packet::SUBSCRIBE => {
                        let prefix = self.shared.topics.prefix();
                        let down = |filter: &str| packet::filter_reaches(filter, prefix);
                        if let Err(e) = packet::downgrade_subscribe(&mut pkt, f, self.v5, down) {
                            debug!(error = %e, "client sent a malformed SUBSCRIBE");
                            return self.flush_and_end(up, &mut out).await;
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
                    packet::CONNECT => return self.flush_and_end(up, &mut out).await,
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
            // Room for a whole burst in one read (and so one write on), once
            // the client has shown it sends bursts: an idle connection keeps
            // a small buffer.
            if buf.capacity() - buf.len() < room {
                buf.reserve(room);
            }
            let space = buf.capacity() - buf.len();
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
                Ok(n) if n >= space => room = BURST_ROOM,
                Ok(_) => {}
            }
        }
    }

    /// The client broke the protocol: what it sent before still goes to the
    /// broker, then the session ends (with the will).
    async fn flush_and_end<W: AsyncWrite + Unpin>(&self, up: &mut W, out: &mut BytesMut) -> End {
        let _ = up.write_all(out).await;
        End::ClientGone
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
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Err(Malformed::Bad("topic alias out of range"));
            }
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

impl Session<'_> {
    /// Forwards the broker's packets to the client, minus the PINGRESPs
    /// that answer the front's own pings (only a keepalive-0 session gets
    /// those; its stream is relayed packet by packet, the others' byte for
    /// byte). A client that takes longer than 1.5 x its keepalive (at least
    /// `WRITE_LIMIT`) to take a write is gone.
    async fn broker_to_client<R, W>(&self, up: &mut R, wr: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let limit = match self.keep_alive {
            0 => WRITE_LIMIT_NO_KEEPALIVE,
            ka => WRITE_LIMIT.max(Duration::from_millis(u64::from(ka) * 1500)),
        };
        let mut buf = BytesMut::with_capacity(8192);
        let mut out = BytesMut::new();
        loop {
            match up.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return End::BrokerGone,
                Ok(_) => {}
            }
            let chunk = if self.keep_alive == 0 {
                // Whole packets only, so a PINGRESP is never mistaken for
                // bytes in the middle of a packet.
                while let Ok(Some(f)) = packet::frame(&buf, usize::MAX) {
                    let pkt = buf.split_to(f.len);
                    let ours = f.kind() == packet::PINGRESP
                        && self
                            .own_pings
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok();
                    if !ours {
                        out.extend_from_slice(&pkt);
                    }
                }
                &mut out
            } else {
                &mut buf
            };
            match timeout(limit, wr.write_all(chunk)).await {
                Ok(Ok(())) => chunk.clear(),
                Ok(Err(_)) => return End::ClientGone,
                Err(_) => {
                    debug!("client stopped reading; dropped");
                    return End::ClientGone;
                }
            }
        }
    }
}

/// The least time a client gets to take a write, and the time a client
/// without keepalive gets.
const WRITE_LIMIT: Duration = Duration::from_secs(5);
const WRITE_LIMIT_NO_KEEPALIVE: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests;
