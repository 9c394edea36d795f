//! The protocol's topic tree under one prefix (`homicro` by default).

use crate::record::Name;

/// Builds and recognises the topics of one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    services: String,
    heartbeat: String,
}

/// What an incoming topic is, with the rest of the topic after the kind's
/// level (which may still be a bad name, e.g. `a/b` or `UPPER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a> {
    Service(&'a str),
    Heartbeat(&'a str),
    Registry,
    Other,
}

/// A publish the hub takes: a call (`PREFIX/call/QUERY[/REPLY-TOPIC]`)
/// or an instance's answer (`PREFIX/reply/ID[/STATUS]`), with what follows
/// the kind's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubTopic<'a> {
    Call(&'a str),
    Reply(&'a str),
}

impl Topics {
    pub const DEFAULT_PREFIX: &'static str = "homicro";

    /// `prefix` must pass [`Topics::validate_prefix`].
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            services: format!("{prefix}/services/"),
            heartbeat: format!("{prefix}/heartbeat/"),
        }
    }

    /// A prefix is one or more non-empty topic levels without wildcards.
    pub fn validate_prefix(prefix: &str) -> Result<(), String> {
        if prefix.is_empty()
            || prefix.starts_with('$')
            || prefix
                .split('/')
                .any(|l| l.is_empty() || l.contains(['+', '#', '\0']))
        {
            return Err(format!(
                "{prefix:?} is not a topic prefix: use one or more non-empty levels without \
                 '+', '#' or a leading '$', e.g. \"homicro\" or \"home/homicro\""
            ));
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn service(&self, name: &str) -> String {
        format!("{}{name}", self.services)
    }

    pub fn heartbeat(&self, name: &str) -> String {
        format!("{}{name}", self.heartbeat)
    }

    pub fn error(&self, name: &str) -> String {
        format!("{}/errors/{name}", self.prefix)
    }

    pub fn event(&self, name: &str) -> String {
        format!("{}/events/{name}", self.prefix)
    }

    /// The registry's view of NAME's health check (retained).
    pub fn health(&self, name: &str) -> String {
        format!("{}/health/{name}", self.prefix)
    }

    pub fn health_filter(&self) -> String {
        format!("{}/health/+", self.prefix)
    }

    pub fn registry(&self) -> String {
        format!("{}/registry", self.prefix)
    }

    /// What the registry subscribes to: every record (deeper topics too, so
    /// they can be refused), every heartbeat.
    pub fn registry_filters(&self) -> [String; 2] {
        [
            format!("{}#", self.services),
            format!("{}+", self.heartbeat),
        ]
    }

    /// What a discovering client subscribes to.
    pub fn services_filter(&self) -> String {
        format!("{}+", self.services)
    }

    /// `$PREFIX/sync/ID`: a client's private echo topic, which tells it
    /// that a subscription's retained copies have all arrived (see
    /// [`crate::mqtt::snapshot`]). `$` keeps it out of every `#` and
    /// `PREFIX/#` subscription (MQTT 4.7.2).
    pub fn sync(&self, id: &str) -> String {
        format!("${}/sync/{id}", self.prefix)
    }

    /// `PREFIX/sync/ID`: the same echo topic, for a broker that drops
    /// publishes to `$` topics (seen by `PREFIX/#` subscribers).
    pub fn plain_sync(&self, id: &str) -> String {
        format!("{}/sync/{id}", self.prefix)
    }

    /// Whether `topic` (or a filter) is one `$PREFIX/sync/ID` topic: one
    /// level of ID, no wildcards.
    pub fn is_sync(&self, topic: &str) -> bool {
        topic
            .strip_prefix('$')
            .and_then(|t| t.strip_prefix(self.prefix.as_str()))
            .and_then(|t| t.strip_prefix("/sync/"))
            .is_some_and(|id| !id.is_empty() && !id.contains(['/', '+', '#']))
    }

    pub fn events_filter(&self) -> String {
        format!("{}/events/+", self.prefix)
    }

    pub fn classify<'a>(&self, topic: &'a str) -> Incoming<'a> {
        if let Some(rest) = topic.strip_prefix(self.services.as_str()) {
            Incoming::Service(rest)
        } else if let Some(rest) = topic.strip_prefix(self.heartbeat.as_str()) {
            Incoming::Heartbeat(rest)
        } else if topic.len() == self.prefix.len() + "/registry".len()
            && topic.starts_with(&self.prefix)
            && topic.ends_with("/registry")
        {
            Incoming::Registry
        } else {
            Incoming::Other
        }
    }

    /// Where the hub hands NAME a request: `PREFIX/rpc/NAME/ID`.
    pub fn request(&self, name: &str, id: &str) -> String {
        format!("{}/rpc/{name}/{id}", self.prefix)
    }

    /// What NAME subscribes to for its requests.
    pub fn request_filter(&self, name: &str) -> String {
        format!("{}/rpc/{name}/+", self.prefix)
    }

    /// The subscriptions that say NAME takes requests: its request filter,
    /// or `PREFIX/rpc/NAME/#` (a wider one, such as `#`, does not).
    pub fn request_filters(&self, name: &str) -> [String; 2] {
        [
            self.request_filter(name),
            format!("{}/rpc/{name}/#", self.prefix),
        ]
    }

    /// Where an instance answers request ID (the MQTT 5 response topic of
    /// every request the hub sends).
    pub fn reply(&self, id: &str) -> String {
        format!("{}/reply/{id}", self.prefix)
    }

    /// Where a caller asks the hub to call QUERY: `PREFIX/call/QUERY`.
    pub fn call(&self, query: &str) -> String {
        format!("{}/call/{query}", self.prefix)
    }

    /// A topic the hub takes for itself (calls and replies never reach
    /// the router), with the rest after its kind's level.
    pub fn hub<'a>(&self, topic: &'a str) -> Option<HubTopic<'a>> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let (kind, rest) = rest.split_once('/')?;
        match kind {
            "call" => Some(HubTopic::Call(rest)),
            "reply" => Some(HubTopic::Reply(rest)),
            _ => None,
        }
    }

    /// The name in a health topic, if the topic is one.
    pub fn health_name(&self, topic: &str) -> Option<Name> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/health/")?;
        Name::parse(rest).ok()
    }

    /// The name in a service topic, if the topic is one.
    pub fn service_name(&self, topic: &str) -> Option<Name> {
        match self.classify(topic) {
            Incoming::Service(rest) => Name::parse(rest).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify() {
        let t = Topics::new("home/hm");
        assert_eq!(t.classify("home/hm/services/a"), Incoming::Service("a"));
        assert_eq!(t.classify("home/hm/services/a/b"), Incoming::Service("a/b"));
        assert_eq!(t.classify("home/hm/heartbeat/x"), Incoming::Heartbeat("x"));
        assert_eq!(t.classify("home/hm/registry"), Incoming::Registry);
        assert_eq!(t.classify("home/hm/events/a"), Incoming::Other);
        assert_eq!(t.classify("homicro/services/a"), Incoming::Other);
        assert_eq!(t.registry_filters()[0], "home/hm/services/#");
    }

    #[test]
    fn hub_topics() {
        let t = Topics::new("home/hm");
        assert_eq!(
            t.hub("home/hm/call/api@^1/me/x"),
            Some(HubTopic::Call("api@^1/me/x"))
        );
        assert_eq!(
            t.hub("home/hm/reply/abc/404"),
            Some(HubTopic::Reply("abc/404"))
        );
        assert_eq!(t.hub("home/hm/call"), None);
        assert_eq!(t.hub("home/hm/rpc/a/b"), None);
        assert_eq!(t.hub("home/hmx/call/a"), None);
        assert_eq!(t.request("web", "id1"), "home/hm/rpc/web/id1");
        assert_eq!(t.request_filter("web"), "home/hm/rpc/web/+");
    }

    #[test]
    fn sync_topics() {
        let t = Topics::new("home/hm");
        assert_eq!(t.sync("dir-1"), "$home/hm/sync/dir-1");
        assert_eq!(t.plain_sync("dir-1"), "home/hm/sync/dir-1");
        assert!(t.is_sync(&t.sync("dir-1")));
        for not in [
            "home/hm/sync/dir-1",
            "$home/hm/sync/",
            "$home/hm/sync/+",
            "$home/hm/sync/#",
            "$home/hm/sync/a/b",
            "$home/hmx/sync/a",
            "$homicro/sync/a",
            "$home/hm/events/a",
        ] {
            assert!(!t.is_sync(not), "{not}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(Topics::validate_prefix("homicro").is_ok());
        assert!(Topics::validate_prefix("a/b").is_ok());
        for bad in ["", "a/", "/a", "a/+", "#", "$SYS"] {
            assert!(Topics::validate_prefix(bad).is_err(), "{bad}");
        }
    }
}
