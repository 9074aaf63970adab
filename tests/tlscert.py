"""A throwaway self-signed certificate for 127.0.0.1 and localhost, made with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write ``key.pem`` and ``cert.pem`` into ``directory``; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chatd test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def client_context(cert_path: Path) -> ssl.SSLContext:
    """A client context that trusts only this certificate and checks the host name."""
    ctx = ssl.create_default_context(cafile=str(cert_path))
    ctx.check_hostname = True
    return ctx


def threaded_client_context(cert_path: Path) -> ssl.SSLContext:
    """:func:`client_context` for the ``websockets`` sync client, held to TLS 1.2.

    That client reads on a thread of its own from the moment it connects,
    while the caller's thread writes on the same ``SSLSocket``; an OpenSSL
    connection is not safe to read and write from two threads at once. On
    TLS 1.3 the server's session tickets come right after the handshake,
    while the upgrade request is being written: about one connection in
    300 then failed in the client ("SSL internal error" on the write, or
    garbage the server refused as "bad record type", or a request the server
    never saw), with any TLS 1.3 server. TLS 1.2 has nothing after the
    handshake but data, and showed no failure in 1,000 connections. chatd's
    TLS 1.3 WebSockets are tested with Chromium (``test_browser``).
    """
    ctx = client_context(cert_path)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx
