"""A throwaway certificate authority and certificates for running the stack with TLS on this machine.

    python -m tools.devcerts out/tls        # ca.crt, gateway.crt/.key, refiner.*, trellis.*, client.*

Every certificate is signed by the one CA in the folder, names ``localhost`` and ``127.0.0.1``, and may be used both
as a server and as a client certificate. ``client`` is what the gateway presents to the model services (and what
the local stack's health checks present to them).
For local use and tests only: in a cluster, cert-manager issues them (k8s/components/cert-manager).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The certificates the local stack needs, besides the CA.
SERVICES = ("gateway", "refiner", "trellis", "client")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Authority:
    """A CA that can sign certificates: its key and certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertFiles:
    """Where one certificate and its key were written."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: float) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def new_authority(common_name: str = "trellisbox dev CA", days: float = 30) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    certificate = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, certificate)


def issue(authority: Authority, common_name: str, names: Sequence[str] = LOOPBACK_NAMES,
          days: float = 30) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``common_name``, valid for ``names`` (DNS names or IP addresses), signed by
    ``authority``, for server and client authentication."""
    key = ec.generate_private_key(ec.SECP256R1())
    alternative: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    not_before, not_after = _validity(days)
    certificate = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(authority.certificate.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, replacing ``path`` at once (as a Kubernetes Secret update does)."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def write_cert(authority: Authority, folder: Path, name: str, names: Sequence[str] = LOOPBACK_NAMES) -> CertFiles:
    """``folder/<name>.crt`` and ``folder/<name>.key``, issued by ``authority`` (replaced if present)."""
    cert_pem, key_pem = issue(authority, name, names)
    files = CertFiles(folder / f"{name}.crt", folder / f"{name}.key")
    write_private(files.key, key_pem)
    write_private(files.cert, cert_pem)
    return files


def write_dev_certs(folder: Path, services: Sequence[str] = SERVICES) -> Authority:
    """A new CA (``folder/ca.crt``) and one certificate per service in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    authority = new_authority()
    write_private(folder / "ca.crt", authority.pem)
    for service in services:
        write_cert(authority, folder, service)
    return authority


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write ca.crt and <service>.crt/.key")
    args = parser.parse_args(argv)
    write_dev_certs(args.folder)
    print(f"wrote a dev CA and certificates for {', '.join(SERVICES)} to {args.folder}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
