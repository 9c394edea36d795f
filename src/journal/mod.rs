//! Durability (issue 11, first part; not yet wired into serve): an
//! append-only journal of changes with group commit, compacted into a
//! snapshot, and recovery from both.
//!
//! `DIR/journal` holds frames (see [`frame`]) appended by one writer
//! thread: every change that arrived while the previous write and fsync
//! ran goes into the next write, with one fsync for all of them, and each
//! change's waiter hears only after its bytes are synced. `DIR/snapshot`
//! holds the whole state as puts, written to a temporary file, synced and
//! renamed; the journal is then emptied. Recovery reads the snapshot and
//! then the journal's intact prefix (puts and deletes are absolute, so a
//! crash between the rename and the emptying replays harmlessly).

pub mod frame;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

pub use frame::{Op, Space};

/// The state: every key's value.
pub type State = BTreeMap<(Space, String), Bytes>;

/// What recovery found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub state: State,
    /// Entries replayed from the journal.
    pub replayed: usize,
    /// A torn or damaged journal tail: its bytes and the entries in it (at
    /// least), cut off.
    pub lost_bytes: usize,
    pub lost_entries: usize,
    /// A damaged snapshot was moved here (what could be read is kept).
    pub snapshot_moved_to: Option<PathBuf>,
}

enum Job {
    Append(Vec<Op>, oneshot::Sender<Result<(), String>>),
    Compact(State, oneshot::Sender<Result<(), String>>),
}

/// The journal's writer.
pub struct Journal {
    tx: mpsc::UnboundedSender<Job>,
    fsyncs: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Journal {
    /// Recovers the state in `dir` (created when missing) and starts the
    /// writer.
    pub fn open(dir: &Path) -> io::Result<(Journal, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let mut rec = Recovered::default();
        let snap_path = dir.join("snapshot");
        if let Some(bytes) = read_if_there(&snap_path)? {
            let read = frame::decode(&bytes);
            apply(&mut rec.state, read.ops);
            if read.lost_bytes > 0 {
                let aside = dir.join(format!("snapshot.bad-{}", unix_now()));
                std::fs::rename(&snap_path, &aside)?;
                rec.snapshot_moved_to = Some(aside);
            }
        }
        let path = dir.join("journal");
        let bytes = read_if_there(&path)?.unwrap_or_default();
        let read = frame::decode(&bytes);
        rec.replayed = read.ops.len();
        rec.lost_bytes = read.lost_bytes;
        rec.lost_entries = read.lost_entries;
        apply(&mut rec.state, read.ops);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        // New entries follow the intact prefix, never a torn tail.
        file.set_len(read.intact as u64)?;
        file.sync_all()?;
        sync_dir(dir);
        let (tx, rx) = mpsc::unbounded_channel();
        let fsyncs = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            len: read.intact as u64,
            fsyncs: fsyncs.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("homicro-journal".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            Journal {
                tx,
                fsyncs,
                thread: Some(thread),
            },
            rec,
        ))
    }

    /// Appends `ops`; the answer comes once they are on disk (or could not
    /// be written: the error says why).
    pub fn append(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Job::Append(_, done))) =
            self.tx.send(Job::Append(ops, done))
        {
            let _ = done.send(Err("the journal has stopped".into()));
        }
        rx
    }

    /// Writes `state` (everything appended so far applied) as the
    /// snapshot and empties the journal.
    pub fn compact(&self, state: State) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Job::Compact(state, done));
        rx
    }

    /// fsyncs of the journal so far.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Close the channel, then let the writer finish what it holds.
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    dir: PathBuf,
    file: File,
    /// Bytes known written and synced.
    len: u64,
    fsyncs: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut next = rx.blocking_recv();
        while let Some(job) = next.take() {
            match job {
                Job::Compact(state, done) => {
                    let _ = done.send(self.compact(&state).map_err(|e| e.to_string()));
                    next = rx.blocking_recv();
                }
                Job::Append(ops, done) => {
                    // Group commit: everything that came meanwhile.
                    let mut group = vec![(ops, done)];
                    loop {
                        match rx.try_recv() {
                            Ok(Job::Append(ops, done)) => group.push((ops, done)),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let result = self.write(group.iter().flat_map(|(ops, _)| ops));
                    for (_, done) in group {
                        let _ = done.send(result.clone());
                    }
                    if next.is_none() {
                        next = rx.blocking_recv();
                    }
                }
            }
        }
    }

    fn write<'a>(&mut self, ops: impl Iterator<Item = &'a Op>) -> Result<(), String> {
        let mut buf = Vec::new();
        for op in ops {
            frame::encode(op, &mut buf);
        }
        let wrote = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        match wrote {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Nothing half-written stays in front of the next entries.
                let _ = self.file.set_len(self.len);
                Err(format!("journal not written: {e}"))
            }
        }
    }

    fn compact(&mut self, state: &State) -> io::Result<()> {
        let mut buf = Vec::new();
        for ((space, key), value) in state {
            let op = Op::Put {
                space: *space,
                key: key.clone(),
                value: value.clone(),
            };
            frame::encode(&op, &mut buf);
        }
        let tmp = self.dir.join("snapshot.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("snapshot"))?;
        sync_dir(&self.dir);
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }
}

fn apply(state: &mut State, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put { space, key, value } => {
                state.insert((space, key), value);
            }
            Op::Delete { space, key } => {
                state.remove(&(space, key));
            }
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

/// Persists a rename or a new file in `dir` (not every filesystem can).
fn sync_dir(dir: &Path) {
    let _ = File::open(dir).and_then(|d| d.sync_all());
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
