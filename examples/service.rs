//! A small HTTP service that registers itself with homicro (with a health
//! path), serves until Ctrl-C, then deregisters.
//!
//! ```sh
//! cargo run --example service -- hello-1 8081 --version 1.2.0
//! curl localhost:8081/          # hello from hello-1
//! ```

use std::time::Duration;

use clap::Parser;
use homicro::client::{Broker, Registration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    /// The instance's name, e.g. hello-1.
    name: String,
    /// The port to serve HTTP on (0: any free port).
    port: u16,
    #[arg(long, default_value = "hello")]
    role: String,
    #[arg(long, default_value = "1.0.0")]
    version: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value = "mqtt://localhost:1883", value_parser = Broker::parse)]
    broker: Broker,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let port = listener.local_addr()?.port();

    let registration = Registration::builder(&args.name)
        .host(&args.host)
        .port(port)
        .ttl(Duration::from_secs(10))
        .role(&args.role)
        .version(&args.version)
        .scheme("http")
        .health_http("/health")
        .register(&args.broker)
        .await?;
    println!("{} serving on {}:{port}", args.name, args.host);

    let name = args.name.clone();
    let serve = async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let body = if request.starts_with("GET /health") {
                    format!("{{\"name\":\"{name}\"}}")
                } else {
                    format!("hello from {name}\n")
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    registration.deregister().await?;
    println!("{} deregistered", args.name);
    Ok(())
}
