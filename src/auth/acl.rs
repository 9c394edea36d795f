//! Mosquitto's ACL file, read the way Mosquitto 2 reads it:
//!
//! ```text
//! # comments
//! topic read homicro/#            # before any `user` line: anonymous clients
//! user kitchen-1
//! topic write homicro/services/kitchen-+
//! topic deny homicro/secret/#
//! pattern readwrite devices/%u/#  # every client: %u user, %c client id
//! ```
//!
//! Access is `read`, `write`, `readwrite` (the default when left out) or
//! `deny`. A client's own rules are tried in file order, then the
//! patterns: the first rule whose filter matches the topic decides (a
//! `deny` refuses, a rule granting the access asked for allows, any other
//! goes on); nothing matching refuses. Pure: text in, answers out.

use std::collections::HashMap;

use super::passwd::FileError;
use crate::bus::codec::{matches, valid_filter};

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read = 1,
    Write = 2,
}

const DENY: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    filter: String,
    /// Bits of [`Access`]; 0: deny.
    access: u8,
}

/// The rules of an ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    /// Reads an ACL file's text; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<Acl, FileError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| FileError {
                path: path.to_string(),
                line: i + 1,
                message,
            };
            let line = line.trim_end();
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (word, rest) = line
                .trim_start()
                .split_once(' ')
                .unwrap_or((line.trim_start(), ""));
            let rest = rest.trim();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name".into()));
                    }
                    user = Some(rest.to_string());
                    acl.users.entry(rest.to_string()).or_default();
                }
                "topic" | "pattern" => {
                    let (access, filter) = match rest.split_once(' ') {
                        Some((a, f)) => match access_of(a) {
                            Some(bits) => (bits, f.trim()),
                            None => {
                                return Err(err(format!(
                                    "access {a:?} is not read, write, readwrite or deny"
                                )));
                            }
                        },
                        // `topic FILTER`: read and write.
                        None => (Access::Read as u8 | Access::Write as u8, rest),
                    };
                    if filter.is_empty() {
                        return Err(err(format!("`{word}` needs a topic")));
                    }
                    if !valid_filter(filter) {
                        let hint = if filter
                            .split('/')
                            .any(|l| l.len() > 1 && l.contains(['+', '#']))
                        {
                            ": '+' and '#' stand for whole topic levels (Mosquitto refuses \
                             this file too); list each name, or give each device user its \
                             own with `pattern write homicro/services/%u`"
                        } else {
                            ""
                        };
                        return Err(err(format!("{filter:?} is not a valid topic filter{hint}")));
                    }
                    let rule = Rule {
                        filter: filter.to_string(),
                        access,
                    };
                    match (word, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(err(format!(
                        "{other:?} is not a rule: expected `user`, `topic` or `pattern`"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Whether a client (`user`: its authenticated user, if any) may
    /// read or write `topic`.
    pub fn allows(&self, user: Option<&str>, client_id: &str, topic: &str, access: Access) -> bool {
        let own = match user {
            Some(u) => self.users.get(u).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        if let Some(verdict) = decide(
            own.iter().map(|r| (r.filter.as_str(), r.access)),
            topic,
            access,
        ) {
            return verdict;
        }
        // A user name or client id with a wildcard could widen a pattern
        // to other clients' topics: Mosquitto refuses it every pattern.
        let unsafe_id = |s: &str| s.contains(['+', '#']);
        if self.patterns.is_empty() || unsafe_id(client_id) || user.is_some_and(unsafe_id) {
            return false;
        }
        let patterns: Vec<(String, u8)> = self
            .patterns
            .iter()
            .filter_map(|r| Some((expand(&r.filter, user, client_id)?, r.access)))
            .collect();
        decide(
            patterns.iter().map(|(f, a)| (f.as_str(), *a)),
            topic,
            access,
        )
        .unwrap_or(false)
    }

    /// Whether `filter` may match some topic the client may read: a
    /// subscription that can never deliver anything is refused.
    pub fn may_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        // A shared subscription's filter is what follows `$share/GROUP/`.
        let filter = match filter
            .strip_prefix("$share/")
            .and_then(|r| r.split_once('/'))
        {
            Some((_, f)) => f,
            None => filter,
        };
        let own = match user {
            Some(u) => self.users.get(u).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous,
        };
        let reads = |f: &str, access: u8| access & Access::Read as u8 != 0 && overlap(f, filter);
        if own.iter().any(|r| reads(&r.filter, r.access)) {
            return true;
        }
        let unsafe_id = |s: &str| s.contains(['+', '#']);
        if unsafe_id(client_id) || user.is_some_and(unsafe_id) {
            return false;
        }
        self.patterns
            .iter()
            .any(|r| expand(&r.filter, user, client_id).is_some_and(|f| reads(&f, r.access)))
    }
}

fn access_of(s: &str) -> Option<u8> {
    match s {
        "read" => Some(Access::Read as u8),
        "write" => Some(Access::Write as u8),
        "readwrite" => Some(Access::Read as u8 | Access::Write as u8),
        "deny" => Some(DENY),
        _ => None,
    }
}

/// The first rule matching `topic` decides: `Some(allowed)`; `None`: none
/// decided.
fn decide<'a>(
    rules: impl Iterator<Item = (&'a str, u8)>,
    topic: &str,
    access: Access,
) -> Option<bool> {
    for (filter, bits) in rules {
        // A `$` topic is matched only by a rule that starts with `$`.
        if topic.starts_with('$') && !filter.starts_with('$') {
            continue;
        }
        if !matches(topic, filter) {
            continue;
        }
        if bits == DENY {
            return Some(false);
        }
        if bits & access as u8 != 0 {
            return Some(true);
        }
    }
    None
}

/// A pattern with `%u` and `%c` put in; `None` when it names the user and
/// the client has none.
fn expand(pattern: &str, user: Option<&str>, client_id: &str) -> Option<String> {
    if pattern.contains("%u") && user.is_none() {
        return None;
    }
    Some(
        pattern
            .replace("%u", user.unwrap_or(""))
            .replace("%c", client_id),
    )
}

/// Whether some topic matches both filters.
fn overlap(a: &str, b: &str) -> bool {
    // A wildcard first level never matches a `$` topic.
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (a.starts_with('$') && wild_first(b)) || (b.starts_with('$') && wild_first(a)) {
        return false;
    }
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{Read, Write};

    const FILE: &str = "\
# anonymous clients
topic read homicro/#
topic deny homicro/services/secret

user kitchen-1
topic deny homicro/services/kitchen-door
topic write homicro/services/kitchen-light
topic write homicro/services/+/x
topic read homicro/#

user admin
topic homicro/#

pattern readwrite devices/%u/#
pattern write clients/%c
";

    fn acl() -> Acl {
        Acl::parse("acl", FILE).unwrap()
    }

    #[test]
    fn the_first_matching_rule_decides_and_nothing_matching_refuses() {
        let a = acl();
        let k = Some("kitchen-1");
        assert!(a.allows(k, "c", "homicro/services/kitchen-light", Write));
        assert!(
            !a.allows(k, "c", "homicro/services/kitchen-door", Write),
            "deny first"
        );
        assert!(
            !a.allows(k, "c", "homicro/services/kitchen-door", Read),
            "deny is all"
        );
        assert!(!a.allows(k, "c", "homicro/services/garage", Write));
        assert!(a.allows(k, "c", "homicro/services/garage", Read));
        assert!(!a.allows(k, "c", "other/topic", Read));
        assert!(
            a.allows(Some("admin"), "c", "homicro/x", Write),
            "readwrite by default"
        );
    }

    #[test]
    fn anonymous_rules_come_before_the_first_user_line() {
        let a = acl();
        assert!(a.allows(None, "c", "homicro/services/web", Read));
        assert!(
            a.allows(None, "c", "homicro/services/secret", Read),
            "read matched first"
        );
        assert!(!a.allows(None, "c", "homicro/services/web", Write));
        // A user not in the file gets the patterns only.
        assert!(!a.allows(Some("stranger"), "c", "homicro/services/web", Read));
    }

    #[test]
    fn patterns_put_in_the_user_and_client_id() {
        let a = acl();
        assert!(a.allows(Some("bob"), "c1", "devices/bob/temp", Write));
        assert!(!a.allows(Some("bob"), "c1", "devices/alice/temp", Read));
        assert!(a.allows(None, "c1", "clients/c1", Write));
        assert!(
            !a.allows(None, "c1", "devices//temp", Read),
            "%u needs a user"
        );
        // A wildcard in the user name or client id gets no pattern.
        assert!(!a.allows(Some("+"), "c1", "devices/x/temp", Read));
        assert!(!a.allows(None, "#", "clients/#", Write));
    }

    #[test]
    fn dollar_topics_need_a_dollar_rule() {
        let a = Acl::parse("acl", "topic read #\ntopic read $SYS/#").unwrap();
        assert!(a.allows(None, "c", "a/b", Read));
        assert!(a.allows(None, "c", "$SYS/broker/uptime", Read));
        let b = Acl::parse("acl", "topic read #").unwrap();
        assert!(!b.allows(None, "c", "$SYS/broker/uptime", Read));
    }

    #[test]
    fn a_subscription_that_can_never_match_a_readable_topic_is_refused() {
        let a = acl();
        let k = Some("kitchen-1");
        assert!(a.may_subscribe(k, "c", "homicro/services/+"));
        assert!(a.may_subscribe(k, "c", "#"), "overlaps homicro/#");
        assert!(!a.may_subscribe(k, "c", "other/#"));
        assert!(a.may_subscribe(Some("bob"), "c", "devices/+/temp"));
        assert!(
            !a.may_subscribe(Some("bob"), "c", "clients/+"),
            "write only"
        );
        assert!(!a.may_subscribe(None, "c", "devices/#"));
        assert!(a.may_subscribe(k, "c", "$share/g/homicro/services/+"));
        assert!(!a.may_subscribe(k, "c", "$share/g/other/#"));
    }

    #[test]
    fn filters_overlap() {
        for (x, y) in [
            ("a/+", "a/b"),
            ("a/#", "a"),
            ("#", "x/y"),
            ("+/b", "a/+"),
            ("a", "a"),
        ] {
            assert!(overlap(x, y) && overlap(y, x), "{x} {y}");
        }
        for (x, y) in [
            ("a/b", "a/c"),
            ("a/+", "a"),
            ("a/b/c", "a/+"),
            ("a", "b"),
            ("#", "$SYS/x"),
        ] {
            assert!(!overlap(x, y) && !overlap(y, x), "{x} {y}");
        }
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let cases = [
            ("topic", "acl:1: `topic` needs a topic"),
            ("user", "acl:1: `user` needs a user name"),
            ("# x\ntopic reed a/b", "acl:2: access \"reed\" is not read"),
            (
                "topic read a/#/b",
                "acl:1: \"a/#/b\" is not a valid topic filter",
            ),
            ("allow read a", "acl:1: \"allow\" is not a rule"),
            (
                "user k\ntopic write homicro/services/kitchen-+",
                "acl:2: \"homicro/services/kitchen-+\" is not a valid topic filter: '+' and '#' \
                 stand for whole topic levels",
            ),
        ];
        for (text, want) in cases {
            let e = Acl::parse("acl", text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }
}
