//! The journal on a real disk (a temporary directory).

use super::*;

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        space: Space::Records,
        key: key.into(),
        value: Value::whole(Bytes::from(value.to_string())),
    }
}

fn retained(key: &str, value: &str) -> Op {
    Op::Put {
        space: Space::Retained,
        key: key.into(),
        value: Value::whole(Bytes::from(value.to_string())),
    }
}

fn get(s: &State, space: Space, key: &str) -> Option<Vec<u8>> {
    s.get(&(space, Arc::from(key)))
        .map(|v| v.to_bytes().to_vec())
}

fn open(dir: &Path) -> (Journal, Recovered) {
    Journal::open(dir, Options::default()).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Waits (bounded) for `f` to hold.
async fn until(mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn what_was_acknowledged_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (j, rec) = open(dir.path());
    assert_eq!(rec, Recovered::default());
    let a = j.append(vec![put("web", "1"), retained("ha/config", "x")]);
    let b = j.append(vec![put("web", "2"), put("nas", "3")]);
    assert!(b > a);
    let del = Op::Delete {
        space: Space::Records,
        key: "nas".into(),
    };
    let c = j.append(vec![del]);
    j.synced(c).await.unwrap();
    assert_eq!(j.appended(), c);
    // As a kill -9 would: no clean close (the threads are simply gone with
    // the process); what was acknowledged is on disk already.
    j.abandon();
    let (_j, rec) = open(dir.path());
    assert_eq!(get(&rec.state, Space::Records, "web"), Some(b"2".to_vec()));
    assert_eq!(get(&rec.state, Space::Records, "nas"), None);
    assert_eq!(
        get(&rec.state, Space::Retained, "ha/config"),
        Some(b"x".to_vec())
    );
    assert_eq!(rec.replayed, 5);
}

#[tokio::test]
async fn changes_that_arrive_together_share_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    let seqs: Vec<u64> = (0..2000)
        .map(|i| j.append(vec![put(&format!("n{i}"), "{}")]))
        .collect();
    for s in seqs {
        j.synced(s).await.unwrap();
    }
    let fsyncs = j.fsyncs();
    assert!(fsyncs < 2000, "{fsyncs} fsyncs for 2,000 changes");
    j.close().unwrap();
    let (_j, rec) = open(dir.path());
    assert_eq!(rec.state.len(), 2000);
}

#[tokio::test]
async fn a_torn_tail_loses_only_its_entries_and_new_ones_are_not_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    for i in 0..10 {
        let s = j.append(vec![put(&format!("n{i}"), "{}")]);
        j.synced(s).await.unwrap();
    }
    j.abandon();
    let path = dir.path().join("journal.1");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let (j, rec) = open(dir.path());
    assert_eq!(rec.state.len(), 9);
    assert_eq!((rec.lost_entries, rec.lost_bytes > 0), (1, true));
    let s = j.append(vec![put("after", "{}")]);
    j.synced(s).await.unwrap();
    j.abandon();
    let (_j, rec) = open(dir.path());
    assert!(
        get(&rec.state, Space::Records, "after").is_some(),
        "the new entry was not lost behind the torn one"
    );
    assert_eq!(rec.state.len(), 10);
}

#[tokio::test]
async fn a_long_journal_is_compacted_in_the_background_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        compact_after: 4096,
        ..Options::default()
    };
    let (j, _) = Journal::open(dir.path(), opts).unwrap();
    let mut last = 0;
    for round in 0..20 {
        for i in 0..50 {
            last = j.append(vec![put(&format!("n{i}"), &format!("{round}-{i}"))]);
        }
        j.synced(last).await.unwrap();
    }
    let del = Op::Delete {
        space: Space::Records,
        key: "n0".into(),
    };
    j.synced(j.append(vec![del])).await.unwrap();
    until(|| dir.path().join("snapshot").exists()).await;
    // Old journals go once a snapshot covers them.
    until(|| {
        files(dir.path())
            .iter()
            .filter(|f| f.starts_with("journal."))
            .count()
            <= 2
    })
    .await;
    j.abandon();
    let (_j, rec) = open(dir.path());
    assert_eq!(rec.state.len(), 49);
    assert_eq!(
        get(&rec.state, Space::Records, "n1"),
        Some(b"19-1".to_vec())
    );
    assert_eq!(get(&rec.state, Space::Records, "n0"), None);
}

#[tokio::test]
async fn a_restart_snapshots_what_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    j.synced(j.append(vec![put("web", "1")])).await.unwrap();
    j.close().unwrap();
    let (j, rec) = open(dir.path());
    assert_eq!(rec.replayed, 1);
    until(|| !dir.path().join("journal.1").exists()).await;
    j.close().unwrap();
    assert_eq!(files(dir.path()), ["journal.2", "lock", "snapshot"]);
    let (_j, rec) = open(dir.path());
    assert_eq!((rec.replayed, rec.state.len()), (0, 1), "from the snapshot");
}

#[tokio::test]
async fn a_damaged_snapshot_is_copied_aside_and_what_can_be_read_is_written_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    for i in 0..10 {
        j.append(vec![put(&format!("n{i}"), "{}")]);
    }
    j.synced_all().await.unwrap();
    j.close().unwrap();
    let (j, _) = open(dir.path());
    until(|| !dir.path().join("journal.1").exists()).await;
    j.close().unwrap();
    let snap = dir.path().join("snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 2);
    std::fs::write(&snap, &bytes).unwrap();
    let (j, rec) = open(dir.path());
    assert_eq!(rec.state.len(), 9);
    let aside = rec.snapshot_moved_to.expect("copied aside");
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        bytes,
        "the damaged one, as it was"
    );
    // A kill now loses nothing that was read: the new snapshot is there.
    j.abandon();
    let (_j, rec) = open(dir.path());
    assert_eq!((rec.state.len(), rec.snapshot_moved_to), (9, None));
}

/// Damage before a journal's end (not a torn last entry): what comes
/// before it is kept and written at once, the journal is copied aside for
/// a look, and nothing after the damage is mistaken for an entry.
#[tokio::test]
async fn damage_inside_a_journal_keeps_its_prefix_and_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    for i in 0..10 {
        j.synced(j.append(vec![put(&format!("n{i}"), "{}")]))
            .await
            .unwrap();
    }
    j.abandon();
    let path = dir.path().join("journal.1");
    let mut bytes = std::fs::read(&path).unwrap();
    let one = bytes.len() / 10;
    bytes[one * 4 + 10] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let (j, rec) = open(dir.path());
    assert_eq!((rec.state.len(), rec.lost_entries), (4, 6));
    assert_eq!(rec.journals_moved_to.len(), 1);
    assert!(!path.exists(), "covered by the snapshot written at once");
    j.abandon();
    let (_j, rec) = open(dir.path());
    assert_eq!((rec.state.len(), rec.lost_entries), (4, 0));
}

#[tokio::test]
async fn one_process_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    let e = Journal::open(dir.path(), Options::default())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("another homicro serve"), "{e}");
    j.close().unwrap();
    // Let go at close.
    let (_j, _) = open(dir.path());
}

/// A full disk: every waiter hears the error (never an acknowledgement),
/// and once the disk works again everything, the changes made meanwhile
/// included, is written by itself.
#[tokio::test]
async fn a_failing_disk_is_answered_with_its_error_and_recovery_writes_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        retry_every: Duration::from_millis(50),
        ..Options::default()
    };
    let (j, _) = Journal::open(dir.path(), opts).unwrap();
    j.synced(j.append(vec![put("before", "1")])).await.unwrap();
    j.inner.fault.store(true, Ordering::Relaxed);
    let s = j.append(vec![put("during", "2")]);
    let e = j.synced(s).await.unwrap_err();
    assert!(e.contains("No space left on device"), "{e}");
    let failure = j.status().failure.expect("failing");
    assert_eq!(failure.from, s);
    // Later changes are refused too, at once.
    let e = j
        .synced(j.append(vec![put("later", "3")]))
        .await
        .unwrap_err();
    assert!(e.contains("No space left"), "{e}");
    j.inner.fault.store(false, Ordering::Relaxed);
    until(|| j.status().failure.is_none()).await;
    j.synced(j.append(vec![put("after", "4")])).await.unwrap();
    j.abandon();
    let (_j, rec) = open(dir.path());
    for k in ["before", "during", "later", "after"] {
        assert!(get(&rec.state, Space::Records, k).is_some(), "{k}");
    }
}

#[tokio::test]
async fn closing_on_a_failed_disk_says_what_was_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    j.inner.fault.store(true, Ordering::Relaxed);
    let s = j.append(vec![put("web", "1"), retained("a/b", "x")]);
    assert!(j.synced(s).await.is_err());
    let e = tokio::task::spawn_blocking(move || j.close())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e, "2 change(s) not written (to web, a/b)");
}

#[tokio::test]
async fn appends_after_close_are_never_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path());
    j.close().unwrap();
    let e = j.synced(j.append(vec![put("web", "1")])).await.unwrap_err();
    assert!(e.contains("closed"), "{e}");
}
