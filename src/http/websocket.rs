//! MQTT over WebSocket (MQTT 3.1.1 and 5.0, section 6): the upgrade of
//! `GET /mqtt`, and a pump between the client's binary messages and the
//! byte stream the bus reads and writes (`bus::listener::serve_mqtt`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::debug;

use super::{Resp, error};
use crate::bus::Bus;
use crate::protocol::ErrorCode;

/// Subprotocols answered, best first: the standard's `mqtt`, and the
/// `mqttv3.1` of older clients.
const PROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// How much of the MQTT stream is buffered in each direction.
const BUFFER: usize = 64 * 1024;

/// Answers `GET /mqtt`: 101 and MQTT over the upgraded connection, or a
/// JSON error when the request is not a WebSocket handshake.
pub(super) fn upgrade(shared: Arc<Bus>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let accepted = match handshake(req.headers()) {
        Ok(a) => a,
        Err(Refused::Version) => {
            let mut resp = error(
                StatusCode::UPGRADE_REQUIRED,
                ErrorCode::Invalid,
                "only WebSocket version 13 is spoken",
            );
            resp.headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return resp;
        }
        Err(Refused::Bad(detail)) => {
            return error(StatusCode::BAD_REQUEST, ErrorCode::Invalid, &detail);
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let _open = shared.metrics.websocket.enter();
                let io = TokioIo::new(upgraded);
                // No message larger than an MQTT packet the bus accepts
                // (tungstenite's defaults allow 64 MiB, reserved up front).
                let config = WebSocketConfig::default()
                    .max_message_size(Some(shared.limits.max_packet))
                    .max_frame_size(Some(shared.limits.max_packet));
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                let (ours, proxy) = tokio::io::duplex(BUFFER);
                tokio::join!(
                    crate::bus::listener::serve_mqtt(shared.clone(), proxy, peer),
                    pump(ws, ours),
                );
            }
            Err(e) => debug!(%peer, error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accepted.accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = accepted.protocol {
        h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    resp
}

/// A valid handshake: the `Sec-WebSocket-Accept` value and the chosen
/// subprotocol (none when the client offered none of [`PROTOCOLS`]).
#[derive(Debug, PartialEq, Eq)]
struct Accepted {
    accept: String,
    protocol: Option<&'static str>,
}

#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Not version 13: answered 426 with the version spoken.
    Version,
    Bad(String),
}

/// Checks a WebSocket opening handshake (RFC 6455, 4.2.1).
fn handshake(headers: &HeaderMap) -> Result<Accepted, Refused> {
    let tokens = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .map(str::to_ascii_lowercase)
            .collect::<Vec<String>>()
    };
    if !tokens(UPGRADE).iter().any(|t| t == "websocket") {
        return Err(Refused::Bad(
            "/mqtt is MQTT over WebSocket: send a WebSocket handshake (Upgrade: websocket)".into(),
        ));
    }
    if !tokens(CONNECTION).iter().any(|t| t == "upgrade") {
        return Err(Refused::Bad(
            "a WebSocket handshake needs Connection: Upgrade".into(),
        ));
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(Refused::Version);
    }
    let key = match headers.get(SEC_WEBSOCKET_KEY) {
        Some(k) if k.len() == 24 => k.as_bytes(),
        _ => {
            return Err(Refused::Bad(
                "Sec-WebSocket-Key must be 16 bytes in base64".into(),
            ));
        }
    };
    let offered = tokens(SEC_WEBSOCKET_PROTOCOL);
    Ok(Accepted {
        accept: derive_accept_key(key),
        protocol: PROTOCOLS
            .into_iter()
            .find(|p| offered.iter().any(|o| o == p)),
    })
}

/// Moves the client's binary messages into `mqtt` and what comes out of it
/// back as binary messages, each direction on its own so that neither
/// waits for the other; pings are answered by the codec. Ends when either
/// side closes; a text message is a protocol error (MQTT 6.0) and closes
/// with 1002.
async fn pump<S>(ws: WebSocketStream<S>, mqtt: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(mqtt);
    let inbound = async {
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    if wr.write_all(&b).await.is_err() {
                        return None;
                    }
                }
                Ok(Message::Text(_)) => {
                    return Some(CloseFrame {
                        code: CloseCode::Protocol,
                        reason: "MQTT over WebSocket takes binary messages".into(),
                    });
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            }
        }
        None
    };
    let outbound = async {
        let mut buf = BytesMut::with_capacity(BUFFER);
        loop {
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let chunk: Bytes = buf.split().freeze();
                    if tx.send(Message::Binary(chunk)).await.is_err() {
                        return;
                    }
                    buf.reserve(BUFFER);
                }
            }
        }
    };
    let close = tokio::select! {
        why = inbound => why,
        () = outbound => None,
    };
    // The proxy sees its client gone at once, whatever the socket does next.
    drop((rd, wr));
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if let Some(frame) = close {
            let _ = tx.send(Message::Close(Some(frame))).await;
        }
        let _ = tx.close().await;
    })
    .await;
}

/// How long a closing handshake may take (a client that stops reading
/// would hold it forever).
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn accepts_the_rfc_example_and_picks_mqtt() {
        let mut pairs = GOOD.to_vec();
        pairs.push(("sec-websocket-protocol", "mqttv3.1, mqtt"));
        let a = handshake(&headers(&pairs)).unwrap();
        // RFC 6455, section 1.3.
        assert_eq!(a.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, Some("mqtt"));
        assert_eq!(handshake(&headers(&GOOD)).unwrap().protocol, None);
    }

    #[test]
    fn refuses_what_is_not_a_handshake() {
        assert!(matches!(handshake(&headers(&[])), Err(Refused::Bad(_))));
        for skip in [0, 1, 3] {
            let pairs: Vec<_> = GOOD
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            assert!(
                matches!(handshake(&headers(&pairs)), Err(Refused::Bad(_))),
                "{skip}"
            );
        }
        let mut old = GOOD.to_vec();
        old[2] = ("sec-websocket-version", "8");
        assert_eq!(handshake(&headers(&old)), Err(Refused::Version));
    }

    /// The pump between a client WebSocket (over an in-memory socket) and
    /// the test standing in for the MQTT proxy.
    async fn pumped() -> (WebSocketStream<DuplexStream>, DuplexStream) {
        let (client, server) = tokio::io::duplex(BUFFER);
        let (ours, proxy) = tokio::io::duplex(BUFFER);
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
        tokio::spawn(pump(ws, ours));
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        (client, proxy)
    }

    #[tokio::test]
    async fn carries_binary_both_ways_and_answers_pings() {
        let (mut client, mut proxy) = pumped().await;
        client
            .send(Message::binary(&b"\x10\x0c"[..]))
            .await
            .unwrap();
        client.send(Message::binary(&b"rest"[..])).await.unwrap();
        let mut got = [0u8; 6];
        proxy.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x0crest");
        proxy.write_all(b"\x20\x02\x00\x00").await.unwrap();
        let msg = client.next().await.unwrap().unwrap();
        assert_eq!(msg, Message::binary(&b"\x20\x02\x00\x00"[..]));
        client.send(Message::Ping("hi".into())).await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong("hi".into())
        );
        // The client closes: the proxy reads the end.
        client.close(None).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(proxy.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_text_message_closes_with_a_protocol_error() {
        let (mut client, mut proxy) = pumped().await;
        client.send(Message::text("CONNECT")).await.unwrap();
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Protocol),
            other => panic!("{other:?}"),
        }
        let mut rest = Vec::new();
        assert_eq!(proxy.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_proxy_closing_closes_the_websocket() {
        let (mut client, proxy) = pumped().await;
        drop(proxy);
        assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
    }
}
