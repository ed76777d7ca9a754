"""Workload certificates on the node: the key is generated here and never
leaves (0600); a CSR goes to the CA; the certificate is renewed at half-life."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import SpiffeId
from meshnode.core.pki import generate_private_key, make_csr, write_private_key

log = logging.getLogger("meshnode.nodeagent.certs")


class CaClient(Protocol):
    """How the agent gets certificates signed: the control-plane client
    (nodeagent/enrolled.py CpClient) over mTLS; tests substitute a fake."""

    def sign(self, csr_pem: bytes, identity: SpiffeId) -> bytes: ...

    def trust_bundle(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path


class CertManager:
    def __init__(self, directory: Path, ca: CaClient) -> None:
        self.directory = directory
        self.ca = ca
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)

    def bundle_path(self) -> Path:
        path = self.directory / "trust-bundle.pem"
        bundle = self.ca.trust_bundle()
        if not path.exists() or path.read_bytes() != bundle:
            write_file_atomic(path, bundle, 0o644)
        return path

    def files(self, identity: SpiffeId) -> CertFiles:
        stem = f"{identity.namespace}.{identity.service_account}"
        return CertFiles(self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem")

    def ensure(self, identity: SpiffeId, now: datetime | None = None) -> CertFiles:
        """A valid certificate for identity, issued or renewed if it is past
        half of its life (or missing, or for another key)."""
        files = self.files(identity)
        if not self.needs_renewal(files, now):
            return files
        key = generate_private_key()
        csr = make_csr(key, identity)
        chain = self.ca.sign(csr, identity)
        write_private_key(files.key, key)  # the new key lands first, then its certificate
        write_file_atomic(files.cert, chain, 0o644)
        log.info(
            "certificate for %s issued, valid until %s",
            identity,
            x509.load_pem_x509_certificate(chain).not_valid_after_utc.isoformat(),
        )
        return files

    @staticmethod
    def renewal_due(files: CertFiles) -> float:
        """When (epoch seconds) the certificate reaches half of its life; 0 if
        it is missing or unreadable (due now)."""
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        except (OSError, ValueError):
            return 0.0
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return (start + (end - start) / 2).timestamp()

    @staticmethod
    def needs_renewal(files: CertFiles, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        try:
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
            key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        except (OSError, ValueError):
            return True
        if cert.public_key() != key.public_key():
            return True
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return now >= start + (end - start) / 2
