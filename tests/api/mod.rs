//! The `Api` fixture shared by tests/http.rs and tests/websocket.rs:
//! `homicro serve` (or a front with a registry on a Mosquitto, both started
//! with tests/common) and one HTTP request at a time with hyper's client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use homicro::bus::{self, Bus, Limits, Router};
use homicro::config::BrokerUrl;
use homicro::registry::{self, Handle};
use homicro::topics::Topics;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{Client, Mosquitto, Serve, WAIT};

/// How long the test front waits for a request (the handshake timeout).
pub const IDLE: Duration = Duration::from_millis(500);

/// `homicro serve` (or a front with a registry on a Mosquitto); stopped on
/// drop.
pub struct Api {
    /// Where HTTP goes (loopback).
    pub addr: SocketAddr,
    /// Where MQTT clients go.
    pub mqtt: BrokerUrl,
    pub mosq: Option<Mosquitto>,
    front: Option<tokio::task::JoinHandle<()>>,
    _serve: Option<Serve>,
    _tmp: tempfile::TempDir,
}

impl Api {
    /// `homicro serve` on every address (so that a peer that is not
    /// loopback can be tried), with a handshake timeout of `IDLE`.
    pub async fn start() -> Api {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("homicro.toml");
        std::fs::write(
            &conf,
            format!("[embedded]\nconnect_timeout = \"{}ms\"\n", IDLE.as_millis()),
        )
        .unwrap();
        let serve = Serve::start_with(
            &["--listen", "0.0.0.0:0", "--config", conf.to_str().unwrap()],
            &tmp.path().join("state"),
        )
        .await;
        Api {
            addr: SocketAddr::from(([127, 0, 0, 1], serve.port())),
            mqtt: serve.url.clone(),
            mosq: None,
            front: None,
            _serve: Some(serve),
            _tmp: tmp,
        }
    }

    /// The front and a registry in this process, on a Mosquitto the test
    /// can kill.
    pub async fn start_on_mosquitto() -> Api {
        let mosq = Mosquitto::start().await;
        let tmp = tempfile::tempdir().unwrap();
        let registry = Handle::spawn(registry::Options {
            bus: registry::Bus::External(mosq.url.clone()),
            prefix: "homicro".into(),
            journal: None,
            restored: Vec::new(),
            health_concurrency: 8,
        })
        .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let topics = Topics::new("homicro");
        let router = Router::new();
        let limits = Limits {
            handshake_timeout: IDLE,
            ..Limits::default()
        };
        let shared = Bus::new(
            limits,
            router,
            topics,
            Some(registry),
            Arc::new(homicro::auth::Auth::load(homicro::auth::AuthConfig::default()).unwrap()),
        );
        let front = tokio::spawn(bus::listener::run(listener, Arc::new(shared)));
        let mut c = Client::connect(&mosq.url).await;
        c.subscribe("homicro/registry").await;
        c.expect("homicro/registry", |v| v["state"] == "online")
            .await;
        Api {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            mqtt: mosq.url.clone(),
            mosq: Some(mosq),
            front: Some(front),
            _serve: None,
            _tmp: tmp,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, "").await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        request(self.addr, "PUT", path, &body.to_string()).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        request(self.addr, "DELETE", path, "").await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(f) = &self.front {
            f.abort();
        }
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the status; returns the JSON body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        self.json()
    }
}

/// One request over a fresh connection with hyper's client.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("no answer in time")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Registers NAME on behalf of someone (from loopback); asserts 201.
pub async fn register(api: &Api, name: &str, record: Value) {
    let mut body = record;
    body["name"] = json!(name);
    let ev = api.put("/register", &body).await.expect(201);
    assert_eq!(ev["event"], "registered");
}
