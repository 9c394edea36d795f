//! A paho-style raw MQTT client over a TcpStream: exact bytes, for what
//! rumqttc will not send (keepalive 0, odd client ids, wills, abrupt
//! closes, v5 properties).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

pub struct Raw {
    pub stream: TcpStream,
    pub v5: bool,
    buf: Vec<u8>,
    /// Packets read while waiting for an acknowledgement, for the next
    /// reads (a PUBLISH may come before the PUBACK it follows from).
    stash: std::collections::VecDeque<(u8, Vec<u8>)>,
    next_id: u16,
}

/// What a CONNECT carries.
#[derive(Default, Clone)]
pub struct Hello<'a> {
    pub v5: bool,
    pub client_id: &'a str,
    pub keep_alive: u16,
    /// topic, payload, retain
    pub will: Option<(&'a str, &'a [u8], bool)>,
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

impl Raw {
    /// Connects and sends CONNECT; returns the CONNACK's return/reason code.
    pub async fn connect(port: u16, h: &Hello<'_>) -> (Raw, u8) {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw {
            stream,
            v5: h.v5,
            buf: Vec::new(),
            stash: Default::default(),
            next_id: 1,
        };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', if h.v5 { 5 } else { 4 }];
        let mut flags = 0x02;
        if let Some((_, _, retain)) = h.will {
            flags |= 0x04 | 0x08 | if retain { 0x20 } else { 0 };
        }
        body.push(flags);
        body.extend_from_slice(&h.keep_alive.to_be_bytes());
        if h.v5 {
            body.push(0);
        }
        string(h.client_id.as_bytes(), &mut body);
        if let Some((topic, payload, _)) = h.will {
            if h.v5 {
                body.push(0);
            }
            string(topic.as_bytes(), &mut body);
            string(payload, &mut body);
        }
        raw.send(&packet(0x10, &body)).await;
        let (first, ack) = raw.read_packet().await.expect("CONNACK");
        assert_eq!(first >> 4, 2, "expected CONNACK, got {first:#x}");
        (raw, ack[1])
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// PUBLISH at QoS 1 (waits for PUBACK) or 0. `props`: raw v5
    /// properties.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        qos1: bool,
        props: &[u8],
    ) {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        let id = self.next_id;
        if qos1 {
            self.next_id += 1;
            body.extend_from_slice(&id.to_be_bytes());
        }
        if self.v5 {
            varint(props.len(), &mut body);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(payload);
        let first = 0x30 | if qos1 { 0x02 } else { 0 } | u8::from(retain);
        self.send(&packet(first, &body)).await;
        if qos1 {
            let mut other = Vec::new();
            loop {
                let (f, b) = self.read_packet().await.expect("PUBACK");
                if f >> 4 == 4 && b[..2] == id.to_be_bytes() {
                    self.stash.extend(other);
                    return;
                }
                other.push((f, b));
            }
        }
    }

    /// PUBLISHes every (topic, payload) at QoS 1 in one write, then waits
    /// for all their PUBACKs, each within `within` of the one before.
    pub async fn publish_all(
        &mut self,
        messages: &[(String, Vec<u8>)],
        retain: bool,
        within: Duration,
    ) {
        let mut out = Vec::new();
        for (topic, payload) in messages {
            let mut body = Vec::new();
            string(topic.as_bytes(), &mut body);
            body.extend_from_slice(&self.next_id.to_be_bytes());
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if self.v5 {
                body.push(0);
            }
            body.extend_from_slice(payload);
            out.extend(packet(0x32 | u8::from(retain), &body));
        }
        self.send(&out).await;
        let mut acked = 0;
        while acked < messages.len() {
            let read = tokio::time::timeout(within, self.read_packet_no_wait()).await;
            let (f, _) = read
                .unwrap_or_else(|_| panic!("{acked} of {} PUBACKs", messages.len()))
                .expect("PUBACK");
            acked += usize::from(f >> 4 == 4);
        }
    }

    /// SUBSCRIBE; returns the granted QoS from the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = id.to_be_bytes().to_vec();
        if self.v5 {
            body.push(0);
        }
        string(filter.as_bytes(), &mut body);
        body.push(qos);
        self.send(&packet(0x82, &body)).await;
        loop {
            let (f, b) = self.read_packet().await.expect("SUBACK");
            if f >> 4 == 9 {
                return *b.last().unwrap();
            }
        }
    }

    /// The next packet (first byte, body); `None` when the server closed.
    pub async fn read_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        if let Some(p) = self.stash.pop_front() {
            return Some(p);
        }
        tokio::time::timeout(WAIT, self.read_packet_no_wait())
            .await
            .expect("timed out reading a packet")
    }

    async fn read_packet_no_wait(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let mut len = 0usize;
                let mut i = 1;
                let mut complete = false;
                while i < self.buf.len() && i <= 4 {
                    let b = self.buf[i];
                    len |= ((b & 0x7f) as usize) << (7 * (i - 1));
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if complete && self.buf.len() >= i + len {
                    let first = self.buf[0];
                    let body = self.buf[i..i + len].to_vec();
                    self.buf.drain(..i + len);
                    return Some((first, body));
                }
            }
            // Into the heap: a 64 KiB array here made every future
            // holding a read 64 KiB larger, and debug builds overflowed
            // a test thread's stack with a few of them.
            self.buf.reserve(8192);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next PUBLISH: (topic, payload, retain).
    pub async fn next_publish(&mut self) -> Option<(String, Vec<u8>, bool)> {
        loop {
            let (f, body) = self.read_packet().await?;
            if f >> 4 != 3 {
                continue;
            }
            let n = u16::from_be_bytes([body[0], body[1]]) as usize;
            let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
            let mut at = 2 + n;
            if (f >> 1) & 3 > 0 {
                // Acknowledge QoS 1 so the broker goes on.
                let ack = packet(0x40, &body[at..at + 2]);
                self.send(&ack).await;
                at += 2;
            }
            if self.v5 {
                let mut len = 0usize;
                let mut shift = 0;
                loop {
                    let b = body[at];
                    at += 1;
                    len |= ((b & 0x7f) as usize) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                at += len;
            }
            return Some((topic, body[at..].to_vec(), f & 1 == 1));
        }
    }

    /// Whether the server closes the connection within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            while self.read_packet_no_wait().await.is_some() {}
        })
        .await
        .is_ok()
    }

    /// The socket and the bytes read from it but not yet parsed.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    pub async fn disconnect(mut self) {
        self.send(&[0xE0, 0]).await;
    }
}
