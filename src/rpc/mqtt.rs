//! Calls and answers over MQTT: a session hands the hub every publish to
//! `PREFIX/call/…` and `PREFIX/reply/…` (they never reach the router), and
//! the hub publishes the answer to the caller's reply topic.
//!
//! - MQTT 5 caller: `PREFIX/call/QUERY` with a Response Topic (and
//!   Correlation Data, echoed); optional user property `timeout` (`5s`) or
//!   a Message Expiry Interval. The answer arrives on the response topic
//!   with user property `status`.
//! - 3.1.1 caller: `PREFIX/call/QUERY/REPLY/TOPIC`; the answer arrives on
//!   `REPLY/TOPIC/STATUS`.
//! - Instance: a request arrives on `PREFIX/rpc/NAME/ID` (MQTT 5: Response
//!   Topic `PREFIX/reply/ID`, Correlation Data ID); it answers on
//!   `PREFIX/reply/ID` (status in user property `status`, default 200) or,
//!   in 3.1.1, `PREFIX/reply/ID/STATUS`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, info};

use super::{Answer, Request, wire};
use crate::auth::Access;
use crate::bus::Bus;
use crate::bus::codec::{Properties, Publish, reason};
use crate::bus::router::{Message, now_ms};
use crate::record::Name;
use crate::topics::HubTopic;

/// Who publishes to a hub topic.
pub struct Caller {
    pub user: Option<Arc<str>>,
    pub client_id: String,
}

/// Takes a publish to a hub topic; the MQTT 5 reason code for its
/// acknowledgement (the answer comes later, on the reply topic).
pub fn on_publish(bus: &Arc<Bus>, p: &Publish, topic: HubTopic<'_>, caller: Caller) -> u8 {
    match topic {
        HubTopic::Reply(rest) => on_reply(bus, p, rest),
        HubTopic::Call(rest) => on_call(bus, p, rest, caller),
    }
}

fn on_reply(bus: &Bus, p: &Publish, rest: &str) -> u8 {
    let (id, in_topic) = match wire::split_reply(rest) {
        Ok(r) => r,
        Err(e) => {
            info!(topic = %p.topic, error = %e, "reply refused");
            return reason::TOPIC_NAME_INVALID;
        }
    };
    let in_props = p
        .props
        .user
        .iter()
        .find(|(k, _)| k == "status")
        .map(|(_, v)| wire::parse_status(v));
    let status = match (in_topic, in_props) {
        (Some(s), _) | (None, Some(Ok(s))) => s,
        (None, Some(Err(e))) => {
            info!(topic = %p.topic, error = %e, "reply refused");
            return reason::IMPLEMENTATION_SPECIFIC;
        }
        (None, None) => 200,
    };
    let answer = Answer {
        status,
        content_type: p.props.content_type.clone(),
        body: Bytes::copy_from_slice(&p.payload),
    };
    // The ACL's write on PREFIX/reply/ID was checked before the session
    // handed it over.
    match bus.calls.answer(id, answer, |_| true) {
        Ok(()) => reason::SUCCESS,
        Err(_) => {
            debug!(
                call = id,
                "a reply for no waiting call (timed out, or answered)"
            );
            reason::NO_MATCHING_SUBSCRIBERS
        }
    }
}

fn on_call(bus: &Arc<Bus>, p: &Publish, rest: &str, caller: Caller) -> u8 {
    let (query, suffix) = wire::split_call(rest);
    // MQTT 5: the Response Topic as it is; 3.1.1: the levels after QUERY,
    // with the status appended.
    let (reply, append_status) = match (&p.props.response_topic, suffix) {
        (Some(t), _) => (t.clone(), false),
        (None, Some(t)) => (t.to_string(), true),
        (None, None) => {
            info!(
                topic = %p.topic, client_id = %caller.client_id,
                "call refused: no reply topic (MQTT 5: a Response Topic; 3.1.1: \
                 PREFIX/call/QUERY/REPLY/TOPIC)"
            );
            return reason::IMPLEMENTATION_SPECIFIC;
        }
    };
    if let Err(e) = wire::reply_topic_ok(&bus.topics, &reply) {
        info!(topic = %p.topic, error = %e, "call refused");
        return reason::TOPIC_NAME_INVALID;
    }
    let auth = bus.auth.clone();
    let user = caller.user.clone();
    // The hub publishes where the caller may: the reply topic (3.1.1: with
    // the status appended, checked again with the real status below).
    let may_write = {
        let (auth, user, client_id) = (auth.clone(), user.clone(), caller.client_id.clone());
        move |topic: &str| {
            !auth.has_acl() || auth.allows(user.as_deref(), &client_id, topic, Access::Write)
        }
    };
    let first = match append_status {
        true => format!("{reply}/200"),
        false => reply.clone(),
    };
    if !may_write(&first) {
        info!(topic = %p.topic, reply = %reply, "call refused: the ACL does not let the caller write its reply topic");
        return reason::NOT_AUTHORIZED;
    }
    let timeout = match timeout_of(bus, p) {
        Ok(t) => t,
        Err(e) => {
            info!(topic = %p.topic, error = %e, "call refused");
            return reason::IMPLEMENTATION_SPECIFIC;
        }
    };
    let req = Request {
        body: Bytes::copy_from_slice(&p.payload),
        content_type: p.props.content_type.clone(),
    };
    let to = Arc::new(ReplyTo {
        bus: bus.clone(),
        reply,
        append_status,
        correlation: p.props.correlation_data.clone(),
        qos: p.qos.min(1),
        may_write: Box::new(may_write),
    });
    let deliver: super::Deliver = {
        let to = to.clone();
        Arc::new(move |name, answer| to.send(Some(name), answer))
    };
    let may_read = |name: &str| {
        auth.allows(
            user.as_deref(),
            &caller.client_id,
            &bus.topics.service(name),
            Access::Read,
        )
    };
    // Handed to the instance now, on this session's task; the answer is
    // published from the instance's task as it arrives.
    match bus
        .calls
        .start(bus, query, req, timeout, may_read, Some(deliver))
    {
        Err(e) => {
            debug!(query, error = %e, "call failed");
            to.send(None, e.answer());
        }
        Ok(started) => {
            let bus = bus.clone();
            tokio::spawn(async move {
                match bus.calls.finish(&bus, started).await {
                    Ok(None) => {}
                    Ok(Some((name, answer))) => to.send(Some(&name), answer),
                    Err(e) => {
                        debug!(error = %e, "call failed");
                        to.send(None, e.answer());
                    }
                }
            });
        }
    }
    reason::SUCCESS
}

/// Where an MQTT caller's answer goes.
struct ReplyTo {
    bus: Arc<Bus>,
    reply: String,
    /// 3.1.1 form: the status is the reply topic's last level.
    append_status: bool,
    correlation: Option<Bytes>,
    qos: u8,
    /// The ACL's write for the caller.
    may_write: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl ReplyTo {
    fn send(&self, instance: Option<&Name>, answer: Answer) {
        let mut props = Properties {
            correlation_data: self.correlation.clone(),
            content_type: answer.content_type.clone(),
            ..Properties::default()
        };
        props
            .user
            .push(("status".into(), answer.status.to_string()));
        if let Some(n) = instance {
            props.user.push(("instance".into(), n.to_string()));
        }
        let topic = match self.append_status {
            true => format!("{}/{}", self.reply, answer.status),
            false => self.reply.clone(),
        };
        if !(self.may_write)(&topic) {
            info!(%topic, "answer dropped: the ACL does not let the caller write its reply topic");
            return;
        }
        self.bus.router.publish(Message {
            topic: topic.into(),
            payload: answer.body,
            qos: self.qos,
            retain: false,
            origin: 0,
            at_ms: now_ms(),
            expiry: None,
            props: Some(Box::new(props)),
        });
    }
}

/// The call's own timeout (user property `timeout`, or its Message Expiry
/// Interval), else the server's default.
fn timeout_of(bus: &Bus, p: &Publish) -> Result<Duration, String> {
    if let Some((_, t)) = p.props.user.iter().find(|(k, _)| k == "timeout") {
        return wire::parse_timeout(t);
    }
    match p.props.message_expiry {
        Some(s) if s > 0 => Ok(Duration::from_secs(s as u64).min(wire::MAX_TIMEOUT)),
        _ => Ok(bus.limits.proxy_timeout),
    }
}
