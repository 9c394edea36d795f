//! Mosquitto's password file, so that a house keeps the file and the tool
//! (`mosquitto_passwd`) it already has. One `user:hash` per line; blank
//! lines and `#` comments are skipped. Hashes:
//!
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 of the password with
//!   SALT, 64 bytes (mosquitto_passwd's default since Mosquitto 2.0);
//! - `$6$SALT$HASH`: SHA-512 of the password followed by SALT (Mosquitto
//!   1.6 and earlier; `mosquitto_passwd -H sha512`).
//!
//! SALT and HASH are standard base64. Pure: text in, users out.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha512};

/// The iterations `homicro passwd` writes into a new `$7$` hash (Mosquitto
/// writes 101; more makes a stolen file slower to attack and costs each
/// CONNECT with a password a few milliseconds).
pub const ITERATIONS: u32 = 10_000;

/// One user's hash.
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl fmt::Debug for Hash {
    /// Never shows the hash itself (logs, panics).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hash::Sha512 { .. } => f.write_str("$6$…"),
            Hash::Pbkdf2 { iterations, .. } => write!(f, "$7${iterations}$…"),
        }
    }
}

impl Hash {
    /// A new `$7$` hash of `password` with a random salt (12 bytes, as
    /// mosquitto_passwd).
    pub fn new(password: &[u8]) -> Hash {
        let mut salt = vec![0u8; 12];
        getrandom::fill(&mut salt).expect("the system's random source");
        Hash::pbkdf2(password, salt, ITERATIONS)
    }

    /// A hash no password matches, as costly to check as the file's users'
    /// (the first `$7$` user's iterations): an unknown user then takes as
    /// long to refuse as a known one with a wrong password.
    pub fn decoy(users: &Users) -> Hash {
        let iterations = users
            .users
            .values()
            .find_map(|h| match h {
                Hash::Pbkdf2 { iterations, .. } => Some(*iterations),
                Hash::Sha512 { .. } => None,
            })
            .unwrap_or(ITERATIONS);
        let mut salt = vec![0u8; 12];
        getrandom::fill(&mut salt).expect("the system's random source");
        let mut h = Hash::pbkdf2(&salt, salt.clone(), iterations);
        if let Hash::Pbkdf2 { hash, .. } = &mut h {
            hash.iter_mut().for_each(|b| *b = !*b);
        }
        h
    }

    fn pbkdf2(password: &[u8], salt: Vec<u8>, iterations: u32) -> Hash {
        let mut hash = vec![0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut hash);
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        }
    }

    /// Whether `password` is the one hashed (in constant time over the
    /// hash).
    pub fn verify(&self, password: &[u8]) -> bool {
        let (want, got) = match self {
            Hash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                (hash, d.finalize().to_vec())
            }
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                (hash, out)
            }
        };
        want.len() == got.len() && want.iter().zip(&got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// Parses the part after `user:`.
    pub fn parse(s: &str) -> Result<Hash, String> {
        let b64 = |what: &str, v: &str| {
            B64.decode(v)
                .map_err(|e| format!("the {what} is not base64: {e}"))
        };
        let parts: Vec<&str> = s.split('$').collect();
        match parts.as_slice() {
            ["", "6", salt, hash] => {
                let (salt, hash) = (b64("salt", salt)?, b64("hash", hash)?);
                if hash.len() != 64 {
                    return Err(format!("a $6$ hash is 64 bytes, got {}", hash.len()));
                }
                Ok(Hash::Sha512 { salt, hash })
            }
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("the iteration count {iterations:?} is not a positive integer"))?;
                let (salt, hash) = (b64("salt", salt)?, b64("hash", hash)?);
                if hash.is_empty() {
                    return Err("the hash is empty".into());
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                })
            }
            _ if !s.starts_with('$') => Err(
                "the password is not hashed (plain text); hash the file with `mosquitto_passwd -U FILE` or add users with `homicro passwd`".into(),
            ),
            _ => Err(
                "expected $7$ITERATIONS$SALT$HASH or $6$SALT$HASH (mosquitto_passwd's formats)".into(),
            ),
        }
    }
}

impl fmt::Display for Hash {
    /// The file's form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hash::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", B64.encode(salt), B64.encode(hash))
            }
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                B64.encode(salt),
                B64.encode(hash)
            ),
        }
    }
}

/// A line of the file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct FileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

/// The users of a password file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Users {
    users: BTreeMap<String, Hash>,
}

impl Users {
    /// Reads a password file's text; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<Users, FileError> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| FileError {
                path: path.to_string(),
                line: i + 1,
                message,
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("expected USER:HASH".into()));
            };
            if user.is_empty() {
                return Err(err("the user name is empty".into()));
            }
            let hash = Hash::parse(hash).map_err(|m| err(format!("user {user:?}: {m}")))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(err(format!("user {user:?} is listed twice")));
            }
        }
        Ok(Users { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn get(&self, user: &str) -> Option<&Hash> {
        self.users.get(user)
    }

    /// Adds `user` or changes its hash.
    pub fn set(&mut self, user: &str, hash: Hash) {
        self.users.insert(user.to_string(), hash);
    }

    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// The file's text (sorted by user).
    pub fn to_text(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{h}\n"))
            .collect()
    }
}

/// Checks a user name for `homicro passwd` (and the file's rules).
pub fn valid_user(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("the user name is empty".into());
    }
    if user.contains(':') || user.chars().any(char::is_control) {
        return Err(format!(
            "user name {user:?} may not contain ':' or control characters"
        ));
    }
    if user.len() > 65_535 {
        return Err("the user name is longer than MQTT allows".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd -b` (2.0.x), password "secret".
    const MOSQ7: &str = "alice:$7$101$II6gOdzIEgkoGUJW$lk6hQrBwQosADMs3yKjpkaIN3gLOyMY3oBhrm+6RGLC06OjUqyhzy9fGKJPGr4tlvif+B0xKF0z6KzxbONA66Q==";

    #[test]
    fn reads_mosquitto_passwd_hashes() {
        let users = Users::parse("pw", &format!("# house\n\n{MOSQ7}\r\n")).unwrap();
        let h = users.get("alice").unwrap();
        assert!(h.verify(b"secret"));
        assert!(!h.verify(b"Secret"));
        assert!(!h.verify(b""));
        // $6$: sha512(password ‖ salt), made here the way Mosquitto 1.6 did.
        let salt = b"0123456789ab".to_vec();
        let mut d = Sha512::new();
        d.update(b"pw6");
        d.update(&salt);
        let line = format!("bob:$6${}${}", B64.encode(&salt), B64.encode(d.finalize()));
        let users = Users::parse("pw", &line).unwrap();
        assert!(users.get("bob").unwrap().verify(b"pw6"));
        assert!(!users.get("bob").unwrap().verify(b"pw7"));
    }

    #[test]
    fn new_hashes_round_trip_through_the_file() {
        let mut users = Users::default();
        users.set("carol", Hash::new(b"hunter2"));
        let text = users.to_text();
        assert!(
            text.starts_with(&format!("carol:$7${ITERATIONS}$")),
            "{text}"
        );
        let again = Users::parse("pw", &text).unwrap();
        assert!(again.get("carol").unwrap().verify(b"hunter2"));
        assert_eq!(again, users);
        assert_ne!(Hash::new(b"x"), Hash::new(b"x"), "salted");
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let cases = [
            ("alice", "pw:1: expected USER:HASH"),
            (":$6$a$b", "pw:1: the user name is empty"),
            (
                "# c\nalice:secret",
                "pw:2: user \"alice\": the password is not hashed",
            ),
            (
                "a:$7$x$c2FsdA==$aGFzaA==",
                "pw:1: user \"a\": the iteration count \"x\"",
            ),
            ("a:$7$0$c2FsdA==$aGFzaA==", "is not a positive integer"),
            ("a:$7$5$!!$aGFzaA==", "the salt is not base64"),
            ("a:$6$c2FsdA==$aGFzaA==", "a $6$ hash is 64 bytes, got 4"),
            (
                "a:$5$x$y",
                "expected $7$ITERATIONS$SALT$HASH or $6$SALT$HASH",
            ),
            (
                &format!("{MOSQ7}\n{MOSQ7}"),
                "pw:2: user \"alice\" is listed twice",
            ),
        ];
        for (text, want) in cases {
            let e = Users::parse("pw", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_decoy_matches_no_password_and_costs_what_the_users_cost() {
        let users = Users::parse("pw", MOSQ7).unwrap();
        let decoy = Hash::decoy(&users);
        assert!(matches!(
            decoy,
            Hash::Pbkdf2 {
                iterations: 101,
                ..
            }
        ));
        let Hash::Pbkdf2 { salt, .. } = &decoy else {
            unreachable!()
        };
        for guess in [&b""[..], b"secret", salt] {
            assert!(!decoy.verify(guess));
        }
        assert!(matches!(
            Hash::decoy(&Users::default()),
            Hash::Pbkdf2 {
                iterations: ITERATIONS,
                ..
            }
        ));
    }

    #[test]
    fn debug_never_shows_a_hash() {
        let h = Hash::parse(&MOSQ7["alice:".len()..]).unwrap();
        assert_eq!(format!("{h:?}"), "$7$101$…");
    }

    #[test]
    fn user_names() {
        assert!(valid_user("alice").is_ok());
        assert!(valid_user("kitchen-1").is_ok());
        for bad in ["", "a:b", "a\nb"] {
            assert!(valid_user(bad).is_err(), "{bad:?}");
        }
    }
}
