//! Records, registered in bulk, and a watcher that counts them arriving.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::subject::Subject;
use crate::wire::{self, Client, Reader};

pub const SERVICES: &str = "homicro/services/";
pub const EVENTS: &str = "homicro/events/";

/// A record for name number `i`: each its own host, so that no two names
/// share an owner. `extra` is more JSON fields (`,"ttl":2`).
pub fn record(i: usize, extra: &str) -> String {
    format!(
        r#"{{"host":"10.{}.{}.{}","port":8080{extra}}}"#,
        i / 65536 % 256,
        i / 256 % 256,
        i % 256
    )
}

/// Publishers that wrote everything and are draining their PUBACKs: keep
/// them until the records were seen (dropping closes the connections).
pub struct Publishers(Vec<(wire::Wr, JoinHandle<usize>)>);

impl Drop for Publishers {
    fn drop(&mut self) {
        for (_, task) in &self.0 {
            task.abort();
        }
    }
}

/// Each client publishes its share of the retained QoS 1 records
/// `TAG-0 .. TAG-(n-1)`, pipelined (one write of all its packets, PUBACKs
/// read meanwhile). Returns when every client has written its share.
pub async fn publish(clients: Vec<Client>, tag: &str, n: usize, extra: &str) -> Publishers {
    let k = clients.len();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, client)| {
            let mut buf = Vec::new();
            for (j, i) in (c..n).step_by(k).enumerate() {
                let payload = record(i, extra);
                wire::publish(
                    &mut buf,
                    &format!("{SERVICES}{tag}-{i}"),
                    payload.as_bytes(),
                    true,
                    true,
                    (j % 65535 + 1) as u16,
                );
            }
            tokio::spawn(async move {
                let (mut wr, acks) = client.drain_acks();
                tokio::io::AsyncWriteExt::write_all(&mut wr, &buf)
                    .await
                    .unwrap();
                (wr, acks)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    Publishers(out)
}

/// When a watcher had seen every record (and, with the registry, every
/// `registered` event), counted from its start.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// Every record visible on `services/TAG-i`.
    pub records: Option<Duration>,
    /// Every record visible and (with the registry) announced.
    pub all: Option<Duration>,
}

/// Reads `watcher` until it has seen the `n` records `TAG-i` (non-empty)
/// and, when `events`, their `registered` events; gives up after `limit`
/// without a message.
pub async fn watch(rd: &mut Reader, tag: &str, n: usize, events: bool, limit: Duration) -> Seen {
    let t = Instant::now();
    let (mut rec, mut ev) = (vec![false; n], vec![false; n]);
    let (mut nrec, mut nev) = (0, 0);
    let mut seen = Seen {
        records: None,
        all: None,
    };
    let services = format!("{SERVICES}{tag}-");
    let announced = format!("{EVENTS}{tag}-");
    while nrec < n || (events && nev < n) {
        let Some(p) = rd.next_within(limit).await else {
            println!("    (watcher: {nrec} of {n} records, {nev} events seen; gave up)");
            return seen;
        };
        let Some((topic, payload)) = p.publish() else {
            continue;
        };
        let Ok(topic) = std::str::from_utf8(topic) else {
            continue;
        };
        if let Some(i) = index(topic, &services)
            && !payload.is_empty()
            && i < n
            && !rec[i]
        {
            rec[i] = true;
            nrec += 1;
            if nrec == n {
                seen.records = Some(t.elapsed());
            }
        } else if events
            && let Some(i) = index(topic, &announced)
            && i < n
            && !ev[i]
            && contains(payload, b"\"registered\"")
        {
            ev[i] = true;
            nev += 1;
        }
    }
    seen.all = Some(t.elapsed());
    seen
}

fn index(topic: &str, prefix: &str) -> Option<usize> {
    topic.strip_prefix(prefix)?.parse().ok()
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A watcher on records (and events, with the registry).
pub async fn watcher(addr: SocketAddr, id: &str, events: bool) -> Client {
    let mut w = Client::connect(addr, id).await.unwrap();
    if events {
        w.subscribe(&["homicro/services/+", "homicro/events/+"])
            .await;
    } else {
        w.subscribe(&["homicro/services/+"]).await;
    }
    w
}

/// Registers `n` records `TAG-i` from 20 clients and waits until a watcher
/// saw them all (with the registry: accepted). Every connection is closed
/// when it returns.
pub async fn preload(s: &Subject, tag: &str, n: usize) {
    if n == 0 {
        return;
    }
    let events = s.kind.registry();
    let mut w = watcher(s.addr, &format!("{tag}-watch"), events).await;
    let clients = wire::connect_many(s.addr, &format!("{tag}-pub"), 20).await;
    let publishers = publish(clients, tag, n, "").await;
    let seen = watch(&mut w.rd, tag, n, events, Duration::from_secs(60)).await;
    assert!(
        seen.all.is_some(),
        "preload of {n} records on {}",
        s.kind.label()
    );
    drop(publishers);
}
