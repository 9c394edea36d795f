//! Item 9, trust on: homicro and Mosquitto each with a password file (the
//! same one, made by mosquitto_passwd), an ACL file and TLS on their port.
//! (a) TLS connects per second: `n` clients each do a TLS handshake, a
//! CONNECT with a password and wait for the CONNACK, `c` at a time; (b)
//! registrations per second as in item 1, every client over TLS as a user.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::Opts;
use crate::load;
use crate::report::{Report, Row, int, median, ratio, verdict};
use crate::subject::{Kind, Subject, TrustFiles};
use crate::wire::{self, Client, Secure};

const KINDS: [Kind; 2] = [Kind::Homicro, Kind::Mosquitto];

pub async fn run(o: &Opts, report: &mut Report) {
    let (conns, at_once) = (o.n(2_000, 200), 50);
    let (n, k) = (o.n(20_000, 1_000), 50);
    println!(
        "\n## 9. Trust on (password file, ACL, TLS; the same files for both): {conns} TLS connects ({at_once} at a time), then {k} TLS clients publish {n} retained records"
    );
    let files = TrustFiles::make(
        "bench",
        "bench-pw",
        "user bench\ntopic readwrite homicro/#\n",
    );
    let secure = Arc::new(Secure {
        tls: client_config(&files.ca),
        user: "bench".into(),
        password: "bench-pw".into(),
    });
    let (mut connects, mut regs) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    for run in 0..o.runs {
        for kind in Kind::order(&KINDS, run) {
            let s = Subject::start_secured(kind, &files);
            let t = Instant::now();
            storm(&s, &secure, conns, at_once).await;
            let c_rate = conns as f64 / t.elapsed().as_secs_f64();
            // The two figures apart: the storm's 2,000 sessions end, and
            // homicro gives their memory back a second later (see
            // `bus::trim_memory`), which would otherwise land in the middle
            // of the registrations.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let r_rate = registrations(&s, &secure, n, k, run).await;
            let i = kind as usize;
            connects[i].push(c_rate);
            regs[i].push(r_rate);
            println!(
                "  run {run} {:<10} {:>7} TLS connects/s  {:>8} registrations/s",
                kind.label(),
                int(c_rate),
                int(r_rate)
            );
        }
    }
    let m = |v: &[Vec<f64>; 3], k: Kind| median(v[k as usize].clone());
    for (figure, v) in [
        (
            format!(
                "TLS connects/s with a password (handshake, CONNECT, CONNACK), {conns} clients"
            ),
            &connects,
        ),
        (
            format!("registrations/s with password, ACL and TLS, {k} clients, {n} records"),
            &regs,
        ),
    ] {
        let (h, q) = (m(v, Kind::Homicro), m(v, Kind::Mosquitto));
        let ok = h >= q;
        println!(
            "  median {figure}: homicro {}, mosquitto {}; {:.2}; target ≥ mosquitto: {}",
            int(h),
            int(q),
            h / q,
            verdict(ok)
        );
        report.add(Row {
            item: "9",
            figure,
            homicro: int(h),
            bus: "–".into(),
            mosquitto: int(q),
            ratio: ratio(h, q),
            target: format!("≥ mosquitto: **{}**", verdict(ok)),
        });
    }
}

/// The bench's own CA, and nothing else, trusted.
fn client_config(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// `n` clients connect over TLS as the user and leave, `at_once` at a time.
async fn storm(s: &Subject, secure: &Arc<Secure>, n: usize, at_once: usize) {
    let gate = Arc::new(tokio::sync::Semaphore::new(at_once));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (gate, secure, addr) = (gate.clone(), secure.clone(), s.addr);
            tokio::spawn(async move {
                let _turn = gate.acquire_owned().await.unwrap();
                let c = Client::connect_as(addr, &format!("tls-{i}"), Some(&secure)).await;
                c.unwrap_or_else(|e| panic!("TLS connect {i}: {e}"));
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Item 1's registrations, over TLS as the user: the rate until a watcher
/// saw every record. On homicro's bus a record is forwarded only once the
/// registry accepted it, so this is also the rate of accepted
/// registrations; the watcher does not take the `registered` events too,
/// which would double what it decrypts (on the same two cores) for one
/// subject only.
async fn registrations(s: &Subject, secure: &Arc<Secure>, n: usize, k: usize, run: usize) -> f64 {
    let events = false;
    let mut w = Client::connect_as(s.addr, "watch", Some(secure))
        .await
        .unwrap();
    if events {
        w.subscribe(&["homicro/services/+", "homicro/events/+"])
            .await;
    } else {
        w.subscribe(&["homicro/services/+"]).await;
    }
    let clients = wire::connect_many_as(s.addr, "pub", k, Some(secure.clone())).await;
    let tag = format!("t{run}");
    let publishers = load::publish(clients, &tag, n, "");
    let watch = load::watch(&mut w.rd, &tag, n, events, Duration::from_secs(30));
    let (publishers, seen) = tokio::join!(publishers, watch);
    drop(publishers);
    seen.all.map_or(0.0, |d| n as f64 / d.as_secs_f64())
}
