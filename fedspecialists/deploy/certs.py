"""Credentials for a TLS federation: a CA, server certificates and SuperNode keys.

Flower's own deployment example makes them with the ``cryptography`` package; so does this
module (``scripts/make_credentials.py`` is its command line). Everything is written as PEM (keys
of SuperNodes also in OpenSSH form, which ``flwr supernode register`` reads).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(folder: Path, days: int = 365) -> tuple[Path, Path]:
    """A self-signed certificate authority: ``ca.crt`` and ``ca.key`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedspecialists CA"))
        .issuer_name(_name("fedspecialists CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "ca.key").write_bytes(_pem_key(key))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.crt", folder / "ca.key"


def make_server_cert(
    folder: Path,
    name: str,
    hosts: Sequence[str],
    ca_cert: Path,
    ca_key: Path,
    days: int = 365,
) -> tuple[Path, Path]:
    """A certificate signed by the CA for ``hosts`` (IP addresses or DNS names, in its SANs)."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.key").write_bytes(_pem_key(key))
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / f"{name}.crt", folder / f"{name}.key"


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair: ``<name>`` (private) and ``<name>.pub``, both in OpenSSH form."""
    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / name
    public = folder / f"{name}.pub"
    private.write_bytes(  # the OpenSSH form ssh-keygen writes, which flower-supernode reads
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    private.chmod(0o600)
    return private, public
