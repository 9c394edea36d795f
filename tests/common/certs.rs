//! Certificates for TLS tests and the benchmark, made with the openssl
//! command (shared by `tests/` and `benches/` through `#[path]`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and a server certificate it signs for 127.0.0.1 and localhost,
/// made in `dir`: (CA, cert, key) paths.
pub fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test-ca",
        "-days",
        "30",
    ];
    let ca_ext = [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ];
    openssl(&[&["req", "-x509"], &ec[..], &ca[..], &ca_ext[..]].concat());
    let srv = [
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ];
    let san = ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"];
    openssl(&[&["req"], &ec[..], &srv[..], &san[..]].concat());
    openssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "30",
        "-copy_extensions",
        "copy",
    ]);
    (dir.join("ca.pem"), dir.join("srv.pem"), dir.join("srv.key"))
}
