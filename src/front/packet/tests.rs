use super::*;
use proptest::prelude::*;

fn frame_of(buf: &[u8]) -> Frame {
    frame(buf, usize::MAX).unwrap().unwrap()
}

/// A CONNECT as paho and mosquitto send it.
fn connect_bytes(level: u8, flags: u8, keep_alive: u16, id: &str, tail: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(tail);
    let mut out = BytesMut::new();
    put_header(&mut out, 0x10, body.len());
    out.extend_from_slice(&body);
    out.to_vec()
}

fn will_tail(level: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    if level == 5 {
        t.extend_from_slice(&[5, 0x18, 0, 0, 0, 9]); // will delay 9 s
    }
    t.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    t.extend_from_slice(topic.as_bytes());
    t.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    t.extend_from_slice(payload);
    t
}

#[test]
fn frames_need_the_whole_packet() {
    assert_eq!(frame(&[], 100), Ok(None));
    assert_eq!(frame(&[0x30], 100), Ok(None));
    assert_eq!(frame(&[0x30, 3, 0], 100), Ok(None));
    let f = frame(&[0x30, 2, 0, 0, 0xC0], 100).unwrap().unwrap();
    assert_eq!((f.header_len, f.len, f.kind()), (2, 4, PUBLISH));
    assert_eq!(
        frame(&[0x30, 0x80, 0x80, 0x80, 0x80, 1], 1 << 30),
        Err(Malformed::Length)
    );
    assert!(frame(&[0x30, 0xff, 0x7f], 100).is_err(), "larger than max");
    let f = frame(&[0x30, 0x80, 0x01], usize::MAX).unwrap();
    assert_eq!(f, None, "128 bytes announced, none there");
}

#[test]
fn connect_without_will_round_trips() {
    for level in [4, 5] {
        let raw = connect_bytes(level, 0x02, 30, "sensor-1", &[]);
        let c = parse_connect(&raw, frame_of(&raw)).unwrap();
        assert_eq!(
            (c.level, c.keep_alive, c.client_id.as_str()),
            (level, 30, "sensor-1")
        );
        assert!(c.clean_start() && c.will.is_none());
        assert_eq!(&encode_connect(&c, "sensor-1", 30)[..], &raw[..]);
    }
}

#[test]
fn connect_will_is_taken_out_and_credentials_kept() {
    for level in [4, 5] {
        let mut tail = will_tail(level, "homicro/services/web", b"");
        tail.extend_from_slice(&[0, 2, b'u', b'1', 0, 2, b'p', b'w']);
        // clean, will, will QoS 1, will retain, password, username
        let raw = connect_bytes(
            level,
            0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80,
            0,
            "a/b",
            &tail,
        );
        let c = parse_connect(&raw, frame_of(&raw)).unwrap();
        let will = c.will.clone().unwrap();
        assert_eq!(will.topic, "homicro/services/web");
        assert!(will.payload.is_empty() && will.retain && will.qos == 1);
        let out = encode_connect(&c, "a%2Fb", 65535);
        let again = parse_connect(&out, frame_of(&out)).unwrap();
        assert!(again.will.is_none());
        assert_eq!(again.client_id, "a%2Fb");
        assert_eq!(again.keep_alive, 65535);
        assert_eq!(
            again.flags,
            0x02 | 0x40 | 0x80,
            "will bits cleared, login kept"
        );
        assert_eq!(again.credentials, c.credentials);
    }
}

#[test]
fn bad_connects_are_errors() {
    let ok = connect_bytes(4, 2, 10, "x", &[]);
    let mut level3 = ok.clone();
    level3[8] = 3;
    assert_eq!(
        parse_connect(&level3, frame_of(&level3)),
        Err(Malformed::Bad("unsupported protocol level"))
    );
    let mut reserved = ok.clone();
    reserved[9] |= 1;
    assert!(parse_connect(&reserved, frame_of(&reserved)).is_err());
    let mut name = ok.clone();
    name[4] = b'X';
    assert!(parse_connect(&name, frame_of(&name)).is_err());
    let short = connect_bytes(4, 0x80, 10, "x", &[0, 5, b'a']);
    assert!(
        parse_connect(&short, frame_of(&short)).is_err(),
        "username cut"
    );
    let extra = connect_bytes(4, 2, 10, "x", &[1]);
    assert!(parse_connect(&extra, frame_of(&extra)).is_err());
}

#[test]
fn client_ids_are_escaped_one_to_one() {
    assert_eq!(broker_client_id("plain-id_1"), "plain-id_1");
    assert_eq!(broker_client_id("a/b+c#d$e"), "a%2Fb%2Bc%23d%24e");
    assert_eq!(broker_client_id("50%"), "50%25");
    assert_ne!(broker_client_id("a/b"), broker_client_id("a%2Fb"));
}

fn publish_bytes(
    first: u8,
    topic: &str,
    pkid: Option<u16>,
    props: Option<&[u8]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if let Some(p) = props {
        body.push(p.len() as u8);
        body.extend_from_slice(p);
    }
    body.extend_from_slice(payload);
    let mut out = BytesMut::new();
    put_header(&mut out, first, body.len());
    out.extend_from_slice(&body);
    out.to_vec()
}

#[test]
fn v5_publish_properties_are_dropped() {
    // user property ("k","v"), content type "json", topic alias 3
    let props = [
        0x26, 0, 1, b'k', 0, 1, b'v', 0x03, 0, 4, b'j', b's', b'o', b'n', 0x23, 0, 3,
    ];
    let raw = publish_bytes(0x33, "a/b", Some(7), Some(&props), b"hi");
    let p = parse_publish(&raw, frame_of(&raw), true).unwrap();
    assert_eq!(
        (p.topic, p.pkid, p.payload, p.topic_alias()),
        ("a/b", Some(7), &b"hi"[..], Some(3))
    );
    let mut out = BytesMut::new();
    encode_publish(&mut out, &p, p.topic, p.payload, true);
    assert_eq!(
        &out[..],
        &publish_bytes(0x33, "a/b", Some(7), Some(&[]), b"hi")[..]
    );
    let bad = publish_bytes(0x30, "t", None, Some(&[0x7f, 0]), b"");
    assert_eq!(
        parse_publish(&bad, frame_of(&bad), true),
        Err(Malformed::Bad("unknown property"))
    );
}

#[test]
fn subscribe_to_registry_filters_asks_for_qos_0() {
    let mut body = vec![0, 9];
    for (f, qos) in [
        ("homicro/services/+", 1u8),
        ("sensors/#", 2),
        ("#", 2),
        ("homicro/events/x", 0),
    ] {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(qos);
    }
    let mut raw = BytesMut::new();
    put_header(&mut raw, 0x82, body.len());
    raw.extend_from_slice(&body);
    let f = frame_of(&raw);
    let n = downgrade_subscribe(&mut raw, f, false, |t| filter_reaches(t, "homicro")).unwrap();
    assert_eq!(n, 2);
    let qos: Vec<u8> = {
        let mut r = Reader {
            buf: &raw[f.header_len + 2..],
        };
        let mut v = Vec::new();
        while !r.buf.is_empty() {
            r.string("f").unwrap();
            v.push(r.u8("o").unwrap());
        }
        v
    };
    assert_eq!(qos, [0, 2, 0, 0]);
}

#[test]
fn which_filters_reach_the_prefix() {
    for f in [
        "#",
        "+/#",
        "homicro/#",
        "homicro/services/+",
        "+/services/web",
        "homicro/+",
    ] {
        assert!(filter_reaches(f, "homicro"), "{f}");
    }
    for f in ["homicro", "other/#", "+", "homicrox/#", "sensors/+/temp"] {
        assert!(!filter_reaches(f, "homicro"), "{f}");
    }
    assert!(filter_reaches("home/+/services/+", "home/homicro"));
    assert!(!filter_reaches("home/x/#", "home/homicro"));
}

#[test]
fn records_without_host_get_the_publishers_address() {
    let out = with_host(br#"{"port":8080,"ttl":"30s"}"#, "192.168.1.20").unwrap();
    assert_eq!(out, br#"{"host":"192.168.1.20","port":8080,"ttl":"30s"}"#);
    assert_eq!(with_host(b" {} ", "::1").unwrap(), br#" {"host":"::1"} "#);
    assert_eq!(with_host(br#"{"host":"nas","port":1}"#, "10.0.0.1"), None);
    assert_eq!(with_host(b"not json", "10.0.0.1"), None);
    assert_eq!(with_host(b"[1]", "10.0.0.1"), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random bytes never panic any parser, and a frame never claims more
    /// bytes than there are.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = crate::front::classify::classify(&bytes);
        if let Ok(Some(f)) = frame(&bytes, 1 << 20) {
            prop_assert!(f.len <= bytes.len() && f.header_len <= f.len);
            let _ = parse_connect(&bytes, f);
            for v5 in [false, true] {
                let _ = parse_publish(&bytes, f, v5);
                let mut copy = bytes.clone();
                let _ = downgrade_subscribe(&mut copy, f, v5, |_| true);
            }
            let _ = disconnect_reason(&bytes, f);
        }
        let _ = with_host(&bytes, "10.0.0.1");
    }

    /// Valid CONNECTs with random fields survive the rewrite.
    #[test]
    fn connects_round_trip(level in 4u8..=5, keep in any::<u16>(), id in "[ -~]{0,40}",
                           user in proptest::option::of("[a-z]{0,10}")) {
        let mut tail = Vec::new();
        let mut flags = 0x02;
        if let Some(u) = &user {
            flags |= 0x80;
            tail.extend_from_slice(&(u.len() as u16).to_be_bytes());
            tail.extend_from_slice(u.as_bytes());
        }
        let raw = connect_bytes(level, flags, keep, &id, &tail);
        let c = parse_connect(&raw, frame_of(&raw)).unwrap();
        prop_assert_eq!(&c.client_id, &id);
        let escaped = broker_client_id(&id);
        prop_assert!(!escaped.contains(['/', '+', '#', '$']));
        let out = encode_connect(&c, &escaped, keep.max(1));
        let again = parse_connect(&out, frame_of(&out)).unwrap();
        prop_assert_eq!(again.client_id.as_str(), &*escaped);
        prop_assert_eq!(again.keep_alive, keep.max(1));
    }

    /// Mutated valid packets (one byte flipped, or cut short) give an error
    /// or a packet, never a panic.
    #[test]
    fn mutated_packets_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut tail = will_tail(5, "homicro/services/web", b"{}");
        tail.extend_from_slice(&[0, 1, b'u']);
        let samples = [
            connect_bytes(5, 0x02 | 0x04 | 0x80, 10, "id", &tail),
            publish_bytes(0x32, "homicro/services/web", Some(1), Some(&[0x23, 0, 1]), br#"{"port":1}"#),
        ];
        for s in samples {
            let mut m = s.clone();
            let i = at.index(m.len());
            m[i] = byte;
            let m = &m[..cut.index(m.len() + 1)];
            if let Ok(Some(f)) = frame(m, 1 << 20) {
                let _ = parse_connect(m, f);
                let _ = parse_publish(m, f, true);
            }
        }
    }
}
