//! The state file's writer: a thread of its own at the lowest CPU
//! priority (Linux `SCHED_IDLE`: preempted by any other thread; on CPUs
//! kept busy it still gets a sliver, so writes are late, not lost). At
//! `nice 10` it still took a CPU for 3 ms at a time to encode 1,000
//! records, while a bus thread woken on that CPU waited its turn: a 2 to
//! 4 ms stall of every publish on the bus once per second (`perf sched
//! timehist`, on 2 cores). It keeps its own copy of the records, brought
//! up to date by the registry's change log, so that the registry's lock is
//! held only for a swap of that log. The last write, at shutdown, runs at
//! normal priority.

use std::collections::HashMap;
use std::path::PathBuf;

use tokio::sync::mpsc;
use tracing::{debug, error};

use super::state::{Changes, Kept};
use crate::record::Name;
use crate::statefile;

/// What the writer is sent: changes to write soon, or the last ones.
enum Job {
    Write(Changes),
    Last(Changes),
}

pub(super) struct Writer {
    tx: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// With `persist` false, changes are taken and forgotten.
    pub fn spawn(path: PathBuf, persist: bool) -> Writer {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("homicro-state".into())
            .spawn(move || {
                set_idle(true);
                let mut records: HashMap<Name, Kept> = HashMap::new();
                let apply = |job: Job, records: &mut HashMap<Name, Kept>| match job {
                    Job::Write(c) => c.apply(records),
                    Job::Last(c) => {
                        set_idle(false);
                        c.apply(records)
                    }
                };
                while let Some(job) = rx.blocking_recv() {
                    if !persist {
                        continue;
                    }
                    apply(job, &mut records);
                    // Whatever came meanwhile goes into the same write.
                    while let Ok(more) = rx.try_recv() {
                        apply(more, &mut records);
                    }
                    let bytes = statefile::encode(records.iter());
                    match statefile::write(&path, &bytes) {
                        Ok(()) => debug!(path = %path.display(), "state file written"),
                        Err(e) => error!(error = %e, "state file not written"),
                    }
                }
            })
            .expect("spawn the state file writer");
        Writer {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Writes the state file with `changes` applied (soon, off the caller's
    /// thread).
    pub fn write(&self, changes: Changes) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Write(changes));
        }
    }

    /// Writes the last changes and waits until the file is written.
    pub async fn finish(mut self, last: Changes) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Job::Last(last));
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Makes the calling thread run only on an otherwise idle CPU (`true`), or
/// as any other thread (`false`). Linux: the policy is per thread.
fn set_idle(idle: bool) {
    #[cfg(target_os = "linux")]
    {
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sets the calling thread's (pid 0) policy from a valid
        // sched_param; a failure leaves the policy as it was.
        unsafe {
            libc::sched_setscheduler(0, policy, &param);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = idle;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of this process's thread named `name` (Linux).
    #[cfg(target_os = "linux")]
    fn policies(name: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let tid: i32 = task.file_name().to_str().unwrap().parse().unwrap();
            if comm.trim_end() == name {
                // SAFETY: reads the policy of one of this process's threads.
                out.push(unsafe { libc::sched_getscheduler(tid) });
            }
        }
        out
    }

    #[tokio::test]
    async fn writes_changes_on_an_idle_priority_thread_and_the_last_ones_at_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let w = Writer::spawn(path.clone(), true);
        let n = |s: &str| Name::parse(s).unwrap();
        let p = |s: &'static str| Kept::of(&bytes::Bytes::from_static(s.as_bytes()), None);
        w.write(Changes::Since(vec![
            (n("web"), Some(p(r#"{"host":"web.local"}"#))),
            (n("nas"), Some(p(r#"{"host":"nas.local"}"#))),
        ]));
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&path).is_ok_and(|t| t.contains("nas.local")) {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        #[cfg(target_os = "linux")]
        assert!(
            policies("homicro-state").contains(&libc::SCHED_IDLE),
            "the writer runs SCHED_IDLE"
        );
        w.finish(Changes::Since(vec![(n("nas"), None)])).await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("web.local") && !text.contains("nas"),
            "{text}"
        );
    }
}
