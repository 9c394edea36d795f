//! Client ids held by live MQTT sessions, for takeovers: a newcomer with a
//! live client id asks the old session to end and waits until its will is
//! out and its broker connection closed, so that rumqttd never sees two
//! connections for one client id (a takeover there fires the wrong will,
//! and one before the first CONNACK can poison its listener).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

use super::Shared;

/// A live session's entry, for takeovers by the same client id.
pub(crate) struct SessionSlot {
    generation: u64,
    kick: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How long a newcomer waits for the session it takes over to end. A
/// session ends within its bounded steps (the CONNACK wait, a write to its
/// client, the will, the broker's close), well within this.
const TAKEOVER_WAIT: Duration = Duration::from_secs(20);

/// The old session did not end in time.
#[derive(Debug)]
pub(crate) struct Stuck;

/// A session's hold on its client id, given back when it drops.
pub(crate) struct Claim {
    shared: Arc<Shared>,
    id: String,
    generation: u64,
    kick: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Claim {
    /// Takes the client id over: asks a live session with the same id to
    /// end, and waits until it has, its will published.
    pub(crate) async fn take(shared: &Arc<Shared>, id: &str) -> Result<Claim, Stuck> {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let mut claim = Claim {
            shared: shared.clone(),
            id: id.to_string(),
            generation,
            kick: None,
            done: None,
        };
        if id.is_empty() {
            // The broker assigns an id: nothing to take over.
            return Ok(claim);
        }
        let (kick_tx, kick_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        (claim.kick, claim.done) = (Some(kick_rx), Some(done_tx));
        let slot = SessionSlot {
            generation,
            kick: kick_tx,
            done: done_rx,
        };
        let previous = shared.sessions.lock().unwrap().insert(id.to_string(), slot);
        if let Some(prev) = previous {
            let _ = prev.kick.send(());
            if timeout(TAKEOVER_WAIT, prev.done).await.is_err() {
                return Err(Stuck);
            }
        }
        Ok(claim)
    }

    /// Resolves when another connection takes the id over.
    pub(crate) async fn kicked(&mut self) {
        if let Some(rx) = self.kick.as_mut()
            && rx.await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await
    }

    /// Whether another connection has asked this session to end.
    pub(crate) fn is_kicked(&mut self) -> bool {
        use tokio::sync::oneshot::error::TryRecvError;
        let Some(rx) = self.kick.as_mut() else {
            return false;
        };
        match rx.try_recv() {
            Err(TryRecvError::Empty) => false,
            // A oneshot must not be polled once it has answered.
            Ok(()) => {
                self.kick = None;
                true
            }
            Err(TryRecvError::Closed) => {
                self.kick = None;
                false
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.id.is_empty()
            && let Ok(mut sessions) = self.shared.sessions.lock()
            && sessions
                .get(&self.id)
                .is_some_and(|s| s.generation == self.generation)
        {
            sessions.remove(&self.id);
        }
        // A newcomer waiting for this session goes on.
        drop(self.done.take());
    }
}

/// Client ids for the broker, for sessions the broker keeps nothing of
/// (clean sessions): rumqttd remembers every client id it has seen (its
/// "graveyard", ~0.9 KiB each), so 100,000 devices that came and went with
/// their own ids would stay in memory for good. Such sessions get an id
/// from this pool instead, reused once its last connection has been closed
/// for `REUSE_AFTER` (rumqttd handles a close after the socket is gone),
/// so rumqttd sees about as many ids as connections live at once. The
/// client's own id still decides takeovers (in the front).
#[derive(Debug, Default)]
pub(crate) struct IdPool {
    free: VecDeque<(u64, Instant)>,
    next: u64,
}

const REUSE_AFTER: Duration = Duration::from_secs(1);

impl IdPool {
    pub(crate) fn take(&mut self, now: Instant) -> u64 {
        if let Some(&(n, at)) = self.free.front()
            && now >= at + REUSE_AFTER
        {
            self.free.pop_front();
            return n;
        }
        self.next += 1;
        self.next
    }

    pub(crate) fn release(&mut self, n: u64, now: Instant) {
        self.free.push_back((n, now));
    }

    /// The broker's client id for pool entry `n`: `%` followed by a letter
    /// never comes out of `packet::broker_client_id`, so it is no client's
    /// own id.
    fn broker_id(n: u64) -> String {
        format!("%pool-{n}")
    }
}

/// A pooled broker id, given back when it drops (after its broker
/// connection was closed).
pub(crate) struct PooledId {
    shared: Arc<Shared>,
    n: u64,
}

impl PooledId {
    pub(crate) fn take(shared: &Arc<Shared>) -> PooledId {
        let n = shared.broker_ids.lock().unwrap().take(Instant::now());
        PooledId {
            shared: shared.clone(),
            n,
        }
    }

    pub(crate) fn broker_id(&self) -> String {
        IdPool::broker_id(self.n)
    }
}

impl Drop for PooledId {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.shared.broker_ids.lock() {
            pool.release(self.n, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids_are_reused_only_after_a_while() {
        let mut p = IdPool::default();
        let t = Instant::now();
        let (a, b) = (p.take(t), p.take(t));
        assert_ne!(a, b);
        p.release(a, t);
        assert_ne!(p.take(t + Duration::from_millis(999)), a, "too soon");
        assert_eq!(p.take(t + REUSE_AFTER), a);
        assert!(!IdPool::broker_id(a).starts_with("%2"));
        assert_ne!(
            crate::front::packet::broker_client_id(&IdPool::broker_id(a)),
            IdPool::broker_id(a),
            "a client using a pool id as its own gets another broker id"
        );
    }
}
