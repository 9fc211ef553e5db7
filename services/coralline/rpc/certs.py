"""A development certificate authority for TLS / mutual TLS (`coralline certs`, `make certs`).

Writes into one folder:
  ca.pem, ca-key.pem          the CA (10 years; keep ca-key.pem private or delete it)
  server.pem, server-key.pem  one certificate every coralline service uses: it serves (drafter,
                              verifier, the router's front) and dials (verifier -> drafter,
                              router -> workers), so it carries both serverAuth and clientAuth;
                              its names are `hosts` (default localhost, 127.0.0.1, ::1)
  client.pem, client-key.pem  a client certificate (clientAuth) for SDK users of a mutual-TLS port
EC P-256 keys, written 0600. For production, use your own PKI (cert-manager in Kubernetes);
the services only read PEM files (rpc/security.py).

Knows nothing about gRPC.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_dev_ca(
    folder: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 825
) -> dict[str, Path]:
    """Write the CA, the service certificate and the client certificate; -> {name: path}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("the service certificate needs at least one host name or address")
    if days < 1:
        raise ValueError("days must be >= 1")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coralline development"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ])  # fmt: skip

    ca_key = _key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("coralline development CA"))
        .issuer_name(name("coralline development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usages, san) -> tuple[bytes, bytes]:
        key = _key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if san is not None:
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    server = leaf("coralline service", both, _san(hosts))
    client = leaf("coralline client", [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    paths = {
        "ca": out / "ca.pem",
        "ca-key": out / "ca-key.pem",
        "server": out / "server.pem",
        "server-key": out / "server-key.pem",
        "client": out / "client.pem",
        "client-key": out / "client-key.pem",
    }
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), False)
    _write(paths["ca-key"], _pem_key(ca_key), True)
    _write(paths["server"], server[0], False)
    _write(paths["server-key"], server[1], True)
    _write(paths["client"], client[0], False)
    _write(paths["client-key"], client[1], True)
    return paths
