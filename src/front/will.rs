//! Wills, which the front keeps instead of the broker, and how a broker
//! connection is ended.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;
use tracing::warn;

use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use super::claim::PooledId;
use super::packet;

/// How long a will, and a broker connection's close, may take.
pub(crate) const WILL_TIMEOUT: Duration = Duration::from_secs(2);

/// Publishes a will: through the session's own broker connection while it
/// is open (the broker then handles it before that connection's close, and
/// so before a newcomer with the same client id), else through a fresh one.
pub(crate) async fn fire_will(
    shared: &Arc<Shared>,
    will: &packet::Will,
    v5: bool,
    upstream: Option<(&mut OwnedReadHalf, &mut OwnedWriteHalf)>,
) {
    if let Some((rd, wr)) = upstream
        && wr.write_all(&packet::will_publish(will, v5)).await.is_ok()
    {
        close_upstream(rd, wr).await;
        return;
    }
    // A fresh v4 connection, under a pooled id like any clean session.
    let id = PooledId::take(shared);
    let hello = packet::clean_connect_v4(&id.broker_id(), 60);
    let result = timeout(WILL_TIMEOUT, async {
        let stream = TcpStream::connect(shared.v4).await?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        wr.write_all(&hello).await?;
        let mut ack = [0u8; 4];
        rd.read_exact(&mut ack).await?;
        if ack != [0x20, 2, 0, 0] {
            return Err(std::io::Error::other("CONNECT refused"));
        }
        wr.write_all(&packet::will_publish(will, false)).await?;
        close_upstream(&mut rd, &mut wr).await;
        Ok::<(), std::io::Error>(())
    })
    .await;
    if !matches!(result, Ok(Ok(()))) {
        warn!(topic = %will.topic, "will not published: the broker did not answer");
    }
}

/// Ends a broker connection: FIN, then wait (briefly) until the broker has
/// closed its side, so that what was written before is handled before a
/// newcomer with the same client id connects.
///
/// Never with a DISCONNECT packet: rumqttd then handles the disconnect
/// twice (once for the packet, once when its link ends), and the second
/// one, arriving after the connection's id was reused by a new client,
/// drops that new client, often before its CONNACK (seen as "no-connection
/// id N is already gone" in rumqttd's log, and as CONNECTs that are never
/// answered under a storm of short connections).
pub(crate) async fn close_upstream<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
) {
    let _ = wr.shutdown().await;
    drain_until_closed(rd).await;
}

async fn drain_until_closed<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut sink = [0u8; 1024];
    let _ = timeout(WILL_TIMEOUT, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
}
