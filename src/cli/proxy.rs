//! `homicro proxy [--listen 127.0.0.1:PORT] QUERY`: a local TCP port that
//! forwards each connection to an instance of QUERY picked at that moment
//! from the live directory, so a program that only knows
//! `localhost:5984` reaches whichever CouchDB 3.x is alive.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{CliError, fail};
use crate::client::{Broker, Directory, DirectoryOptions, Service};
use crate::record::{Name, Query};

/// Each direction's copy buffer: 512 KiB a connection in all (1 MiB each
/// measured 0.69, at 2 MiB a connection). See `forward` for what else was
/// measured against it.
const BUF: usize = 256 << 10;

/// How long connecting to an instance may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Forwards connections on `listen` to instances of `query` until `stop`.
pub async fn proxy(
    broker: &Broker,
    prefix: &str,
    listen: SocketAddr,
    query: &str,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    Query::parse(query).map_err(|e| CliError {
        code: 2,
        message: format!("{e}: QUERY is a service name or role@range, such as couchdb@3.x"),
    })?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| fail(format!("cannot listen on {listen}: {e}")))?;
    let bound = listener.local_addr().map_err(fail)?;
    let options = DirectoryOptions {
        prefix: prefix.to_string(),
        ..Default::default()
    };
    let dir = Directory::connect_with(broker, options).await?;
    tokio::time::timeout(2 * crate::client::ANSWER_TIMEOUT, dir.ready())
        .await
        .map_err(|_| fail(format!("no answer from {broker}")))?;
    println!("proxying {bound} -> {query}");
    info!(%bound, query, "proxying");
    tokio::pin!(stop);
    loop {
        let (conn, peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (dir, query) = (dir.clone(), query.to_string());
        tokio::spawn(async move { forward(&dir, &query, conn, peer).await });
    }
}

/// One connection: to the first instance that accepts it.
async fn forward(dir: &Directory, query: &str, mut conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nodelay(true);
    let tries = candidates(dir, query).max(1);
    for _ in 0..tries {
        let Some(svc) = pick(dir, query) else {
            break;
        };
        let ep = svc.endpoint();
        let Some(port) = ep.port else {
            debug!(instance = %svc.name, "no port in the record; skipped");
            dir.report_failed(&svc);
            continue;
        };
        let addr = (ep.host.as_str(), port);
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
        let mut upstream = match upstream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(instance = %svc.name, error = %e, "instance refused; trying the next");
                dir.report_failed(&svc);
                continue;
            }
            Err(_) => {
                warn!(instance = %svc.name, "instance did not answer; trying the next");
                dir.report_failed(&svc);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        debug!(%peer, instance = %svc.name, "connected");
        // Large buffers: a bulk transfer moves in few system calls
        // (measured, 100 MB through it: 0.48 of a direct connection's rate
        // with tokio's 8 KiB, 0.63 with 256 KiB; splice(2) through a pipe
        // did worse here, 0.52).
        //
        // Measured since (bench item 11, 5-run medians of proxy / direct;
        // 2 cores shared with other builds, so one design spans 0.45-0.65
        // from series to series):
        //   this (tokio, 256 KiB)                          0.47 0.53 0.55 0.57
        //   a blocking std thread per direction, splice(2)
        //     socket -> 1 MiB pipe -> socket, SPLICE_F_MOVE  0.44 0.46 0.56
        //     ... and SPLICE_F_MORE into the socket          0.50 0.66
        //   the same threads, blocking read/write 256 KiB   0.50 0.58 0.62
        //     ... and SO_RCVBUF/SO_SNDBUF 1 MiB             0.46 0.47
        //   this, and SO_RCVBUF/SO_SNDBUF 1 MiB             0.62
        // None is better beyond the noise, and the threads cost two a
        // connection. perf (3 x 2 GB) says why: with any of them, the
        // bench's writer and reader and the proxy together spend about
        // twice the CPU per byte of a direct connection; splice makes the
        // proxy itself cheapest, but more bytes are in flight than a core's
        // 1 MiB L2 holds, so the reader's copy out costs 2.5-3.7x as much.
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut upstream, BUF, BUF).await;
        return;
    }
    warn!(%peer, query, "no live instance: connection closed");
}

/// How many instances QUERY names now.
fn candidates(dir: &Directory, query: &str) -> usize {
    if Name::parse(query).is_ok() && dir.get(query).is_some() {
        return 1;
    }
    dir.find(query).map_or(0, |v| v.len())
}

/// The service named QUERY, or the next live instance of the role.
fn pick(dir: &Directory, query: &str) -> Option<Service> {
    if Name::parse(query).is_ok()
        && let Some(s) = dir.get(query)
    {
        return Some(s);
    }
    dir.pick(query).ok().flatten()
}
