//! End to end: the bus on the one port under abuse. Garbage, silence and
//! random bytes are closed without slowing anyone; 10,000 idle sockets and
//! storms of short connections are served; clients that stop reading or
//! send too much are dropped with their wills. Real clients: raw sockets,
//! raw MQTT and rumqttc.

mod common;

use common::raw::{Hello, Raw};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB: &str = r#"{"host":"10.0.0.5","port":8080}"#;

/// `serve` with a short handshake timeout (`embedded.connect_timeout`).
async fn serve_with_timeout(timeout: &str) -> (Serve, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("homicro.toml");
    std::fs::write(
        &conf,
        format!("[embedded]\nconnect_timeout = \"{timeout}\"\n"),
    )
    .unwrap();
    let s = Serve::start_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            conf.to_str().unwrap(),
        ],
        &tmp.path().join("state"),
    )
    .await;
    (s, tmp)
}

#[tokio::test]
async fn garbage_and_silence_are_closed_and_nothing_else_is_slowed() {
    let (s, _tmp) = serve_with_timeout("1s").await;
    let mut c = Client::connect(&s.url).await;
    // A TLS hello, a PUBLISH before CONNECT, and random bytes: closed.
    for junk in [
        &[0x16u8, 0x03, 0x01, 0x02, 0x00][..],
        &[0x30, 0x02, 0, 0],
        b"\x00\xffhello",
    ] {
        let mut t = TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
        t.write_all(junk).await.unwrap();
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(WAIT, t.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{junk:?} not closed: {n:?}");
    }
    // A bad CONNECT (protocol level 3) gets CONNACK 1, then closed.
    let mut t = TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
    t.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 10, 0, 0])
        .await
        .unwrap();
    let mut b = [0u8; 4];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(b, [0x20, 2, 0, 1]);
    // Silence: closed after the handshake timeout.
    let mut quiet = TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
    let mut half = TcpStream::connect(("127.0.0.1", s.port())).await.unwrap();
    half.write_all(&[0x10, 20, 0, 4]).await.unwrap(); // a CONNECT cut short
    for t in [&mut quiet, &mut half] {
        let n = tokio::time::timeout(WAIT, t.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    // The registry answered all along.
    c.register("web", WEB).await;
    s.wait_log("neither MQTT nor HTTP").await;
}

#[tokio::test]
async fn ten_thousand_idle_connections_slow_nothing_and_are_closed() {
    raise_fd_limit();
    let (s, _tmp) = serve_with_timeout("3s").await;
    let mut c = Client::connect(&s.url).await;
    c.subscribe("homicro/events/+").await;
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(TcpStream::connect(("127.0.0.1", s.port())).await.unwrap());
    }
    // With 10,000 sockets open and silent, registrations go on as usual.
    let start = std::time::Instant::now();
    for i in 0..20 {
        c.register(
            &format!("busy-{i}"),
            &format!(r#"{{"host":"10.0.0.{i}","port":1}}"#),
        )
        .await;
    }
    let took = start.elapsed();
    println!("20 registrations with 10,000 idle sockets open: {took:?}");
    // ...and every idle socket is closed at the handshake deadline.
    for t in &mut idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, t.read(&mut b)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    c.register("after", WEB).await;
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads and writes a live local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[tokio::test]
async fn a_storm_of_short_connections_gets_every_connack() {
    // rumqttd's own listener left a few percent of these unanswered (a
    // connection id reused while its old DISCONNECT was handled twice);
    // the bus answers every one.
    let s = Serve::start().await;
    let port = s.port();
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            tokio::spawn(async move {
                for i in 0..150 {
                    let id = format!("storm-{t}-{i}");
                    let hello = Hello {
                        client_id: &id,
                        keep_alive: 30,
                        ..Hello::default()
                    };
                    let (c, code) = Raw::connect(port, &hello).await;
                    assert_eq!(code, 0);
                    c.disconnect().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn random_bytes_after_any_start_never_hang_or_harm_the_bus() {
    let (s, _tmp) = serve_with_timeout("1s").await;
    let mut c = Client::connect(&s.url).await;
    c.register("steady", WEB).await;
    // xorshift: reproducible random bytes without another dependency.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut valid_connect = Vec::new();
    // keepalive 1 s: a session the junk leaves idle ends in 1.5 s.
    valid_connect.extend_from_slice(&[0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 1]);
    valid_connect.extend_from_slice(&[0, 4, b'f', b'u', b'z', b'z']);
    let starts: [&[u8]; 5] = [
        b"",
        &[0x10],
        &valid_connect,
        b"GET /",
        b"PUT /register HTTP/1.1\r\n",
    ];
    let mut tasks = Vec::new();
    for i in 0..300 {
        let start = starts[i % starts.len()].to_vec();
        let junk: Vec<u8> = (0..(next() % 512)).map(|_| next() as u8).collect();
        let port = s.port();
        tasks.push(tokio::spawn(async move {
            let mut t = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let _ = t.write_all(&start).await;
            let _ = t.write_all(&junk).await;
            // Whatever the bus answers, it closes (or the 1 s handshake
            // timeout does) without hanging.
            let mut sink = [0u8; 4096];
            let closed = tokio::time::timeout(WAIT, async {
                loop {
                    match t.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(closed.is_ok(), "connection {i} left open");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Nothing registered was lost, and the registry still answers.
    c.register("after-fuzz", r#"{"host":"10.0.0.6","port":1}"#)
        .await;
    assert!(records(&s.url).await.contains_key("steady"));
}

#[tokio::test]
async fn clients_that_stop_reading_are_dropped_with_their_will_and_can_be_taken_over() {
    let s = Serve::start().await;
    let mut watch = Client::connect(&s.url).await;
    watch.subscribe("test/will/+").await;
    let hello = |v5, id, ka, will| Hello {
        v5,
        client_id: id,
        keep_alive: ka,
        will: Some((will, b"gone", false)),
    };
    // Two clients subscribe to a flood and never read again: a v5 one that
    // another connection then takes over, and a v4 one with keepalive 2.
    let (mut stuck5, _) = Raw::connect(s.port(), &hello(true, "stuck5", 60, "test/will/a")).await;
    stuck5.subscribe("test/flood", 0).await;
    let (mut stuck4, _) = Raw::connect(s.port(), &hello(false, "stuck4", 2, "test/will/b")).await;
    stuck4.subscribe("test/flood", 0).await;
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..1_000 {
        watch.publish("test/flood", chunk.clone(), false).await;
    }
    // 16 MB later both sockets are full. The takeover still completes, and
    // the old session's will fires.
    let start = std::time::Instant::now();
    let (_new5, code) = Raw::connect(s.port(), &hello(true, "stuck5", 60, "test/will/c")).await;
    assert_eq!(code, 0);
    println!("takeover of a stuck session took {:?}", start.elapsed());
    watch.expect_raw("test/will/a", b"gone").await;
    // The v4 one is dropped when a write to it has waited 1.5 x keepalive
    // (at least 5 s), and its will fires.
    watch.expect_raw("test/will/b", b"gone").await;
}

#[tokio::test]
async fn a_payload_over_the_limit_closes_the_client_and_its_will_goes_out() {
    let s = Serve::start().await;
    let mut watch = Client::connect(&s.url).await;
    watch.subscribe("test/will/+").await;
    let hello = Hello {
        client_id: "rude",
        keep_alive: 30,
        will: Some(("test/will/rude", b"gone", false)),
        ..Hello::default()
    };
    let (mut c, code) = Raw::connect(s.port(), &hello).await;
    assert_eq!(code, 0);
    // A payload just over `max_payload_size` (1 MiB; the packet limit has
    // room for headers above it): the connection is closed, the will goes
    // out.
    let big = vec![b'x'; (1 << 20) + 1000];
    c.publish("test/big", &big, false, false, &[]).await;
    assert!(c.closed_within(WAIT).await);
    watch.expect_raw("test/will/rude", b"gone").await;
}
