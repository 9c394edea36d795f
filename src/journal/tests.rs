//! The journal on a real disk (a temporary directory).

use super::*;

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        space: Space::Records,
        key: key.into(),
        value: Bytes::from(value.to_string()),
    }
}

fn retained(key: &str, value: &str) -> Op {
    Op::Put {
        space: Space::Retained,
        key: key.into(),
        value: Bytes::from(value.to_string()),
    }
}

fn get<'a>(s: &'a State, space: Space, key: &str) -> Option<&'a [u8]> {
    s.get(&(space, key.to_string())).map(|b| &b[..])
}

#[tokio::test]
async fn what_was_acknowledged_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(rec, Recovered::default());
    j.append(vec![put("web", "1"), retained("ha/config", "x")])
        .await
        .unwrap()
        .unwrap();
    j.append(vec![put("web", "2"), put("nas", "3")])
        .await
        .unwrap()
        .unwrap();
    let del = Op::Delete {
        space: Space::Records,
        key: "nas".into(),
    };
    j.append(vec![del]).await.unwrap().unwrap();
    // As a kill -9 would: no clean close (the writer thread is simply gone
    // with the process); what was acknowledged is on disk already.
    std::mem::forget(j);
    let (_j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(get(&rec.state, Space::Records, "web"), Some(&b"2"[..]));
    assert_eq!(get(&rec.state, Space::Records, "nas"), None);
    assert_eq!(
        get(&rec.state, Space::Retained, "ha/config"),
        Some(&b"x"[..])
    );
    assert_eq!(rec.replayed, 5);
}

#[tokio::test]
async fn changes_that_arrive_together_share_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(dir.path()).unwrap();
    let waits: Vec<_> = (0..2000)
        .map(|i| j.append(vec![put(&format!("n{i}"), "{}")]))
        .collect();
    for w in waits {
        w.await.unwrap().unwrap();
    }
    let fsyncs = j.fsyncs();
    assert!(fsyncs < 2000, "{fsyncs} fsyncs for 2,000 changes");
    drop(j);
    let (_j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(rec.state.len(), 2000);
}

#[tokio::test]
async fn a_torn_tail_loses_only_its_entries_and_new_ones_follow_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(dir.path()).unwrap();
    for i in 0..10 {
        j.append(vec![put(&format!("n{i}"), "{}")])
            .await
            .unwrap()
            .unwrap();
    }
    drop(j);
    let path = dir.path().join("journal");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let (j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(rec.state.len(), 9);
    assert_eq!((rec.lost_entries, rec.lost_bytes > 0), (1, true));
    j.append(vec![put("after", "{}")]).await.unwrap().unwrap();
    drop(j);
    let (_j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(
        rec.state.len(),
        10,
        "the new entry was not lost behind the torn one"
    );
    assert_eq!(rec.lost_entries, 0);
}

#[tokio::test]
async fn compaction_keeps_the_state_and_empties_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(dir.path()).unwrap();
    let mut state = State::new();
    for i in 0..100 {
        let op = put(&format!("n{i}"), &i.to_string());
        j.append(vec![op.clone()]).await.unwrap().unwrap();
        apply(&mut state, vec![op]);
    }
    j.compact(state.clone()).await.unwrap().unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("journal")).unwrap().len(),
        0
    );
    j.append(vec![put("n0", "changed")]).await.unwrap().unwrap();
    drop(j);
    let (_j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(rec.state.len(), 100);
    assert_eq!(get(&rec.state, Space::Records, "n0"), Some(&b"changed"[..]));
    assert_eq!(rec.replayed, 1);
}

#[tokio::test]
async fn a_damaged_snapshot_is_moved_aside_and_what_can_be_read_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(dir.path()).unwrap();
    let state: State = (0..10)
        .map(|i| ((Space::Records, format!("n{i}")), Bytes::from_static(b"{}")))
        .collect();
    j.compact(state).await.unwrap().unwrap();
    drop(j);
    let snap = dir.path().join("snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 2);
    std::fs::write(&snap, bytes).unwrap();
    let (_j, rec) = Journal::open(dir.path()).unwrap();
    assert_eq!(rec.state.len(), 9);
    let aside = rec.snapshot_moved_to.expect("moved aside");
    assert!(aside.exists() && !snap.exists());
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_full_disk_is_answered_with_its_error_never_an_acknowledgement() {
    // /dev/full: every write fails with ENOSPC, as a full disk.
    let Ok(full) = OpenOptions::new().append(true).open("/dev/full") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let fsyncs = Arc::new(AtomicU64::new(0));
    let writer = Writer {
        dir: dir.path().to_path_buf(),
        file: full,
        len: 0,
        fsyncs,
    };
    let thread = std::thread::spawn(move || writer.run(rx));
    let (done, answer) = oneshot::channel();
    tx.send(Job::Append(vec![put("web", "{}")], done))
        .ok()
        .unwrap();
    let e = answer.await.unwrap().unwrap_err();
    assert!(e.contains("No space left on device"), "{e}");
    drop(tx);
    thread.join().unwrap();
}
