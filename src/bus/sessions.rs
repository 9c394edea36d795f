//! Sessions by client id: a CONNECT goes to the session of its client id
//! (a takeover or a resume) or starts a new one. A session removes itself
//! under the same lock when it ends, and passes on any connection that
//! reached it meanwhile, so no CONNECT is lost in between.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Bus;
use super::connect::Conn;
use super::session;

/// A live session as the map holds it. Connections travel boxed: a
/// channel allocates room for 32 of what it carries up front (an unboxed
/// `Conn` made that 25 KiB per session).
pub(crate) struct Entry {
    pub(crate) tx: mpsc::UnboundedSender<Box<Conn>>,
    pub(crate) number: u64,
}

/// Hands `conn` to its session, starting one if there is none.
pub fn dispatch(bus: &Arc<Bus>, conn: Conn) {
    let mut map = bus.sessions.lock().unwrap();
    let conn = match map.get(&conn.connect.client_id) {
        Some(entry) => match entry.tx.send(Box::new(conn)) {
            Ok(()) => return,
            // The session is ending and has not removed itself yet.
            Err(mpsc::error::SendError(conn)) => *conn,
        },
        None => conn,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let number = bus.session_number();
    let client_id = conn.connect.client_id.clone();
    tx.send(Box::new(conn)).ok();
    map.insert(client_id.clone(), Entry { tx, number });
    drop(map);
    tokio::spawn(session::run(bus.clone(), client_id, number, rx));
}

/// Removes session `number` of `client_id` from the map, then hands any
/// connection still queued for it to a new session.
pub fn remove(
    bus: &Arc<Bus>,
    client_id: &str,
    number: u64,
    mut rx: mpsc::UnboundedReceiver<Box<Conn>>,
) {
    {
        let mut map = bus.sessions.lock().unwrap();
        if map.get(client_id).is_some_and(|e| e.number == number) {
            map.remove(client_id);
        }
    }
    bus.metrics
        .sessions_ended
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    rx.close();
    while let Ok(conn) = rx.try_recv() {
        dispatch(bus, *conn);
    }
}
