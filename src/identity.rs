//! Who writes: every record remembers the identity that wrote it (an
//! authenticated username, or an anonymous client's address), and only
//! that identity or an admin may change it (docs/PROTOCOL.md, Ownership).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// A writer's identity, as a record's owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An authenticated user.
    User(Arc<str>),
    /// An anonymous client, known by its address (canonical: an
    /// IPv4-mapped IPv6 address is its IPv4 address).
    Address(IpAddr),
}

impl Identity {
    pub fn address(ip: IpAddr) -> Identity {
        Identity::Address(ip.to_canonical())
    }

    pub fn user(name: &str) -> Identity {
        Identity::User(name.into())
    }

    /// The form kept in the state file: `user:NAME` or the address.
    pub fn to_stored(&self) -> String {
        match self {
            Identity::User(u) => format!("user:{u}"),
            Identity::Address(ip) => ip.to_string(),
        }
    }

    /// The inverse of [`Identity::to_stored`].
    pub fn from_stored(s: &str) -> Option<Identity> {
        match s.strip_prefix("user:") {
            Some(u) if !u.is_empty() => Some(Identity::user(u)),
            Some(_) => None,
            None => s.parse().ok().map(Identity::address),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::User(u) => write!(f, "user {u}"),
            Identity::Address(ip) => write!(f, "{ip}"),
        }
    }
}

/// A writer as the registry judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    /// `None`: not known (records seen through an external broker): no
    /// ownership by identity can be enforced for it.
    pub identity: Option<Identity>,
    /// May change any record (the HTTP API from loopback, an admin user).
    pub admin: bool,
}

impl Author {
    /// A writer the registry cannot identify.
    pub const UNKNOWN: Author = Author {
        identity: None,
        admin: false,
    };

    pub fn new(identity: Identity) -> Author {
        Author {
            identity: Some(identity),
            admin: false,
        }
    }

    pub fn admin(identity: Identity) -> Author {
        Author {
            identity: Some(identity),
            admin: true,
        }
    }

    /// Whether this writer may change a record owned by `owner` (`None`:
    /// a record whose writer is not known, such as one seen through an
    /// external broker).
    pub fn may_change(&self, owner: Option<&Identity>) -> bool {
        match (owner, &self.identity) {
            _ if self.admin => true,
            (Some(owner), Some(me)) => owner == me,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Identity {
        Identity::address(s.parse().unwrap())
    }

    #[test]
    fn only_the_owner_or_an_admin_may_change_a_record() {
        let owner = ip("10.0.0.5");
        assert!(Author::new(ip("10.0.0.5")).may_change(Some(&owner)));
        assert!(!Author::new(ip("6.6.6.6")).may_change(Some(&owner)));
        assert!(!Author::new(Identity::user("10.0.0.5")).may_change(Some(&owner)));
        assert!(Author::admin(ip("127.0.0.1")).may_change(Some(&owner)));
        let alice = Identity::user("alice");
        assert!(Author::new(Identity::user("alice")).may_change(Some(&alice)));
        assert!(!Author::new(Identity::user("bob")).may_change(Some(&alice)));
        // Unknown on either side: nothing to enforce.
        assert!(Author::UNKNOWN.may_change(Some(&alice)));
        assert!(Author::new(ip("6.6.6.6")).may_change(None));
    }

    #[test]
    fn addresses_are_canonical_and_stored_forms_round_trip() {
        assert_eq!(ip("::ffff:10.0.0.5"), ip("10.0.0.5"));
        for id in [ip("10.0.0.5"), ip("::1"), Identity::user("kitchen:1")] {
            assert_eq!(Identity::from_stored(&id.to_stored()), Some(id));
        }
        assert_eq!(Identity::from_stored("user:"), None);
        assert_eq!(Identity::from_stored("nonsense"), None);
        assert_eq!(ip("10.0.0.5").to_string(), "10.0.0.5");
        assert_eq!(Identity::user("alice").to_string(), "user alice");
    }
}
