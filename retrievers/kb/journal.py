"""The write journal and writer lock of a knowledge base: what makes every write crash safe.

Every write follows a journal so that a writer killed at any moment (SIGKILL included) leaves a
knowledge base the next open repairs to a consistent state:

1. an ``op="images"`` entry lists the images about to be stored, then the images are written;
2. an ``op="upsert"`` entry (records, vectors) replaces it, then both collections are written and
   images no longer referenced by any record are released;
3. the entry is removed.

Recovery rolls an ``upsert`` or ``delete`` entry forward (every step is idempotent) and rolls an
``images`` entry back (deleting the images no record references). Writers hold a file lock; a
second writer gets :class:`KnowledgeBaseLockedError` naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from ..errors import KnowledgeBaseError, KnowledgeBaseLockedError
from .manifest import HOLDER_NAME, LOCK_NAME, now, write_json_atomic
from .store import ImageStore, VectorStore

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.json"
_JOURNAL_VECTORS = "journal.npz"
_REVISION = "revision"


class Journal:
    """Journaled writes to the two collections and the image store of the KB at ``path``."""

    def __init__(self, path: Path, vectors: VectorStore, images: ImageStore, lock_timeout: float = 0.0):
        self.path = path
        self.vectors = vectors
        self.images = images
        self.lock_timeout = lock_timeout
        self._lock = FileLock(str(path / LOCK_NAME))

    # ------------------------------------------------------------------ revision
    @property
    def revision(self) -> str:
        """Changes before and after records are written or deleted; derived indexes (the lexical
        index, hubness banks) compare it with the revision they were built at."""
        try:
            return (self.path / _REVISION).read_text().strip()
        except FileNotFoundError:
            return "0"

    def bump_revision(self) -> None:
        write_json_atomic(self.path / _REVISION, uuid.uuid4().hex)

    # ------------------------------------------------------------------ writing
    def record(self, entry: dict, vectors: dict[str, np.ndarray] | None = None) -> None:
        """Write ``entry`` (and its vectors) as the pending operation; it replaces any earlier one."""
        if entry["op"] != "images":
            # before the records change (a crash leaves derived indexes marked stale), and again after
            self.bump_revision()
        if vectors is not None:
            # write through a temporary name: the json journal's presence means "complete"
            tmp = self.path / f".{_JOURNAL_VECTORS}.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, **vectors)
            os.replace(tmp, self.path / _JOURNAL_VECTORS)
        write_json_atomic(self.path / JOURNAL_NAME, entry)

    def apply(self, recovering: bool = True) -> None:
        """Complete (or, for ``images``, undo) the journaled operation, then drop the journal.

        In normal operation ids the lookup found absent are written with Chroma's ``add`` (about
        20% faster than ``upsert``); recovery upserts everything, since part may have landed.
        """
        entry = json.loads((self.path / JOURNAL_NAME).read_text())
        op = entry["op"]
        if op == "upsert":
            with np.load(self.path / _JOURNAL_VECTORS, allow_pickle=False) as v:
                iv, tv = v["images"], v["texts"]
            new = np.asarray(entry["new"], dtype=bool) & (not recovering)
            for mask, upsert in ((new, False), (~new, True)):
                if mask.any():
                    idx = np.flatnonzero(mask)
                    self.vectors.write([entry["ids"][i] for i in idx], iv[idx], tv[idx],
                                       [entry["metadatas"][i] for i in idx], [entry["documents"][i] for i in idx],
                                       upsert=upsert)
        elif op == "delete":
            self.vectors.delete(entry["ids"])
        elif op != "images":
            raise KnowledgeBaseError(
                f"Unknown journal operation {op!r} in {self.path / JOURNAL_NAME}; remove the file by hand.")
        if op != "images":
            # again after the change: an index built while it was under way carries the earlier token
            self.bump_revision()
        self.release(entry.get("release", []))
        (self.path / JOURNAL_NAME).unlink()
        (self.path / _JOURNAL_VECTORS).unlink(missing_ok=True)

    def release(self, relpaths: list[str]) -> None:
        """Delete the stored images among ``relpaths`` that no record references."""
        if not relpaths:
            return
        by_sha = {Path(r).stem: r for r in relpaths}
        still_used = self.vectors.referenced_shas(by_sha)
        for sha, rel in by_sha.items():
            if sha not in still_used:
                self.images.delete(rel)

    # ------------------------------------------------------------------ recovery and locking
    def recover(self) -> None:
        """Clean what a killed writer left and complete (or undo) its pending operation."""
        self.images.clear_tmp()
        (self.path / f".{_JOURNAL_VECTORS}.tmp").unlink(missing_ok=True)
        if (self.path / JOURNAL_NAME).exists():
            logger.warning("Completing an interrupted write in %s", self.path)
            self.apply()

    def pending(self) -> bool:
        return (self.path / JOURNAL_NAME).exists()

    def try_recover(self) -> None:
        """On open: repair after a killed writer, unless a live writer holds the lock (it will)."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return
        try:
            self.recover()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def write_lock(self):
        """Hold the KB's writer lock (recovering first); a second writer waits ``lock_timeout``."""
        try:
            self._lock.acquire(timeout=self.lock_timeout)
        except Timeout:
            raise KnowledgeBaseLockedError(
                f"The knowledge base at {str(self.path)!r} is being written by {self.holder()}; wait for it to "
                "finish, or pass lock_timeout=SECONDS (--lock-timeout) to wait: writes to a knowledge base "
                "take turns."
            ) from None
        try:
            write_json_atomic(self.path / HOLDER_NAME, {
                "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                "since": now(),
            })
            self.recover()
            yield
        finally:
            (self.path / HOLDER_NAME).unlink(missing_ok=True)
            self._lock.release()

    def holder(self) -> str:
        try:
            h: dict[str, Any] = json.loads((self.path / HOLDER_NAME).read_text())
            return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']!r})"
        except (OSError, ValueError, KeyError):
            return "another process"
