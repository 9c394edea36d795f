//! The MQTT proxy between a client and rumqttd (to be written).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Shared;

/// How the client reached the front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    WebSocket,
}

/// A live session's handle, for takeovers by the same client id.
pub(crate) struct SessionSlot;

/// Proxies one MQTT client connection (its CONNECT not yet read) to the
/// embedded broker until either side closes.
pub async fn serve<S>(shared: Arc<Shared>, io: S, peer: SocketAddr, via: Via)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = (shared, io, peer, via);
}
