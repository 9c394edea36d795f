//! Who may use the bus: users from a Mosquitto password file (`passwd`),
//! anonymous clients when allowed, failures slowed down per address
//! (`throttle`). MQTT CONNECT and HTTP Basic auth ask the same [`Auth`].
//!
//! As in Mosquitto: without a password file every client is anonymous
//! (a user name is taken but proves nothing); with one, `allow_anonymous`
//! defaults to false and a client that names a user must give its
//! password.

pub mod acl;
pub mod passwd;
mod throttle;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::time::Instant;
use tracing::{info, warn};

use crate::identity::{Author, Identity};
pub use acl::{Access, Acl};
pub use passwd::{FileError, Hash, Users};
use throttle::Throttle;

/// `[auth]` of the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    pub password_file: Option<PathBuf>,
    /// Clients without a user name are let in.
    pub allow_anonymous: bool,
    /// Users who act as admins (change any record, use `/register`).
    pub admins: Vec<String>,
    /// Mosquitto's ACL format (see [`acl`]).
    pub acl_file: Option<PathBuf>,
    /// Reverse proxies whose `X-Forwarded-For` is believed (HTTP).
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// What a client proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let in without a user (no password file, or anonymous allowed).
    Anonymous,
    /// A user whose password matched.
    User { name: Arc<str>, admin: bool },
    /// A user name unknown, or its password wrong or missing.
    BadCredentials,
    /// No user name, and anonymous clients are not allowed.
    AnonymousRefused,
}

impl Verdict {
    /// The writer this client is, connecting from `ip`.
    pub fn author(&self, ip: IpAddr) -> Author {
        match self {
            Verdict::User { name, admin: true } => Author::admin(Identity::User(name.clone())),
            Verdict::User { name, .. } => Author::new(Identity::User(name.clone())),
            _ => Author::new(Identity::address(ip)),
        }
    }

    /// The authenticated user, if any (what ACLs look up).
    pub fn user(&self) -> Option<Arc<str>> {
        match self {
            Verdict::User { name, .. } => Some(name.clone()),
            _ => None,
        }
    }

    pub fn admitted(&self) -> bool {
        matches!(self, Verdict::Anonymous | Verdict::User { .. })
    }
}

pub struct Auth {
    config: AuthConfig,
    users: RwLock<Arc<Users>>,
    /// Checked for an unknown user, so that refusing it takes as long.
    decoy: RwLock<Hash>,
    acl: RwLock<Arc<Acl>>,
    admins: HashSet<String>,
    throttle: Mutex<Throttle>,
}

impl Auth {
    /// Reads the password file, if one is set.
    pub fn load(config: AuthConfig) -> Result<Auth, FileError> {
        let users = match &config.password_file {
            Some(path) => read(path)?,
            None => Users::default(),
        };
        let acl = match &config.acl_file {
            Some(path) => read_acl(path)?,
            None => Acl::default(),
        };
        Ok(Auth {
            admins: config.admins.iter().cloned().collect(),
            config,
            decoy: RwLock::new(Hash::decoy(&users)),
            users: RwLock::new(Arc::new(users)),
            acl: RwLock::new(Arc::new(acl)),
            throttle: Mutex::default(),
        })
    }

    /// Users are checked (a password file is set).
    pub fn enabled(&self) -> bool {
        self.config.password_file.is_some()
    }

    pub fn allow_anonymous(&self) -> bool {
        self.config.allow_anonymous
    }

    /// How many users the password file has.
    pub fn users(&self) -> usize {
        self.users.read().unwrap().len()
    }

    /// Reads the password and ACL files again (SIGHUP); a file with errors
    /// leaves what it holds as it was (the other is still read). The
    /// number of users.
    pub fn reload(&self) -> Result<usize, FileError> {
        let acl = match &self.config.acl_file {
            Some(path) => read_acl(path).map(|acl| {
                *self.acl.write().unwrap() = Arc::new(acl);
                info!(path = %path.display(), "ACL file reloaded");
            }),
            None => Ok(()),
        };
        let users = match &self.config.password_file {
            Some(path) => {
                let users = read(path)?;
                let n = users.len();
                *self.decoy.write().unwrap() = Hash::decoy(&users);
                *self.users.write().unwrap() = Arc::new(users);
                info!(path = %path.display(), users = n, "password file reloaded");
                n
            }
            None => 0,
        };
        acl.map(|()| users)
    }

    /// Whether a client (its authenticated user, if any) may read or write
    /// `topic`: always, without an ACL file.
    pub fn allows(&self, user: Option<&str>, client_id: &str, topic: &str, access: Access) -> bool {
        self.config.acl_file.is_none()
            || self
                .acl
                .read()
                .unwrap()
                .allows(user, client_id, topic, access)
    }

    /// Whether a subscription to `filter` can deliver anything to the
    /// client (see [`Acl::may_subscribe`]).
    pub fn may_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.config.acl_file.is_none()
            || self
                .acl
                .read()
                .unwrap()
                .may_subscribe(user, client_id, filter)
    }

    /// An ACL file is in force.
    pub fn has_acl(&self) -> bool {
        self.config.acl_file.is_some()
    }

    /// The address an HTTP request comes from: `peer`, or, when `peer` is
    /// a trusted proxy, the nearest address in `X-Forwarded-For` that is
    /// not one (headers from anyone else are never believed). A header
    /// whose hops run out, or reach one that is no address, before an
    /// untrusted address gives the unspecified address: never loopback,
    /// never anyone's identity.
    pub fn client_address(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let trusted = |ip: &IpAddr| self.config.trusted_proxies.contains(&ip.to_canonical());
        if !trusted(&peer) {
            return peer;
        }
        let Some(list) = forwarded_for else {
            return peer;
        };
        let unknown = IpAddr::from([0, 0, 0, 0]);
        for hop in list.split(',').rev().map(|h| h.trim().parse::<IpAddr>()) {
            match hop {
                Ok(ip) if trusted(&ip) => {}
                Ok(ip) => return ip.to_canonical(),
                Err(_) => return unknown,
            }
        }
        unknown
    }

    /// A client whose TLS certificate (from `[tls] client_ca`) names
    /// `name`: that user, as if it had given its password.
    pub fn certified(&self, name: Arc<str>) -> Verdict {
        let admin = self.admins.contains(&*name);
        Verdict::User { name, admin }
    }

    /// Checks a client's credentials. A failure is logged (never the
    /// password) and answered late when its address keeps failing.
    pub async fn check(&self, ip: IpAddr, user: Option<&str>, password: Option<&[u8]>) -> Verdict {
        let ip = ip.to_canonical();
        // An address that kept failing waits before it is checked at all:
        // many attempts at once cannot keep PBKDF2 busy for free.
        let earned = self.throttle.lock().unwrap().earned(ip, Instant::now());
        if user.is_some() && !earned.is_zero() {
            tokio::time::sleep(earned).await;
        }
        let verdict = self.judge(user, password).await;
        if verdict.admitted() {
            return verdict;
        }
        let delay = self.throttle.lock().unwrap().failed(ip, Instant::now());
        match &verdict {
            Verdict::BadCredentials => {
                warn!(%ip, user = user.unwrap_or(""), delay_ms = delay.as_millis() as u64, "authentication failed")
            }
            _ => {
                info!(%ip, delay_ms = delay.as_millis() as u64, "anonymous client refused (allow_anonymous = false)")
            }
        }
        tokio::time::sleep(delay).await;
        verdict
    }

    async fn judge(&self, user: Option<&str>, password: Option<&[u8]>) -> Verdict {
        if !self.enabled() {
            return Verdict::Anonymous;
        }
        let Some(user) = user else {
            return if self.config.allow_anonymous {
                Verdict::Anonymous
            } else {
                Verdict::AnonymousRefused
            };
        };
        let known = self.users.read().unwrap().get(user).cloned();
        // An unknown user, or no password, is checked against the decoy,
        // so that its refusal takes as long as a wrong password's.
        let real = known.is_some() && password.is_some();
        let hash = known.unwrap_or_else(|| self.decoy.read().unwrap().clone());
        let password = password.unwrap_or_default().to_vec();
        // PBKDF2 takes milliseconds: off the runtime's worker threads.
        let ok = tokio::task::spawn_blocking(move || hash.verify(&password))
            .await
            .unwrap_or(false)
            && real;
        if ok {
            Verdict::User {
                name: user.into(),
                admin: self.admins.contains(user),
            }
        } else {
            Verdict::BadCredentials
        }
    }
}

/// Reads `path` and parses it with `parse` (which names it in errors).
fn read_with<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str, &str) -> Result<T, FileError>,
) -> Result<T, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: shown.clone(),
        line: 0,
        message: format!("cannot read it: {e}"),
    })?;
    parse(&shown, &text)
}

fn read_acl(path: &std::path::Path) -> Result<Acl, FileError> {
    read_with(path, Acl::parse)
}

fn read(path: &std::path::Path) -> Result<Users, FileError> {
    read_with(path, Users::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(anonymous: bool, admins: &[&str]) -> (Auth, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        let mut users = Users::default();
        users.set("alice", Hash::new(b"secret"));
        users.set("root", Hash::new(b"toor"));
        std::fs::write(&path, users.to_text()).unwrap();
        let config = AuthConfig {
            password_file: Some(path),
            allow_anonymous: anonymous,
            admins: admins.iter().map(|s| s.to_string()).collect(),
            acl_file: None,
            trusted_proxies: Vec::new(),
        };
        (Auth::load(config).unwrap(), dir)
    }

    fn ip() -> IpAddr {
        "10.0.0.5".parse().unwrap()
    }

    #[tokio::test]
    async fn users_anonymous_and_admins() {
        let (a, _d) = auth(false, &["root"]);
        let alice = a.check(ip(), Some("alice"), Some(b"secret")).await;
        assert_eq!(
            alice,
            Verdict::User {
                name: "alice".into(),
                admin: false
            }
        );
        assert_eq!(alice.author(ip()), Author::new(Identity::user("alice")));
        let root = a.check(ip(), Some("root"), Some(b"toor")).await;
        assert_eq!(root.author(ip()), Author::admin(Identity::user("root")));
        for (user, pw) in [
            (Some("alice"), Some(&b"wrong"[..])),
            (Some("alice"), None),
            (Some("mallory"), Some(&b"secret"[..])),
        ] {
            assert_eq!(
                a.check(ip(), user, pw).await,
                Verdict::BadCredentials,
                "{user:?}"
            );
        }
        assert_eq!(a.check(ip(), None, None).await, Verdict::AnonymousRefused);
        let (open, _d) = auth(true, &[]);
        assert_eq!(open.check(ip(), None, None).await, Verdict::Anonymous);
        assert_eq!(
            open.check(ip(), Some("alice"), Some(b"nope")).await,
            Verdict::BadCredentials,
            "a named user must prove it even when anonymous clients may connect"
        );
    }

    #[tokio::test]
    async fn without_a_password_file_everyone_is_anonymous() {
        let a = Auth::load(AuthConfig {
            allow_anonymous: true,
            ..Default::default()
        })
        .unwrap();
        let v = a.check(ip(), Some("alice"), Some(b"x")).await;
        assert_eq!(v, Verdict::Anonymous);
        assert_eq!(v.author(ip()), Author::new(Identity::address(ip())));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let plain = Auth::load(AuthConfig::default()).unwrap();
        assert_eq!(
            plain.client_address(ip("127.0.0.1"), Some("10.9.9.9")),
            ip("127.0.0.1")
        );
        let proxied = Auth::load(AuthConfig {
            trusted_proxies: vec![ip("127.0.0.1"), ip("10.0.0.1")],
            ..Default::default()
        })
        .unwrap();
        let peer = ip("127.0.0.1");
        assert_eq!(
            proxied.client_address(peer, Some("10.9.9.9")),
            ip("10.9.9.9")
        );
        // A client's own forged hops before the proxies' are not taken.
        assert_eq!(
            proxied.client_address(peer, Some("127.0.0.1, 6.6.6.6, 10.0.0.1")),
            ip("6.6.6.6")
        );
        // Fails closed: never the proxy's own loopback.
        let unknown = ip("0.0.0.0");
        assert_eq!(proxied.client_address(peer, Some("junk")), unknown);
        assert_eq!(
            proxied.client_address(peer, Some("\u{e9}, 10.0.0.1")),
            unknown
        );
        assert_eq!(proxied.client_address(peer, Some("127.0.0.1")), unknown);
        assert_eq!(
            proxied.client_address(peer, Some("\u{e9}, 6.6.6.6")),
            ip("6.6.6.6")
        );
        // Two header lines, a client's then the proxy's: the proxy's wins.
        assert_eq!(
            proxied.client_address(peer, Some("127.0.0.1,6.6.6.6")),
            ip("6.6.6.6")
        );
        // The proxy's own requests carry no header: they are its own.
        assert_eq!(proxied.client_address(peer, None), peer);
        assert_eq!(
            proxied.client_address(ip("6.6.6.6"), Some("127.0.0.1")),
            ip("6.6.6.6")
        );
    }

    #[tokio::test]
    async fn a_reload_with_errors_keeps_the_users() {
        let (a, dir) = auth(false, &[]);
        std::fs::write(dir.path().join("pw"), "broken").unwrap();
        let e = a.reload().unwrap_err();
        assert!(e.to_string().ends_with("pw:1: expected USER:HASH"), "{e}");
        assert_eq!(a.users(), 2);
        let mut users = Users::default();
        users.set("dave", Hash::new(b"d"));
        std::fs::write(dir.path().join("pw"), users.to_text()).unwrap();
        assert_eq!(a.reload().unwrap(), 1);
        assert!(a.check(ip(), Some("dave"), Some(b"d")).await.admitted());
        assert!(
            !a.check(ip(), Some("alice"), Some(b"secret"))
                .await
                .admitted()
        );
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text as a password file or an ACL file: an answer or an
        /// error naming a line of it, never a panic.
        #[test]
        fn files_of_any_text_never_panic(text in "[ -~\n\t:$#+/%]{0,300}") {
            match Users::parse("f", &text) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1)),
            }
            match Acl::parse("f", &text) {
                Ok(acl) => {
                    let _ = acl.allows(Some("u"), "c", "a/b", Access::Read);
                    let _ = acl.may_subscribe(None, "c", "#");
                }
                Err(e) => prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1)),
            }
        }

        /// Any X-Forwarded-For from a trusted proxy: an address, never a
        /// panic, and never the proxy's own loopback when a header is there.
        #[test]
        fn any_forwarded_for_is_an_address(header in "[0-9a-f.:, \\[\\]x]{0,80}") {
            // One Auth for every case: loading one hashes a decoy password.
            static AUTH: std::sync::OnceLock<Auth> = std::sync::OnceLock::new();
            let auth = AUTH.get_or_init(|| {
                Auth::load(AuthConfig {
                    trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
                    ..Default::default()
                })
                .unwrap()
            });
            let got = auth.client_address("127.0.0.1".parse().unwrap(), Some(&header));
            prop_assert!(!got.is_loopback());
        }
    }
}
