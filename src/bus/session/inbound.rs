//! What a session does with its client's packets: PUBLISH (topic aliases,
//! Receive Maximum, QoS 1 and 2 flows, the registry's gate), SUBSCRIBE and
//! UNSUBSCRIBE (on the router link), acknowledgements, PINGREQ and
//! DISCONNECT.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tracing::debug;

use super::{Ack, End, MAX_PENDING, Pending, Session, Sub, Unsynced, Verdict};
use crate::auth::Access;
use crate::bus::codec::{self, AckKind, Packet, Publish, Subscription, Version, reason};
use crate::bus::gate::{self, Gated};
use crate::bus::router::{After, Message};
use crate::topics::Incoming;

impl Session {
    /// Handles every complete packet in the read buffer. `Err` ends the
    /// connection.
    pub(super) async fn on_bytes(&mut self) -> Result<(), End> {
        loop {
            let Some(live) = &mut self.conn else {
                return Ok(());
            };
            let version = live.version;
            let len = match codec::frame(&live.rbuf, self.bus.limits.max_packet) {
                Ok(Some(len)) => len,
                Ok(None) => {
                    self.settle_later().await;
                    return Ok(());
                }
                Err(e) => return Err(self.malformed(e)),
            };
            let bytes = live.rbuf.split_to(len).freeze();
            let packet = match codec::read(bytes, version) {
                Ok(p) => p,
                Err(e) => return Err(self.malformed(e)),
            };
            self.on_packet(packet).await?;
        }
    }

    fn malformed(&self, e: codec::Error) -> End {
        debug!(client_id = %self.client_id, error = %e, "bad packet; connection closed");
        End::Abnormal(Some(e.reason()))
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        // Verdicts still to come are answered before anything else is,
        // but for publishes whose own answers queue behind them (a client's
        // retained messages in a row share a sync, as its records do).
        let queued = match &packet {
            Packet::Publish(p) => self.pipelined(p) || (p.qos == 1 && self.journaled(p)),
            _ => false,
        };
        if !queued {
            self.settle().await;
        }
        match packet {
            Packet::Publish(p) => self.on_publish(p).await?,
            Packet::Ack { kind, pkid, reason } => self.on_ack(kind, pkid, reason).await,
            Packet::Subscribe {
                pkid,
                id,
                subscriptions,
            } => self.on_subscribe(pkid, id, subscriptions).await,
            Packet::Unsubscribe { pkid, filters } => self.on_unsubscribe(pkid, filters).await,
            Packet::PingReq => {
                if let Some(live) = &mut self.conn {
                    codec::write_pingresp(&mut live.wbuf);
                }
            }
            Packet::Disconnect {
                reason: code,
                props,
            } => {
                if let Some(e) = props.session_expiry {
                    if self.expiry == 0 && e != 0 {
                        return Err(End::Abnormal(Some(reason::PROTOCOL_ERROR)));
                    }
                    self.expiry = e;
                }
                self.close(if code == reason::DISCONNECT_WITH_WILL {
                    End::Abnormal(None)
                } else {
                    End::Normal
                })
                .await;
            }
            Packet::Auth | Packet::Connect => {
                return Err(End::Abnormal(Some(reason::PROTOCOL_ERROR)));
            }
        }
        Ok(())
    }

    async fn on_ack(&mut self, kind: AckKind, pkid: u16, code: u8) {
        if kind == AckKind::PubRel {
            let code = match self.unreleased.remove(&pkid) {
                // Released: now it goes on, as Mosquitto does it.
                Some(Some(p)) => {
                    self.publish(&p);
                    0
                }
                Some(None) => 0,
                None => reason::PACKET_ID_NOT_FOUND,
            };
            if let Some(live) = &mut self.conn {
                codec::write_ack(&mut live.wbuf, live.version, AckKind::PubComp, pkid, code);
            }
            return;
        }
        let Some(live) = &mut self.conn else {
            return;
        };
        if let Some(rel) = self.out.on_ack(kind, pkid, code) {
            codec::write_ack(&mut live.wbuf, live.version, AckKind::PubRel, rel, 0);
        }
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), End> {
        let Some(live) = &mut self.conn else {
            return Ok(());
        };
        if p.payload.len() > self.bus.limits.max_payload {
            return Err(End::Abnormal(Some(reason::PACKET_TOO_LARGE)));
        }
        if let Some(alias) = p.props.topic_alias.take() {
            if alias == 0 {
                // Mosquitto takes alias 0 for a malformed packet.
                return Err(End::Abnormal(Some(reason::MALFORMED)));
            }
            if alias > self.bus.limits.topic_alias_max {
                return Err(End::Abnormal(Some(reason::TOPIC_ALIAS_INVALID)));
            }
            if p.topic.is_empty() {
                match live.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(End::Abnormal(Some(reason::PROTOCOL_ERROR))),
                }
            } else {
                live.aliases.insert(alias, p.topic.clone());
            }
        }
        if p.qos == 2 {
            if self.unreleased.contains_key(&p.pkid) {
                // A resent QoS 2 message already taken: acknowledge again.
                codec::write_ack(&mut live.wbuf, live.version, AckKind::PubRec, p.pkid, 0);
                return Ok(());
            }
            if self.unreleased.len() >= self.bus.limits.receive_maximum as usize {
                return Err(End::Abnormal(Some(reason::RECEIVE_MAXIMUM_EXCEEDED)));
            }
        }
        let peer = live.peer;
        if !self.may_write(&p.topic) {
            return self.denied(&p).await;
        }
        if self.pipelined(&p) {
            return self.submit(&p, peer).await;
        }
        // QoS 2 goes on when the client releases it (PUBREL), as in
        // Mosquitto; what the registry judges is judged now, so that PUBREC
        // carries the verdict, and a retained message is stored now, so
        // that PUBREC can wait for the journal.
        let journaled = self.journaled(&p);
        let held = p.qos == 2 && !self.judged_at_once(&p.topic) && !journaled;
        let code = if p.props.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err()
        {
            reason::PAYLOAD_FORMAT_INVALID
        } else if held {
            reason::SUCCESS
        } else {
            self.route(&p, Some(peer), false).await
        };
        if journaled && p.qos > 0 {
            // Acknowledged once it is on disk (see `settle`).
            self.pending.push_back(Pending {
                verdict: Verdict::Known(code),
                qos: p.qos,
                pkid: p.pkid,
                durable: true,
            });
            if self.pending.len() >= MAX_PENDING {
                self.settle().await;
            }
            return Ok(());
        }
        let Some(live) = &mut self.conn else {
            return Ok(());
        };
        // A 3.1.1 client has no way to hear of a refusal but the registry's
        // error message: its publish is acknowledged as usual.
        let code = if live.version == Version::V4 { 0 } else { code };
        match p.qos {
            1 => codec::write_ack(&mut live.wbuf, live.version, AckKind::PubAck, p.pkid, code),
            2 => {
                let pkid = p.pkid;
                if code < 0x80 {
                    self.unreleased.insert(pkid, held.then(|| Box::new(p)));
                }
                codec::write_ack(&mut live.wbuf, live.version, AckKind::PubRec, pkid, code);
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the ACL lets this client publish to `topic`. A heartbeat
    /// for NAME is a write to NAME's record.
    pub(super) fn may_write(&self, topic: &str) -> bool {
        let auth = &self.bus.auth;
        if !auth.has_acl() || self.bus.topics.is_sync(topic) {
            return true;
        }
        let topic = match self.bus.topics.classify(topic) {
            Incoming::Heartbeat(raw) => std::borrow::Cow::Owned(self.bus.topics.service(raw)),
            _ => std::borrow::Cow::Borrowed(topic),
        };
        auth.allows(self.user.as_deref(), &self.client_id, &topic, Access::Write)
    }

    /// A publish the ACL denies: dropped; MQTT 5 hears 0x87 in its
    /// acknowledgement, 3.1.1 a plain one (as Mosquitto does).
    async fn denied(&mut self, p: &Publish) -> Result<(), End> {
        self.bus
            .metrics
            .refused_publishes
            .fetch_add(1, Ordering::Relaxed);
        debug!(client_id = %self.client_id, topic = %p.topic, "publish denied by the ACL");
        // Acknowledgements go out in order: those waiting for the gate first.
        self.settle().await;
        let Some(live) = &mut self.conn else {
            return Ok(());
        };
        let code = match live.version {
            Version::V4 => reason::SUCCESS,
            Version::V5 => reason::NOT_AUTHORIZED,
        };
        match p.qos {
            1 => codec::write_ack(&mut live.wbuf, live.version, AckKind::PubAck, p.pkid, code),
            2 => codec::write_ack(&mut live.wbuf, live.version, AckKind::PubRec, p.pkid, code),
            _ => {}
        }
        Ok(())
    }

    /// Whether `p` is a QoS 0 or 1 record or heartbeat, put to the gate
    /// without waiting for its verdict: a client that sends many in a row
    /// has them judged in one go (the acknowledgements follow, in order,
    /// before the session answers any other packet).
    fn pipelined(&self, p: &Publish) -> bool {
        p.qos < 2
            && self.bus.gate.is_some()
            && p.props.payload_format != Some(1)
            && matches!(
                self.bus.topics.classify(&p.topic),
                Incoming::Service(_) | Incoming::Heartbeat(_)
            )
    }

    /// Whether this session's will would clear NAME's record (an empty
    /// publish on its `services/NAME`): then what it writes of NAME is
    /// guarded by that will (see [`gate::Submission::guards`]).
    fn guards(&self, raw: &str) -> bool {
        let Some(will) = self.conn.as_ref().and_then(|c| c.will.as_ref()) else {
            return false;
        };
        will.payload.is_empty()
            && matches!(self.bus.topics.classify(&will.topic), Incoming::Service(r) if r == raw)
    }

    /// Puts `p` (see [`Self::pipelined`]) to the gate; its verdict is
    /// awaited by [`Self::settle`].
    async fn submit(&mut self, p: &Publish, peer: SocketAddr) -> Result<(), End> {
        let after = self.after_token(p.qos);
        let (Some(registry), kind) = (&self.bus.gate, self.bus.topics.classify(&p.topic)) else {
            return Ok(());
        };
        let (kind, raw) = match kind {
            Incoming::Service(raw) => (gate::Kind::Record, raw),
            Incoming::Heartbeat(raw) => (gate::Kind::Heartbeat, raw),
            _ => return Ok(()),
        };
        let mut submission =
            gate::Submission::new(kind, raw, p, Some(peer), self.author.clone(), self.number);
        submission.after = after;
        submission.guards = self.guards(raw);
        let verdict = registry.gate_later(submission).ok();
        self.pending.push_back(Pending {
            verdict: Verdict::Gate(verdict),
            qos: p.qos,
            pkid: p.pkid,
            // QoS 0 is best effort: nothing waits for it.
            durable: kind == gate::Kind::Record && p.qos > 0 && self.bus.journal.is_some(),
        });
        if self.pending.len() >= MAX_PENDING {
            self.settle().await;
        }
        Ok(())
    }

    /// The verdicts of the publishes put to the gate, in order, as
    /// acknowledgements; whether any waits for the journal.
    async fn resolve(&mut self) -> (Vec<Ack>, bool) {
        let mut acks = Vec::with_capacity(self.pending.len());
        let mut wait = false;
        while let Some(Pending {
            verdict,
            qos,
            pkid,
            durable,
        }) = self.pending.pop_front()
        {
            let code = match verdict {
                Verdict::Gate(Some(rx)) => {
                    let v = rx.await.ok();
                    self.code_for(v)
                }
                Verdict::Gate(None) => self.code_for(None),
                Verdict::Known(code) => code,
            };
            wait |= durable && code < 0x80;
            if qos > 0 {
                acks.push(Ack {
                    qos,
                    pkid,
                    durable,
                    code,
                });
            }
        }
        (acks, wait)
    }

    /// Decides the acknowledgements of the publishes handled so far; those
    /// that promise a change on disk are written once the journal has it
    /// (`Event::Synced`), while the session goes on reading: a client's
    /// publishes that arrive meanwhile share the next sync.
    async fn settle_later(&mut self) {
        let (acks, wait) = self.resolve().await;
        if acks.is_empty() {
            return;
        }
        if !wait && self.unsynced.is_empty() {
            return self.write_acks(acks, &Ok(()));
        }
        // Appended before their verdicts came: whatever is last now
        // includes them.
        let seq = match (&self.bus.journal, wait) {
            (Some(j), true) => j.appended(),
            _ => 0,
        };
        self.unsynced.push_back(Unsynced { seq, acks });
        let waiting: usize = self.unsynced.iter().map(|u| u.acks.len()).sum();
        if waiting >= MAX_PENDING {
            self.wait_unsynced().await;
        }
    }

    /// Acknowledges everything handled so far, in order, waiting for the
    /// journal where a success promises a change on disk: before any other
    /// packet is answered.
    pub(super) async fn settle(&mut self) {
        self.settle_later().await;
        self.wait_unsynced().await;
    }

    /// Waits for the journal for every acknowledgement waiting, and writes
    /// them.
    async fn wait_unsynced(&mut self) {
        while let Some(u) = self.unsynced.front() {
            let journal = self.bus.journal.clone().filter(|_| u.seq > 0);
            let seq = u.seq;
            let r = match journal {
                Some(j) => j.synced_within(seq, crate::journal::PATIENCE).await,
                None => Ok(()),
            };
            self.on_synced(r);
        }
    }

    /// The journal answered for the first acknowledgements waiting: they
    /// are written, and those behind them that wait for nothing more.
    pub(super) fn on_synced(&mut self, r: Result<(), String>) {
        let Some(u) = self.unsynced.pop_front() else {
            return;
        };
        self.write_acks(u.acks, &r);
        while let Some(next) = self.unsynced.front() {
            let done = next.seq == 0
                || self
                    .bus
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.status().upto >= next.seq);
            if !done {
                break;
            }
            let next = self.unsynced.pop_front().expect("looked at");
            self.write_acks(next.acks, &Ok(()));
        }
    }

    /// Writes acknowledgements; `synced` says whether the journal has what
    /// the durable ones promise. A change the journal could not write is
    /// not acknowledged as a success: MQTT 5 hears 0x80, and a 3.1.1 client
    /// hears nothing (it sends the publish again when it reconnects).
    fn write_acks(&mut self, acks: Vec<Ack>, synced: &Result<(), String>) {
        if let Err(e) = synced {
            debug!(client_id = %self.client_id, error = %e, "not acknowledged: not on disk");
        }
        for Ack {
            qos,
            pkid,
            durable,
            code,
        } in acks
        {
            // Not on disk, or not applied at all (the registry has
            // stopped): never acknowledged as a success.
            let lost =
                (durable && code < 0x80 && synced.is_err()) || code == reason::SERVER_UNAVAILABLE;
            let Some(live) = &mut self.conn else {
                continue;
            };
            let code = match (live.version, lost) {
                (Version::V4, true) => continue,
                (Version::V5, true) if code < 0x80 => reason::UNSPECIFIED,
                (Version::V5, true) => code,
                // 3.1.1 hears of a refusal only on PREFIX/errors/NAME.
                (Version::V4, false) => 0,
                (Version::V5, false) => code,
            };
            let kind = if qos == 2 {
                if code < 0x80 {
                    self.unreleased.insert(pkid, None);
                }
                AckKind::PubRec
            } else {
                AckKind::PubAck
            };
            codec::write_ack(&mut live.wbuf, live.version, kind, pkid, code);
        }
    }

    /// Whether a publish changes what the journal keeps: a record, or a
    /// retained message on a topic of the bus's own.
    fn journaled(&self, p: &Publish) -> bool {
        if self.bus.journal.is_none() {
            return false;
        }
        if self.bus.gate.is_none() {
            // No registry: every retained message is the bus's.
            return p.retain;
        }
        match self.bus.topics.classify(&p.topic) {
            Incoming::Service(_) => true,
            Incoming::Other => {
                p.retain
                    && !gate::reserved(&self.bus.topics, &p.topic)
                    && self.bus.topics.hub(&p.topic).is_none()
            }
            _ => false,
        }
    }

    /// The reason code for a verdict (`None`: the registry has stopped).
    fn code_for(&self, verdict: Option<Gated>) -> u8 {
        match verdict {
            Some(Gated::Accepted) => reason::SUCCESS,
            Some(Gated::Refused(code)) => {
                self.bus
                    .metrics
                    .refused_publishes
                    .fetch_add(1, Ordering::Relaxed);
                gate::reason_for(code)
            }
            None => reason::SERVER_UNAVAILABLE,
        }
    }

    /// Whether a publish to `topic` is decided by the registry (or refused
    /// as its own) rather than simply routed.
    fn judged_at_once(&self, topic: &str) -> bool {
        self.bus.gate.is_some()
            && (!matches!(self.bus.topics.classify(topic), Incoming::Other)
                || gate::reserved(&self.bus.topics, topic)
                || self.bus.topics.hub(topic).is_some())
    }

    /// Hands a publish (a client's, or with `will` its will) on: refused
    /// when it is for the registry's own topics, judged by the registry
    /// when it is a record or heartbeat, otherwise to the router. The MQTT
    /// 5 reason code for the acknowledgement.
    pub(super) async fn route(&mut self, p: &Publish, peer: Option<SocketAddr>, will: bool) -> u8 {
        /// A sync echo's payload carries nothing (the helper's is `sync`).
        const MAX_SYNC_PAYLOAD: usize = 64;
        // `$` topics are the server's (MQTT 4.7.2): none are routed but a
        // client's `$PREFIX/sync/ID` echo, kept out of `#` subscriptions so
        // (never retained: nothing of it is kept).
        if p.topic.starts_with('$')
            && (p.retain
                || p.payload.len() > MAX_SYNC_PAYLOAD
                || !self.bus.topics.is_sync(&p.topic))
        {
            return reason::NOT_AUTHORIZED;
        }
        if self.bus.gate.is_some()
            && let Some(hub) = self.bus.topics.hub(&p.topic)
        {
            let caller = crate::rpc::mqtt::Caller {
                user: self.user.clone(),
                client_id: self.client_id.clone(),
            };
            return crate::rpc::mqtt::on_publish(&self.bus, p, hub, caller);
        }
        let after = self.after_token(p.qos);
        if let Some(registry) = &self.bus.gate {
            let topics = &self.bus.topics;
            let kind = match topics.classify(&p.topic) {
                Incoming::Service(raw) => Some((gate::Kind::Record, raw)),
                Incoming::Heartbeat(raw) => Some((gate::Kind::Heartbeat, raw)),
                Incoming::Registry => None,
                Incoming::Other if !gate::reserved(topics, &p.topic) => {
                    return self.publish(p);
                }
                Incoming::Other => None,
            };
            let Some((kind, raw)) = kind else {
                self.bus
                    .metrics
                    .refused_publishes
                    .fetch_add(1, Ordering::Relaxed);
                debug!(client_id = %self.client_id, topic = %p.topic, "publish to a registry topic refused");
                return reason::NOT_AUTHORIZED;
            };
            let mut submission =
                gate::Submission::new(kind, raw, p, peer, self.author.clone(), self.number);
            submission.after = after;
            submission.will = will;
            submission.guards = self.guards(raw);
            let verdict = registry.gate(submission).await.ok();
            return self.code_for(verdict);
        }
        self.publish(p)
    }

    fn publish(&mut self, p: &Publish) -> u8 {
        let after = self.after_token(p.qos);
        self.link
            .publish_after(Message::new(p, self.number), after.as_ref());
        reason::SUCCESS
    }

    /// The token a publish about to be acknowledged hands to the
    /// subscribers it wakes, so that the connection writes nothing more
    /// until they have taken it (see [`After`]). `None` at QoS 0 or with no
    /// connection (a will): there is nothing to acknowledge.
    fn after_token(&mut self, qos: u8) -> Option<After> {
        if qos == 0 {
            return None;
        }
        self.conn.as_ref()?;
        if self.after.is_none() {
            let (after, rx) = After::new();
            self.after = Some(after);
            self.hold = Some(rx);
        }
        self.after.clone()
    }

    async fn on_subscribe(&mut self, pkid: u16, id: Option<u32>, subs: Vec<Subscription>) {
        let mut codes = Vec::with_capacity(subs.len());
        for s in subs {
            let v4 = self.conn.as_ref().is_some_and(|c| c.version == Version::V4);
            if !codec::valid_filter(&s.filter) {
                codes.push(if v4 {
                    0x80
                } else {
                    reason::TOPIC_FILTER_INVALID
                });
                continue;
            }
            // A client's own `$PREFIX/sync/ID` echo topic carries nothing
            // and cannot be guessed: it needs no ACL rule.
            let sync = self.bus.topics.is_sync(&s.filter);
            if !sync
                && !self
                    .bus
                    .auth
                    .may_subscribe(self.user.as_deref(), &self.client_id, &s.filter)
            {
                debug!(client_id = %self.client_id, filter = %s.filter, "subscription denied by the ACL");
                // 0x80 in both versions: failure (3.1.1), unspecified (5).
                codes.push(reason::UNSPECIFIED);
                continue;
            }
            let existed = self.subs.contains_key(&s.filter);
            // `$SYS/#` and the like are granted, but homicro publishes no
            // `$` topics (and refuses them from clients), but for the
            // `$PREFIX/sync/ID` echo topics, each to its one subscriber (a
            // wildcard filter over them is granted and gets nothing).
            let server_topics =
                s.filter.starts_with('$') && !s.filter.starts_with("$share/") && !sync;
            // Retained messages are sent for a new subscription, and again
            // for a repeated one with Retain Handling 0.
            if !server_topics && (!existed || s.retain_handling == 0) {
                self.link.subscribe(&s.filter, s.retain_handling != 2);
            }
            let suppress = s.retain_handling == 2 || s.filter.starts_with("$share/");
            self.subs.insert(
                s.filter,
                Sub {
                    qos: s.qos,
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    id,
                    suppress_retained: suppress,
                },
            );
            codes.push(s.qos);
        }
        if let Some(live) = &mut self.conn {
            codec::write_suback(&mut live.wbuf, live.version, pkid, &codes);
        }
    }

    async fn on_unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        for f in filters {
            if self.subs.remove(&f).is_some() {
                self.link.unsubscribe(&f);
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        if let Some(live) = &mut self.conn {
            codec::write_unsuback(&mut live.wbuf, live.version, pkid, &codes);
        }
    }
}
