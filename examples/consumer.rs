//! Finds an instance of `role@range` through a live homicro directory, calls
//! it, and fails over to another instance when one stops answering.
//!
//! ```sh
//! cargo run --example consumer -- 'hello@^1' --count 10
//! ```

use std::time::Duration;

use clap::Parser;
use homicro::client::{Broker, Directory, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// What to call: a role, optionally with a semver range (hello@^1.2).
    #[arg(default_value = "hello@^1")]
    query: String,
    /// How many calls to make.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Pause between calls, in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    #[arg(long, default_value = "mqtt://localhost:1883", value_parser = Broker::parse)]
    broker: Broker,
}

/// GET / on the instance; its body.
async fn call(s: &Service) -> std::io::Result<String> {
    let ep = s.endpoint();
    let addr = (ep.host.as_str(), ep.port.unwrap_or(80));
    let mut sock = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await??;
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(1), sock.read_to_string(&mut reply)).await??;
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(body)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = Directory::connect(&args.broker).await?;
    dir.ready().await;
    dir.wait_for(&args.query, Duration::from_secs(10)).await?;
    for i in 0..args.count {
        loop {
            let Some(service) = dir.pick(&args.query)? else {
                return Err(format!("no live instance of {}", args.query).into());
            };
            match call(&service).await {
                Ok(body) => {
                    println!("{i}: {} answered: {body}", service.name);
                    break;
                }
                Err(e) => {
                    println!("{i}: {} failed ({e}); failing over", service.name);
                    dir.report_failed(&service);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    Ok(())
}
