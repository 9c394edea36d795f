//! The HTTP API's admin path, for what only an admin may do: `DELETE
//! /register/NAME` on the broker's own port (`homicro serve` answers HTTP
//! there), which the server takes as an admin's only from loopback.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{ANSWER_TIMEOUT, Broker, RegisterError};
use crate::protocol::ErrorPayload;
use crate::record::Name;
use crate::tls_client::Io;

/// Removes NAME's record whoever wrote it; `false`: it was not registered.
pub async fn deregister_as_admin(broker: &Broker, name: &Name) -> Result<bool, RegisterError> {
    let refused = |why: String| RegisterError::Refused(why);
    let at = format!("{}:{}", broker.host, broker.port);
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
        let stream = TcpStream::connect((broker.host.as_str(), broker.port))
            .await
            .map_err(|e| format!("cannot reach the HTTP API at {at}: {e}"))?;
        // With mqtts://, the same port speaks HTTPS.
        let io: Box<dyn Io> = if broker.tls {
            let config = broker.tls_config()?;
            let name = rustls::pki_types::ServerName::try_from(broker.host.clone())
                .map_err(|e| format!("{}: {e}", broker.host))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {at}: {e}"))?;
            Box::new(tls)
        } else {
            Box::new(stream)
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP API at {at}: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::delete(format!("/register/{name}")).header(hyper::header::HOST, &at);
        if let Some(login) = &broker.login {
            use base64::Engine as _;
            let pair = format!("{}:{}", login.user, login.password);
            let basic = base64::engine::general_purpose::STANDARD.encode(pair);
            req = req.header(hyper::header::AUTHORIZATION, format!("Basic {basic}"));
        }
        let req = req.body(Empty::<Bytes>::new()).expect("a valid request");
        let resp = sender.send_request(req).await.map_err(|e| {
            format!("HTTP API at {at}: {e} (is it homicro serve, not another broker?)")
        })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        driver.abort();
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|_| refused(format!("the HTTP API at {at} did not answer")))?
    .map_err(refused)?;
    let (status, body) = answer;
    match status {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        s => {
            let detail = serde_json::from_slice::<ErrorPayload>(&body).map_or_else(
                |_| String::from_utf8_lossy(&body).into_owned(),
                |e| e.detail,
            );
            Err(refused(format!("{s}: {detail}")))
        }
    }
}
