//! Messages from the router to the client: which subscriptions they
//! match decides whether and how they are delivered (NoLocal, Retain As
//! Published, Retain Handling, subscription identifiers, QoS =
//! min(publish, granted)); the client's Maximum Packet Size and Receive
//! Maximum decide when.

use std::sync::atomic::Ordering;

use super::{Session, WRITE_HIGH};
use crate::auth::Access;
use crate::bus::codec;
use crate::bus::router::{self, Forwarded};

impl Session {
    /// Queues a forwarded message for the client, as its subscriptions
    /// want it, or drops it.
    pub(super) fn on_forward(&mut self, f: Forwarded) {
        let mut granted: Option<u8> = None;
        let mut all_no_local = true;
        let mut all_suppress = true;
        let mut rap = false;
        let mut ids = Vec::new();
        for (filter, sub) in &self.subs {
            if !codec::matches(&f.msg.topic, filter) {
                continue;
            }
            granted = Some(granted.map_or(sub.qos, |g| g.max(sub.qos)));
            all_no_local &= sub.no_local;
            all_suppress &= sub.suppress_retained;
            rap |= sub.retain_as_published;
            ids.extend(sub.id);
        }
        let Some(granted) = granted else {
            return; // unsubscribed since
        };
        // A client's sync echo goes back to that client alone: it is no
        // channel between clients, whatever they subscribe to (`$share/…`).
        let sync = self.bus.topics.is_sync(&f.msg.topic);
        if sync && f.msg.origin != self.number {
            return;
        }
        // Through a wildcard, or retained: never a topic the ACL denies.
        if self.bus.auth.has_acl()
            && !sync
            && !self.bus.auth.allows(
                self.user.as_deref(),
                &self.client_id,
                &f.msg.topic,
                Access::Read,
            )
        {
            return;
        }
        if (all_no_local && f.msg.origin == self.number) || (f.from_store && all_suppress) {
            return;
        }
        let Ok(expiry) = f.msg.remaining_expiry(router::now_ms()) else {
            return; // expired while it waited
        };
        let mut p = f.msg.to_publish();
        p.qos = p.qos.min(granted);
        p.retain = f.from_store || (rap && p.retain);
        p.props.message_expiry = expiry;
        ids.sort_unstable();
        ids.dedup();
        p.props.subscription_ids = ids;
        if let Some(live) = &self.conn {
            // The length does not depend on the packet id (still 0 here).
            if live.max_packet < usize::MAX
                && codec::publish_len(live.version, &p) > live.max_packet
            {
                return; // larger than the client takes (MQTT 5, 3.1.2.11.4)
            }
        }
        let before = self.out.dropped;
        self.out
            .push(p, self.bus.limits.max_queued, self.conn.is_some());
        if self.out.dropped > before {
            self.bus.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes queued messages while the client has room for them.
    pub(super) fn pump(&mut self) {
        let Some(live) = &mut self.conn else {
            return;
        };
        while live.wbuf.len() < WRITE_HIGH {
            let Some(p) = self.out.next(live.receive_max) else {
                break;
            };
            // A 3.1.1 client gets the message without its properties.
            codec::write_publish(&mut live.wbuf, live.version, &p);
        }
    }
}
