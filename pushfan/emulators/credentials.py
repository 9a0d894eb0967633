"""The emulators' key material, generated on first start into a state directory.

- a local CA and a server certificate for ``127.0.0.1`` / ``localhost`` (clients trust
  ``ca.pem``);
- an APNs provider signing key (``apns-key.p8``, EC P-256) with its key id and team id;
- an FCM service account (``fcm-service-account.json``, RSA) whose ``token_uri`` points at
  the FCM emulator's OAuth2 endpoint, so google-auth's real flow runs end to end.

Files are reused on later starts, so clients configured once keep working.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

DEFAULT_STATE_DIR = Path(".pushfan") / "emulators"
APNS_KEY_ID = "PUSHFAN001"
APNS_TEAM_ID = "PUSHFANTM1"
FCM_PROJECT_ID = "pushfan-demo"
FCM_CLIENT_EMAIL = f"pushfan@{FCM_PROJECT_ID}.iam.gserviceaccount.com"


@dataclass(frozen=True)
class Credentials:
    """Paths and identifiers of the emulators' key material."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def apns_key_file(self) -> Path:
        return self.directory / "apns-key.p8"

    @property
    def fcm_service_account_file(self) -> Path:
        return self.directory / "fcm-service-account.json"

    apns_key_id: str = APNS_KEY_ID
    apns_team_id: str = APNS_TEAM_ID
    fcm_project_id: str = FCM_PROJECT_ID

    def apns_public_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_private_key(self.apns_key_file.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key.public_key()

    def fcm_public_key(self) -> rsa.RSAPublicKey:
        info = json.loads(self.fcm_service_account_file.read_text())
        key = serialization.load_pem_private_key(info["private_key"].encode(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.public_key()

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS for the emulators: ALPN offers h2 and http/1.1."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """TLS that trusts the emulators' CA, for clients in tests and ``make run``."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def ensure_credentials(directory: Path, token_uri: str) -> Credentials:
    """Create whatever key material is missing under ``directory``; return its paths.

    ``token_uri`` is written into the service account; when it changes (another port),
    the account file is rewritten with the same key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    creds = Credentials(directory)
    if not (creds.ca_file.exists() and creds.cert_file.exists() and creds.key_file.exists()):
        _write_tls(creds)
    if not creds.apns_key_file.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(creds.apns_key_file, _pem(key))
    _write_service_account(creds, token_uri)
    return creds


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_tls(creds: Credentials) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own per CA: a verifier holding two emulator CAs (SSL_CERT_FILE naming
    # one, a ca_file the other) finds issuers by name and would check against the wrong key.
    ca_name = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"pushfan emulators local CA {os.urandom(4).hex()}"
            )
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(creds.key_file, _pem(key))
    creds.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    creds.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))


def _write_service_account(creds: Credentials, token_uri: str) -> None:
    path = creds.fcm_service_account_file
    if path.exists():
        info = json.loads(path.read_text())
        if info.get("token_uri") == token_uri:
            return
        private_key = info["private_key"]
    else:
        private_key = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)).decode()
    info = {
        "type": "service_account",
        "project_id": creds.fcm_project_id,
        "private_key_id": "pushfan-emulator-key",
        "private_key": private_key,
        "client_email": FCM_CLIENT_EMAIL,
        "client_id": "1",
        "token_uri": token_uri,
    }
    _write_private(path, json.dumps(info, indent=2).encode())
