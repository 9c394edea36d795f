//! The state file of homicro before the journal (0.1): read once at start
//! and migrated into the state directory (see [`crate::durable`]).
//!
//! Format: `{"version":1,"records":{"NAME":"<record JSON as published>"},
//! "owners":{"NAME":"10.0.0.5" or "user:alice"}}`. Records are kept as
//! strings so that a re-publish after a restart is byte-identical to what
//! the owner published; `owners` (who wrote each record) may be missing, as
//! in files written before it existed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::identity::Identity;
use crate::record::{Name, Record};

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    records: BTreeMap<String, String>,
    #[serde(default)]
    owners: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read state file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No state file yet: a first start.
    Missing,
    /// Each record with who wrote it, where the file says.
    Records(Vec<(Name, Record, Option<Identity>)>),
    /// The file could not be used; it was moved to `moved_to` (or could not
    /// be moved, `None`) and serve starts empty.
    Discarded {
        error: StateFileError,
        moved_to: Option<PathBuf>,
    },
}

/// Reads the state file. Individual records that no longer validate are
/// skipped with a warning; a file that cannot be used at all is moved aside,
/// never overwritten.
pub fn load(path: &Path) -> Loaded {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(source) => {
            let error = StateFileError::Unreadable {
                path: path.to_path_buf(),
                source,
            };
            return discard(path, error);
        }
    };
    // The same name twice: JSON leaves it to the reader which one counts
    // (this one keeps the last); say so rather than choose silently.
    if let Err(e) = serde_json::from_slice::<crate::record::strict::Strict>(&text)
        && e.to_string().starts_with(crate::record::strict::DUPLICATE)
    {
        warn!(path = %path.display(), error = %e,
            "the state file names something twice; the last one is kept");
    }
    let file: File = match serde_json::from_slice(&text) {
        Ok(f) => f,
        Err(e) => {
            let error = StateFileError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            };
            return discard(path, error);
        }
    };
    if file.version != VERSION {
        let error = StateFileError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("version {} is not {VERSION}", file.version),
        };
        return discard(path, error);
    }
    let mut records = Vec::with_capacity(file.records.len());
    for (name, payload) in file.records {
        let owner = file.owners.get(&name).and_then(|o| {
            let id = Identity::from_stored(o);
            if id.is_none() {
                warn!(path = %path.display(), name, owner = o, "a stored owner is not an identity; the record's next writer owns it");
            }
            id
        });
        let parsed = Name::parse(&name)
            .and_then(|n| Record::parse(&n, Bytes::from(payload)).map(|r| (n, r, owner)));
        match parsed {
            Ok(nr) => records.push(nr),
            Err(e) => warn!(path = %path.display(), name, error = %e, "skipped a stored record"),
        }
    }
    Loaded::Records(records)
}

fn discard(path: &Path, error: StateFileError) -> Loaded {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".bad-{stamp}"));
    let aside = PathBuf::from(aside);
    let moved_to = std::fs::rename(path, &aside).ok().map(|_| aside);
    Loaded::Discarded { error, moved_to }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::record::parsed as rec;

    #[test]
    fn round_trip_keeps_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        assert!(matches!(load(&path), Loaded::Missing));
        let (web, nas) = (
            rec("web", r#"{"port":1, "host":"h","x":[1]}"#),
            rec("nas", r#"{"host":"n"}"#),
        );
        let alice = Some(Identity::user("alice"));
        // As homicro 0.1 wrote it.
        let text = r#"{"version":1,"records":{
"nas":"{\"host\":\"n\"}",
"web":"{\"port\":1, \"host\":\"h\",\"x\":[1]}"
},"owners":{
"web":"user:alice"
}}
"#;
        std::fs::write(&path, text).unwrap();
        let Loaded::Records(mut got) = load(&path) else {
            panic!("not loaded")
        };
        got.sort_by(|a, b| b.0.cmp(&a.0));
        assert_eq!(got, vec![(web.0, web.1, alice), (nas.0, nas.1, None)]);
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, "{ half").unwrap();
        let Loaded::Discarded { error, moved_to } = load(&path) else {
            panic!("not discarded")
        };
        assert!(error.to_string().contains("is corrupt"), "{error}");
        let moved = moved_to.unwrap();
        assert_eq!(std::fs::read_to_string(moved).unwrap(), "{ half");
        assert!(!path.exists());
    }

    #[test]
    fn unreadable_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::create_dir(&path).unwrap();
        let Loaded::Discarded { error, moved_to } = load(&path) else {
            panic!("not discarded")
        };
        assert!(
            error.to_string().starts_with("cannot read state file"),
            "{error}"
        );
        assert!(moved_to.unwrap().is_dir());
        assert!(!path.exists());
    }

    #[test]
    fn bad_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(
            &path,
            r#"{"version":1,"records":{"ok":"{\"host\":\"h\"}","Bad":"{\"host\":\"h\"}","x":"[]"}}"#,
        )
        .unwrap();
        let Loaded::Records(got) = load(&path) else {
            panic!()
        };
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.as_str(), "ok");
    }
}
