//! End to end: the bus on the one port. What home clients hit with a
//! broker (keepalive 0, QoS 1 and 2 newcomers to 100,000 records, wills on
//! reconnect, odd client ids, MQTT 5 properties beside 3.1.1 watchers,
//! clean and persistent sessions) and the peer address filled into
//! records. Real clients: raw MQTT, rumqttc v4 and v5, mosquitto_pub/sub
//! 3.1.1 and 5. (Garbage, silence, idle sockets and storms are in
//! tests/robustness.rs; the MQTT conformance checks beside Mosquitto are in
//! tests/conformance, with paho-mqtt.)

mod common;

use std::time::Duration;

use common::raw::{Hello, Raw};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB: &str = r#"{"host":"10.0.0.5","port":8080}"#;

#[tokio::test]
async fn keepalive_0_is_accepted() {
    let s = Serve::start().await;
    for v5 in [false, true] {
        let hello = Hello {
            v5,
            client_id: "paho-ka0",
            keep_alive: 0,
            will: None,
        };
        let (mut c, code) = Raw::connect(s.port(), &hello).await;
        assert_eq!(code, 0, "v5={v5}: CONNACK refused keepalive 0");
        assert_eq!(c.subscribe("homicro/services/web", 0).await, 0);
        c.publish("homicro/services/web", WEB.as_bytes(), true, true, &[])
            .await;
        let (topic, payload, _) = c.next_publish().await.unwrap();
        assert_eq!(
            (topic.as_str(), payload.as_slice()),
            ("homicro/services/web", WEB.as_bytes())
        );
        c.publish("homicro/services/web", b"", true, true, &[])
            .await;
        c.disconnect().await;
    }
}

#[tokio::test]
async fn a_qos1_or_qos2_newcomer_gets_all_hundred_thousand_records() {
    let s = Serve::start().await;
    let n = 100_000;
    fill(&s.url, n).await;

    // paho-style QoS 1 subscriber: granted QoS 1, every record delivered.
    let (mut raw, _) = Raw::connect(
        s.port(),
        &Hello {
            client_id: "ha-like",
            keep_alive: 60,
            ..Hello::default()
        },
    )
    .await;
    assert_eq!(
        raw.subscribe("homicro/services/#", 1).await,
        1,
        "granted QoS"
    );
    let mut got = 0;
    while got < n + 1 {
        let (_, _, retained) = raw.next_publish().await.expect("a record");
        assert!(retained);
        got += 1;
    }
    // rumqttc at QoS 1 and mosquitto_sub at QoS 2 (Node-RED's default).
    let mut rc = Client::connect(&s.url).await;
    rc.client
        .subscribe("homicro/services/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = 0;
    while got < n + 1 {
        if let homicro::mqtt::Incoming::Message { .. } = rc.recv().await {
            got += 1;
        }
    }
    for v in ["mqttv311", "mqttv5"] {
        assert_eq!(mosquitto_sub_records(&s.url, v, 2, n + 1), n + 1, "{v}");
    }
}

#[tokio::test]
async fn a_reconnect_with_the_same_client_id_fires_the_old_will_and_keeps_the_new_one() {
    let s = Serve::start().await;
    let mut watch = Client::connect(&s.url).await;
    watch.subscribe("homicro/services/plug").await;
    let rec = r#"{"host":"10.0.0.40","port":80}"#;
    let hello = Hello {
        client_id: "tasmota-plug",
        keep_alive: 30,
        will: Some(("homicro/services/plug", b"", true)),
        ..Hello::default()
    };
    let (mut old, code) = Raw::connect(s.port(), &hello).await;
    assert_eq!(code, 0);
    old.publish("homicro/services/plug", rec.as_bytes(), true, true, &[])
        .await;
    watch
        .expect_raw("homicro/services/plug", rec.as_bytes())
        .await;

    // Wi-Fi blip: the device reconnects while the old socket is still open.
    let (mut new, code) = Raw::connect(s.port(), &hello).await;
    assert_eq!(code, 0);
    // The old connection's will fired (MQTT: the old session is dropped)...
    watch.expect_raw("homicro/services/plug", b"").await;
    assert!(old.closed_within(WAIT).await, "old connection closed");
    // ...the device registers again, and its new will is still armed.
    new.publish("homicro/services/plug", rec.as_bytes(), true, true, &[])
        .await;
    watch
        .expect_raw("homicro/services/plug", rec.as_bytes())
        .await;
    assert_eq!(
        records(&s.url).await.get("plug").map(String::as_str),
        Some(rec)
    );
    // The device dies for good (no DISCONNECT): the new will clears it.
    drop(new);
    watch.expect_raw("homicro/services/plug", b"").await;
    assert!(!records(&s.url).await.contains_key("plug"));
}

#[tokio::test]
async fn a_disconnect_sends_no_will_and_a_silent_client_is_dropped_with_its_will() {
    let s = Serve::start().await;
    let mut watch = Client::connect(&s.url).await;
    watch.subscribe("test/will/+").await;
    let hello = |id, ka| Hello {
        client_id: id,
        keep_alive: ka,
        will: Some(("test/will/x", b"gone", false)),
        ..Hello::default()
    };
    let (polite, _) = Raw::connect(s.port(), &hello("polite", 30)).await;
    polite.disconnect().await;
    // A half-open client: keepalive 1 s, then silence (no FIN, no data),
    // while the broker keeps writing to it (which restarts rumqttd's own
    // keepalive timer).
    let (mut silent, _) = Raw::connect(s.port(), &hello("silent", 1)).await;
    silent.subscribe("test/busy", 0).await;
    let busy = watch.client.clone();
    let ticker = tokio::spawn(async move {
        loop {
            let _ = busy
                .publish("test/busy", rumqttc::QoS::AtMostOnce, false, "tick")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert!(
        silent.closed_within(Duration::from_secs(5)).await,
        "a client silent past 1.5 x keepalive is dropped"
    );
    ticker.abort();
    watch.expect_raw("test/will/x", b"gone").await;
    assert!(
        watch
            .seen
            .iter()
            .all(|(t, p, _)| !(t == "test/will/x" && p == "gone")),
        "exactly one will (the silent one's): {:?}",
        watch.seen
    );
}

#[tokio::test]
async fn a_client_that_pings_outlives_many_keepalive_periods_and_is_dropped_once_silent() {
    // The keepalive timer is armed once and moved on when it fires early:
    // a client pinging every 0.4 s with keepalive 1 passes the 1.5 s
    // mark three times, then goes silent and is dropped with its will.
    let s = Serve::start().await;
    let mut watch = Client::connect(&s.url).await;
    watch.subscribe("test/will/+").await;
    let hello = Hello {
        client_id: "pinger",
        keep_alive: 1,
        will: Some(("test/will/pinger", b"gone", false)),
        ..Hello::default()
    };
    let (mut pinger, code) = Raw::connect(s.port(), &hello).await;
    assert_eq!(code, 0);
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        pinger.send(&[0xC0, 0x00]).await;
        let (first, _) = pinger
            .read_packet()
            .await
            .unwrap_or_else(|| panic!("closed after {i} pings, {} ms", (i + 1) * 400));
        assert_eq!(first, 0xD0, "PINGRESP");
    }
    assert!(
        watch.seen.iter().all(|(t, _, _)| t != "test/will/pinger"),
        "no will while the client pings: {:?}",
        watch.seen
    );
    let silent = std::time::Instant::now();
    assert!(
        pinger.closed_within(Duration::from_secs(4)).await,
        "a client silent past 1.5 x keepalive is dropped"
    );
    let after = silent.elapsed();
    assert!(
        after >= Duration::from_millis(1000),
        "dropped {after:?} after its last ping: before 1.5 x keepalive"
    );
    watch.expect_raw("test/will/pinger", b"gone").await;
}

#[tokio::test]
async fn client_ids_with_slash_plus_hash_dollar_are_accepted() {
    let s = Serve::start().await;
    for (v5, id) in [
        (false, "home/kitchen+sensor#1"),
        (true, "$esp/32"),
        (false, "50%"),
    ] {
        let (mut c, code) = Raw::connect(
            s.port(),
            &Hello {
                v5,
                client_id: id,
                keep_alive: 30,
                will: None,
            },
        )
        .await;
        assert_eq!(code, 0, "{id}");
        assert_eq!(c.subscribe("test/ids", 0).await, 0);
        c.publish("test/ids", id.as_bytes(), false, false, &[])
            .await;
        let (_, payload, _) = c.next_publish().await.unwrap();
        assert_eq!(payload, id.as_bytes());
    }
    // Two ids that escape alike stay two clients: "a/b" and "a%2Fb".
    let hello = |id| Hello {
        client_id: id,
        keep_alive: 30,
        ..Hello::default()
    };
    let (mut a, _) = Raw::connect(s.port(), &hello("a/b")).await;
    let (_b, _) = Raw::connect(s.port(), &hello("a%2Fb")).await;
    a.subscribe("test/still", 0).await;
    a.publish("test/still", b"here", false, false, &[]).await;
    assert_eq!(a.next_publish().await.unwrap().1, b"here");
}

#[tokio::test]
async fn a_v5_publish_with_properties_leaves_v311_watchers_connected() {
    let s = Serve::start().await;
    let mut v4 = Client::connect(&s.url).await;
    v4.subscribe("homicro/services/+").await;
    let v311 = Proc::mosquitto_sub(&s.url, &["-t", "homicro/services/+"]).await;
    let v5sub = Proc::mosquitto_sub(&s.url, &["-V", "mqttv5", "-t", "homicro/services/+"]).await;
    mosquitto_pub(
        &s.url,
        &[
            "-V",
            "mqttv5",
            "-t",
            "homicro/services/v5svc",
            "-r",
            "-m",
            WEB,
            "-D",
            "publish",
            "user-property",
            "origin",
            "esphome",
            "-D",
            "publish",
            "content-type",
            "application/json",
            "-D",
            "publish",
            "message-expiry-interval",
            "3600",
        ],
    );
    v4.expect_raw("homicro/services/v5svc", WEB.as_bytes())
        .await;
    let line = format!("homicro/services/v5svc {WEB}");
    v311.wait_line(|l| l == line).await;
    v5sub.wait_line(|l| l == line).await;
    // rumqttc v5 with a user property, too.
    let mut o5 = rumqttc::v5::MqttOptions::new("rumqttc-v5", s.url.host.clone(), s.port());
    o5.set_keep_alive(Duration::from_secs(10));
    let (c5, mut el) = rumqttc::v5::AsyncClient::new(o5, 10);
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    c5.publish_with_properties(
        "homicro/services/v5b",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        WEB,
        props,
    )
    .await
    .unwrap();
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    v4.expect_raw("homicro/services/v5b", WEB.as_bytes()).await;
    // Everyone is still connected and still receives.
    mosquitto_pub(&s.url, &["-t", "homicro/services/after", "-r", "-m", WEB]);
    v4.expect_raw("homicro/services/after", WEB.as_bytes())
        .await;
    let after = format!("homicro/services/after {WEB}");
    v311.wait_line(|l| l == after).await;
    v5sub.wait_line(|l| l == after).await;
}

/// A publisher's connection writes its acknowledgements only after the
/// sessions its publishes woke have taken their turn (delivery before
/// acknowledgement, as in Mosquitto). A subscriber whose client reads
/// nothing stops taking messages: it must hold no publisher back. Here it
/// shares the topics with a watcher that reads and with the publisher's
/// own subscription; every publish is acknowledged and delivered.
#[tokio::test]
async fn a_subscriber_that_reads_nothing_holds_no_publisher_back() {
    let s = Serve::start().await;
    let hello = |client_id| Hello {
        client_id,
        keep_alive: 0,
        ..Hello::default()
    };
    let (mut stuck, _) = Raw::connect(s.port(), &hello("reads-nothing")).await;
    assert_eq!(stuck.subscribe("load/#", 1).await, 1);
    let (mut watch, _) = Raw::connect(s.port(), &hello("watch")).await;
    assert_eq!(watch.subscribe("load/#", 1).await, 1);
    let (mut publisher, _) = Raw::connect(s.port(), &hello("pub")).await;
    assert_eq!(publisher.subscribe("load/#", 0).await, 0);
    let (rounds, per_round) = (5, 1000);
    let watcher = tokio::spawn(async move {
        let mut got = 0;
        while got < rounds * per_round {
            let (topic, _, _) = watch.next_publish().await.expect("a message");
            assert!(topic.starts_with("load/"));
            got += 1;
        }
        got
    });
    // 4 KiB each: 20 MiB in all, far more than the stuck client's socket
    // and its session's queue take.
    let payload = vec![b'x'; 4096];
    let batch: Vec<_> = (0..per_round)
        .map(|i| (format!("load/{i}"), payload.clone()))
        .collect();
    for _ in 0..rounds {
        publisher
            .publish_all(&batch, false, Duration::from_secs(5))
            .await;
    }
    let got = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the watcher got every message")
        .unwrap();
    assert_eq!(got, rounds * per_round);
    drop(stuck);
}

#[tokio::test]
async fn a_record_without_host_gets_the_publishers_address() {
    let s = Serve::start().await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/services/nohost").await;
    c.register("nohost", r#"{"port":8123,"role":"hass"}"#).await;
    let rec = c
        .expect("homicro/services/nohost", |v| v["port"] == 8123)
        .await;
    assert_eq!(rec["host"], "127.0.0.1");
    assert_eq!(rec["role"], "hass");
    // A heartbeat without host counts as the same endpoint.
    c.subscribe("homicro/errors/nohost").await;
    c.publish("homicro/heartbeat/nohost", r#"{"port":8123}"#, false)
        .await;
    c.publish(
        "homicro/heartbeat/nohost",
        r#"{"host":"10.0.0.1","port":8123}"#,
        false,
    )
    .await;
    let err = c
        .expect("homicro/errors/nohost", |v| v["error"] == "owned")
        .await;
    assert_eq!(
        err["endpoint"]["host"], "10.0.0.1",
        "only the foreign one refused: {err}"
    );
    assert!(
        c.seen.iter().all(|(t, _, _)| t != "homicro/errors/nohost"),
        "the host-less heartbeat was accepted: {:?}",
        c.seen
    );
    assert!(records(&s.url).await["nohost"].contains("\"host\":\"127.0.0.1\""));
}

#[tokio::test]
async fn rumqttc_v5_registers_and_discovers() {
    let s = Serve::start().await;
    let mut o5 = rumqttc::v5::MqttOptions::new("v5-client", s.url.host.clone(), s.port());
    o5.set_keep_alive(Duration::from_secs(10));
    let (c5, mut el) = rumqttc::v5::AsyncClient::new(o5, 100);
    c5.subscribe(
        "homicro/events/v5web",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    c5.publish(
        "homicro/services/v5web",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        true,
        WEB,
    )
    .await
    .unwrap();
    let ev: Value = tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) =
                el.poll().await.expect("v5 connection")
            {
                return serde_json::from_slice(&p.payload).unwrap();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ev["event"], "registered");
    assert!(records(&s.url).await.contains_key("v5web"));
}

#[tokio::test]
async fn clean_sessions_come_and_go_and_a_persistent_one_is_kept() {
    let s = Serve::start().await;
    // Clean sessions (most devices) end with their connection.
    for i in 0..50 {
        let id = format!("blip-{i}");
        let hello = Hello {
            client_id: &id,
            keep_alive: 30,
            ..Hello::default()
        };
        let (c, code) = Raw::connect(s.port(), &hello).await;
        assert_eq!(code, 0);
        c.disconnect().await;
    }
    // A persistent session (clean session 0) is kept: session present on
    // reconnect.
    let connect = |clean: bool| {
        let mut body = vec![
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,
            if clean { 2 } else { 0 },
            0,
            30,
        ];
        body.extend_from_slice(&[0, 7]);
        body.extend_from_slice(b"durable");
        let mut p = vec![0x10, body.len() as u8];
        p.extend_from_slice(&body);
        p
    };
    let mut t = TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
    t.write_all(&connect(false)).await.unwrap();
    let mut ack = [0u8; 4];
    t.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    let mut sub = vec![0x82, 11, 0, 1, 0, 6];
    sub.extend_from_slice(b"test/d");
    sub.push(1);
    t.write_all(&sub).await.unwrap();
    let mut suback = [0u8; 5];
    t.read_exact(&mut suback).await.unwrap();
    t.write_all(&[0xE0, 0]).await.unwrap();
    drop(t);
    let mut t = TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
    t.write_all(&connect(false)).await.unwrap();
    t.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 1, 0], "session present: the broker kept it");
}
