"""The gateway's self-signed certificate (fal clients speak only https, fal-protocol.md §1.1).

On first start: an EC P-256 key and a self-signed certificate whose SAN holds IP 127.0.0.1, DNS
localhost and the public host, at `var/tls/{cert,key}.pem`; and `var/tls/bundle.pem` = the system CAs
+ that certificate, for clients' `SSL_CERT_FILE` (httpx and websockets read it). Later starts reuse the
files while the certificate still covers the public host and has not expired.

The certificate is its own CA (basicConstraints CA:TRUE, keyCertSign, SKI/AKI), which keeps it valid
as a trust anchor under OpenSSL's strict X.509 checks (Python >= 3.13 turns them on by default).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

SYSTEM_CA_FILE = Path("/etc/ssl/certs/ca-certificates.crt")
VALID_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    bundle: Path


def tls_dir_of(var_dir: Path) -> Path:
    return var_dir / "tls"


def _san_entries(public_host: str, extra_hosts: tuple[str, ...] = ()) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    seen = {"127.0.0.1", "localhost"}
    for host in (public_host, *extra_hosts):
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def certificate_hosts(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses of the certificate's SAN, as strings."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _covers(cert: x509.Certificate, public_host: str, extra_hosts: tuple[str, ...] = ()) -> bool:
    try:
        hosts = certificate_hosts(cert)
    except x509.ExtensionNotFound:
        return False
    wanted = {"127.0.0.1", "localhost", public_host, *extra_hosts}
    fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    return wanted <= hosts and fresh


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _create(cert_path: Path, key_path: Path, public_host: str, extra_hosts: tuple[str, ...] = ()) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, public_host or "127.0.0.1"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ember gateway (self-signed)"),
    ])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(public_host, extra_hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _system_cas() -> bytes:
    if SYSTEM_CA_FILE.is_file():
        return SYSTEM_CA_FILE.read_bytes()
    try:
        import certifi  # httpx's dependency; only a fallback where the system bundle is missing
    except ImportError:
        return b""
    return Path(certifi.where()).read_bytes()


def ensure_tls(var_dir: Path, public_host: str, extra_hosts: tuple[str, ...] = ()) -> TlsFiles:
    """The certificate, key and client bundle under `var_dir/tls`, created or renewed as needed; its SAN
    covers 127.0.0.1, localhost, `public_host` and `extra_hosts` (EMBER_TLS_HOSTS)."""
    directory = tls_dir_of(var_dir)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(cert=directory / "cert.pem", key=directory / "key.pem", bundle=directory / "bundle.pem")
    reuse = False
    if files.cert.is_file() and files.key.is_file():
        try:
            reuse = _covers(x509.load_pem_x509_certificate(files.cert.read_bytes()), public_host, extra_hosts)
        except ValueError:
            reuse = False
    if not reuse:
        _create(files.cert, files.key, public_host, extra_hosts)
        log.info("created a self-signed certificate for 127.0.0.1, localhost, %s in %s",
                 ", ".join((public_host, *extra_hosts)), directory)
    cas = _system_cas()
    if cas and not cas.endswith(b"\n"):
        cas += b"\n"
    bundle = cas + files.cert.read_bytes()
    if not files.bundle.is_file() or files.bundle.read_bytes() != bundle:
        _write(files.bundle, bundle, 0o644)
    return files
