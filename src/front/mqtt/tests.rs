use super::*;
use crate::topics::Topics;

fn shared() -> Shared {
    let a = SocketAddr::from(([127, 0, 0, 1], 1));
    Shared::new(a, a, Topics::new("homicro"), None, Duration::from_secs(1))
}

fn session(shared: &Shared, keep_alive: u16, own_pings: u32) -> Session<'_> {
    Session {
        shared,
        v5: false,
        host: "10.0.0.1".into(),
        own_pings: AtomicU32::new(own_pings),
        keep_alive,
        aliases: Mutex::new(HashMap::new()),
    }
}

/// A PUBLISH whose second half, read on its own, starts like a PINGRESP
/// reaches the client whole; only the real PINGRESP answering the
/// front's ping is dropped.
#[tokio::test]
async fn own_pingresps_are_dropped_by_packet_not_by_read() {
    let sh = shared();
    let s = session(&sh, 0, 1);
    let mut publish = vec![0x30, 8, 0, 1, b't', 0xD0, 0x00, b'x', b'y', b'z'];
    let (head, tail) = publish.split_at(5);
    let (mut broker, mut from_broker) = tokio::io::duplex(64);
    let (mut to_client, mut client) = tokio::io::duplex(64);
    let relay = async { s.broker_to_client(&mut from_broker, &mut to_client).await };
    let feed = async {
        broker.write_all(head).await.unwrap();
        tokio::task::yield_now().await;
        broker.write_all(tail).await.unwrap();
        broker.write_all(&[0xD0, 0x00]).await.unwrap(); // ours
        broker.write_all(&[0xD0, 0x00]).await.unwrap(); // the client's
        drop(broker);
    };
    let (end, ()) = tokio::join!(relay, feed);
    assert_eq!(end, End::BrokerGone);
    drop(to_client);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    publish.extend_from_slice(&[0xD0, 0x00]);
    assert_eq!(got, publish);
    assert_eq!(s.own_pings.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn topic_aliases_are_resolved_and_bounded() {
    let sh = shared();
    let mut s = session(&sh, 30, 0);
    s.v5 = true;
    let publish = |topic: &str, alias: u16| {
        let mut body = vec![0, topic.len() as u8];
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&[3, 0x23]);
        body.extend_from_slice(&alias.to_be_bytes());
        body.extend_from_slice(b"p");
        let mut p = vec![0x30, body.len() as u8];
        p.extend_from_slice(&body);
        p
    };
    let mut out = BytesMut::new();
    let set = publish("a/b", 7);
    s.publish(
        &set,
        packet::frame(&set, 1 << 20).unwrap().unwrap(),
        &mut out,
    )
    .unwrap();
    let used = publish("", 7);
    s.publish(
        &used,
        packet::frame(&used, 1 << 20).unwrap().unwrap(),
        &mut out,
    )
    .unwrap();
    let plain = [0x30, 7, 0, 3, b'a', b'/', b'b', 0, b'p'];
    assert_eq!(
        &out[..],
        [plain, plain].concat(),
        "properties dropped, alias resolved"
    );
    for bad in [publish("x", 0), publish("x", 4097), publish("", 9)] {
        let f = packet::frame(&bad, 1 << 20).unwrap().unwrap();
        assert!(s.publish(&bad, f, &mut out).is_err());
    }
}
