//! The HTTP side's connections end to end, on `homicro serve`: an idle
//! connection closed after the handshake timeout, the WebSocket upgrade on
//! `/mqtt`, and MQTT 3.1.1 over it with packets written by hand.

mod api;
mod common;

use std::time::Duration;

use api::{Api, IDLE, register};
use common::WAIT;
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let api = Api::start().await;
    let mut raw = TcpStream::connect(api.addr).await.unwrap();
    raw.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Kept alive, then closed after IDLE without a request.
    let start = std::time::Instant::now();
    let rest = tokio::time::timeout(WAIT, raw.read_to_end(&mut buf)).await;
    assert!(matches!(rest, Ok(Ok(0))), "{rest:?}");
    let waited = start.elapsed();
    assert!(waited >= IDLE - Duration::from_millis(50), "{waited:?}");

    // A body that never completes is answered 408 after IDLE.
    let mut raw = TcpStream::connect(api.addr).await.unwrap();
    raw.write_all(b"PUT /register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"name\"")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// A WebSocket client's handshake on `/mqtt` offering `protocols`.
async fn websocket(
    api: &Api,
    protocols: &str,
) -> (
    tokio_tungstenite::WebSocketStream<TcpStream>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/mqtt", api.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let stream = TcpStream::connect(api.addr).await.unwrap();
    tokio_tungstenite::client_async(req, stream).await.unwrap()
}

#[tokio::test]
async fn websocket_handshake_offers_mqtt() {
    let api = Api::start().await;
    let (_ws, resp) = websocket(&api, "mqttv3.1, mqtt").await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    assert!(resp.headers().contains_key("sec-websocket-accept"));
    let start = std::time::Instant::now();
    loop {
        let text = api.get("/metrics").await.text();
        if text.contains("homicro_connections_total{kind=\"websocket\"} 1") {
            break;
        }
        assert!(start.elapsed() < WAIT, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// MQTT 3.1.1 packets by hand, as a paho-style client sends them.
mod packet {
    pub fn connect(client_id: &str) -> Vec<u8> {
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
        string(&mut v, client_id);
        frame(0x10, v)
    }

    pub fn subscribe(id: u16, filter: &str) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        string(&mut v, filter);
        v.push(0);
        frame(0x82, v)
    }

    fn string(v: &mut Vec<u8>, s: &str) {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    }

    fn frame(header: u8, body: Vec<u8>) -> Vec<u8> {
        let mut out = vec![header];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
        out.extend(body);
        out
    }

    /// The first whole packet in `buf`, taken out: (first byte, body).
    pub fn take(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
        let (mut len, mut shift, mut i) = (0usize, 0, 1);
        loop {
            let b = *buf.get(i)?;
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if buf.len() < i + len {
            return None;
        }
        let first = buf[0];
        let body = buf[i..i + len].to_vec();
        buf.drain(..i + len);
        Some((first, body))
    }
}

#[tokio::test]
async fn mqtt_over_websocket_gets_a_retained_record() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let api = Api::start().await;
    register(&api, "wsdemo", json!({"host": "10.0.0.7", "port": 1883})).await;
    let (mut ws, _) = websocket(&api, "mqtt").await;
    let mut buf = Vec::new();
    let mut next = async |ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>| loop {
        if let Some(p) = packet::take(&mut buf) {
            return p;
        }
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!("websocket ended: {other:?}"),
        }
    };
    ws.send(Message::binary(packet::connect("ws-test")))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, (0x20, vec![0, 0]), "CONNACK accepted");
    ws.send(Message::binary(packet::subscribe(
        1,
        "homicro/services/wsdemo",
    )))
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await, (0x90, vec![0, 1, 0]), "SUBACK QoS 0");
    let (first, body) = next(&mut ws).await;
    assert_eq!(first, 0x31, "a retained QoS 0 PUBLISH");
    let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
    assert_eq!(&body[2..2 + topic_len], b"homicro/services/wsdemo");
    let record: Value = serde_json::from_slice(&body[2 + topic_len..]).unwrap();
    assert_eq!(record, json!({"host": "10.0.0.7", "port": 1883}));
}
