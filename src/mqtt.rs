//! The one way homicro talks MQTT: rumqttc options that fit the protocol,
//! and an event loop task that reconnects with backoff and reports only what
//! callers act on.
//!
//! rumqttc's event loop must be polled for requests to go out, so it runs in
//! a task of its own and forwards to the caller; the caller may then `await`
//! publishes without deadlocking against its own reads.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::BrokerUrl;

/// Largest packet homicro sends or accepts. rumqttc's default (10 KiB) is
/// below the record limit; a record of up to 16 KiB must pass, and larger
/// ones must reach the registry so that it can refuse them.
pub const MAX_PACKET: usize = 64 * 1024 * 1024;

/// What the event loop task reports.
#[derive(Debug)]
pub enum Incoming {
    /// A (re)connection was accepted: subscribe and re-publish now, since a
    /// clean session forgets subscriptions.
    Connected,
    /// A publish arrived; `retained` is the retain flag (set only on copies
    /// delivered at subscribe time).
    Message {
        topic: String,
        payload: Bytes,
        retained: bool,
    },
    /// The broker acknowledged a subscription (in the order they were made).
    Subscribed,
    /// The connection failed; the task retries after a backoff.
    Disconnected(String),
    /// Our DISCONNECT went out: the task has stopped.
    Closed,
}

/// A unique client id, `PREFIX-<16 hex digits>`, random per call.
pub fn client_id(prefix: &str) -> String {
    let n = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{prefix}-{n:016x}")
}

/// Options for a homicro client of `broker`. TLS settings that cannot be
/// made (see [`BrokerUrl::tls_config`]) give TLS that trusts no server, so
/// the connection fails: never plaintext instead.
pub fn options(client_id: &str, broker: &BrokerUrl) -> MqttOptions {
    options_checked(client_id, broker).unwrap_or_else(|e| {
        warn!(broker = %broker, error = %e, "TLS not set up");
        let none = crate::tls_client::trusting(rustls::RootCertStore::empty());
        with_tls(plain(client_id, broker), none)
    })
}

/// [`options`], or why its TLS settings cannot be made.
pub fn options_checked(client_id: &str, broker: &BrokerUrl) -> Result<MqttOptions, String> {
    let o = plain(client_id, broker);
    match broker.tls {
        true => Ok(with_tls(o, broker.tls_config()?)),
        false => Ok(o),
    }
}

fn plain(client_id: &str, broker: &BrokerUrl) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_clean_session(true);
    o.set_inflight(1000);
    if let Some(login) = &broker.login {
        o.set_credentials(login.user.clone(), login.password.clone());
    }
    o
}

fn with_tls(mut o: MqttOptions, config: std::sync::Arc<rustls::ClientConfig>) -> MqttOptions {
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(config),
    ));
    o
}

/// Creates the client and spawns its event loop; reconnects after errors
/// with a backoff from `min_backoff` doubling to 5 s.
pub fn connect(
    options: MqttOptions,
    min_backoff: Duration,
) -> (AsyncClient, mpsc::UnboundedReceiver<Incoming>) {
    // A large request queue: publishes wait here while the broker is away
    // (flume allocates only what is queued).
    let (client, mut eventloop) = AsyncClient::new(options, 1 << 20);
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    // TCP connect plus CONNACK. rumqttd now and then never answers a
    // CONNECT (2-4% under a connection storm in the bench, once in the test
    // suite); a short timeout retries soon instead of hanging.
    net.set_connection_timeout(2);
    eventloop.set_network_options(net);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(drive(eventloop, tx, min_backoff));
    (client, rx)
}

async fn drive(mut el: EventLoop, tx: mpsc::UnboundedSender<Incoming>, min: Duration) {
    let max = Duration::from_secs(5).max(min);
    let mut backoff = min;
    loop {
        let incoming = match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = min;
                Incoming::Connected
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Incoming::Message {
                topic: p.topic,
                payload: p.payload,
                retained: p.retain,
            },
            Ok(Event::Incoming(Packet::SubAck(_))) => Incoming::Subscribed,
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                let _ = tx.send(Incoming::Closed);
                return;
            }
            Ok(_) => continue,
            Err(ConnectionError::RequestsDone) => {
                let _ = tx.send(Incoming::Closed);
                return;
            }
            Err(e) => {
                debug!(error = %e, "mqtt connection failed");
                if tx.send(Incoming::Disconnected(e.to_string())).is_err() {
                    return;
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(max);
                continue;
            }
        };
        if tx.send(incoming).is_err() {
            warn!("mqtt receiver gone; stopping the event loop");
            return;
        }
    }
}

/// `d` plus up to a quarter of it, so that many clients that lost the same
/// broker do not all come back in the same millisecond.
fn jitter(d: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    d + d.mul_f64((r % 1000) as f64 / 4000.0)
}

/// Why a connection attempt failed, when trying again soon cannot help: the
/// broker's port is closed (connection refused), its host has no address,
/// or there is no route to it. `reason` is a [`Incoming::Disconnected`]
/// reason (rumqttc's error, which carries the OS error's text).
pub fn unreachable(reason: &str) -> Option<&'static str> {
    let reason = reason.to_ascii_lowercase();
    if reason.contains("return code") || reason.contains("temporary failure") {
        // A CONNACK's refusal (a bad login, a full server): MQTT's, not
        // TCP's; a name server that could not answer yet (EAI_AGAIN):
        // worth trying again.
        return None;
    }
    [
        ("connection refused", "connection refused"),
        ("failed to lookup address", "unknown host"),
        ("name or service not known", "unknown host"),
        ("network is unreachable", "network unreachable"),
        ("no route to host", "no route to host"),
    ]
    .into_iter()
    .find_map(|(text, what)| reason.contains(text).then_some(what))
}

/// A message as delivered: topic, payload, retain flag.
pub type Message = (String, Bytes, bool);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no answer from the broker within {0:?}")]
    Timeout(Duration),
    #[error("lost the broker: {0}")]
    Disconnected(String),
    #[error("mqtt client closed")]
    Closed,
}

/// Subscribes to `filter` and returns every message received until the
/// broker has delivered all retained copies for it.
///
/// Completeness: brokers queue a subscription's retained copies when they
/// handle the SUBSCRIBE (rumqttd right after the SUBACK, Mosquitto right
/// after it too). So after the SUBACK for `filter` arrives, a second
/// subscription to the private topic `sync_topic` and a publish to it come
/// back behind every retained copy of the first. Messages for other topics
/// that arrive meanwhile are returned too, in order.
pub async fn snapshot(
    client: &AsyncClient,
    rx: &mut mpsc::UnboundedReceiver<Incoming>,
    filter: &str,
    sync_topic: &str,
    wait: Duration,
) -> Result<Vec<Message>, SnapshotError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    let mut next = async |out: &mut Vec<Message>| -> Result<Option<Incoming>, SnapshotError> {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => Err(SnapshotError::Timeout(wait)),
            Ok(None) => Err(SnapshotError::Closed),
            Ok(Some(Incoming::Disconnected(e))) => Err(SnapshotError::Disconnected(e)),
            Ok(Some(Incoming::Message {
                topic,
                payload,
                retained,
            })) => {
                out.push((topic, payload, retained));
                Ok(None)
            }
            Ok(Some(other)) => Ok(Some(other)),
        }
    };
    for f in [filter, sync_topic] {
        client
            .subscribe(f, QoS::AtMostOnce)
            .await
            .map_err(|_| SnapshotError::Closed)?;
        while !matches!(next(&mut out).await?, Some(Incoming::Subscribed)) {}
    }
    client
        .publish(sync_topic, QoS::AtMostOnce, false, "sync")
        .await
        .map_err(|_| SnapshotError::Closed)?;
    loop {
        next(&mut out).await?;
        if out.last().is_some_and(|(t, ..)| t == sync_topic) {
            out.pop();
            let _ = client.unsubscribe(sync_topic).await;
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rumqttc's errors as they read when nothing can be reached, and some
    /// that deserve a retry.
    #[test]
    fn unreachable_is_told_from_a_failure_worth_retrying() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let os = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        for (reason, want) in [
            (
                ConnectionError::Io(os).to_string(),
                Some("connection refused"),
            ),
            (format!("I/O: {refused}"), Some("connection refused")),
            (
                "I/O: failed to lookup address information: Name or service not known".into(),
                Some("unknown host"),
            ),
            (
                "I/O: Network is unreachable (os error 101)".into(),
                Some("network unreachable"),
            ),
            (
                "I/O: failed to lookup address information: Temporary failure in name \
                 resolution"
                    .into(),
                None,
            ),
            ("Timeout".into(), None),
            ("Connection closed by peer abruptly".into(), None),
            (
                "Connection refused, return code: `NotAuthorized`".into(),
                None,
            ),
            (
                "Connection refused, return code: `ServiceUnavailable`".into(),
                None,
            ),
        ] {
            assert_eq!(unreachable(&reason), want, "{reason}");
        }
    }
}
