//! The router: who is subscribed to what, the retained messages, and the
//! fan-out of every publish to the sessions that want it, in-process.
//!
//! One lock guards the subscription tree and the retained store, so a
//! subscriber sees every retained message exactly once: as it stood when
//! it subscribed (the snapshot, taken with its subscription under the
//! lock), then every change after it live. A publish is matched and
//! handed to each subscribing link's queue under that lock (a few hundred
//! nanoseconds a subscriber); nothing else happens there.
//!
//! Publishers never wait for subscribers. A link's queue holds up to
//! [`LINK_QUEUE`] messages (a few dozen bytes each: the messages are
//! shared), far more than any burst a house sees, so a subscriber that
//! is slower than its publishers for a while loses nothing, as with
//! Mosquitto, which queues without bound for a connected client; one that
//! stops reading but stays connected loses what does not fit (counted in
//! [`Router::dropped`]) instead of holding memory without bound. The
//! retained messages of a new subscription are not in that queue: the
//! link keeps them (shared with the store) and hands them out as the
//! session takes them.

mod message;
mod store;
mod tree;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

pub use message::{After, Expired, Forwarded, Message, from_stored, now_ms, stored_head};
use store::Store;
use tree::Tree;

/// Messages a link's queue holds before the router drops for it.
pub const LINK_QUEUE: usize = 1 << 20;

/// The running router.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

/// Which retained topics the journal keeps (not the registry's own: it
/// journals its records itself).
pub type Journaled = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner {
    state: Mutex<State>,
    /// Where retained messages are written, as they change.
    journal: std::sync::OnceLock<(crate::journal::Journal, Journaled)>,
    next_link: AtomicU64,
    dropped: AtomicU64,
    link_queue: usize,
}

impl Default for Router {
    fn default() -> Self {
        Router::with_link_queue(LINK_QUEUE)
    }
}

#[derive(Default)]
struct State {
    subs: Tree<Target>,
    retained: Store,
}

#[derive(Clone)]
struct Target {
    link: u64,
    tx: mpsc::Sender<Forwarded>,
    waiters: Arc<Waiters>,
}

/// The publishers' tokens a link holds until its session's next turn.
#[derive(Default)]
struct Waiters(Mutex<WaitState>);

#[derive(Default)]
struct WaitState {
    /// The session is taking messages: it will take its turn soon.
    taking: bool,
    held: Vec<After>,
}

impl Waiters {
    fn state(&self) -> MutexGuard<'_, WaitState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `after` if the session is taking messages.
    fn hold(&self, after: &After) {
        let mut s = self.state();
        if s.taking {
            s.held.push(after.clone());
        }
    }

    /// Lets go of every token held; takes more only if `taking`.
    fn turn(&self, taking: bool) {
        let mut s = self.state();
        s.taking = taking;
        if s.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut s.held);
        drop(s);
        // Dropped outside the lock: the last clone wakes its publisher.
        drop(held);
    }
}

impl tree::Target for Target {
    fn link(&self) -> u64 {
        self.link
    }
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// A router whose links queue `n` messages each.
    pub fn with_link_queue(n: usize) -> Router {
        Router {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                journal: std::sync::OnceLock::new(),
                next_link: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                link_queue: n,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock panics by design; if something did, the
        // tree and store are still whole (every change is one call).
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new link: a place to publish from and subscribe with.
    pub fn link(&self) -> Link {
        let (tx, rx) = mpsc::channel(self.inner.link_queue);
        Link {
            id: self.inner.next_link.fetch_add(1, Ordering::Relaxed) + 1,
            router: self.clone(),
            tx,
            rx,
            backlog: VecDeque::new(),
            filters: HashSet::new(),
            waiters: Arc::default(),
        }
    }

    /// Writes every change to a retained message whose topic `which`
    /// takes to `journal`, in the order the changes are made.
    pub fn journal_retained(&self, journal: crate::journal::Journal, which: Journaled) {
        let _ = self.inner.journal.set((journal, which));
    }

    /// Retained messages recovered at start (not journaled again).
    pub fn restore(&self, messages: Vec<Message>) {
        let mut state = self.state();
        for m in messages {
            state.retained.set(&Arc::new(m));
        }
    }

    /// Messages dropped because a link's queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Retained messages held.
    pub fn retained(&self) -> usize {
        self.state().retained.len()
    }

    /// Whether anyone is subscribed to one of `filters` exactly (as
    /// written, not by a wider wildcard).
    pub fn subscribed(&self, filters: &[String]) -> bool {
        let state = self.state();
        filters.iter().any(|f| state.subs.has_filter(f))
    }

    /// Stores `m` if retained and hands it to every link subscribed to its
    /// topic.
    pub fn publish(&self, m: Message) {
        self.publish_after(m, None);
    }

    /// [`Self::publish`]; how many links it was handed to.
    pub fn publish_counted(&self, m: Message) -> usize {
        self.publish_after(m, None)
    }

    /// [`Self::publish`], with `after` held by each link it is handed to
    /// until that link's session takes its next turn; how many links it
    /// was handed to.
    pub fn publish_after(&self, m: Message, after: Option<&After>) -> usize {
        let m = Arc::new(m);
        let (mut dropped, mut handed) = (0, 0);
        // Built before the lock: a put encodes the properties.
        let journal = self.inner.journal.get();
        let op = match journal {
            Some((_, which)) if m.retain && which(&m.topic) => Some(retained_op(&m)),
            _ => None,
        };
        let mut state = self.state();
        if m.retain {
            state.retained.set(&m);
            if let (Some((j, _)), Some(op)) = (journal, op) {
                j.append(vec![op]);
            }
        }
        state.subs.for_each_match(&m.topic, |t| {
            let f = Forwarded {
                msg: m.clone(),
                from_store: false,
            };
            if t.tx.try_send(f).is_err() {
                dropped += 1;
            } else {
                handed += 1;
                if let Some(after) = after {
                    t.waiters.hold(after);
                }
            }
        });
        drop(state);
        if dropped > 0 {
            self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        handed
    }
}

/// The journal's entry for a change to a retained message (its payload
/// shared, not copied).
fn retained_op(m: &Message) -> crate::journal::Op {
    use crate::journal::{Op, Space, Value};
    let key = m.topic.clone();
    if m.payload.is_empty() {
        Op::Delete {
            space: Space::Retained,
            key,
        }
    } else {
        Op::Put {
            space: Space::Retained,
            key,
            value: Value {
                head: stored_head(m),
                body: m.payload.clone(),
            },
        }
    }
}

/// One session's (or the registry's) place in the router. Its
/// subscriptions end when it is dropped.
pub struct Link {
    id: u64,
    router: Router,
    tx: mpsc::Sender<Forwarded>,
    rx: mpsc::Receiver<Forwarded>,
    /// Retained messages of new subscriptions, not yet taken.
    backlog: VecDeque<Forwarded>,
    filters: HashSet<String>,
    waiters: Arc<Waiters>,
}

impl Link {
    pub fn publish(&self, m: Message) {
        self.router.publish(m);
    }

    /// [`Router::publish_after`].
    pub fn publish_after(&self, m: Message, after: Option<&After>) {
        self.router.publish_after(m, after);
    }

    /// The session's turn: lets go of the publishers' tokens this link
    /// holds (see [`After`]), and says whether it is taking messages now
    /// (a link that is not takes no token: nothing would let it go).
    pub fn turn(&self, taking: bool) {
        self.waiters.turn(taking);
    }

    /// Subscribes to `filter` (`$share/GROUP/f` for a shared
    /// subscription), and with `retained` queues the retained messages it
    /// matches (never for a shared subscription), again when already
    /// subscribed.
    pub fn subscribe(&mut self, filter: &str, retained: bool) {
        let target = Target {
            link: self.id,
            tx: self.tx.clone(),
            waiters: self.waiters.clone(),
        };
        let shared = tree::split_shared(filter).0.is_some();
        let mut state = self.router.state();
        state.subs.insert(filter, target);
        let retained = match retained && !shared {
            true => state.retained.matching(filter, now_ms()),
            false => Vec::new(),
        };
        let expired = state.retained.take_expired();
        if let Some((j, which)) = self.router.inner.journal.get() {
            let ops: Vec<_> = expired
                .iter()
                .filter(|t| which(t))
                .map(|t| crate::journal::Op::Delete {
                    space: crate::journal::Space::Retained,
                    key: t.clone(),
                })
                .collect();
            j.append(ops);
        }
        drop(state);
        self.filters.insert(filter.to_string());
        self.backlog
            .extend(retained.into_iter().map(|msg| Forwarded {
                msg,
                from_store: true,
            }));
    }

    pub fn unsubscribe(&mut self, filter: &str) {
        if self.filters.remove(filter) {
            self.router.state().subs.remove(filter, self.id);
        }
    }

    /// Whether retained messages of a new subscription are yet to be
    /// taken (once not, every one of them has been).
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// The next message for this link.
    pub async fn next(&mut self) -> Forwarded {
        if let Some(f) = self.backlog.pop_front() {
            return f;
        }
        // The link holds a sender itself: the queue never closes.
        self.rx.recv().await.expect("a link holds its own sender")
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.waiters.turn(false);
        if self.filters.is_empty() {
            return;
        }
        let mut state = self.router.state();
        for f in self.filters.drain() {
            state.subs.remove(&f, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::sync::oneshot;

    fn msg(topic: &str, payload: &'static [u8], retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            retain,
            ..Message::default()
        }
    }

    async fn topics(link: &mut Link, n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for _ in 0..n {
            let f = link.next().await;
            v.push(format!("{}={}", f.msg.topic, f.from_store));
        }
        v
    }

    #[tokio::test]
    async fn retained_then_live_each_once() {
        let r = Router::new();
        let p = r.link();
        p.publish(msg("s/a", b"1", true));
        p.publish(msg("s/b", b"1", true));
        p.publish(msg("s/b", b"", true)); // cleared
        let mut s = r.link();
        s.subscribe("s/+", true);
        s.subscribe("s/#", true); // overlapping: still one live delivery
        p.publish(msg("s/c", b"1", false));
        assert_eq!(
            topics(&mut s, 3).await,
            ["s/a=true", "s/a=true", "s/c=false"]
        );
        assert_eq!(r.retained(), 1);
        s.unsubscribe("s/+");
        s.unsubscribe("s/#");
        p.publish(msg("s/d", b"1", false));
        drop(s);
        let mut t = r.link();
        t.subscribe("x", true);
        p.publish(msg("x", b"1", false));
        assert_eq!(topics(&mut t, 1).await, ["x=false"]);
    }

    #[tokio::test]
    async fn a_dropped_link_leaves_nothing_behind() {
        let r = Router::new();
        let mut s = r.link();
        s.subscribe("a/#", true);
        s.subscribe("$share/g/b", true);
        drop(s);
        assert!(r.state().subs.for_each_match_count("a/x") == 0);
        assert!(r.state().subs.for_each_match_count("b") == 0);
    }

    /// A publisher's token is held by each link it reached that is taking
    /// messages, until that link's turn; a link not taking holds none, and
    /// a link that stops taking, or is dropped, lets go at once.
    #[tokio::test]
    async fn tokens_wait_for_each_taking_link_and_no_other() {
        let r = Router::new();
        let (mut a, mut b, c) = (r.link(), r.link(), r.link());
        a.subscribe("t", true);
        b.subscribe("t", true);
        a.turn(true);
        b.turn(true);
        let (after, mut rx) = After::new();
        c.publish_after(msg("t", b"1", false), Some(&after));
        drop(after);
        assert!(rx.try_recv().is_err(), "held by a and b");
        a.turn(true);
        assert!(rx.try_recv().is_err(), "still held by b");
        b.turn(false);
        assert!(
            rx.try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        // b is not taking: only a holds the next one, until it is dropped.
        let (after, mut rx) = After::new();
        c.publish_after(msg("t", b"2", false), Some(&after));
        drop(after);
        assert!(
            rx.try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        drop(a);
        assert!(
            rx.try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(b.next().await.msg.payload, Bytes::from_static(b"1"));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let r = Router::with_link_queue(100);
        let mut s = r.link();
        s.subscribe("t", true);
        for _ in 0..103 {
            r.publish(msg("t", b"1", false));
        }
        assert_eq!(r.dropped(), 3);
        assert!(!s.next().await.from_store);
    }
}
