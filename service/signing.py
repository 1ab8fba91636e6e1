"""Short-lived signed download URLs: a link the page or a script can follow without a long-lived token in it.

The signature (HMAC-SHA256) binds the job id, its owner and an expiry time. The key comes from
EXPORT_SECRET_KEY or is generated once and kept beside the exports, so every instance sharing the export
directory signs and checks with the same key.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from .query import plain_int

log = logging.getLogger(__name__)
KEY_FILE = ".signing-key"


class SignatureError(ValueError):
    def __init__(self, code: str, message: str, field: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def load_key(secret: str | None, export_dir: Path) -> bytes:
    """The configured secret, else the key file under export_dir, created on first use."""
    if secret:
        return secret.encode()
    path = Path(export_dir) / KEY_FILE
    try:
        # O_EXCL: of two instances starting together, one writes the key and the other reads it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_hex(32).encode())
        out.flush()
        os.fsync(out.fileno())
    log.info("generated a signing key for download links in %s", path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    for _ in range(50):  # the instance that created it may still be writing it
        key = path.read_bytes().strip()
        if key:
            return key
        time.sleep(0.01)
    raise RuntimeError(f"the signing key file {path} is empty")


class UrlSigner:
    def __init__(self, key: bytes, ttl_seconds: float) -> None:
        self.key = key
        self.ttl_seconds = ttl_seconds

    def _signature(self, job_id: str, user: str, expires: int) -> str:
        message = f"{job_id}\n{user}\n{expires}".encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def download_url(self, job_id: str, user: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl_seconds)
        return f"/api/exports/{job_id}/download?exp={expires}&sig={self._signature(job_id, user, expires)}"

    def verify(self, job_id: str, user: str, expires: str, signature: str, now: float | None = None) -> None:
        """Raise SignatureError unless the signature is this job's and its owner's, and not expired."""
        expires_at = plain_int(expires, 12)
        if expires_at is None:
            raise SignatureError("invalid_signature", "the download link is malformed: exp must be a Unix time", "exp")
        expected = self._signature(job_id, user, expires_at)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise SignatureError("invalid_signature", "the download link's signature is not valid", "sig")
        if expires_at < (time.time() if now is None else now):
            raise SignatureError("link_expired", "the download link has expired; ask the job for a new one", "exp")
