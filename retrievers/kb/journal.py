"""The write journal and writer lock of a knowledge base: what makes every write crash safe.

Every write follows a journal so that a writer killed at any moment (SIGKILL included) leaves a
knowledge base the next open repairs to a consistent state:

1. an ``op="images"`` entry lists the images about to be stored, then the images are written;
2. an ``op="upsert"`` entry (records, vectors) replaces it, then both collections are written and
   images no longer referenced by any record are released;
3. the entry is removed.

Recovery rolls an ``upsert`` or ``delete`` entry forward (every step is idempotent) and rolls an
``images`` entry back (deleting the images no record references). A write Chroma refuses (its
content, not a lost connection) is rolled back instead, never replayed again: the two collections
are made to agree on the entry's ids, its images no record uses are released, and a refused
replay keeps a copy of the entry under ``reports/``. Writers hold a file lock; a second writer
gets :class:`KnowledgeBaseLockedError` naming the holder. Temporary files of killed writes are
removed only under that lock, so a live writer's are never touched.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from filelock import FileLock, Timeout

from ..errors import KnowledgeBaseError, KnowledgeBaseLockedError, WriteRefusedError
from . import vector_cache
from .manifest import HOLDER_NAME, LOCK_NAME, MANIFEST_NAME, now, write_json_atomic
from .multivector import MULTIVECTOR_DIR, TMP_SUFFIX, MultiVectorStore, unpack_tokens
from .parts import PARTS_KEY, PartStore
from .store import IMAGE_KEY, WRITE_REFUSALS, ImageStore, VectorStore

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.json"
_JOURNAL_VECTORS = "journal.npz"
_VECTORS_TMP = f".{_JOURNAL_VECTORS}.tmp"
_REVISION = "revision"
REPORTS = "reports"
# write_json_atomic's temporary names (``.<name>.<pid>.tmp``) for the files written under the
# writer lock. Only these are ours to clean: derived indexes (hubness banks) write their own
# temporary files next to them, outside the lock.
_ATOMIC_TMP = re.compile(
    r"\.(%s)\.\d+\.tmp" % "|".join(re.escape(n) for n in (MANIFEST_NAME, JOURNAL_NAME, _REVISION, HOLDER_NAME)))


def temp_files(path: Path) -> list[Path]:
    """Temporary files a killed write of the KB at ``path`` may have left."""
    found = [p for p in _listdir(path) if _ATOMIC_TMP.fullmatch(p.name) or p.name == _VECTORS_TMP]
    found += [p for p in _listdir(path / REPORTS) if p.name.startswith(".failed-journal-")]
    found += [p for d in _listdir(path / MULTIVECTOR_DIR) for p in _listdir(d) if p.name.endswith(TMP_SUFFIX)]
    # written by readers without the lock: only those no live writer can still own
    found += vector_cache.stale_temp_files(path / vector_cache.VECTOR_CACHE_DIR)
    return found + _listdir(ImageStore(path / "images").tmp)


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def clean_temp_files(path: Path) -> int:
    """Remove :func:`temp_files`; the caller holds the writer lock (no live writer owns them)."""
    left = temp_files(path)
    for p in left:
        p.unlink(missing_ok=True)
    return len(left)


# ---------------------------------------------------------------------------- the writer lock
@contextlib.contextmanager
def hold_writer_lock(lock: FileLock, path: Path, timeout: float) -> Iterator[None]:
    """Hold ``lock`` (the writer lock of the KB at ``path``), waiting at most ``timeout`` seconds,
    with a note naming the holder for whoever waits."""
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise KnowledgeBaseLockedError(
            f"The knowledge base at {str(path)!r} is being written by {lock_holder(path)}; wait for it to "
            "finish, or pass lock_timeout=SECONDS (--lock-timeout) to wait: writes to a knowledge base "
            "take turns."
        ) from None
    try:
        write_json_atomic(path / HOLDER_NAME, {
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200], "since": now(),
        })
        yield
    finally:
        (path / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()


def lock_holder(path: Path) -> str:
    try:
        h: dict[str, Any] = json.loads((path / HOLDER_NAME).read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']!r})"
    except (OSError, ValueError, KeyError):
        return "another process"


def writer_lock(path: Path) -> FileLock:
    return FileLock(str(path / LOCK_NAME))


# ---------------------------------------------------------------------------- the journal
class Journal:
    """Journaled writes to the two collections and the image store of the KB at ``path`` (and to
    its late-interaction index, ``multivector``, when it has one, and its documents' parts, ``parts``)."""

    def __init__(self, path: Path, vectors: VectorStore, images: ImageStore, lock_timeout: float = 0.0,
                 multivector: MultiVectorStore | None = None, parts: PartStore | None = None):
        self.path = path
        self.vectors = vectors
        self.images = images
        self.multivector = multivector
        self.parts = parts
        self.lock_timeout = lock_timeout
        self._lock = writer_lock(path)

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
            tmp = self.path / _VECTORS_TMP
            with open(tmp, "wb") as f:
                np.savez(f, **vectors)
            os.replace(tmp, self.path / _JOURNAL_VECTORS)
        write_json_atomic(self.path / JOURNAL_NAME, entry)

    def apply(self, recovering: bool = True) -> None:
        """Complete (or, for ``images``, undo) the journaled operation, then drop the journal.

        In normal operation ids the lookup found absent are written with Chroma's ``add`` (about
        20% faster than ``upsert``); recovery upserts everything, since part may have landed.
        A write Chroma refuses is rolled back and raises :class:`WriteRefusedError`; when
        ``recovering``, a copy of the entry is kept under ``reports/`` first (nobody else will
        report it). Other failures (a lost server) leave the journal for the next open.
        """
        entry = json.loads((self.path / JOURNAL_NAME).read_text())
        op = entry["op"]
        if op not in ("upsert", "delete", "images"):
            raise KnowledgeBaseError(
                f"Unknown journal operation {op!r} in {self.path / JOURNAL_NAME}; remove the file by hand.")
        try:
            self._write_collections(entry, recovering)
        except WRITE_REFUSALS as e:
            raise self._roll_back(entry, e, keep_copy=recovering) from e
        if op != "images":
            # again after the change: an index built while it was under way carries the earlier token
            self.bump_revision()
        self.release(entry.get("release", []))
        self._drop()

    def _write_collections(self, entry: dict, recovering: bool) -> None:
        if entry["op"] == "upsert":
            with np.load(self.path / _JOURNAL_VECTORS, allow_pickle=False) as v:
                iv, tv = v["images"], v["texts"]
                tokens = unpack_tokens(v["mv_tokens"], v["mv_counts"]) if "mv_counts" in v.files else None
                part_vectors = v["part_vectors"] if "part_counts" in v.files else None
            new = np.asarray(entry["new"], dtype=bool) & (not recovering)
            for mask, upsert in ((new, False), (~new, True)):
                if mask.any():
                    idx = np.flatnonzero(mask)
                    self.vectors.write([entry["ids"][i] for i in idx], iv[idx], tv[idx],
                                       [entry["metadatas"][i] for i in idx], [entry["documents"][i] for i in idx],
                                       upsert=upsert)
            if self.multivector is not None:
                if tokens is None:
                    raise KnowledgeBaseError(
                        f"The pending write in {self.path / JOURNAL_NAME} has no token vectors but the knowledge base "
                        "has a late-interaction index; it was written by another program. Remove the journal by hand.")
                # after the records: a write Chroma refuses above leaves the index as it was
                self.multivector.write(entry["ids"], tokens, entry["metadatas"], entry["documents"])
            replace = [entry["ids"][i] for i in np.flatnonzero(~new)]  # ids that may hold older parts
            if self.parts is not None and ("parts" in entry or replace):
                # after the records too; a document's old parts are removed before its new ones land
                rows = entry.get("parts") or [[] for _ in entry["ids"]]
                self.parts.write(rows, part_vectors if part_vectors is not None else np.zeros((0, iv.shape[1])),
                                 replace)
        elif entry["op"] == "delete":
            self.vectors.delete(entry["ids"])
            if self.multivector is not None:
                self.multivector.delete(entry["ids"])
            if self.parts is not None:
                self.parts.delete(entry["ids"])

    def _roll_back(self, entry: dict, error: Exception, keep_copy: bool) -> WriteRefusedError:
        """Undo a write Chroma refused: the collections agree on its ids (records half written are
        deleted), its images no record uses are released, the journal is dropped. Each step is
        idempotent: killed here, the next open refuses the same write and rolls it back again."""
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        kept = self._keep_copy() if keep_copy else None
        torn = self.vectors.make_consistent(entry.get("ids", []))
        if self.multivector is not None:  # no token vectors for a record the rollback left out
            ids = entry.get("ids", [])
            still_stored = self.vectors.get(ids)
            self.multivector.delete([i for i in ids if i not in still_stored])
        if self.parts is not None:
            torn += self._roll_back_parts(entry.get("ids", []))
        self.bump_revision()  # the records may have changed (torn ones deleted)
        part_images = [meta.get(IMAGE_KEY) for rows in entry.get("parts", []) for meta, _ in rows if IMAGE_KEY in meta]
        self.release(entry.get("release", []) + [m.get(IMAGE_KEY) for m in entry.get("metadatas", [])] + part_images)
        self._drop()
        where = f"; the refused journal is kept in {kept}" if kept else ""
        return WriteRefusedError(
            f"Chroma refused the {entry['op']} of {len(entry.get('ids', []))} record(s) ({reason}); it was rolled "
            f"back{f' and {len(torn)} half-written record(s) deleted' if torn else ''}{where}.",
            reason=f"Chroma refused the record ({reason})", kept=kept)

    def _roll_back_parts(self, ids: list[str]) -> list[str]:
        """After a refused write: no parts for a record the rollback left out, and no document
        without all its parts (such a torn document is deleted, like a torn record). Returns those."""
        present = self.vectors.get(ids, include=["metadatas"])
        stored = self.parts.of(list(present), vectors=False)
        torn = [i for i, (m, _) in present.items()
                if [p.index for p in stored.get(i, [])] != list(range(int((m or {}).get(PARTS_KEY) or 0)))]
        if torn:
            self.vectors.delete(torn)
            if self.multivector is not None:
                self.multivector.delete(torn)
        self.parts.delete([i for i in ids if i not in present] + torn)
        return torn

    def _keep_copy(self) -> str:
        """Copy the journal (and its vectors) to ``reports/failed-journal-<time>.json`` (``.npz``)."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        target = self.path / REPORTS / f"failed-journal-{stamp}.json"
        target.parent.mkdir(exist_ok=True)
        if (self.path / _JOURNAL_VECTORS).exists():
            tmp = target.parent / f".{target.stem}.npz.tmp"
            shutil.copyfile(self.path / _JOURNAL_VECTORS, tmp)
            os.replace(tmp, target.with_suffix(".npz"))
        tmp = target.parent / f".{target.name}.tmp"
        shutil.copyfile(self.path / JOURNAL_NAME, tmp)
        os.replace(tmp, target)
        return str(target)

    def _drop(self) -> None:
        # the json first: its presence is what makes the entry pending
        (self.path / JOURNAL_NAME).unlink()
        (self.path / _JOURNAL_VECTORS).unlink(missing_ok=True)

    def release(self, relpaths: list[str]) -> None:
        """Delete the stored images among ``relpaths`` that no record references, and their cached
        rerank vectors (``vector_cache.py``). A path that is not one of the store's (read back from
        metadata anyone with access to Chroma can write) is left alone, and logged."""
        safe = sorted({r for r in relpaths if self.images.is_safe(r)})
        for rel in relpaths:
            if not self.images.is_safe(rel):
                logger.warning("Left %r alone: a record pointed at it, but it is not a file of the image store %s",
                               rel, self.images.root)
        if not safe:
            return
        still_used = self.vectors.referenced_paths(safe)
        if self.parts is not None:  # a document's part images are in use too
            still_used |= self.parts.referenced_paths(safe)
        unused = [rel for rel in safe if rel not in still_used]
        # whether or not the image is still there: a replay after a kill drops what the kill left
        vector_cache.drop(self.path / vector_cache.VECTOR_CACHE_DIR, map(vector_cache.sha_of_relpath, unused))
        for rel in unused:
            self.images.delete(rel)

    # ------------------------------------------------------------------ recovery and locking
    def recover(self) -> None:
        """Clean what a killed writer left and complete (or undo) its pending operation. The
        caller holds the writer lock. A pending write Chroma refuses is rolled back (see
        :meth:`apply`) and logged: the KB stays usable."""
        clean_temp_files(self.path)
        if not self.pending():
            # the vectors of a completed journal: a kill fell between its two unlinks (see _drop)
            (self.path / _JOURNAL_VECTORS).unlink(missing_ok=True)
            return
        logger.warning("Completing an interrupted write in %s", self.path)
        try:
            self.apply()
        except WriteRefusedError as e:
            # the KB stays usable; the refused records were never stored (re-running their
            # ingestion adds the good ones, and reports the bad ones as rejected)
            logger.warning("Could not complete the interrupted write in %s: %s Re-run the ingestion that was "
                           "interrupted to add its good records.", self.path, e)

    def pending(self) -> bool:
        return (self.path / JOURNAL_NAME).exists()

    def needs_recovery(self) -> bool:
        """Whether a killed writer left anything: a pending journal or temporary files."""
        return self.pending() or (self.path / _JOURNAL_VECTORS).exists() or bool(temp_files(self.path))

    def try_recover(self) -> None:
        """On open: repair after a killed writer, unless a live writer holds the lock (it will)."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return
        except OSError as e:  # a read-only KB can be read, not repaired
            logger.warning("Cannot repair %s: its writer lock cannot be taken (%s); open it writable once.", self.path, e)
            return
        try:
            self.recover()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def write_lock(self):
        """Hold the KB's writer lock (recovering first); a second writer waits ``lock_timeout``."""
        with hold_writer_lock(self._lock, self.path, self.lock_timeout):
            self.recover()
            yield

    def holder(self) -> str:
        return lock_holder(self.path)
