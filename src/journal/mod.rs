//! Durability: every change to the registry's records and to the bus's
//! retained messages is appended to a journal and synced before it is
//! acknowledged; a snapshot, written in the background, lets old journals
//! go.
//!
//! On disk (`DIR/`):
//! - `journal.N`: frames (see [`frame`]) appended by one writer thread.
//!   Every change that arrived while the previous write and fsync ran goes
//!   into the next write, with one fsync for all of them (group commit).
//! - `snapshot`: the whole state as puts, its first frame naming the last
//!   journal it covers; written to `snapshot.tmp`, synced and renamed.
//!
//! When `journal.N` grows past [`Options::compact_after`] (or twice the
//! last snapshot), the writer goes on in `journal.N+1` and a second thread
//! (the compactor, which keeps its own copy of the state, fed with every
//! change after it is written) writes a snapshot covering `journal.N`, then
//! deletes it. Neither the writer nor anyone appending waits for that.
//!
//! Recovery reads the snapshot, then every journal after the one it
//! covers, each up to its first damaged frame; puts and deletes are
//! absolute, so replaying a journal the snapshot already holds changes
//! nothing. A new start always writes to a new journal (nothing is
//! appended behind a torn tail) and snapshots what it read.
//!
//! When the disk fails (full, read-only, I/O error), the writer stops
//! writing (the journal may end in half a frame now), answers every waiter
//! with the error, keeps feeding the compactor, and every
//! [`Options::retry_every`] tries a snapshot of everything in a new
//! journal: once that is written, all of it is on disk and writing goes on.

pub mod frame;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use frame::{Op, Space, Value};

/// The state: every key's value.
pub type State = BTreeMap<(Space, Arc<str>), Value>;

/// How long an acknowledgement waits for the disk before it is refused.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// When to compact and how often to retry a failed disk.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A journal this long (or twice the last snapshot, if longer) is
    /// compacted into a snapshot.
    pub compact_after: u64,
    /// How often a failed disk is tried again.
    pub retry_every: Duration,
    /// How long the writer waits after a change arrives before it writes,
    /// so that more share the write (PostgreSQL's `commit_delay`).
    pub commit_delay: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            compact_after: 32 << 20,
            retry_every: Duration::from_secs(1),
            commit_delay: Duration::from_micros(200),
        }
    }
}

/// What recovery found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub state: State,
    /// Entries replayed from journals (after the snapshot's).
    pub replayed: usize,
    /// Damaged journal tails: their bytes and the entries in them (at
    /// least), not replayed.
    pub lost_bytes: usize,
    pub lost_entries: usize,
    /// A damaged snapshot was copied here (what could be read is kept).
    pub snapshot_moved_to: Option<PathBuf>,
    /// Journals damaged before their last entry, copied here (their
    /// intact prefix is kept).
    pub journals_moved_to: Vec<PathBuf>,
}

/// How far the journal is on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    /// Every append up to this number is on disk.
    pub upto: u64,
    /// Appends from `from` on are not (yet) written, and why.
    pub failure: Option<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub from: u64,
    pub reason: String,
}

/// A handle to the journal; clones share it.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    sending: Mutex<Sending>,
    synced: watch::Sender<Synced>,
    fsyncs: AtomicU64,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The writer's last word: what it could not write (set as it ends).
    last_word: Mutex<Option<String>>,
    /// Held while the journal is open: one process per directory.
    lock: Mutex<Option<File>>,
    /// Tests: every write fails as a full disk would.
    #[cfg(test)]
    fault: std::sync::atomic::AtomicBool,
}

struct Sending {
    /// Appends so far (each gets the next number).
    seq: u64,
    tx: Option<mpsc::Sender<Batch>>,
}

struct Batch {
    seq: u64,
    ops: Vec<Op>,
}

impl Journal {
    /// Recovers the state in `dir` (created when missing) and starts the
    /// writer. A directory that can be read but not written still
    /// recovers: the journal starts failed and retries.
    pub fn open(dir: &Path, opts: Options) -> io::Result<(Journal, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let lock = lock(dir)?;
        let mut rec = Recovered::default();
        let snap_path = dir.join("snapshot");
        let mut covers = 0;
        let mut snapshot_len = 0;
        if let Some(bytes) = read_if_there(&snap_path)? {
            snapshot_len = bytes.len() as u64;
            let read = frame::decode(&bytes);
            for op in read.ops {
                match op {
                    Op::Put {
                        space: Space::Meta,
                        key,
                        value,
                    } if &*key == "covers" && value.len() == 8 => {
                        let v = value.to_bytes();
                        covers = u64::from_le_bytes(v[..].try_into().expect("8 bytes"));
                    }
                    op => apply(&mut rec.state, op),
                }
            }
            if read.lost_bytes > 0 {
                rec.snapshot_moved_to = aside(&snap_path);
            }
        }
        let mut last = covers;
        let mut read_any = false;
        for (n, path) in journals(dir)? {
            last = last.max(n);
            if n <= covers {
                // Covered by the snapshot (a crash came before its delete).
                let _ = std::fs::remove_file(&path);
                continue;
            }
            read_any = true;
            let bytes = read_if_there(&path)?.unwrap_or_default();
            let read = frame::decode(&bytes);
            rec.replayed += read.ops.len();
            rec.lost_bytes += read.lost_bytes;
            rec.lost_entries += read.lost_entries;
            if read.lost_entries > 1 {
                // More than the entry being written when the process
                // stopped: damage. Kept for a look.
                rec.journals_moved_to.extend(aside(&path));
            }
            for op in read.ops {
                apply(&mut rec.state, op);
            }
        }
        let _ = std::fs::remove_file(dir.join("snapshot.tmp"));
        let damaged = rec.snapshot_moved_to.is_some() || !rec.journals_moved_to.is_empty();
        if damaged {
            // What could be read is on disk again before anything else
            // (the damaged files' copies are aside; the originals go).
            match write_snapshot(dir, &rec.state, last) {
                Ok(len) => snapshot_len = len,
                Err(e) => warn!(error = %e, "cannot write a snapshot of what was recovered"),
            }
        }

        let (synced, _) = watch::channel(Synced::default());
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            sending: Mutex::new(Sending {
                seq: 0,
                tx: Some(tx),
            }),
            synced,
            fsyncs: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            last_word: Mutex::new(None),
            lock: Mutex::new(lock),
            #[cfg(test)]
            fault: Default::default(),
        });
        let (to_compactor, compactor_rx) = mpsc::channel();
        let snapshot_len = Arc::new(AtomicU64::new(snapshot_len));
        let compactor = Compactor {
            dir: dir.to_path_buf(),
            state: rec.state.clone(),
            snapshot_len: snapshot_len.clone(),
        };
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            inner: inner.clone(),
            file: None,
            number: last,
            len: 0,
            seen: 0,
            failed: None,
            tried_at: Instant::now(),
            unwritten: Unwritten::default(),
            compactor: to_compactor,
            to_compact: Vec::new(),
            snapshot_len,
            opts,
        };
        match writer.new_journal(last + 1) {
            Ok(file) => {
                writer.file = Some(file);
                writer.number = last + 1;
                if read_any && !damaged {
                    // What was read goes into a snapshot, in the background.
                    writer.rotated(last, None);
                }
            }
            Err(e) => writer.fail(
                1,
                format!("cannot start a journal in {}: {e}", dir.display()),
            ),
        }
        let threads = vec![
            std::thread::Builder::new()
                .name("homicro-compact".into())
                .spawn(move || compactor.run(compactor_rx))?,
            std::thread::Builder::new()
                .name("homicro-journal".into())
                .spawn(move || writer.run(rx))?,
        ];
        *inner.threads.lock().unwrap() = threads;
        Ok((Journal { inner }, rec))
    }

    /// Appends `ops` (in this order, after every earlier append); its
    /// number, for [`Self::synced`].
    pub fn append(&self, ops: Vec<Op>) -> u64 {
        let mut s = self.inner.sending.lock().unwrap_or_else(|e| e.into_inner());
        if ops.is_empty() {
            return s.seq;
        }
        s.seq += 1;
        let seq = s.seq;
        let sent =
            s.tx.as_ref()
                .is_some_and(|tx| tx.send(Batch { seq, ops }).is_ok());
        drop(s);
        if !sent {
            self.inner.synced.send_modify(|st| {
                st.failure.get_or_insert(Failure {
                    from: seq,
                    reason: "the journal is closed".into(),
                });
            });
        }
        seq
    }

    /// The number of the latest append.
    pub fn appended(&self) -> u64 {
        self.inner
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seq
    }

    /// Waits until append `seq` is on disk, or could not be written (the
    /// error says why).
    pub async fn synced(&self, seq: u64) -> Result<(), String> {
        let mut rx = self.inner.synced.subscribe();
        let st = rx
            .wait_for(|s| s.upto >= seq || s.failure.as_ref().is_some_and(|f| f.from <= seq))
            .await
            .map_err(|_| "the journal has stopped".to_string())?;
        if st.upto >= seq {
            return Ok(());
        }
        Err(st
            .failure
            .as_ref()
            .map_or_else(String::new, |f| f.reason.clone()))
    }

    /// Waits until everything appended so far is on disk.
    pub async fn synced_all(&self) -> Result<(), String> {
        self.synced(self.appended()).await
    }

    /// [`Self::synced_all`], giving up after `patience` (a disk that does
    /// not answer: a dying SD card, a hung network filesystem).
    pub async fn synced_all_within(&self, patience: Duration) -> Result<(), String> {
        self.synced_within(self.appended(), patience).await
    }

    /// [`Self::synced`], giving up after `patience`.
    pub async fn synced_within(&self, seq: u64, patience: Duration) -> Result<(), String> {
        match tokio::time::timeout(patience, self.synced(seq)).await {
            Ok(r) => r,
            Err(_) => Err(format!("the disk did not answer within {patience:?}")),
        }
    }

    /// How far the journal is on disk.
    pub fn status(&self) -> Synced {
        self.inner.synced.borrow().clone()
    }

    /// fsyncs of the journal so far.
    pub fn fsyncs(&self) -> u64 {
        self.inner.fsyncs.load(Ordering::Relaxed)
    }

    /// Writes what is left and stops (blocking: call it off the runtime).
    /// `Err` says what could not be written.
    pub fn close(&self) -> Result<(), String> {
        drop(
            self.inner
                .sending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tx
                .take(),
        );
        let threads = std::mem::take(&mut *self.inner.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
        drop(self.inner.lock.lock().unwrap().take());
        match self.inner.last_word.lock().unwrap().take() {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl Journal {
    /// As a kill -9 would leave it: the threads are simply gone (here:
    /// left running, unseen), and so is the process's lock.
    fn abandon(self) {
        drop(self.inner.lock.lock().unwrap().take());
        std::mem::forget(self);
    }
}

/// What has not been written since the disk failed.
#[derive(Default)]
struct Unwritten {
    changes: usize,
    /// The first few keys, to name them.
    keys: Vec<Arc<str>>,
}

impl Unwritten {
    fn note(&mut self, ops: &[Op]) {
        for op in ops {
            let (Op::Put { space, key, .. } | Op::Delete { space, key }) = op;
            if *space == Space::Meta {
                continue;
            }
            self.changes += 1;
            if self.keys.len() < 10 && !self.keys.contains(key) {
                self.keys.push(key.clone());
            }
        }
    }

    fn describe(&self) -> String {
        let more = if self.changes > self.keys.len() {
            ", …"
        } else {
            ""
        };
        format!(
            "{} change(s) not written (to {}{more})",
            self.changes,
            self.keys
                .iter()
                .map(|k| &**k)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

enum ToCompactor {
    Ops(Vec<Op>),
    /// Snapshot everything so far as covering journals up to `covers`, then
    /// delete them; say how it went on `reply`.
    Snapshot {
        covers: u64,
        reply: Option<mpsc::Sender<Result<(), String>>>,
    },
}

struct Writer {
    dir: PathBuf,
    inner: Arc<Inner>,
    /// `journal.{number}`, open for appending (`None` after a failure).
    file: Option<File>,
    number: u64,
    /// Bytes of `file` known written and synced.
    len: u64,
    /// The last append taken from the channel.
    seen: u64,
    failed: Option<Failure>,
    tried_at: Instant,
    unwritten: Unwritten,
    compactor: mpsc::Sender<ToCompactor>,
    /// Changes written, for the compactor: handed over in chunks (a wake
    /// of its thread for every group was measurable CPU) and always before
    /// a snapshot is asked for.
    to_compact: Vec<Op>,
    snapshot_len: Arc<AtomicU64>,
    opts: Options,
}

/// Changes the writer gathers before handing them to the compactor.
const COMPACT_CHUNK: usize = 4096;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Batch>) {
        // Woken for every group: as a batch thread, it never preempts a
        // running bus thread when it wakes (a delivery goes out first).
        set_policy(Policy::Batch);
        loop {
            let first = if self.failed.is_some() {
                let wait = self
                    .opts
                    .retry_every
                    .saturating_sub(self.tried_at.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(b) => b,
                    Err(RecvTimeoutError::Timeout) => {
                        self.recover();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(b) => b,
                    Err(_) => break,
                }
            };
            // Group commit: everything that came meanwhile, and for a
            // moment more (the deliveries of what just came go out first).
            if !self.opts.commit_delay.is_zero() {
                std::thread::sleep(self.opts.commit_delay);
            }
            let from = first.seq;
            let mut ops = first.ops;
            self.seen = first.seq;
            while let Ok(more) = rx.try_recv() {
                self.seen = more.seq;
                ops.extend(more.ops);
            }
            if self.failed.is_none() {
                self.write(&ops, from);
            }
            if self.failed.is_some() {
                self.unwritten.note(&ops);
            }
            self.to_compact.extend(ops);
            if self.to_compact.len() >= COMPACT_CHUNK {
                self.hand_over();
            }
            if self.failed.is_some() {
                if self.tried_at.elapsed() >= self.opts.retry_every {
                    self.recover();
                }
            } else if self.len
                > self
                    .opts
                    .compact_after
                    .max(2 * self.snapshot_len.load(Ordering::Relaxed))
            {
                self.rotate();
            }
        }
        if self.failed.is_some() {
            // The last chance to write it all.
            self.recover();
        }
        if self.failed.is_some() {
            *self.inner.last_word.lock().unwrap() = Some(self.unwritten.describe());
        }
    }

    fn write(&mut self, ops: &[Op], from: u64) {
        let mut buf = Vec::new();
        for op in ops {
            frame::encode(op, &mut buf);
        }
        let injected = self.injected();
        let Some(file) = &mut self.file else {
            return self.fail(from, "no journal open".into());
        };
        let wrote = injected
            .and_then(|()| file.write_all(&buf))
            .and_then(|()| file.sync_data());
        self.inner.fsyncs.fetch_add(1, Ordering::Relaxed);
        match wrote {
            Ok(()) => {
                self.len += buf.len() as u64;
                let upto = self.seen;
                self.inner.synced.send_modify(|s| s.upto = upto);
            }
            Err(e) => {
                // Nothing more goes into this file: it may end in half a
                // frame now.
                let _ = file.set_len(self.len);
                self.file = None;
                self.fail(from, format!("journal not written: {e}"));
            }
        }
    }

    fn fail(&mut self, from: u64, reason: String) {
        error!(dir = %self.dir.display(), error = %reason,
            "the disk failed: changes are not acknowledged as durable until it is written again");
        self.tried_at = Instant::now();
        let failure = Failure { from, reason };
        self.failed = Some(failure.clone());
        self.inner.synced.send_modify(|s| s.failure = Some(failure));
    }

    /// After a failure: a snapshot of everything in a new journal.
    fn recover(&mut self) {
        self.tried_at = Instant::now();
        let next = self.number + 1;
        let file = match self.new_journal(next) {
            Ok(f) => f,
            Err(e) => return self.still_failing(format!("cannot start a journal: {e}")),
        };
        let (reply, answer) = mpsc::channel();
        self.rotated(self.number, Some(reply));
        match answer.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.still_failing(e),
            Err(_) => return self.still_failing("the compactor has stopped".into()),
        }
        self.file = Some(file);
        self.number = next;
        self.len = 0;
        self.failed = None;
        let upto = self.seen;
        info!(dir = %self.dir.display(), written = self.unwritten.changes,
            "the disk works again: everything is written, and acknowledged from now on");
        self.unwritten = Unwritten::default();
        self.inner.synced.send_modify(|s| {
            s.upto = upto;
            // An append made after close was never seen: it stays failed.
            s.failure = s.failure.take().filter(|f| f.from > upto);
        });
    }

    fn still_failing(&mut self, reason: String) {
        if let Some(f) = &mut self.failed
            && f.reason != reason
        {
            warn!(error = %reason, "the disk still fails");
            f.reason = reason.clone();
            self.inner.synced.send_modify(|s| {
                if let Some(f) = &mut s.failure {
                    f.reason = reason;
                }
            });
        }
    }

    /// Goes on in a new journal; the old one is snapshotted meanwhile.
    fn rotate(&mut self) {
        let next = self.number + 1;
        match self.new_journal(next) {
            Ok(file) => {
                self.rotated(self.number, None);
                self.file = Some(file);
                self.number = next;
                self.len = 0;
            }
            Err(e) => {
                // Not urgent: this journal takes more meanwhile.
                warn!(error = %e, "cannot start a new journal; compaction waits");
                self.snapshot_len.store(self.len, Ordering::Relaxed);
            }
        }
    }

    fn rotated(&mut self, covers: u64, reply: Option<mpsc::Sender<Result<(), String>>>) {
        self.hand_over();
        let _ = self.compactor.send(ToCompactor::Snapshot { covers, reply });
    }

    /// Hands the changes gathered so far to the compactor.
    fn hand_over(&mut self) {
        if !self.to_compact.is_empty() {
            let ops = std::mem::take(&mut self.to_compact);
            let _ = self.compactor.send(ToCompactor::Ops(ops));
        }
    }

    /// A fault a test asked for.
    fn injected(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.inner.fault.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(())
    }

    fn new_journal(&self, n: u64) -> io::Result<File> {
        self.injected()?;
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(format!("journal.{n}")))?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        Ok(f)
    }
}

struct Compactor {
    dir: PathBuf,
    state: State,
    snapshot_len: Arc<AtomicU64>,
}

impl Compactor {
    fn run(mut self, rx: mpsc::Receiver<ToCompactor>) {
        set_policy(Policy::Batch);
        while let Ok(job) = rx.recv() {
            match job {
                ToCompactor::Ops(ops) => {
                    for op in ops {
                        apply(&mut self.state, op);
                    }
                }
                ToCompactor::Snapshot { covers, reply } => {
                    // In the background, preempted by any other thread (see
                    // `set_idle`); changes are taken in at normal priority,
                    // so they do not pile up behind a busy CPU. A snapshot
                    // the writer waits for (after a failure) runs at once.
                    let idle = reply.is_none();
                    if idle {
                        set_policy(Policy::Idle);
                    }
                    let result = write_snapshot(&self.dir, &self.state, covers)
                        .map(|len| self.snapshot_len.store(len, Ordering::Relaxed))
                        .map_err(|e| format!("snapshot not written: {e}"));
                    set_policy(Policy::Batch);
                    match (&result, &reply) {
                        (Err(e), None) => warn!(error = %e, "compaction failed; the journals stay"),
                        (Ok(()), _) => tracing::debug!(covers, "snapshot written"),
                        _ => {}
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }
}

/// Writes `state` as the snapshot covering journals up to `covers` (to a
/// temporary file, synced, renamed), then deletes those journals; its
/// length.
fn write_snapshot(dir: &Path, state: &State, covers: u64) -> io::Result<u64> {
    let tmp = dir.join("snapshot.tmp");
    let written = (|| {
        let mut f = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let mut buf = Vec::new();
        frame::encode(
            &Op::Put {
                space: Space::Meta,
                key: "covers".into(),
                value: Value::whole(Bytes::copy_from_slice(&covers.to_le_bytes())),
            },
            &mut buf,
        );
        let mut len = 0;
        for ((space, key), value) in state {
            frame::encode(
                &Op::Put {
                    space: *space,
                    key: key.clone(),
                    value: value.clone(),
                },
                &mut buf,
            );
            if buf.len() > 1 << 16 {
                f.write_all(&buf)?;
                len += buf.len();
                buf.clear();
            }
        }
        f.write_all(&buf)?;
        len += buf.len();
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join("snapshot"))?;
        sync_dir(dir)?;
        Ok(len as u64)
    })();
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    for (n, path) in journals(dir)? {
        if n <= covers {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(len)
}

/// Copies a damaged file to `FILE.bad-UNIXTIME` (`None`: it could not be).
fn aside(path: &Path) -> Option<PathBuf> {
    let mut to = path.as_os_str().to_owned();
    to.push(format!(".bad-{}", unix_now()));
    let to = PathBuf::from(to);
    std::fs::copy(path, &to).ok().map(|_| to)
}

/// Locks `dir` for this process (`DIR/lock`, `flock`): a second `serve` on
/// the same directory would truncate and delete this one's journals. A
/// directory where the lock file cannot even be made (read-only) is not
/// locked.
fn lock(dir: &Path) -> io::Result<Option<File>> {
    let path = dir.join("lock");
    let file = match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(_) => match File::open(&path) {
            Ok(f) => f,
            Err(_) => return Ok(None),
        },
    };
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another homicro serve is using this directory",
                ));
            }
            return Err(e);
        }
    }
    Ok(Some(file))
}

/// `journal.N` files in `dir`, by N.
fn journals(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|s| s.strip_prefix("journal."))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Applies one change to `state`.
pub fn apply(state: &mut State, op: Op) {
    match op {
        Op::Put { space, key, value } => {
            state.insert((space, key), value);
        }
        Op::Delete { space, key } => {
            state.remove(&(space, key));
        }
    }
}

fn read_if_there(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match File::open(path) {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Persists a rename or a new file in `dir`.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How the kernel schedules the journal's threads (Linux; the policy is
/// per thread).
#[derive(Clone, Copy)]
enum Policy {
    /// `SCHED_BATCH`: a fair share of the CPU, but a wake-up never preempts
    /// the thread running (measured: as ordinary threads, the writer and
    /// the compactor, woken for every group commit, pushed item 2's
    /// propagation p50 from 0.037 to 0.114 ms).
    Batch,
    /// `SCHED_IDLE`: only on an otherwise idle CPU; on CPUs kept busy it
    /// still gets a sliver, so a background snapshot is late, not lost.
    Idle,
}

fn set_policy(p: Policy) {
    #[cfg(target_os = "linux")]
    {
        let policy = match p {
            Policy::Batch => libc::SCHED_BATCH,
            Policy::Idle => libc::SCHED_IDLE,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sets the calling thread's (pid 0) policy from a valid
        // sched_param; a failure leaves the policy as it was.
        unsafe {
            libc::sched_setscheduler(0, policy, &param);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = p;
}

#[cfg(test)]
mod tests;
