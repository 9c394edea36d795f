//! A new MQTT connection up to its session: the CONNECT is read within the
//! handshake deadline, checked in the order Mosquitto checks it
//! (protocol, client id, authentication, room), and either refused with
//! the right CONNACK or handed to its session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::Bus;
use super::codec::{self, Connect, Properties, Version, reason};
use crate::identity::Author;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A client that has sent a good CONNECT, on its way to its session.
pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
    /// Bytes read after the CONNECT.
    pub rbuf: BytesMut,
    pub peer: SocketAddr,
    pub connect: Connect,
    /// The server chose the client id (sent back in an MQTT 5 CONNACK).
    pub assigned: bool,
    /// Who the client is, as a record's owner.
    pub author: Author,
    /// Its authenticated user (what the ACL file names).
    pub user: Option<std::sync::Arc<str>>,
    /// The connection's place under the listener's connection cap, held
    /// until the connection ends.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// MQTT 3.1.1 CONNACK return codes.
mod rc {
    pub const UNACCEPTABLE_PROTOCOL: u8 = 1;
    pub const IDENTIFIER_REJECTED: u8 = 2;
    pub const SERVER_UNAVAILABLE: u8 = 3;
    /// Mosquitto 2 answers a 3.1.1 client with a wrong password this too
    /// (not 4, "bad user name or password").
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// Reads and checks the CONNECT; `None` when the connection was refused
/// (and answered, where MQTT has an answer) or went away.
pub async fn handshake(
    bus: &Arc<Bus>,
    mut reader: Reader,
    mut writer: Writer,
    peer: SocketAddr,
    deadline: Instant,
    full: bool,
    cert: Option<std::sync::Arc<str>>,
) -> Option<Conn> {
    let mut rbuf = BytesMut::with_capacity(256);
    let connect = loop {
        match codec::frame(&rbuf, bus.limits.max_packet) {
            Ok(Some(len)) => {
                let packet = rbuf.split_to(len).freeze();
                match codec::read_connect(packet) {
                    Ok(c) => break c,
                    Err(codec::Error::UnsupportedVersion(level)) => {
                        debug!(%peer, level, "CONNECT with an unsupported protocol level");
                        refuse(&mut writer, Version::V4, rc::UNACCEPTABLE_PROTOCOL).await;
                        return None;
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "bad CONNECT; closed");
                        return None;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                debug!(%peer, error = %e, "bad CONNECT; closed");
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, reader.read_buf(&mut rbuf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return None,
            Err(_) => {
                bus.metrics.silent.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "no complete CONNECT in time; closed");
                return None;
            }
        }
    };
    let mut connect = connect;
    let v = connect.version;
    let mut assigned = false;
    if connect.client_id.is_empty() {
        if v == Version::V4 && !connect.clean_start {
            refuse(&mut writer, v, rc::IDENTIFIER_REJECTED).await;
            return None;
        }
        connect.client_id = crate::mqtt::client_id("auto");
        assigned = true;
    }
    if connect.props.auth_method.is_some() {
        refuse(&mut writer, v, reason::BAD_AUTH_METHOD).await;
        return None;
    }
    let verdict = match cert {
        // The certificate proved who it is: no password asked.
        Some(name) => bus.auth.certified(name),
        None => {
            bus.auth
                .check(
                    peer.ip(),
                    connect.username.as_deref(),
                    connect.password.as_deref(),
                )
                .await
        }
    };
    // Wrong or missing credentials: 5 in 3.1.1 (as Mosquitto 2), 0x86 in
    // MQTT 5 (Mosquitto 2.0.11 says 0x87 "not authorized", which homicro
    // keeps for what an ACL refuses a known client).
    let refusal = match (verdict.admitted(), v) {
        (true, _) => None,
        (false, Version::V4) => Some(rc::NOT_AUTHORIZED),
        (false, Version::V5) => Some(reason::BAD_USER_NAME_OR_PASSWORD),
    };
    if let Some(code) = refusal {
        refuse(&mut writer, v, code).await;
        return None;
    }
    if full || !room_for(bus, &connect.client_id) {
        bus.metrics.refused_full.fetch_add(1, Ordering::Relaxed);
        let code = match v {
            Version::V4 => rc::SERVER_UNAVAILABLE,
            Version::V5 => reason::SERVER_UNAVAILABLE,
        };
        refuse(&mut writer, v, code).await;
        return None;
    }
    Some(Conn {
        reader,
        writer,
        rbuf,
        peer,
        author: verdict.author(peer.ip()),
        user: verdict.user(),
        connect,
        assigned,
        permit: None,
    })
}

/// Whether a session for `client_id` may be had: its own exists already,
/// or there is room for one more.
fn room_for(bus: &Bus, client_id: &str) -> bool {
    let sessions = bus.sessions.lock().unwrap();
    sessions.contains_key(client_id) || sessions.len() < bus.limits.max_sessions
}

/// Answers a CONNECT with a refusal and closes.
pub async fn refuse(writer: &mut Writer, version: Version, code: u8) {
    let mut out = BytesMut::new();
    codec::write_connack(&mut out, version, false, code, &Properties::default());
    let _ = writer.write_all(&out).await;
    let _ = writer.shutdown().await;
}

/// What an MQTT 5 CONNACK tells the client beside its code.
pub fn connack_properties(bus: &Bus, c: &Connect, assigned: bool) -> Properties {
    let l = &bus.limits;
    Properties {
        receive_maximum: Some(l.receive_maximum),
        topic_alias_max: Some(l.topic_alias_max),
        assigned_client_id: assigned.then(|| c.client_id.clone()),
        server_keep_alive: (granted_keepalive(l.max_keepalive, c) != c.keep_alive)
            .then(|| granted_keepalive(l.max_keepalive, c)),
        ..Properties::default()
    }
}

/// The keepalive the server holds the client to. An MQTT 5 client asking
/// for none or for more than `max` gets `max` (announced as Server Keep
/// Alive); a 3.1.1 client cannot be told, and keeps its own (both as
/// Mosquitto 2.0 does).
pub fn granted_keepalive(max: u16, c: &Connect) -> u16 {
    match c.version {
        Version::V5 if c.keep_alive == 0 || c.keep_alive > max => max,
        _ => c.keep_alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(version: Version, keep_alive: u16) -> Connect {
        Connect {
            version,
            clean_start: true,
            keep_alive,
            client_id: "c".into(),
            props: Properties::default(),
            will: None,
            username: None,
            password: None,
        }
    }

    #[test]
    fn keepalive_is_lowered_for_mqtt5_only() {
        assert_eq!(granted_keepalive(60, &connect(Version::V5, 30)), 30);
        assert_eq!(granted_keepalive(60, &connect(Version::V5, 120)), 60);
        assert_eq!(granted_keepalive(60, &connect(Version::V5, 0)), 60);
        assert_eq!(granted_keepalive(60, &connect(Version::V4, 120)), 120);
        assert_eq!(granted_keepalive(60, &connect(Version::V4, 0)), 0);
    }
}
