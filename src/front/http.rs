//! The HTTP API and the WebSocket upgrade (to be written).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::Shared;

/// Serves HTTP/1.1 on `stream` until the client closes it.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = (shared, stream, peer);
}
