use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn framed(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(first);
    props::put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out.freeze()
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A v5 CONNECT with a will, user name and the given properties block.
fn connect_v5(flags: u8, props: &[u8]) -> Bytes {
    let mut b = string("MQTT");
    b.push(5);
    b.push(flags);
    b.extend_from_slice(&30u16.to_be_bytes());
    b.extend_from_slice(props);
    b.extend(string("dev-1"));
    if flags & 0x04 != 0 {
        b.push(5); // will properties: delay 7
        b.push(0x18);
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend(string("dev/1/state"));
        b.extend(string("offline"));
    }
    if flags & 0x80 != 0 {
        b.extend(string("user"));
    }
    framed(0x10, &b)
}

#[test]
fn a_v5_connect_with_will_and_properties() {
    // Session expiry 60, receive maximum 10.
    let props = [8, 0x11, 0, 0, 0, 60, 0x21, 0, 10];
    let c = read_connect(connect_v5(0x80 | 0x20 | 0x08 | 0x04 | 0x02, &props)).unwrap();
    assert_eq!(c.version, Version::V5);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.client_id, "dev-1");
    assert_eq!(c.props.session_expiry, Some(60));
    assert_eq!(c.props.receive_maximum, Some(10));
    let w = c.will.unwrap();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
        ("dev/1/state", &b"offline"[..], 1, true)
    );
    assert_eq!(w.props.will_delay, Some(7));
    assert_eq!(c.username.as_deref(), Some("user"));
}

#[test]
fn connect_errors_are_specific() {
    let mut mqisdp = string("MQIsdp");
    mqisdp.extend([3, 2, 0, 10]);
    mqisdp.extend(string("x"));
    assert_eq!(
        read_connect(framed(0x10, &mqisdp)),
        Err(Error::UnsupportedVersion(3))
    );
    assert_eq!(
        read_connect(connect_v5(0x03, &[0])),
        Err(Error::Malformed("reserved connect flag set"))
    );
    assert_eq!(
        read_connect(connect_v5(0x02, &[3, 0x21, 0, 0])),
        Err(Error::Protocol("receive maximum 0"))
    );
    assert_eq!(
        read_connect(connect_v5(0x02, &[2, 0x01, 0])),
        Err(Error::Malformed("property not allowed in this packet"))
    );
    assert_eq!(
        read_connect(connect_v5(0x02, &[10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2])),
        Err(Error::Protocol("a property appears twice"))
    );
}

#[test]
fn publish_round_trips_with_properties() {
    let p = Publish {
        dup: true,
        qos: 2,
        retain: true,
        topic: "a/b".into(),
        pkid: 7,
        payload: Bytes::from_static(b"hello"),
        props: Properties {
            content_type: Some("text/plain".into()),
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            message_expiry: Some(9),
            user: vec![("k".into(), "v".into())],
            payload_format: Some(1),
            ..Properties::default()
        },
    };
    let mut out = BytesMut::new();
    write_publish(&mut out, Version::V5, &p);
    assert_eq!(out.len(), publish_len(Version::V5, &p));
    let len = frame(&out, usize::MAX).unwrap().unwrap();
    assert_eq!(len, out.len());
    assert_eq!(
        read(out.freeze(), Version::V5),
        Ok(Packet::Publish(p.clone()))
    );

    let mut v4 = BytesMut::new();
    write_publish(&mut v4, Version::V4, &p);
    let back = read(v4.freeze(), Version::V4).unwrap();
    let Packet::Publish(b) = back else {
        panic!("{back:?}")
    };
    assert_eq!(
        (b.topic, b.payload, b.props),
        (p.topic, p.payload, Properties::default())
    );
}

#[test]
fn publish_errors() {
    let mut body = string("a/+");
    body.extend([0, 1]);
    assert_eq!(
        read(framed(0x32, &body), Version::V4),
        Err(Error::TopicName)
    );
    let mut body = string("a");
    body.extend([0, 0]);
    assert_eq!(
        read(framed(0x32, &body), Version::V4),
        Err(Error::Protocol("packet identifier 0"))
    );
    assert_eq!(
        read(framed(0x36, &string("a")), Version::V4),
        Err(Error::Malformed("PUBLISH QoS 3"))
    );
    // v5: empty topic without an alias.
    assert_eq!(
        read(framed(0x30, &[0, 0, 0]), Version::V5),
        Err(Error::TopicName)
    );
}

#[test]
fn subscribe_options() {
    let mut body = vec![0, 9, 2, 0x0B, 5];
    body.extend(string("a/#"));
    body.push(0b0010_1110); // RH 2, RAP, NoLocal, QoS 2
    let p = read(framed(0x82, &body), Version::V5).unwrap();
    assert_eq!(
        p,
        Packet::Subscribe {
            pkid: 9,
            id: Some(5),
            subscriptions: vec![Subscription {
                filter: "a/#".into(),
                qos: 2,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            }],
        }
    );
    // 3.1.1 has no option bits above QoS.
    let mut body = vec![0, 9];
    body.extend(string("a"));
    body.push(0x04);
    assert!(read(framed(0x82, &body), Version::V4).is_err());
    assert_eq!(
        read(framed(0x80, &body), Version::V4),
        Err(Error::Malformed("reserved fixed header flags"))
    );
}

#[test]
fn frames_and_limits() {
    assert_eq!(frame(&[0x30], 100), Ok(None));
    assert_eq!(frame(&[0x30, 3, 0], 100), Ok(None));
    assert_eq!(frame(&[0x30, 1, 0], 100), Ok(Some(3)));
    assert_eq!(
        frame(&[0x30, 0xff, 0xff, 0xff, 0xff], 100),
        Err(Error::Malformed("remaining length longer than 4 bytes"))
    );
    assert_eq!(frame(&[0x30, 0x80, 0x01], 100), Err(Error::TooLarge(131)));
}

#[test]
fn server_packets() {
    let mut out = BytesMut::new();
    write_connack(&mut out, Version::V4, true, 0, &Properties::default());
    assert_eq!(&out[..], &[0x20, 2, 1, 0]);
    let mut out = BytesMut::new();
    let props = Properties {
        receive_maximum: Some(20),
        ..Properties::default()
    };
    write_connack(&mut out, Version::V5, false, 0, &props);
    assert_eq!(&out[..], &[0x20, 6, 0, 0, 3, 0x21, 0, 20]);
    let mut out = BytesMut::new();
    write_ack(
        &mut out,
        Version::V5,
        AckKind::PubAck,
        3,
        reason::NOT_AUTHORIZED,
    );
    assert_eq!(&out[..], &[0x40, 3, 0, 3, 0x87]);
    let mut out = BytesMut::new();
    write_disconnect(&mut out, reason::SESSION_TAKEN_OVER, &Properties::default());
    assert_eq!(&out[..], &[0xE0, 1, 0x8E]);
    let mut out = BytesMut::new();
    write_suback(&mut out, Version::V5, 1, &[0, 2, 0x8F]);
    assert_eq!(&out[..], &[0x90, 6, 0, 1, 0, 0, 2, 0x8F]);
}

#[test]
fn filters_and_matching() {
    for ok in ["a", "a/+/c", "#", "a/#", "+", "$share/g/a/+", "/"] {
        assert!(valid_filter(ok), "{ok}");
    }
    for bad in [
        "",
        "a#",
        "a/#/b",
        "a+",
        "$share/g",
        "$share//a",
        "$share/g+/a",
    ] {
        assert!(!valid_filter(bad), "{bad}");
    }
    assert!(matches("a/b/c", "a/+/c"));
    assert!(matches("a/b/c", "a/#"));
    assert!(matches("a", "a/#"));
    assert!(!matches("a/b", "a"));
    assert!(!matches("$SYS/x", "#"));
    assert!(matches("$SYS/x", "$SYS/#"));
    assert!(matches("a/b", "$share/g/a/+"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Random bytes after a valid fixed header never panic a reader.
    #[test]
    fn random_bodies_never_panic(first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let packet = framed(first, &body);
        let _ = read(packet.clone(), Version::V5);
        let _ = read(packet.clone(), Version::V4);
        let _ = read_connect(packet);
    }

    /// A valid CONNECT cut or mutated anywhere never panics.
    #[test]
    fn mutated_connects_never_panic(at in 0usize..60, byte in any::<u8>(), cut in 0usize..60) {
        let good = connect_v5(0x80 | 0x04 | 0x02, &[3, 0x21, 0, 10]);
        let mut v = good.to_vec();
        if at < v.len() {
            v[at] = byte;
        }
        v.truncate(cut.max(2));
        if let Ok(Some(len)) = frame(&v, 1 << 20) {
            let _ = read_connect(Bytes::copy_from_slice(&v[..len]));
        }
    }

    #[test]
    fn random_streams_frame_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = frame(&bytes, 1 << 20);
    }
}
