"""The server's certificate authority: CA, server TLS certificate, client certificates from CSRs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=825)
CLIENT_LIFETIME = dt.timedelta(days=90)
OPERATOR_LIFETIME = dt.timedelta(days=365)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew on agents


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> Authority:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("CA key is not an EC key")
        return cls(key, x509.load_pem_x509_certificate(cert_pem))

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding: what agents pin."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def create_ca(common_name: str, now: dt.datetime) -> Authority:
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mobility"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    return Authority(key, builder.sign(key, hashes.SHA256()))


def _leaf(
    ca: Authority,
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    lifetime: dt.timedelta,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )


def issue_server_cert(
    ca: Authority, names: list[str], now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The server's TLS key and certificate, with every name or IP address as a subjectAltName."""
    key = new_key()
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    builder = _leaf(ca, names[0], key.public_key(), now, SERVER_LIFETIME, ExtendedKeyUsageOID.SERVER_AUTH)
    return key, ca.sign(builder.add_extension(x509.SubjectAlternativeName(sans), critical=False))


def issue_client_cert(
    ca: Authority, csr: x509.CertificateSigningRequest, host_id: str, now: dt.datetime
) -> x509.Certificate:
    """A client certificate for ``host_id`` over the CSR's key (the subject is the server's choice)."""
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError("the CSR's key must be an EC key")
    return ca.sign(_leaf(ca, host_id, public_key, now, CLIENT_LIFETIME, ExtendedKeyUsageOID.CLIENT_AUTH))


def issue_operator_cert(
    ca: Authority, name: str, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An operator's client certificate for the dashboard (CN ``operator:NAME``, never a host ID: the API refuses it as
    an unknown machine). The dashboard accepts it only by its fingerprint, recorded with the operator."""
    key = new_key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return key, ca.sign(_leaf(ca, f"operator:{name}", key.public_key(), now, OPERATOR_LIFETIME, usage))


def csr_common_name(csr: x509.CertificateSigningRequest) -> str | None:
    attrs = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def random_secret(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)
