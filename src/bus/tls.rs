//! TLS on the one port: a connection whose first byte is a TLS handshake
//! record (0x16) is terminated here with rustls, and what it carries is
//! classified as usual (MQTT, HTTP, WebSocket). Certificates are read at
//! start and again on SIGHUP.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tracing::info;

/// The first byte of a TLS record carrying a handshake (a ClientHello).
pub const HANDSHAKE: u8 = 0x16;

/// `[tls]` of the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Plaintext connections are refused, except from loopback.
    pub require: bool,
    /// Certificate authorities whose client certificates are taken (PEM):
    /// a client that presents one is the user its certificate's common
    /// name (CN) names, without a password.
    pub client_ca: Option<PathBuf>,
}

/// Why the certificate or key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    pub path: String,
    pub message: String,
}

pub struct Tls {
    config: TlsConfig,
    acceptor: RwLock<TlsAcceptor>,
}

impl Tls {
    pub fn load(config: TlsConfig) -> Result<Tls, TlsError> {
        let acceptor = acceptor(&config)?;
        Ok(Tls {
            config,
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Reads the certificate and key again; on an error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.config)?;
        *self.acceptor.write().unwrap() = fresh;
        info!(cert = %self.config.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap().clone()
    }

    /// Plaintext is refused from anywhere but loopback.
    pub fn required(&self) -> bool {
        self.config.require
    }
}

fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let err = |path: &PathBuf, message: String| TlsError {
        path: path.display().to_string(),
        message,
    };
    let pem =
        |path: &PathBuf| std::fs::read(path).map_err(|e| err(path, format!("cannot read it: {e}")));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem(&config.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| err(&config.cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            &config.cert,
            "holds no certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem(&config.key)?)
        .map_err(|e| err(&config.key, format!("holds no usable private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&config.cert, e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem(ca)?)
                .collect::<Result<_, _>>()
                .map_err(|e| err(ca, format!("not a PEM certificate file: {e}")))?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(err(ca, "holds no usable CA certificate".into()));
            }
            // A client without a certificate may still log in with a
            // password (or as anonymous, when allowed).
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| err(ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder
        .with_single_cert(certs, key)
        .map_err(|e| err(&config.key, format!("does not fit the certificate: {e}")))?;
    let mut server = server;
    // HTTP/1.1 only; MQTT clients offer no ALPN or "mqtt".
    server.alpn_protocols = Vec::new();
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The common name (CN) of a verified client certificate, if the client
/// presented one and it names one.
pub fn client_name<S>(tls: &tokio_rustls::server::TlsStream<S>) -> Option<Arc<str>> {
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    (!cn.is_empty()).then(|| Arc::from(cn))
}

/// A stream whose first bytes were already read: they are read again
/// first, then the stream itself.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_read_first_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let config = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            require: false,
            client_ca: None,
        };
        let e = Tls::load(config.clone()).err().unwrap().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read it", cert.display())),
            "{e}"
        );
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let e = Tls::load(config).err().unwrap().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
    }
}
