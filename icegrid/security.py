"""Authentication of every scheduler icegrid starts: per-campaign TLS credentials (distributed's
``Security``), private files, and where schedulers and dashboards may listen.

Every campaign's scheduler (local, condor, slurm, glidein) listens on ``tls://`` and requires every peer
(workers and the manager's client) to present a certificate signed by the campaign's own authority. The
credentials are three files in one folder (mode 700), created once per campaign, each file mode 600; a
worker or client that was not given them — or was given another campaign's — cannot join or submit.

    <dir>/ca.pem     the campaign's self-signed authority (also the trust anchor)
    <dir>/cert.pem   the certificate every role presents, signed by ca.pem
    <dir>/key.pem    its private key

Scheduler files (they name the address) are written with :func:`write_private` too. Dashboards bind
loopback unless an address with a host is asked for (:func:`dashboard_address`); then, where the
campaign has credentials, they are served over https with them (:func:`dashboard_tls_config`).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from distributed.security import Security

from icegrid.atomic import write_atomic
from icegrid.errors import first_line

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
    try:
        write_private(directory / KEY_FILE, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
        write_private(directory / CERT_FILE, cert.public_bytes(pem))
        # Written last: its presence marks the folder complete.
        write_private(directory / CA_FILE, ca_cert.public_bytes(pem))
    except OSError as err:   # a full disk or a read-only folder: the campaign cannot start, say why
        raise SecurityError(f"{directory}: cannot write the campaign's TLS credentials "
                            f"({err.strerror or first_line(err)})") from None
    return directory


def write_private(path: Path | str, data: bytes | str) -> Path:
    """Write ``path`` atomically, readable by its owner only (mode 600 from the first byte)."""
    return write_atomic(path, data, mode=0o600)


def campaign_security(directory: Path | str) -> Security:
    """The ``Security`` every role of the campaign uses (scheduler, workers, client)."""
    directory = Path(directory)
    files = {name: directory / name for name in (CA_FILE, CERT_FILE, KEY_FILE)}
    for path in files.values():
        if not os.access(path, os.R_OK):
            raise SecurityError(f"{directory}: campaign TLS credentials missing or unreadable ({path.name}); "
                                "create them with `icegrid scheduler --tls-dir DIR`")
    mode = files[KEY_FILE].stat().st_mode & 0o777
    if mode & 0o077:
        raise SecurityError(f"{files[KEY_FILE]}: private key readable by other users (mode {mode:o}); "
                            f"chmod 600 {files[KEY_FILE]}")
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


def temporary_security() -> Security:
    """In-memory credentials for a pool started without a campaign folder (the Python API): every
    peer still needs them, and they exist only in this process and the workers it spawns."""
    return Security.temporary()   # require_encryption=True


LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_address(address: str | None, default: str = f"{LOOPBACK}:8787") -> str:
    """A dashboard address with a host: host-less ones (``:8787``, ``8787``, ``:0``) bind loopback, since
    a dashboard shows worker addresses, local folders, logs and store paths to anyone who reaches it."""
    if not address:
        return default
    host, sep, port = str(address).rpartition(":")
    if not sep:                    # a bare port
        return f"{LOOPBACK}:{address}"
    return address if host else f"{LOOPBACK}:{port}"


def dashboard_tls_config(address: str, folder: Path | str | None) -> dict:
    """Dask config that serves a dashboard over https with the campaign's certificate, for a dashboard
    that listens beyond loopback where credentials exist (empty otherwise)."""
    host = address.rpartition(":")[0]
    if folder is None or is_loopback(host):
        return {}
    folder = Path(folder).resolve()
    return {"distributed.scheduler.dashboard.tls.cert": str(folder / CERT_FILE),
            "distributed.scheduler.dashboard.tls.key": str(folder / KEY_FILE),
            "distributed.scheduler.dashboard.tls.ca-file": str(folder / CA_FILE)}


def security_folder(security) -> Path | None:
    """The credentials folder a ``Security`` was made from (None: in-memory or no TLS)."""
    ca = getattr(security, "tls_ca_file", None) if security is not None else None
    return Path(ca).parent if ca and "\n" not in ca else None
