//! The examples, run for real: two instances of `examples/service` and
//! `examples/consumer` failing over when one dies.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use homicro::client::Directory;

fn example(name: &str) -> PathBuf {
    // target/debug/deps/examples-HASH → target/debug/examples/NAME
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[tokio::test]
async fn the_consumer_fails_over_when_a_service_dies() {
    let s = Serve::start().await;
    let b = s.url.to_string();
    let one = Proc::spawn(Command::new(example("service")).args([
        "hello-1",
        "0",
        "--version",
        "1.2.0",
        "--broker",
        &b,
    ]));
    let mut two = Proc::spawn(Command::new(example("service")).args([
        "hello-2",
        "0",
        "--version",
        "1.3.0",
        "--broker",
        &b,
    ]));
    let old = Proc::spawn(Command::new(example("service")).args([
        "hello-0",
        "0",
        "--version",
        "0.9.0",
        "--broker",
        &b,
    ]));
    for p in [&one, &two, &old] {
        p.wait_line(|l| l.contains("serving on")).await;
    }
    let dir = Directory::connect(&s.url).await.unwrap();
    dir.ready().await;
    assert_eq!(dir.find("hello@^1").unwrap().len(), 2);
    assert_eq!(
        dir.get("hello-1")
            .unwrap()
            .record
            .health
            .as_ref()
            .unwrap()
            .check,
        homicro::record::HealthCheck::Http("/health".into())
    );

    let consumer = Proc::spawn(Command::new(example("consumer")).args([
        "hello@^1",
        "--count",
        "30",
        "--interval-ms",
        "20",
        "--broker",
        &b,
    ]));
    consumer.wait_line(|l| l.starts_with("3: ")).await;
    // hello-2 dies without deregistering (its record lives on for its ttl).
    signal(two.child.id(), "KILL");
    two.wait_exit().await;
    consumer
        .wait_line(|l| l.starts_with("29: ") && l.contains("answered"))
        .await;
    let out = consumer.messages();
    let answered = out.iter().filter(|l| l.contains("answered")).count();
    assert_eq!(answered, 30, "every call answered by someone: {out:#?}");
    assert!(out.iter().any(|l| l.contains("hello-2 failed")), "{out:#?}");
    assert!(
        out.iter().all(|l| !l.contains("hello-0")),
        "0.9.0 is outside ^1"
    );
    assert!(out.last().unwrap().contains("hello-1 answered"));

    // Ctrl-C on a service deregisters it.
    let mut rx = dir.changes();
    let mut one = one;
    signal(one.child.id(), "INT");
    assert!(one.wait_exit().await.success());
    tokio::time::timeout(WAIT, async {
        while !matches!(rx.recv().await, Ok(homicro::client::Change::Removed(ref s)) if s.name.as_str() == "hello-1") {}
    })
    .await
    .unwrap();
}
