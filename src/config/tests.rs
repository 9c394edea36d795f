//! The configuration's rules.

use super::*;

fn load(file: &str, flags: &Overrides) -> Result<ServeConfig, ConfigError> {
    ServeConfig::load(Some(("f.toml", file)), flags)
}

#[test]
fn defaults() {
    let c = ServeConfig::load(None, &Overrides::default()).unwrap();
    assert_eq!(c.listen, "0.0.0.0:1883".parse().unwrap());
    assert_eq!(c.broker, None);
    assert_eq!(c.prefix, "homicro");
    assert_eq!(c.state_dir, Some(PathBuf::from("homicro-state")));
    assert_eq!(c.state_file, Some(PathBuf::from("homicro-state.json")));
    assert_eq!(c.embedded.max_queued_messages, 1_000);
}

#[test]
fn an_empty_state_dir_keeps_nothing_and_an_empty_state_file_migrates_nothing() {
    let c = load(
        "state_dir = \"\"\nstate_file = \"\"\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!((c.state_dir, c.state_file), (None, None));
}

#[test]
fn file_then_flags() {
    let file = "listen = \"127.0.0.1:2000\"\nprefix = \"home\"\n[embedded]\nmax_connections = 5\n";
    let c = load(file, &Overrides::default()).unwrap();
    assert_eq!(c.listen.port(), 2000);
    assert_eq!(c.prefix, "home");
    assert_eq!(c.embedded.max_connections, 5);
    assert_eq!(
        c.embedded.max_topic_alias, 10,
        "unset keys keep the default"
    );
    let flags = Overrides {
        listen: Some("127.0.0.1:3000".into()),
        broker: Some("mqtt://nas:1884".into()),
        ..Default::default()
    };
    let c = load(file, &flags).unwrap();
    assert_eq!(c.listen.port(), 3000);
    assert_eq!(c.broker.unwrap().to_string(), "mqtt://nas:1884");
}

#[test]
fn bad_values_name_key_and_accepted_values() {
    let flag = |f: fn(&mut Overrides)| {
        let mut o = Overrides::default();
        f(&mut o);
        ServeConfig::load(None, &o).unwrap_err().to_string()
    };
    let e = flag(|o| o.listen = Some("1883".into()));
    assert!(e.contains("flag: listen") && e.contains("IP:PORT"), "{e}");
    let e = flag(|o| o.broker = Some("http://x".into()));
    assert!(
        e.contains("broker") && e.contains("mqtt://HOST:PORT"),
        "{e}"
    );
    let e = flag(|o| o.log_level = Some("loud".into()));
    assert!(
        e.contains("log_level") && e.contains("error, warn, info"),
        "{e}"
    );
    let e = flag(|o| o.prefix = Some("a/#".into()));
    assert!(e.contains("prefix") && e.contains("without"), "{e}");

    let cases = [
        (
            "nope = 1",
            "f.toml: nope: unknown key; accepted keys are listen",
        ),
        (
            "[embedded]\nmax_connections = \"x\"",
            "embedded.max_connections: must be an integer from 1",
        ),
        (
            "[embedded]\nmax_payload_size = 100",
            "embedded.max_payload_size: must be an integer from 65536",
        ),
        ("[embedded]\nbogus = 1", "embedded.bogus: unknown key"),
        (
            "[embedded]\nsegment_count = 4",
            "embedded.segment_count: no longer used",
        ),
        (
            "state_flush = \"1s\"",
            "state_flush: no longer used: every change is written to the journal",
        ),
        ("listen = 5", "listen: must be a string, got 5"),
        (
            "health_concurrency = 0",
            "health_concurrency: must be an integer from 1 to 100000, got 0",
        ),
        ("listen = ", "not valid TOML"),
        (
            "huge_code_pages = \"yes\"",
            "huge_code_pages: must be true or false, got \"yes\"",
        ),
        (
            "[embedded]\nconnect_timeout = \"5m\"",
            "embedded.connect_timeout: must be from",
        ),
        (
            "[embedded]\nmax_inflight_messages = 0",
            "embedded.max_inflight_messages: must be an integer from 1 to 65535, got 0",
        ),
        (
            "[embedded]\nmax_queued_messages = -1",
            "embedded.max_queued_messages: must be an integer from 1",
        ),
        (
            "[embedded]\nmax_topic_alias = 70000",
            "embedded.max_topic_alias: must be an integer from 0 to 65535, got 70000",
        ),
        (
            "[embedded]\nmax_keepalive = 5",
            "embedded.max_keepalive: must be an integer from 10 to 65535, got 5",
        ),
    ];
    for (file, want) in cases {
        let e = load(file, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains(want), "{file:?}: {e:?} lacks {want:?}");
    }
}

#[test]
fn broker_urls() {
    let ok = |s: &str| BrokerUrl::parse(s).unwrap();
    assert_eq!(
        ok("mqtt://localhost"),
        BrokerUrl {
            host: "localhost".into(),
            port: 1883,
            login: None,
            tls: false,
            cafile: None,
            fail_fast: false,
        }
    );
    assert_eq!(ok("mqtt://10.0.0.2:1884").port, 1884);
    assert_eq!(ok("tcp://h:1/").port, 1);
    assert_eq!(ok("mqtt://[::1]:1885").host, "::1");
    assert_eq!(ok("mqtt://[::1]:1885").to_string(), "mqtt://[::1]:1885");
    for bad in [
        "localhost:1883",
        "mqtt://",
        "mqtt://h:0",
        "mqtt://h:x",
        "http://h",
        "mqtt://u@h",
    ] {
        assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
    }
    let tls = ok("mqtts://h");
    assert!(tls.tls && tls.port == 8883);
    assert_eq!(tls.to_string(), "mqtts://h:8883");
    assert!(ok("ssl://h:1883").tls);
    assert!(!ok("mqtt://h").tls);
}

#[test]
fn the_home_assistant_example_loads() {
    let text = include_str!("../../config/home-assistant.toml");
    let c = ServeConfig::load(Some(("home-assistant.toml", text)), &Overrides::default()).unwrap();
    assert!(c.home_assistant.discovery);
    assert_eq!(c.home_assistant.forget_after, Duration::from_secs(86_400));
    let c = ServeConfig::load(None, &Overrides::default()).unwrap();
    assert!(!c.home_assistant.discovery, "off by default");
}
