"""Certificates for the TLS tests, made with the openssl command: a CA, and
server certificates it signs (valid, expired) or that sign themselves."""

import os
import subprocess


def _run(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def ca(d, name="homicro-test-ca"):
    """A CA in directory `d`: returns (cert path, key path)."""
    os.makedirs(d, exist_ok=True)
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-subj", f"/CN={name}", "-days", "30",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")


def server(d, ca_dir, name="server", ips=("127.0.0.1",), expired=False, self_signed=False):
    """A server certificate for `ips` and localhost: (cert path, key path)."""
    san = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
    key, csr, cert = f"{name}.key", f"{name}.csr", f"{name}.pem"
    if self_signed:
        _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-subj", "/CN=localhost", "-days", "30",
             "-addext", f"subjectAltName={san}", cwd=d)
        return os.path.join(d, cert), os.path.join(d, key)
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=localhost",
         "-addext", f"subjectAltName={san}", cwd=d)
    ca_pem, ca_key = os.path.join(ca_dir, "ca.pem"), os.path.join(ca_dir, "ca.key")
    if not expired:
        _run("x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "30", "-copy_extensions", "copy", cwd=d)
    else:
        # `openssl ca` can date a certificate in the past.
        conf = os.path.join(d, "ca.cnf")
        with open(conf, "w") as f:
            f.write("[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\n"
                    "serial=serial\ndefault_md=sha256\npolicy=p\ncopy_extensions=copy\n"
                    "[p]\ncommonName=supplied\n")
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "serial"), "w") as f:
            f.write("1000\n")
        _run("ca", "-batch", "-config", conf, "-cert", ca_pem, "-keyfile", ca_key, "-in", csr,
             "-out", cert, "-startdate", "20200101000000Z", "-enddate", "20200201000000Z",
             "-notext", cwd=d)
    return os.path.join(d, cert), os.path.join(d, key)


def client(d, ca_dir, cn):
    """A client certificate for common name `cn`: (cert path, key path)."""
    key, csr, cert = f"client-{cn}.key", f"client-{cn}.csr", f"client-{cn}.pem"
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", csr, "-subj", f"/CN={cn}",
         "-addext", "extendedKeyUsage=clientAuth", cwd=d)
    _run("x509", "-req", "-in", csr, "-CA", os.path.join(ca_dir, "ca.pem"), "-CAkey",
         os.path.join(ca_dir, "ca.key"), "-CAcreateserial", "-out", cert, "-days", "30",
         "-copy_extensions", "copy", cwd=d)
    return os.path.join(d, cert), os.path.join(d, key)
