//! A session's messages to its client: the queue, packet identifiers and
//! the QoS 1 and 2 flows, within the client's Receive Maximum. Pure: the
//! session task writes what this decides.

use std::collections::{BTreeMap, VecDeque};

use crate::bus::codec::{AckKind, Publish};

/// A message sent and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InFlight {
    /// QoS 1 or 2, waiting for PUBACK or PUBREC.
    Publish(Box<Publish>),
    /// QoS 2, PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// What to write next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Publish(Box<Publish>),
    /// A PUBREL for this packet identifier.
    Release(u16),
}

/// The session's outgoing side.
#[derive(Debug, Default)]
pub struct Outbound {
    next_pkid: u16,
    inflight: BTreeMap<u16, InFlight>,
    queue: VecDeque<Publish>,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
}

impl Outbound {
    /// Queues `p` (its QoS already the delivered one). With the queue at
    /// `limit`, the message is dropped (counted); so is a QoS 0 message
    /// for a client that is not connected.
    pub fn push(&mut self, p: Publish, limit: usize, connected: bool) {
        if self.queue.len() >= limit || (p.qos == 0 && !connected) {
            self.dropped += 1;
            return;
        }
        self.queue.push_back(p);
    }

    /// How many messages wait.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The next message to write with at most `receive_max` QoS 1 and 2
    /// messages unacknowledged; order is kept, so a QoS 0 message waits
    /// behind a QoS 1 message that has no room.
    pub fn next(&mut self, receive_max: u16) -> Option<Publish> {
        let head = self.queue.front()?;
        if head.qos > 0 && self.inflight.len() >= receive_max as usize {
            return None;
        }
        let mut p = self.queue.pop_front()?;
        if p.qos > 0 {
            p.pkid = self.take_pkid()?;
            self.inflight
                .insert(p.pkid, InFlight::Publish(Box::new(p.clone())));
        }
        Some(p)
    }

    fn take_pkid(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return Some(self.next_pkid);
            }
        }
        None
    }

    /// An acknowledgement from the client: `Some(pkid)` when a PUBREL is
    /// to be sent. Acknowledgements of unknown identifiers are ignored
    /// (a client may acknowledge twice after a reconnect).
    pub fn on_ack(&mut self, kind: AckKind, pkid: u16, reason: u8) -> Option<u16> {
        match (kind, self.inflight.get(&pkid)) {
            (AckKind::PubAck, Some(InFlight::Publish(p))) if p.qos == 1 => {
                self.inflight.remove(&pkid);
                None
            }
            (AckKind::PubRec, Some(InFlight::Publish(p))) if p.qos == 2 => {
                if reason >= 0x80 {
                    // The client refused it: the flow ends here.
                    self.inflight.remove(&pkid);
                    return None;
                }
                self.inflight.insert(pkid, InFlight::Released);
                Some(pkid)
            }
            (AckKind::PubRec, Some(InFlight::Released)) => Some(pkid),
            (AckKind::PubComp, Some(InFlight::Released)) => {
                self.inflight.remove(&pkid);
                None
            }
            _ => None,
        }
    }

    /// On a resumed session: what was unacknowledged, again (PUBLISH with
    /// DUP set, PUBREL), in the order first sent.
    pub fn resend(&self) -> Vec<Out> {
        self.inflight
            .iter()
            .map(|(pkid, f)| match f {
                InFlight::Publish(p) => {
                    let mut p = p.clone();
                    p.dup = true;
                    Out::Publish(p)
                }
                InFlight::Released => Out::Release(*pkid),
            })
            .collect()
    }

    /// Unacknowledged QoS 1 and 2 messages.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(qos: u8, n: u8) -> Publish {
        Publish {
            qos,
            topic: "t".into(),
            payload: vec![n].into(),
            ..Publish::default()
        }
    }

    #[test]
    fn receive_maximum_bounds_what_is_in_flight_and_order_is_kept() {
        let mut o = Outbound::default();
        o.push(msg(1, 1), 10, true);
        o.push(msg(1, 2), 10, true);
        o.push(msg(0, 3), 10, true);
        let a = o.next(1).unwrap();
        assert_eq!(a.pkid, 1);
        assert_eq!(o.next(1), None, "one in flight: the QoS 1 message waits");
        assert_eq!(o.on_ack(AckKind::PubAck, 1, 0), None);
        let b = o.next(1).unwrap();
        assert_eq!((b.pkid, &b.payload[..]), (2, &[2][..]));
        let c = o.next(1).unwrap();
        assert_eq!((c.qos, c.pkid), (0, 0), "QoS 0 needs no room");
    }

    #[test]
    fn qos2_flow_and_resend_after_reconnect() {
        let mut o = Outbound::default();
        o.push(msg(2, 1), 10, true);
        o.push(msg(2, 2), 10, true);
        let a = o.next(10).unwrap();
        let b = o.next(10).unwrap();
        assert_eq!(o.on_ack(AckKind::PubRec, a.pkid, 0), Some(a.pkid));
        let again = o.resend();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0], Out::Release(a.pkid));
        match &again[1] {
            Out::Publish(p) => assert!(p.dup && p.pkid == b.pkid),
            other => panic!("{other:?}"),
        }
        assert_eq!(o.on_ack(AckKind::PubComp, a.pkid, 0), None);
        assert_eq!(o.in_flight(), 1);
        assert_eq!(
            o.on_ack(AckKind::PubAck, b.pkid, 0),
            None,
            "wrong ack ignored"
        );
        assert_eq!(o.in_flight(), 1);
    }

    #[test]
    fn a_full_queue_drops_and_offline_qos0_is_not_queued() {
        let mut o = Outbound::default();
        o.push(msg(1, 1), 1, false);
        o.push(msg(1, 2), 1, false);
        o.push(msg(0, 3), 5, false);
        assert_eq!((o.queued(), o.dropped), (1, 2));
    }

    #[test]
    fn packet_ids_skip_zero_and_those_in_flight() {
        let mut o = Outbound {
            next_pkid: u16::MAX - 1,
            ..Outbound::default()
        };
        for n in 0..3 {
            o.push(msg(1, n), 10, true);
        }
        let ids: Vec<u16> = (0..3).map(|_| o.next(10).unwrap().pkid).collect();
        assert_eq!(ids, vec![u16::MAX, 1, 2]);
    }
}
