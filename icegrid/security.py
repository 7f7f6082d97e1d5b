"""Per-campaign TLS credentials for grid mode (distributed's ``Security``).

A condor or glidein campaign's scheduler listens on ``tls://`` and requires every peer (workers and
the manager's client) to present a certificate signed by the campaign's own authority. The
credentials are three files in one folder, created once per campaign and readable only by their
owner; a worker that was not given them — or was given another campaign's — cannot join.

    <dir>/ca.pem     the campaign's self-signed authority (also the trust anchor)
    <dir>/cert.pem   the certificate every role presents, signed by ca.pem
    <dir>/key.pem    its private key (mode 600)
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from distributed.security import Security

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cert.pem", "key.pem"


class SecurityError(RuntimeError):
    """Missing or unreadable campaign credentials; the message names the folder."""


def create_credentials(directory: Path | str, valid_days: int = 30) -> Path:
    """Create a fresh authority + certificate in ``directory`` unless it already holds them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    if all((directory / name).exists() for name in (CA_FILE, CERT_FILE, KEY_FILE)):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    lifetime = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days))

    # EC keys: generated in milliseconds (RSA-2048 takes ~100 ms per key on a slow core).
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"icegrid campaign CA {os.urandom(6).hex()}")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(lifetime[0]).not_valid_after(lifetime[1])
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    # Distributed does not check host names (workers come from anywhere); the CA signature is the check.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "icegrid-campaign")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(lifetime[0]).not_valid_after(lifetime[1])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("icegrid-campaign")]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    _write_private(directory / KEY_FILE, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (directory / CERT_FILE).write_bytes(cert.public_bytes(pem))
    # Written last: its presence marks the folder complete.
    (directory / CA_FILE).write_bytes(ca_cert.public_bytes(pem))
    return directory


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def campaign_security(directory: Path | str) -> Security:
    """The ``Security`` every role of the campaign uses (scheduler, workers, client)."""
    directory = Path(directory)
    files = {name: directory / name for name in (CA_FILE, CERT_FILE, KEY_FILE)}
    for path in files.values():
        if not os.access(path, os.R_OK):
            raise SecurityError(f"{directory}: campaign TLS credentials missing or unreadable ({path.name}); "
                                "create them with `icegrid scheduler --tls-dir DIR`")
    ca, cert, key = (str(files[n]) for n in (CA_FILE, CERT_FILE, KEY_FILE))
    return Security(require_encryption=True, tls_ca_file=ca,
                    tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)


def worker_tls_args(directory: Path | str) -> list[str]:
    """``dask worker`` flags that present the campaign's credentials."""
    directory = Path(directory).resolve()
    return ["--tls-ca-file", str(directory / CA_FILE), "--tls-cert", str(directory / CERT_FILE),
            "--tls-key", str(directory / KEY_FILE)]
