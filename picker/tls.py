"""Server credentials: a given certificate, or a self-signed one made at start-up (the EPP default)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(hostname: str = "picker") -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM), valid for a year; gateways call the EPP without verifying it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        # Its own CA, so a client may also pin it as the trust root instead of skipping checks.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def server_credentials(cert_path: str | None) -> grpc.ServerCredentials:
    """`cert_path` is a directory holding tls.crt and tls.key (a Kubernetes TLS secret's layout)."""
    if cert_path:
        folder = Path(cert_path)
        key, cert = (folder / "tls.key").read_bytes(), (folder / "tls.crt").read_bytes()
    else:
        key, cert = self_signed()
    return grpc.ssl_server_credentials([(key, cert)])
