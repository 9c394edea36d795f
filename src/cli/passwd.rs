//! `homicro passwd FILE USER`: adds a user to a Mosquitto password file or
//! changes its password (`--delete`: removes it). The password comes from
//! a prompt (twice, not echoed) or, when stdin is not a terminal, from its
//! first line; never from the command line, where `ps` and the shell's
//! history would show it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use super::{CliError, fail, usage};
use crate::auth::passwd::{Hash, Users, valid_user};

/// What `passwd` did, for its one line of output.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Added,
    Changed,
    Deleted,
}

pub fn passwd(file: &Path, user: &str, delete: bool) -> Result<(), CliError> {
    valid_user(user).map_err(usage)?;
    let done = if delete {
        update(file, user, None)?
    } else {
        let password = read_password()?;
        update(file, user, Some(Hash::new(password.as_bytes())))?
    };
    let what = match done {
        Done::Added => "added",
        Done::Changed => "changed the password of",
        Done::Deleted => "deleted",
    };
    println!("{what} {user} in {}", file.display());
    Ok(())
}

/// Sets (or with `None` removes) `user` in `file`, which is created when
/// missing (readable by its owner only) and otherwise rewritten whole, in
/// one rename. A file with errors is left as it is.
pub fn update(file: &Path, user: &str, hash: Option<Hash>) -> Result<Done, CliError> {
    let shown = file.display().to_string();
    let mut users = match std::fs::read_to_string(file) {
        Ok(text) => Users::parse(&shown, &text).map_err(usage)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && hash.is_some() => Users::default(),
        Err(e) => return Err(fail(format!("{shown}: cannot read: {e}"))),
    };
    let known = users.get(user).is_some();
    let done = match hash {
        Some(h) => {
            users.set(user, h);
            if known { Done::Changed } else { Done::Added }
        }
        None if known => {
            users.remove(user);
            Done::Deleted
        }
        None => return Err(fail(format!("{shown}: no user {user:?}"))),
    };
    write(file, users.to_text().as_bytes())
        .map_err(|e| fail(format!("{shown}: cannot write: {e}")))?;
    Ok(done)
}

/// Writes `text` to `file` in one rename, through a new temporary file that
/// only its owner can read (an old one left behind is never reused), and
/// keeps an existing file's owner and group, so that the broker reading it
/// still can.
fn write(file: &Path, text: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let old = std::fs::metadata(file).ok();
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    if let Some(m) = &old {
        // Only root may give a file away; anyone else keeps their own.
        let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
    }
    f.write_all(text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}

fn read_password() -> Result<String, CliError> {
    let stdin = std::io::stdin();
    let password = if stdin.is_terminal() {
        let first = prompt("Password: ")?;
        let again = prompt("Reenter password: ")?;
        if first != again {
            return Err(fail("the passwords do not match"));
        }
        first
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| fail(format!("cannot read the password from stdin: {e}")))?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        return Err(usage("the password is empty"));
    }
    Ok(password)
}

/// Reads a line from the terminal with echo off.
fn prompt(text: &str) -> Result<String, CliError> {
    eprint!("{text}");
    let _ = std::io::stderr().flush();
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a valid termios to write into.
    let have = unsafe { libc::tcgetattr(fd, &mut old) } == 0;
    if have {
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: a termios derived from the terminal's own.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if have {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    }
    read.map_err(|e| fail(format!("cannot read the password: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_changes_deletes_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        assert_eq!(
            update(&f, "alice", Some(Hash::new(b"a"))).unwrap(),
            Done::Added
        );
        assert_eq!(
            update(&f, "bob", Some(Hash::new(b"b"))).unwrap(),
            Done::Added
        );
        assert_eq!(
            update(&f, "alice", Some(Hash::new(b"a2"))).unwrap(),
            Done::Changed
        );
        let users = Users::parse("pw", &std::fs::read_to_string(&f).unwrap()).unwrap();
        assert!(users.get("alice").unwrap().verify(b"a2"));
        assert!(users.get("bob").unwrap().verify(b"b"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(update(&f, "bob", None).unwrap(), Done::Deleted);
        assert!(
            update(&f, "bob", None)
                .unwrap_err()
                .message
                .contains("no user \"bob\"")
        );
    }

    #[test]
    fn a_file_with_errors_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "alice:plain\n").unwrap();
        let e = update(&f, "bob", Some(Hash::new(b"b"))).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.ends_with("pw:1: user \"alice\": the password is not hashed (plain text); hash the file with `mosquitto_passwd -U FILE` or add users with `homicro passwd`"), "{}", e.message);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "alice:plain\n");
    }
}
