//! The bridge's rules: each step of a service's life, and the exact
//! publishes it makes.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);
const ONLINE: &[u8] = br#"{"state":"online","version":"0.1.0"}"#;
const WEB: &[u8] = br#"{"host":"10.0.0.5","port":8080,"version":"1.2.0","scheme":"http"}"#;

/// `s` seconds into the test.
fn t(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
}

fn bridge(forget_after: Duration) -> Bridge {
    Bridge::new(
        Layout::new("homicro", "homeassistant"),
        Some("http://hub:1883/".into()),
        forget_after,
        "0.1.0",
    )
}

/// A bridge that has read an empty broker and seen the registry online.
fn live(forget_after: Duration) -> Bridge {
    let mut b = bridge(forget_after);
    b.on_connected();
    assert!(b.on_synced(t(0)).is_empty());
    assert!(b.on_message(t(0), "homicro/registry", ONLINE).is_empty());
    b
}

/// Topic and payload of each publish (all of them retained).
fn shown(out: &[Publish]) -> Vec<(String, String)> {
    assert!(out.iter().all(|p| p.retain), "{out:?}");
    out.iter()
        .map(|p| {
            (
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        })
        .collect()
}

fn pairs(want: &[(&str, &str)]) -> Vec<(String, String)> {
    want.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const CONFIG: &str = "homeassistant/binary_sensor/homicro/web/config";
const STATE: &str = "homicro/ha/web/state";
const ATTRS: &str = "homicro/ha/web/attributes";

fn web_config(sw_version: &str) -> String {
    format!(
        r#"{{"availability_template":"{{{{ value_json.state }}}}","availability_topic":"homicro/registry","device":{{"configuration_url":"http://hub:1883/#web","identifiers":["homicro_web"],"manufacturer":"homicro","model":"web","name":"web","sw_version":"{sw_version}"}},"device_class":"connectivity","json_attributes_topic":"homicro/ha/web/attributes","origin":{{"name":"homicro","sw_version":"0.1.0"}},"payload_available":"online","payload_not_available":"offline","payload_off":"OFF","payload_on":"ON","qos":1,"state_topic":"homicro/ha/web/state","unique_id":"homicro_web"}}"#
    )
}

/// What a bridge publishes to show web (`WEB`).
fn web_shown() -> Vec<(String, String)> {
    pairs(&[
        (ATTRS, WEB_UP),
        (STATE, "ON"),
        (CONFIG, &web_config("1.2.0")),
    ])
}

const WEB_UP: &str = r#"{"endpoint":"10.0.0.5:8080","role":"web","scheme":"http","status":"registered","version":"1.2.0"}"#;

/// web's attributes once gone at `since` (+ `forget` to `forget_at`).
fn web_gone(status: &str, since: &str, forget_at: &str, detail: Option<&str>) -> String {
    let detail = detail.map_or(String::new(), |d| format!(r#""detail":"{d}","#));
    format!(
        r#"{{{detail}"endpoint":"10.0.0.5:8080","forget_at":"{forget_at}","role":"web","scheme":"http","since":"{since}","status":"{status}","version":"1.2.0"}}"#
    )
}

/// t(0) .. as RFC 3339.
const T10: &str = "2023-11-14T22:13:30.000Z";
const T10_PLUS_DAY: &str = "2023-11-15T22:13:30.000Z";

#[test]
fn the_test_clock_reads_as_expected() {
    assert_eq!(humantime::format_rfc3339_millis(t(10)).to_string(), T10);
    assert_eq!(
        humantime::format_rfc3339_millis(t(10) + DAY).to_string(),
        T10_PLUS_DAY
    );
}

#[test]
fn a_registration_publishes_attributes_state_on_and_the_config() {
    let mut b = live(DAY);
    let out = b.on_message(t(1), "homicro/services/web", WEB);
    assert_eq!(shown(&out), web_shown());
    // The same record again (a refresh, a restore): nothing to say.
    assert!(b.on_message(t(2), "homicro/services/web", WEB).is_empty());
    // A new version: the device's sw_version and the attributes change.
    let v2 = br#"{"host":"10.0.0.5","port":8080,"version":"1.3.0","scheme":"http"}"#;
    let out = b.on_message(t(3), "homicro/services/web", v2);
    assert_eq!(
        shown(&out),
        pairs(&[
            (ATTRS, &WEB_UP.replace("1.2.0", "1.3.0")),
            (CONFIG, &web_config("1.3.0")),
        ])
    );
}

#[test]
fn a_record_without_version_or_dashboard_leaves_those_keys_out() {
    let mut b = Bridge::new(Layout::new("homicro", "homeassistant"), None, DAY, "0.1.0");
    b.on_connected();
    b.on_synced(t(0));
    b.on_message(t(0), "homicro/registry", ONLINE);
    let out = b.on_message(
        t(1),
        "homicro/services/nas",
        br#"{"host":"nas.lan","role":"storage"}"#,
    );
    let config: serde_json::Value = serde_json::from_slice(&out[2].payload).unwrap();
    assert_eq!(
        config["device"],
        serde_json::json!({"identifiers":["homicro_nas"],"manufacturer":"homicro","model":"storage","name":"nas"})
    );
    assert_eq!(
        shown(&out[..1]),
        pairs(&[(
            "homicro/ha/nas/attributes",
            r#"{"endpoint":"nas.lan","role":"storage","status":"registered"}"#
        )])
    );
}

#[test]
fn health_results_are_attributes() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    let failing = br#"{"check":"tcp 10.0.0.5:8080","detail":"connection refused","failures":1,"name":"web","of":3,"status":"failing"}"#;
    let out = b.on_message(t(2), "homicro/health/web", failing);
    assert_eq!(
        shown(&out),
        pairs(&[(
            ATTRS,
            r#"{"endpoint":"10.0.0.5:8080","health":"failing 1/3","health_check":"tcp 10.0.0.5:8080","health_detail":"connection refused","role":"web","scheme":"http","status":"registered","version":"1.2.0"}"#
        )]),
        "still on: one failure of three"
    );
    // Cleared (the check went from the record): back to no health.
    assert_eq!(
        shown(&b.on_message(t(3), "homicro/health/web", b"")),
        pairs(&[(ATTRS, WEB_UP)])
    );
}

#[test]
fn an_expiry_turns_the_entity_off_and_says_why() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    // The registry clears the record, then says why.
    let out = b.on_message(t(10), "homicro/services/web", b"");
    assert_eq!(
        shown(&out),
        pairs(&[
            (ATTRS, &web_gone("gone", T10, T10_PLUS_DAY, None)),
            (STATE, "OFF")
        ])
    );
    let expired = br#"{"endpoint":"10.0.0.5:8080","event":"expired","name":"web"}"#;
    let out = b.on_message(t(10), "homicro/events/web", expired);
    assert_eq!(
        shown(&out),
        pairs(&[(ATTRS, &web_gone("expired", T10, T10_PLUS_DAY, None))])
    );
    assert_eq!(b.next_deadline(), Some(t(10) + DAY));
}

#[test]
fn an_event_before_the_clear_is_taken_too() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    let expired = br#"{"event":"expired","name":"web"}"#;
    let out = b.on_message(t(10), "homicro/events/web", expired);
    assert_eq!(
        shown(&out),
        pairs(&[
            (ATTRS, &web_gone("expired", T10, T10_PLUS_DAY, None)),
            (STATE, "OFF")
        ])
    );
    assert!(b.on_message(t(11), "homicro/services/web", b"").is_empty());
}

#[test]
fn an_unhealthy_service_turns_off_with_the_detail() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    b.on_message(t(2), "homicro/health/web", br#"{"check":"tcp 10.0.0.5:8080","detail":"refused","failures":1,"name":"web","of":1,"status":"failing"}"#);
    // As the registry publishes it: clear, health clear, event.
    let mut out = b.on_message(t(10), "homicro/services/web", b"");
    out.extend(b.on_message(t(10), "homicro/health/web", b""));
    let unhealthy = br#"{"detail":"tcp 10.0.0.5:8080 failed 1 times in a row: refused","endpoint":"10.0.0.5:8080","event":"unhealthy","name":"web"}"#;
    out.extend(b.on_message(t(10), "homicro/events/web", unhealthy));
    assert_eq!(
        shown(&out),
        pairs(&[
            (ATTRS, &web_gone("gone", T10, T10_PLUS_DAY, None)),
            (STATE, "OFF"),
            (
                ATTRS,
                &web_gone(
                    "unhealthy",
                    T10,
                    T10_PLUS_DAY,
                    Some("tcp 10.0.0.5:8080 failed 1 times in a row: refused")
                )
            ),
        ])
    );
}

#[test]
fn a_deregistration_removes_the_entity_at_once() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    let out = b.on_message(t(10), "homicro/services/web", b"");
    assert_eq!(shown(&out)[1], (STATE.to_string(), "OFF".to_string()));
    let deregistered = br#"{"endpoint":"10.0.0.5:8080","event":"deregistered","name":"web"}"#;
    let out = b.on_message(t(10), "homicro/events/web", deregistered);
    assert_eq!(
        shown(&out),
        pairs(&[(CONFIG, ""), (STATE, ""), (ATTRS, "")]),
        "config first"
    );
    // Its deadline passing later changes nothing.
    assert!(b.on_tick(t(10) + DAY).is_empty());
}

/// Its client was lost and its MQTT will cleared the record: not a
/// deliberate deregistration, so the entity turns off and stays until
/// `forget_after`, as an expired one does.
#[test]
fn a_service_cleared_by_its_will_turns_off_and_stays() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    b.on_message(t(10), "homicro/services/web", b"");
    let by_will =
        br#"{"endpoint":"10.0.0.5:8080","event":"deregistered","name":"web","will":true}"#;
    let out = b.on_message(t(10), "homicro/events/web", by_will);
    assert_eq!(
        shown(&out),
        pairs(&[(ATTRS, &web_gone("lost", T10, T10_PLUS_DAY, None))])
    );
    // Back within forget_after: on again, the same entity.
    let out = b.on_message(t(20), "homicro/services/web", WEB);
    assert_eq!(shown(&out), pairs(&[(ATTRS, WEB_UP), (STATE, "ON")]));
}

#[test]
fn a_gone_service_is_forgotten_after_forget_after() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    b.on_message(t(10), "homicro/services/web", b"");
    assert!(b.on_tick(t(10) + DAY - Duration::from_secs(1)).is_empty());
    let out = b.on_tick(t(10) + DAY);
    assert_eq!(
        shown(&out),
        pairs(&[(CONFIG, ""), (STATE, ""), (ATTRS, "")])
    );
    assert_eq!(b.next_deadline(), None);
}

#[test]
fn a_service_back_within_forget_after_is_on_again_and_kept() {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    b.on_message(t(10), "homicro/services/web", b"");
    let out = b.on_message(t(20), "homicro/services/web", WEB);
    assert_eq!(shown(&out), pairs(&[(ATTRS, WEB_UP), (STATE, "ON")]));
    assert!(
        b.on_tick(t(10) + DAY).is_empty(),
        "the old deadline is stale"
    );
    // Gone again later: a new deadline from then.
    b.on_message(t(30), "homicro/services/web", b"");
    assert!(b.on_tick(t(10) + DAY).is_empty());
    assert_eq!(b.on_tick(t(30) + DAY).len(), 3);
}

#[test]
fn forget_after_zero_removes_a_service_as_it_goes() {
    let mut b = live(Duration::ZERO);
    b.on_message(t(1), "homicro/services/web", WEB);
    let out = b.on_message(t(10), "homicro/services/web", b"");
    assert_eq!(
        shown(&out),
        pairs(&[(CONFIG, ""), (STATE, ""), (ATTRS, "")])
    );
    assert!(
        b.on_message(
            t(10),
            "homicro/events/web",
            br#"{"event":"expired","name":"web"}"#
        )
        .is_empty()
    );
}

#[test]
fn what_is_not_a_change_publishes_nothing() {
    let mut b = live(DAY);
    for (topic, payload) in [
        ("homicro/services/web", &b"not json"[..]),
        ("homicro/services/web", br#"{"port":1}"#),
        ("homicro/services/a/b", WEB),
        ("homicro/services/Web", WEB),
        ("homicro/events/web", br#"{"event":"expired","name":"web"}"#),
        ("homicro/events/web", b"forged"),
        ("homicro/health/web", br#"{"status":"passing"}"#),
        ("homicro/services/gone", b""),
        // Another program's config under our node id.
        (CONFIG, b"{}"),
        ("elsewhere/services/web", WEB),
    ] {
        assert!(b.on_message(t(1), topic, payload).is_empty(), "{topic}");
    }
    b.on_message(t(1), "homicro/services/web", WEB);
    let registered = br#"{"endpoint":"10.0.0.5:8080","event":"registered","name":"web"}"#;
    assert!(
        b.on_message(t(2), "homicro/events/web", registered)
            .is_empty()
    );
}

#[test]
fn nothing_is_published_before_the_broker_is_read_and_the_registry_online() {
    let mut b = bridge(DAY);
    b.on_connected();
    assert!(b.on_message(t(1), "homicro/services/web", WEB).is_empty());
    assert!(b.on_synced(t(2)).is_empty(), "registry not online yet");
    let out = b.on_message(t(3), "homicro/registry", ONLINE);
    assert_eq!(out.len(), 3, "{out:?}");
    let mut b = bridge(DAY);
    b.on_connected();
    b.on_message(t(1), "homicro/registry", ONLINE);
    assert!(b.on_message(t(1), "homicro/services/web", WEB).is_empty());
    assert_eq!(b.on_synced(t(2)).len(), 3);
    let offline = br#"{"state":"offline","version":"0.1.0"}"#;
    let mut b = bridge(DAY);
    b.on_connected();
    b.on_message(t(1), "homicro/registry", offline);
    b.on_message(t(1), "homicro/services/web", WEB);
    assert!(b.on_synced(t(2)).is_empty());
}

/// Hands `out` back to the bridge as the bus echoes it; nothing to say.
fn echo(b: &mut Bridge, out: &[Publish]) {
    for p in out {
        let again = b.on_message(t(0), &p.topic, &p.payload);
        assert!(again.is_empty(), "{} {:?}", p.topic, shown(&again));
    }
}

/// The config as someone else writes it: ours with their state topic.
fn forged() -> String {
    web_config("1.2.0").replace("homicro/ha/web/state", "forger/state")
}

#[test]
fn a_forged_config_or_state_is_repaired_at_once() {
    let mut b = live(DAY);
    let out = b.on_message(t(1), "homicro/services/web", WEB);
    echo(&mut b, &out);
    let out = b.on_message(t(2), CONFIG, forged().as_bytes());
    assert_eq!(shown(&out), pairs(&[(CONFIG, &web_config("1.2.0"))]));
    echo(&mut b, &out);
    // Through an external broker anyone may write PREFIX/ha/ too.
    let out = b.on_message(t(3), STATE, b"OFF");
    assert_eq!(shown(&out), pairs(&[(STATE, "ON")]));
    echo(&mut b, &out);
    let out = b.on_message(t(3), ATTRS, b"");
    assert_eq!(shown(&out), pairs(&[(ATTRS, WEB_UP)]));
    echo(&mut b, &out);
    // A config with our unique id for a service we do not show: cleared;
    // another program's under our node id: left alone.
    let tv = "homeassistant/binary_sensor/homicro/tv/config";
    let fake = web_config("1.2.0").replace("homicro_web", "homicro_tv");
    let out = b.on_message(t(4), tv, fake.as_bytes());
    assert_eq!(shown(&out), pairs(&[(tv, "")]));
    echo(&mut b, &out);
    assert!(
        b.on_message(t(4), tv, br#"{"unique_id":"tv_1"}"#)
            .is_empty()
    );
}

#[test]
fn someone_elses_publish_before_ours_lands_is_overwritten_by_ours() {
    let mut b = live(DAY);
    let out = b.on_message(t(1), "homicro/services/web", WEB);
    // A forged config reaches the broker before our config.
    assert!(b.on_message(t(1), CONFIG, forged().as_bytes()).is_empty());
    echo(&mut b, &out);
    // Afterwards it counts.
    assert_eq!(b.on_message(t(2), CONFIG, forged().as_bytes()).len(), 1);
}

#[test]
fn our_own_publishes_coming_back_late_are_not_taken_for_someone_elses() {
    // Registered, removed ("0s") and registered again before any of it
    // comes back: the empty config coming back is not a deletion in Home
    // Assistant, nor the config after it a forgery.
    let mut b = live(Duration::ZERO);
    let mut sent = b.on_message(t(1), "homicro/services/web", WEB);
    sent.extend(b.on_message(t(2), "homicro/services/web", b""));
    sent.extend(b.on_message(t(3), "homicro/services/web", WEB));
    assert_eq!(sent.len(), 9);
    echo(&mut b, &sent);
    // Still shown: the next change is published.
    assert_eq!(b.on_message(t(4), "homicro/services/web", b"").len(), 3);
}

#[test]
fn a_device_deleted_in_home_assistant_stays_deleted_until_it_registers_anew() {
    let mut b = live(DAY);
    let out = b.on_message(t(1), "homicro/services/web", WEB);
    echo(&mut b, &out);
    // Home Assistant clears the config when its user deletes the device.
    let out = b.on_message(t(2), CONFIG, b"");
    assert_eq!(shown(&out), pairs(&[(STATE, ""), (ATTRS, "")]));
    echo(&mut b, &out);
    // A refresh, a new version, a forged config, an expiry: nothing shown.
    let updated = br#"{"event":"updated","name":"web","changed":false}"#;
    let v2 = br#"{"host":"10.0.0.5","port":8080,"version":"1.3.0","scheme":"http"}"#;
    assert!(b.on_message(t(3), "homicro/services/web", WEB).is_empty());
    assert!(b.on_message(t(3), "homicro/events/web", updated).is_empty());
    assert!(b.on_message(t(4), "homicro/services/web", v2).is_empty());
    let out = b.on_message(t(4), CONFIG, forged().as_bytes());
    assert_eq!(shown(&out), pairs(&[(CONFIG, "")]), "not ours to show");
    echo(&mut b, &out);
    // A reconnection remembers it.
    b.on_connected();
    b.on_message(t(5), "homicro/services/web", v2);
    b.on_message(t(5), "homicro/registry", ONLINE);
    assert!(b.on_synced(t(5)).is_empty());
    assert!(b.on_message(t(10), "homicro/services/web", b"").is_empty());
    let expired = br#"{"event":"expired","name":"web"}"#;
    assert!(
        b.on_message(t(10), "homicro/events/web", expired)
            .is_empty()
    );
    // Back, and registered anew: shown again.
    assert!(b.on_message(t(20), "homicro/services/web", WEB).is_empty());
    let registered = br#"{"event":"registered","name":"web"}"#;
    let out = b.on_message(t(20), "homicro/events/web", registered);
    assert_eq!(shown(&out), web_shown());
}

#[test]
fn a_deleted_device_of_a_gone_service_is_forgotten_with_it() {
    let mut b = live(DAY);
    let out = b.on_message(t(1), "homicro/services/web", WEB);
    echo(&mut b, &out);
    let out = b.on_message(t(10), "homicro/services/web", b"");
    echo(&mut b, &out);
    assert_eq!(b.on_message(t(11), CONFIG, b"").len(), 2);
    assert!(b.on_tick(t(10) + DAY).is_empty());
    // Not dismissed any more: a new record is shown at once.
    assert_eq!(
        b.on_message(t(20) + DAY, "homicro/services/web", WEB).len(),
        3
    );
}

const REJECTED: &[u8] =
    br#"{"endpoint":"10.0.0.5:8080","error":"owned","event":"rejected","name":"web"}"#;

#[test]
fn a_record_the_registry_refuses_and_clears_leaves_no_device() {
    // Through an external broker a refused record reaches the bus before
    // the registry clears it and says `rejected`.
    let mut b = live(DAY);
    assert_eq!(b.on_message(t(1), "homicro/services/web", WEB).len(), 3);
    assert_eq!(b.on_message(t(1), "homicro/services/web", b"").len(), 2);
    let out = b.on_message(t(1), "homicro/events/web", REJECTED);
    assert_eq!(
        shown(&out),
        pairs(&[(CONFIG, ""), (STATE, ""), (ATTRS, "")])
    );
    assert!(b.on_tick(t(1) + DAY).is_empty());
}

/// A live bridge showing web, registered at t(1) as the registry said.
fn registered_web() -> Bridge {
    let mut b = live(DAY);
    b.on_message(t(1), "homicro/services/web", WEB);
    let registered = br#"{"event":"registered","name":"web"}"#;
    b.on_message(t(1), "homicro/events/web", registered);
    b
}

#[test]
fn a_refused_record_of_a_gone_service_leaves_it_as_it_was() {
    let mut b = registered_web();
    b.on_message(t(10), "homicro/services/web", b"");
    b.on_message(
        t(10),
        "homicro/events/web",
        br#"{"event":"expired","name":"web"}"#,
    );
    b.on_message(t(20), "homicro/services/web", WEB);
    b.on_message(t(20), "homicro/services/web", b"");
    let out = b.on_message(t(20), "homicro/events/web", REJECTED);
    assert_eq!(
        shown(&out),
        pairs(&[(ATTRS, &web_gone("expired", T10, T10_PLUS_DAY, None))])
    );
    assert_eq!(b.on_tick(t(10) + DAY).len(), 3, "due as before");
}

#[test]
fn a_refused_record_the_registry_answers_with_the_owners_changes_nothing_after() {
    let mut b = registered_web();
    let other = br#"{"host":"10.0.0.9","port":8080}"#;
    b.on_message(t(2), "homicro/services/web", other);
    // The registry restores the owner's record, then says `rejected`.
    let out = b.on_message(t(2), "homicro/services/web", WEB);
    assert_eq!(shown(&out)[0], (ATTRS.to_string(), WEB_UP.to_string()));
    assert!(
        b.on_message(t(2), "homicro/events/web", REJECTED)
            .is_empty()
    );
    // A new one whose verdict is not in yet, and an unrelated refusal
    // (on the embedded bus refused publishes never reach it): still on.
    b.on_message(t(3), "homicro/services/nas", br#"{"host":"nas.lan"}"#);
    let rejected = br#"{"event":"rejected","name":"nas","error":"not_owner"}"#;
    assert!(
        b.on_message(t(3), "homicro/events/nas", rejected)
            .is_empty()
    );
}

/// The broker's retained messages, as a bridge's publishes leave them.
#[derive(Default)]
struct Held(HashMap<String, Bytes>);

impl Held {
    fn apply(&mut self, out: &[Publish]) {
        for p in out {
            if p.payload.is_empty() {
                self.0.remove(&p.topic);
            } else {
                self.0.insert(p.topic.clone(), p.payload.clone());
            }
        }
    }

    /// A new bridge reading this broker (what it retains of the bridge's
    /// topics, and `records`), the registry online at `now`.
    fn restart(
        &self,
        forget_after: Duration,
        records: &[(&str, &[u8])],
        now: SystemTime,
    ) -> (Bridge, Vec<Publish>) {
        let mut b = bridge(forget_after);
        b.on_connected();
        for (topic, payload) in &self.0 {
            assert!(b.on_message(now, topic, payload).is_empty());
        }
        for (name, record) in records {
            assert!(
                b.on_message(now, &format!("homicro/services/{name}"), record)
                    .is_empty()
            );
        }
        assert!(b.on_synced(now).is_empty());
        let out = b.on_message(now, "homicro/registry", ONLINE);
        (b, out)
    }
}

/// What a bridge leaves on the broker after web was registered at t(1)
/// and nas registered then cleared at t(10), with `event` after the clear.
fn web_up_nas_gone(event: Option<&[u8]>) -> Held {
    let mut held = Held::default();
    let mut b = live(DAY);
    held.apply(&b.on_message(t(1), "homicro/services/web", WEB));
    held.apply(&b.on_message(t(1), "homicro/services/nas", br#"{"host":"nas.lan"}"#));
    held.apply(&b.on_message(t(10), "homicro/services/nas", b""));
    if let Some(event) = event {
        held.apply(&b.on_message(t(10), "homicro/events/nas", event));
    }
    held
}

#[test]
fn a_restart_reads_back_what_it_published_and_republishes_nothing_unchanged() {
    let held = web_up_nas_gone(Some(br#"{"event":"expired","name":"nas"}"#));
    assert_eq!(held.0.len(), 6);
    // Back an hour later: web was restored by the registry, nas is still
    // gone (since t(10), as its attributes say).
    let (mut b, out) = held.restart(DAY, &[("web", WEB)], t(3600));
    assert!(out.is_empty(), "{:?}", shown(&out));
    assert_eq!(b.next_deadline(), Some(t(10) + DAY));
    let out = b.on_tick(t(10) + DAY);
    assert_eq!(
        shown(&out),
        pairs(&[
            ("homeassistant/binary_sensor/homicro/nas/config", ""),
            ("homicro/ha/nas/state", ""),
            ("homicro/ha/nas/attributes", ""),
        ])
    );
}

#[test]
fn a_restart_turns_off_what_vanished_and_removes_what_fell_due_meanwhile() {
    let held = web_up_nas_gone(None);
    // Two days later, with no records at all: web vanished while homicro
    // was away (off, since now); nas fell due a day ago (removed).
    let now = t(10) + 2 * DAY;
    let (b, out) = held.restart(DAY, &[], now);
    let since = humantime::format_rfc3339_millis(now).to_string();
    let due = humantime::format_rfc3339_millis(now + DAY).to_string();
    let mut got = shown(&out);
    got.sort();
    let mut want = pairs(&[
        ("homeassistant/binary_sensor/homicro/nas/config", ""),
        ("homicro/ha/nas/state", ""),
        ("homicro/ha/nas/attributes", ""),
        (ATTRS, &web_gone("gone", &since, &due, None)),
        (STATE, "OFF"),
    ]);
    want.sort();
    assert_eq!(got, want);
    assert_eq!(b.next_deadline(), Some(now + DAY));
}

#[test]
fn a_restart_removes_what_was_deregistered_while_reading_and_strays_of_its_own() {
    let mut held = Held::default();
    let mut b = live(DAY);
    held.apply(&b.on_message(t(1), "homicro/services/web", WEB));
    // A state without a config (a removal cut short), and another
    // program's config under our node id: the stray goes, the other stays.
    held.0
        .insert("homicro/ha/old/state".into(), Bytes::from_static(b"OFF"));
    let foreign = "homeassistant/binary_sensor/homicro/tv/config";
    held.0.insert(
        foreign.into(),
        Bytes::from_static(br#"{"unique_id":"someone_else"}"#),
    );
    let mut b = bridge(DAY);
    b.on_connected();
    for (topic, payload) in &held.0 {
        b.on_message(t(5), topic, payload);
    }
    b.on_message(
        t(5),
        "homicro/events/web",
        br#"{"event":"deregistered","name":"web"}"#,
    );
    b.on_synced(t(5));
    let mut got = shown(&b.on_message(t(5), "homicro/registry", ONLINE));
    got.sort();
    let mut want = pairs(&[
        (CONFIG, ""),
        (STATE, ""),
        (ATTRS, ""),
        ("homicro/ha/old/state", ""),
    ]);
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn a_reconnection_reads_everything_again() {
    let mut held = Held::default();
    let mut b = live(DAY);
    held.apply(&b.on_message(t(1), "homicro/services/web", WEB));
    b.on_connected();
    assert!(
        b.on_message(t(2), "homicro/services/web", b"").is_empty(),
        "reading"
    );
    for (topic, payload) in &held.0 {
        b.on_message(t(2), topic, payload);
    }
    b.on_message(t(2), "homicro/services/web", WEB);
    b.on_message(t(2), "homicro/registry", ONLINE);
    assert!(
        b.on_synced(t(2)).is_empty(),
        "the broker holds what it should"
    );
}

#[test]
fn names_with_dots_and_other_prefixes() {
    let l = Layout::new("home/hm", "ha");
    let name = Name::parse("kitchen.lamp_2").unwrap();
    assert_eq!(
        l.config(&name),
        "ha/binary_sensor/home_hm/kitchen_2Elamp_2/config"
    );
    assert_eq!(l.state(&name), "home/hm/ha/kitchen.lamp_2/state");
    assert_eq!(l.unique_id(&name), "home_hm_kitchen.lamp_2");
    assert_eq!(l.heard(&l.config(&name)), Heard::Ours(name.clone()));
    assert_eq!(l.heard(&l.attributes(&name)), Heard::Ours(name.clone()));
    assert_eq!(
        l.heard("home/hm/services/kitchen.lamp_2"),
        Heard::Record(name)
    );
    for other in [
        "ha/binary_sensor/home_hm/Kitchen/config",
        "ha/binary_sensor/home_hm/a/b/config",
        "ha/binary_sensor/home_hmx/a/config",
        "ha/sensor/home_hm/a/config",
        "home/hm/ha/a/b/c",
        "home/hm/ha/a/other",
        "home/hm/events/a/b",
    ] {
        assert_eq!(l.heard(other), Heard::Other, "{other}");
    }
    assert_eq!(
        l.filters(),
        [
            "home/hm/services/+",
            "home/hm/events/+",
            "home/hm/health/+",
            "home/hm/registry",
            "home/hm/ha/+/+",
            "ha/binary_sensor/home_hm/+/config",
        ]
    );
    assert_eq!(
        l.read_back_filters(),
        ["home/hm/ha/+/+", "ha/binary_sensor/home_hm/+/config"]
    );
}

#[test]
fn the_default_dashboard_url_follows_the_listen_address() {
    let host = || "nas".to_string();
    let url = |a: &str, https| dashboard_url(a.parse().unwrap(), https, host);
    assert_eq!(url("0.0.0.0:1883", false), "http://nas:1883/");
    assert_eq!(url("[::]:1883", true), "https://nas:1883/");
    assert_eq!(url("192.168.1.2:1884", false), "http://192.168.1.2:1884/");
    assert_eq!(url("[fd00::2]:1883", false), "http://[fd00::2]:1883/");
}

#[test]
fn with_discovery_off_what_an_earlier_run_published_is_removed_once() {
    let mut held = Held::default();
    let mut b = live(DAY);
    held.apply(&b.on_message(t(1), "homicro/services/web", WEB));
    let mut r = Bridge::remover(Layout::new("homicro", "homeassistant"), "0.1.0");
    assert_eq!(
        r.filters(),
        [
            "homicro/ha/+/+",
            "homeassistant/binary_sensor/homicro/+/config"
        ]
    );
    r.on_connected();
    for (topic, payload) in &held.0 {
        assert!(r.on_message(t(2), topic, payload).is_empty());
    }
    // Records and the registry's state mean nothing to it.
    assert!(r.on_message(t(2), "homicro/services/web", WEB).is_empty());
    assert!(r.on_message(t(2), "homicro/registry", ONLINE).is_empty());
    assert!(!r.finished());
    let out = r.on_synced(t(2));
    assert_eq!(
        shown(&out),
        pairs(&[(CONFIG, ""), (STATE, ""), (ATTRS, "")])
    );
    assert!(r.finished());
    // Nothing there: nothing to do, and done.
    let mut r = Bridge::remover(Layout::new("homicro", "homeassistant"), "0.1.0");
    r.on_connected();
    assert!(r.on_synced(t(3)).is_empty());
    assert!(r.finished());
}

/// The actor on a real router: what a watcher of the bus sees.
#[tokio::test]
async fn the_actor_on_the_embedded_router() {
    use crate::bus::router::{Link, Message, Router};
    let router = Router::new();
    let publish = |topic: &str, payload: &'static [u8], retain: bool| {
        router.publish(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain,
            ..Message::default()
        })
    };
    let mut watcher = router.link();
    watcher.subscribe("homeassistant/#", true);
    watcher.subscribe("homicro/#", true);
    // Before it starts: the registry online, one record.
    publish("homicro/registry", ONLINE, true);
    publish("homicro/services/web", WEB, true);
    let task = tokio::spawn(actor::run(bridge(DAY), Bus::Embedded(router.clone())));
    async fn next(w: &mut Link) -> (String, Bytes) {
        let f = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("a message within 10 s");
        (f.msg.topic.to_string(), f.msg.payload.clone())
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.push(next(&mut watcher).await);
    }
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "homicro/registry",
            "homicro/services/web",
            ATTRS,
            STATE,
            CONFIG
        ],
        "no sync message on the bus"
    );
    assert_eq!(seen[3].1, "ON");
    // Expired: the registry's clear, then its event.
    publish("homicro/services/web", b"", true);
    publish(
        "homicro/events/web",
        br#"{"event":"expired","name":"web"}"#,
        false,
    );
    let mut seen = Vec::new();
    while !seen.iter().any(|(t, p)| t == STATE && p == "OFF") {
        seen.push(next(&mut watcher).await);
    }
    task.abort();
}
