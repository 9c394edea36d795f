//! A rumqttc client that waits for messages (part of the shared helper).

use bytes::Bytes;
use homicro::config::BrokerUrl;
use homicro::mqtt::{self, Incoming};
use rumqttc::{AsyncClient, QoS};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

use super::WAIT;

/// A rumqttc client with helpers to wait for messages.
pub struct Client {
    pub client: AsyncClient,
    pub rx: UnboundedReceiver<Incoming>,
    /// Messages received and not yet consumed by an `expect`.
    pub seen: Vec<(String, Bytes, bool)>,
}

impl Client {
    pub async fn connect(url: &BrokerUrl) -> Client {
        Client::connect_with(mqtt::options(&mqtt::client_id("test"), url)).await
    }

    pub async fn connect_with(opts: rumqttc::MqttOptions) -> Client {
        let (client, mut rx) = mqtt::connect(opts, Duration::from_millis(100));
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(Incoming::Connected) = rx.recv().await {
                    return;
                }
            }
        })
        .await
        .expect("connect");
        Client {
            client,
            rx,
            seen: Vec::new(),
        }
    }

    /// Subscribes at QoS 0 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .unwrap();
        loop {
            match self.recv().await {
                Incoming::Subscribed => return,
                Incoming::Message {
                    topic,
                    payload,
                    retained,
                } => self.seen.push((topic, payload, retained)),
                _ => {}
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>, retain: bool) {
        self.client
            .publish_bytes(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .unwrap();
    }

    /// The next event; panics on a lost connection or after `WAIT`.
    pub async fn recv(&mut self) -> Incoming {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(Incoming::Disconnected(e))) => {
                panic!("lost the broker: {e}; seen {:?}", self.seen)
            }
            Ok(Some(m)) => m,
            Ok(None) => panic!("connection task ended"),
            Err(_) => panic!("timed out waiting for MQTT; seen {:?}", self.seen),
        }
    }

    /// Waits for a message on `topic` whose JSON payload satisfies `pred`;
    /// returns it. Earlier non-matching messages are kept in `seen`.
    pub async fn expect(&mut self, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let p = self
            .take(|t, p| t == topic && serde_json::from_slice::<Value>(p).is_ok_and(|v| pred(&v)))
            .await;
        serde_json::from_slice(&p).unwrap()
    }

    /// The first message, already seen or still to come, that `wanted`
    /// accepts (by topic and payload); the others are kept in `seen`.
    async fn take(&mut self, wanted: impl Fn(&str, &Bytes) -> bool) -> Bytes {
        if let Some(i) = self.seen.iter().position(|(t, p, _)| wanted(t, p)) {
            return self.seen.remove(i).1;
        }
        loop {
            if let Incoming::Message {
                topic,
                payload,
                retained,
            } = self.recv().await
            {
                if wanted(&topic, &payload) {
                    return payload;
                }
                self.seen.push((topic, payload, retained));
            }
        }
    }

    /// Every message up to the end of `filter`'s retained copies.
    pub async fn snapshot(&mut self, filter: &str) -> Vec<(String, Bytes, bool)> {
        let sync = format!("test/sync/{}", mqtt::client_id("s"));
        mqtt::snapshot(&self.client, &mut self.rx, filter, &sync, WAIT)
            .await
            .expect("snapshot")
    }

    /// Registers NAME with `record` and waits for the registry's `registered`.
    pub async fn register(&mut self, name: &str, record: &str) {
        let events = format!("homicro/events/{name}");
        self.subscribe(&events).await;
        self.publish(
            &format!("homicro/services/{name}"),
            record.to_string(),
            true,
        )
        .await;
        self.expect(&events, |v| v["event"] == "registered").await;
    }

    /// Waits for a raw payload on `topic` equal to `want`.
    pub async fn expect_raw(&mut self, topic: &str, want: &[u8]) {
        self.take(|t, p| t == topic && p == want).await;
    }
}
