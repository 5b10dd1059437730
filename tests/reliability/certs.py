"""Certificates for the TLS tests, generated per session with `cryptography`: a CA, server
certificates for loopback, client certificates, and a second, unrelated CA with its own client
certificate (what a stranger would hold)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.tls import ClientTls, ServerTls

NAMED_HOST = "worker.switchyard.test"
"""The only name in the `named` server certificate (no IP): dialled by IP, a client must
override the server name to accept it."""


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    crt, pem = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pem.chmod(0o600)
    return str(crt), str(pem)


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def make_ca(folder: Path, name: str) -> tuple[Issuer, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(name, _name(name), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    crt, _ = _write(folder, name, cert, key)
    return Issuer(cert, key), crt


def issue(folder: Path, ca: Issuer, stem: str, *, server: bool,
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> tuple[str, str]:
    """A leaf certificate signed by `ca`; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(stem, ca.cert.subject, key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                              for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(folder, stem, builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    """Paths of every file, plus the settings the services take."""

    ca: str
    server: tuple[str, str]
    """SAN localhost and 127.0.0.1."""
    named: tuple[str, str]
    """SAN NAMED_HOST only."""
    client: tuple[str, str]
    other_ca: str
    """A CA nobody in the cluster trusts."""
    other_client: tuple[str, str]
    """A client certificate signed by other_ca."""

    def server_tls(self, mutual: bool = True) -> ServerTls:
        return ServerTls(cert_file=self.server[0], key_file=self.server[1],
                         ca_file=self.ca if mutual else None, require_client_cert=mutual)

    def client_tls(self, cert: bool = True) -> ClientTls:
        """Trusts the cluster CA; presents the client certificate unless `cert` is False."""
        return ClientTls(ca_file=self.ca, cert_file=self.client[0] if cert else None,
                         key_file=self.client[1] if cert else None)


def make_pki(folder: Path) -> Pki:
    ca, ca_crt = make_ca(folder, "switchyard-test-ca")
    other, other_crt = make_ca(folder, "stranger-ca")
    return Pki(
        ca=ca_crt,
        server=issue(folder, ca, "server", server=True, dns=("localhost",), ips=("127.0.0.1",)),
        named=issue(folder, ca, "named", server=True, dns=(NAMED_HOST,)),
        client=issue(folder, ca, "client", server=False),
        other_ca=other_crt,
        other_client=issue(folder, other, "stranger", server=False))
