"""admin_tokens.py: admin tokens kept hashed in ``<data_dir>/admin_tokens.json``.

In: ``gateway admin token create|list|revoke`` (the CLI, on the server's machine) and the
admin API's authentication (``TokenFile.digests()``). Out: a JSON file, mode 0600, holding for
each token its name, role, creation time and the SHA-256 of its secret; the secret itself is
printed once by ``create`` and stored nowhere. The server re-reads the file when its
modification time changes, so a created or revoked token takes effect without a restart.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["TOKEN_FILE", "StoredToken", "TokenFile", "TokenFileError", "new_secret"]

TOKEN_FILE: Final = "admin_tokens.json"
ROLES: Final = ("viewer", "operator")


class TokenFileError(Exception):
    """The token file cannot be read or written, or a request about it is invalid."""


@dataclass(frozen=True, slots=True)
class StoredToken:
    name: str
    role: str
    sha256: str  # hex digest of the secret
    created: float


def new_secret() -> str:
    """A fresh secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenFile:
    """The token file at ``path``; every method is safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._cached: list[StoredToken] = []

    def load(self) -> list[StoredToken]:
        """The stored tokens; [] when the file does not exist."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TokenFileError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            items = json.loads(raw)["tokens"]
            return [
                StoredToken(str(t["name"]), str(t["role"]), str(t["sha256"]), float(t["created"]))
                for t in items
                if t.get("role") in ROLES
            ]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenFileError(f"{self.path} is not a token file") from None

    def _save(self, tokens: list[StoredToken]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "tokens": [
                {"name": t.name, "role": t.role, "sha256": t.sha256, "created": t.created}
                for t in tokens
            ]
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def create(self, name: str, role: str) -> str:
        """Store a new token for ``name`` and return its secret (shown once)."""
        if role not in ROLES:
            raise TokenFileError(f"role must be viewer or operator, not {role!r}")
        if not name or len(name) > 64:
            raise TokenFileError("token name must have 1 to 64 characters")
        with self._lock:
            tokens = self.load()
            if any(t.name == name for t in tokens):
                raise TokenFileError(f"a token named {name!r} exists; revoke it first")
            secret = new_secret()
            tokens.append(StoredToken(name, role, digest(secret), time.time()))
            self._save(tokens)
        return secret

    def revoke(self, name: str) -> None:
        with self._lock:
            tokens = self.load()
            kept = [t for t in tokens if t.name != name]
            if len(kept) == len(tokens):
                raise TokenFileError(f"no token named {name!r}")
            self._save(kept)

    def digests(self) -> list[StoredToken]:
        """The stored tokens, re-read only when the file changed (a stat per call)."""
        try:
            st = self.path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        with self._lock:
            if key != self._seen:
                try:
                    self._cached = self.load() if key is not None else []
                except TokenFileError:
                    self._cached = []  # a broken file grants nothing
                self._seen = key
            return self._cached
