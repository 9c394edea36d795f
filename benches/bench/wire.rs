//! A minimal MQTT 3.1.1 client on raw sockets: the same cheap load
//! generator for every subject, so that the bench's own CPU (on the same two
//! cores) stays small next to the broker's. Enough for CONNECT, SUBSCRIBE
//! at QoS 0, PUBLISH at QoS 0 or 1 (pipelined) and reading what comes back.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection's halves, plain or TLS.
pub type Rd = Box<dyn AsyncRead + Send + Unpin>;
pub type Wr = Box<dyn AsyncWrite + Send + Unpin>;

/// How to reach a broker with trust on: TLS with this client config (the
/// bench's own CA), and a user.
pub struct Secure {
    pub tls: Arc<rustls::ClientConfig>,
    pub user: String,
    pub password: String,
}

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;

/// Appends MQTT's variable-length remaining length.
fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u16).to_be_bytes());
    out.extend(s);
}

/// A clean-session 3.1.1 CONNECT (keepalive 0: none).
pub fn connect_packet(id: &str, keepalive: u16) -> Vec<u8> {
    connect_packet_as(id, keepalive, None)
}

/// [`connect_packet`] with a user name and password.
pub fn connect_packet_as(id: &str, keepalive: u16, login: Option<(&str, &str)>) -> Vec<u8> {
    let flags = if login.is_some() { 0x02 | 0xC0 } else { 0x02 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend(keepalive.to_be_bytes());
    put_str(&mut body, id.as_bytes());
    if let Some((user, password)) = login {
        put_str(&mut body, user.as_bytes());
        put_str(&mut body, password.as_bytes());
    }
    let mut p = vec![0x10];
    put_len(&mut p, body.len());
    p.extend(body);
    p
}

/// Appends a PUBLISH (`pkid` is used at QoS 1 only).
pub fn publish(
    out: &mut Vec<u8>,
    topic: &str,
    payload: &[u8],
    qos1: bool,
    retain: bool,
    pkid: u16,
) {
    out.push(0x30 | if qos1 { 0x02 } else { 0 } | retain as u8);
    put_len(
        out,
        2 + topic.len() + if qos1 { 2 } else { 0 } + payload.len(),
    );
    put_str(out, topic.as_bytes());
    if qos1 {
        out.extend(pkid.max(1).to_be_bytes());
    }
    out.extend(payload);
}

/// A SUBSCRIBE of `filters`, each at QoS 0.
pub fn subscribe_packet(filters: &[&str]) -> Vec<u8> {
    let mut body = vec![0, 1];
    for f in filters {
        put_str(&mut body, f.as_bytes());
        body.push(0);
    }
    let mut p = vec![0x82];
    put_len(&mut p, body.len());
    p.extend(body);
    p
}

/// One packet as read: its first byte and what follows the length.
pub struct Packet {
    pub header: u8,
    pub body: Bytes,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// Topic and payload of a PUBLISH.
    pub fn publish(&self) -> Option<(&[u8], &[u8])> {
        if self.kind() != PUBLISH || self.body.len() < 2 {
            return None;
        }
        let tlen = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let qos = (self.header >> 1) & 3;
        let start = 2 + tlen + if qos > 0 { 2 } else { 0 };
        (self.body.len() >= start).then(|| (&self.body[2..2 + tlen], &self.body[start..]))
    }
}

/// The read half, with its buffer.
pub struct Reader {
    half: Rd,
    buf: BytesMut,
}

impl Reader {
    /// The next packet; `None` at end of stream or on an error.
    pub async fn next(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = self.parse() {
                return Some(p);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            match self.half.read_buf(&mut self.buf).await {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// The next packet within `limit`; `None` also on timeout.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Packet> {
        tokio::time::timeout(limit, self.next())
            .await
            .ok()
            .flatten()
    }

    fn parse(&mut self) -> Option<Packet> {
        let (mut len, mut shift, mut i) = (0usize, 0, 1);
        loop {
            let b = *self.buf.get(i)?;
            len |= ((b & 0x7f) as usize) << shift;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        if self.buf.len() < i + len {
            return None;
        }
        let header = self.buf[0];
        self.buf.advance(i);
        Some(Packet {
            header,
            body: self.buf.split_to(len).freeze(),
        })
    }
}

/// A connected client.
pub struct Client {
    pub rd: Reader,
    pub wr: Wr,
}

impl Client {
    /// Connects, sends CONNECT and waits for a successful CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> io::Result<Client> {
        Client::connect_as(addr, id, None).await
    }

    /// [`Client::connect`], over TLS and as a user with `secure`.
    pub async fn connect_as(
        addr: SocketAddr,
        id: &str,
        secure: Option<&Secure>,
    ) -> io::Result<Client> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, mut wr): (Rd, Wr) = match secure {
            None => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(sec) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(sec.tls.clone())
                    .connect(name, s)
                    .await?;
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        };
        let login = secure.map(|s| (s.user.as_str(), s.password.as_str()));
        wr.write_all(&connect_packet_as(id, 0, login)).await?;
        let mut rd = Reader {
            half: r,
            buf: BytesMut::with_capacity(8 * 1024),
        };
        match rd.next_within(Duration::from_secs(10)).await {
            Some(p) if p.kind() == CONNACK && p.body.get(1) == Some(&0) => Ok(Client { rd, wr }),
            _ => Err(io::Error::other(format!("{addr}: no CONNACK for {id}"))),
        }
    }

    /// Subscribes at QoS 0 and waits for the SUBACK (nothing else comes
    /// before it: retained messages follow it).
    pub async fn subscribe(&mut self, filters: &[&str]) {
        self.wr.write_all(&subscribe_packet(filters)).await.unwrap();
        loop {
            let p = self.rd.next().await.expect("SUBACK");
            if p.kind() == SUBACK {
                return;
            }
        }
    }

    /// Splits off the reader into a task that reads and counts PUBACKs
    /// until the connection ends (the handle gives the count).
    pub fn drain_acks(self) -> (Wr, tokio::task::JoinHandle<usize>) {
        let mut rd = self.rd;
        let task = tokio::spawn(async move {
            let mut acks = 0;
            while let Some(p) = rd.next().await {
                acks += (p.kind() == PUBACK) as usize;
            }
            acks
        });
        (self.wr, task)
    }
}

/// Connects `k` clients `TAG-i` at once.
pub async fn connect_many(addr: SocketAddr, tag: &str, k: usize) -> Vec<Client> {
    connect_many_as(addr, tag, k, None).await
}

/// [`connect_many`] with trust on.
pub async fn connect_many_as(
    addr: SocketAddr,
    tag: &str,
    k: usize,
    secure: Option<Arc<Secure>>,
) -> Vec<Client> {
    let tasks: Vec<_> = (0..k)
        .map(|i| {
            let id = format!("{tag}-{i}");
            let secure = secure.clone();
            tokio::spawn(async move {
                Client::connect_as(addr, &id, secure.as_deref())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
