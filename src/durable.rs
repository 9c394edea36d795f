//! The state directory at start: the journal, what it recovered (records
//! for the registry, retained messages for the bus), and the migration of
//! a state file from before the journal.

use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use crate::bus::router::{Message, from_stored};
use crate::identity::Identity;
use crate::journal::{self, Journal, Space};
use crate::record::{Name, Record};
use crate::registry::state::{Kept, ops_for, recovered};
use crate::statefile::{self, Loaded};

/// An open state directory (`journal: None`: none, nothing kept).
#[derive(Default)]
pub struct Opened {
    pub journal: Option<Journal>,
    pub records: Vec<(Name, Record, Option<Identity>)>,
    pub retained: Vec<Message>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot use state_dir {dir}: {source}")]
pub struct DirError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

/// Opens `dir` (created when missing), recovering what it holds; when it
/// holds nothing and `legacy` (a pre-journal state file) exists, that is
/// read, written to the journal and renamed `FILE.migrated`.
pub async fn open(dir: &Path, legacy: Option<&Path>) -> Result<Opened, DirError> {
    let d = dir.to_path_buf();
    let opened =
        tokio::task::spawn_blocking(move || Journal::open(&d, journal::Options::default()))
            .await
            .expect("journal recovery does not panic");
    let (journal, rec) = opened.map_err(|source| DirError {
        dir: dir.to_path_buf(),
        source,
    })?;
    if let Some(aside) = &rec.snapshot_moved_to {
        error!(copied_to = %aside.display(),
            "the snapshot is damaged: copied aside; what could be read of it is kept");
    }
    for aside in &rec.journals_moved_to {
        error!(copied_to = %aside.display(),
            "a journal is damaged before its end: copied aside; the entries before the damage are kept");
    }
    if rec.lost_entries > 0 {
        warn!(
            lost_entries = rec.lost_entries,
            lost_bytes = rec.lost_bytes,
            "a journal ended in a torn or damaged entry: cut off (an entry being written \
             when the process stopped was never acknowledged); everything before it is kept"
        );
    }
    let mut records = recovered(&rec.state);
    let mut retained = Vec::new();
    for ((space, topic), value) in &rec.state {
        if *space != Space::Retained {
            continue;
        }
        match from_stored(topic, value.to_bytes()) {
            Some(m) => retained.push(m),
            None => warn!(
                topic = &**topic,
                "skipped a stored retained message that cannot be read"
            ),
        }
    }
    info!(dir = %dir.display(), records = records.len(), retained = retained.len(),
        replayed = rec.replayed, "state recovered");
    let migrated = rec
        .state
        .contains_key(&(Space::Meta, std::sync::Arc::from(MIGRATED)));
    if let Some(file) = legacy.filter(|f| f.exists() && !migrated) {
        if records.is_empty() && retained.is_empty() {
            records = migrate(&journal, file).await;
        } else {
            warn!(state_file = %file.display(),
                "an old state file is left alone: state_dir already holds state");
        }
    }
    Ok(Opened {
        journal: Some(journal),
        records,
        retained,
    })
}

/// The journal's note that an old state file was migrated (never again).
const MIGRATED: &str = "migrated";

/// Reads a pre-journal state file into the journal, then renames it.
async fn migrate(journal: &Journal, file: &Path) -> Vec<(Name, Record, Option<Identity>)> {
    let records = match statefile::load(file) {
        Loaded::Missing => return Vec::new(),
        Loaded::Records(r) => r,
        Loaded::Discarded { error, moved_to } => {
            error!(error = %error, moved_to = ?moved_to, "old state file unusable; not migrated");
            return Vec::new();
        }
    };
    let mut ops = Vec::with_capacity(2 * records.len() + 1);
    ops.push(journal::Op::Put {
        space: Space::Meta,
        key: MIGRATED.into(),
        value: journal::Value::whole(bytes::Bytes::from(file.display().to_string())),
    });
    for (name, record, owner) in &records {
        ops.push(ops_for(
            name,
            Some(Kept::of(record.payload(), owner.as_ref())),
        ));
    }
    if let Err(e) = journal.synced(journal.append(ops)).await {
        error!(error = %e, state_file = %file.display(),
            "old state file not migrated (it stays, and is read again at the next start)");
        return records;
    }
    let mut done = file.as_os_str().to_owned();
    done.push(".migrated");
    match std::fs::rename(file, &done) {
        Ok(()) => info!(records = records.len(), from = %file.display(), renamed = ?done,
            "old state file migrated into the journal"),
        Err(e) => warn!(error = %e, from = %file.display(),
            "old state file migrated, but not renamed (the journal notes it is done: it is ignored from now on)"),
    }
    records
}
