"""API keys of ``mmrag serve``: a small store in the knowledge-base folder (``<kb>/keys.json``).

A key reads ``mmrag_<id>_<secret>``: ``id`` (8 hex digits) finds the entry, ``secret`` (32 random
bytes, URL-safe base64) proves it. The store keeps the id, the scope, a name, the creation time
and the sha256 of the secret, never the secret itself, so a copy of the file grants nothing; the
key is shown once, when it is created. A 32-byte random secret needs no slow password hash: there
is nothing to brute-force (PBKDF2/bcrypt exist for low-entropy passwords).

Scopes are ordered ``read`` < ``write`` < ``admin``; a key grants its scope and every lower one.
The file is rewritten atomically (temporary file + rename) under a file lock, so that a server
reading it and ``mmrag keys create`` writing it never see half a file, and two writers never
lose each other's key. The server re-reads it when it changes: a revoked key stops working at
the next request, without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from mmrag.retrievers.errors import ConfigError, KnowledgeBaseError, NotAKnowledgeBaseError
from mmrag.retrievers.kb.manifest import MANIFEST_NAME

from .errors import NotFoundError

KEYS_NAME = "keys.json"
SCOPES = ("read", "write", "admin")  # in order: each grants the ones before it
PREFIX = "mmrag"
_FORMAT = "mmrag-api-keys"
_KEY = re.compile(rf"{PREFIX}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})")  # 32 bytes -> 43 base64 chars
# compared against when the id is unknown, so that an unknown id costs the same hash + compare
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One stored key, without its secret."""

    id: str
    scope: str
    name: str | None
    created: str  # ISO 8601, UTC
    sha256: str  # of the secret part

    def allows(self, needed: str) -> bool:
        """Whether this key's scope grants ``needed`` (admin > write > read)."""
        return scope_rank(self.scope) >= scope_rank(needed)

    def public(self) -> dict[str, str | None]:
        """What ``mmrag keys list`` shows: everything but the hash."""
        return {"id": self.id, "scope": self.scope, "name": self.name, "created": self.created}


def scope_rank(scope: str) -> int:
    if scope not in SCOPES:
        raise ConfigError(f"`scope` must be one of {', '.join(SCOPES)}, got {scope!r}.")
    return SCOPES.index(scope)


class KeyStore:
    """The keys of one knowledge base. ``KeyStore.for_kb(DIR)`` refuses a folder that holds no KB
    (so that a typo in ``--kb`` does not start a key file in a stray folder)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple | None = None  # (inode, size, mtime) of the file last read
        self._keys: dict[str, ApiKey] = {}

    @classmethod
    def for_kb(cls, kb_path: str | os.PathLike) -> "KeyStore":
        kb = Path(kb_path).expanduser().resolve()
        if not (kb / MANIFEST_NAME).is_file():
            raise NotAKnowledgeBaseError(
                f"No knowledge base at {str(kb)!r} (no {MANIFEST_NAME}); create one with "
                f"`mmrag ingest SOURCE --kb {kb}` (its API keys live in its folder).")
        return cls(kb / KEYS_NAME)

    # ------------------------------------------------------------------ reading
    def keys(self) -> list[ApiKey]:
        """Every key, oldest first (re-read when the file changed since the last call)."""
        return sorted(self._current().values(), key=lambda k: (k.created, k.id))

    def has_keys(self) -> bool:
        return bool(self._current())

    def authenticate(self, token: str) -> ApiKey | None:
        """The key ``token`` proves, or None. The comparison is constant-time on the hashes."""
        found = _KEY.fullmatch(token.strip()) if isinstance(token, str) else None
        if found is None:
            return None
        key_id, secret = found.groups()
        key = self._current().get(key_id)
        digest = _hash(secret)
        matches = hmac.compare_digest(digest, key.sha256 if key is not None else _DUMMY_HASH)
        return key if matches and key is not None else None

    def _current(self) -> dict[str, ApiKey]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if signature != self._signature:
                self._keys = {k.id: k for k in self._read()}
                self._signature = signature
            return self._keys

    def _read(self) -> list[ApiKey]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {_FORMAT!r}")
            return [ApiKey(**entry) for entry in data["keys"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            # refuse rather than serve with no keys: an unreadable store must not open the door
            raise KnowledgeBaseError(
                f"The API key store {str(self.path)!r} is unreadable ({type(e).__name__}: {e}); restore it, or "
                "delete it and create new keys with `mmrag keys create`.") from None

    # ------------------------------------------------------------------ writing
    def create(self, scope: str, name: str | None = None) -> tuple[ApiKey, str]:
        """A new key with ``scope``: ``(the stored entry, the key to hand out once)``."""
        scope_rank(scope)
        if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 200):
            raise ConfigError(f"`name` must be a non-empty string of at most 200 characters, got {name!r}.")
        with self._writing() as keys:
            key_id = secrets.token_hex(4)
            while key_id in keys:  # 4 bytes: a clash is rare, never silent
                key_id = secrets.token_hex(4)
            secret = secrets.token_urlsafe(32)
            key = ApiKey(id=key_id, scope=scope, name=name.strip() if name else None,
                         created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sha256=_hash(secret))
            keys[key_id] = key
        return key, f"{PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        """Remove the key ``key_id``; :class:`NotFoundError` lists the ids there are."""
        with self._writing() as keys:
            if key_id not in keys:
                known = ", ".join(sorted(keys)) or "none"
                raise NotFoundError(f"No API key with id {key_id!r} in {str(self.path)!r} (ids: {known}); "
                                    "`mmrag keys list --kb DIR` shows them.", param="id")
            return keys.pop(key_id)

    @contextlib.contextmanager
    def _writing(self):
        lock = FileLock(str(self.path.with_name(f".{self.path.name}.lock")))
        try:
            lock.acquire(timeout=10)
        except Timeout:
            raise KnowledgeBaseError(f"Another process has held the lock of {str(self.path)!r} for 10 s; "
                                     "try again when it is done.") from None
        try:
            keys = {k.id: k for k in self._read()}
            yield keys
            self._write(sorted(keys.values(), key=lambda k: (k.created, k.id)))
        finally:
            lock.release()

    def _write(self, keys: list[ApiKey]) -> None:
        data = json.dumps({"format": _FORMAT, "version": 1, "keys": [asdict(k) for k in keys]}, indent=2)
        # the temporary name must not match the KB's own temporary files, which its writers clean up
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # hashes only, still nobody else's
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()
