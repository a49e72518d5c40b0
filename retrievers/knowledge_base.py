"""The knowledge base: (image, text) records in two Chroma collections plus an image store.

Crash safety. Every write follows a journal so that a writer killed at any moment (SIGKILL
included) leaves a knowledge base the next open repairs to a consistent state:

1. ``op="images"`` journal lists the images about to be stored, then the images are written;
2. ``op="upsert"`` journal (records, vectors) replaces it, then both collections are upserted and
   images no longer referenced by any record are released;
3. the journal is removed.

Recovery rolls an ``upsert`` or ``delete`` journal forward (every step is idempotent) and rolls an
``images`` journal back (deleting the images no record references). Record ids are deterministic,
so re-running an interrupted ingestion finds what already landed instead of duplicating it.
Writers hold a file lock; a second writer gets :class:`KnowledgeBaseLockedError` naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from chromadb.errors import NotFoundError
from filelock import FileLock, Timeout

from . import __version__
from .encoders import DualEncoder, normalize_model_id
from .errors import (
    ConfigError,
    EmbedderMismatchError,
    InvalidItemError,
    KnowledgeBaseError,
    KnowledgeBaseLockedError,
    NotAKnowledgeBaseError,
    SchemaVersionError,
)
from .images import DEFAULT_MAX_IMAGE_PIXELS, PreparedImage, prepare_image
from .records import IngestReport, Record, Rejection, SourceItem, content_id
from .sources import DEFAULT_MAX_TEXT_CHARS, describe_source, iter_source, prepare_text
from .store import HNSW_KEYS, IMAGE_KEY, SHA_KEY, ImageStore, VectorStore, decode_metadata, encode_metadata, make_client

logger = logging.getLogger(__name__)

MANIFEST_NAME = "mmrag-kb.json"
SCHEMA_VERSION = 1
_JOURNAL = "journal.json"
_JOURNAL_VECTORS = "journal.npz"
_LOCK = ".write.lock"
_HOLDER = "writer.json"
_REVISION = "revision"


@dataclass
class _Prepared:
    """A validated item: normalised image and text, ready to embed."""

    ref: str
    source: str
    id: str
    text: str
    image: PreparedImage
    metadata: dict[str, Any]  # already encoded for Chroma

    @property
    def fingerprint(self) -> tuple:
        return (self.image.sha256, self.text, json.dumps(self.metadata, sort_keys=True))


class KnowledgeBase:
    """A persistent multimodal knowledge base. Create or open one with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, vectors: VectorStore, embedder: DualEncoder | None, *,
                 lock_timeout: float, max_image_pixels: int, max_text_chars: int, allow_remote: bool):
        self.path = path
        self.manifest = manifest
        self.vectors = vectors
        self.images = ImageStore(path / "images")
        self._embedder = embedder
        self.lock_timeout = lock_timeout
        self.max_image_pixels = max_image_pixels
        self.max_text_chars = max_text_chars
        self.allow_remote = allow_remote
        self._lock = FileLock(str(path / _LOCK))
        self._gate = threading.Lock()  # serialises item decoding with Chroma writes (see _write)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        embedder: DualEncoder | str | None = None,
        url: str | None = None,
        *,
        create: bool = True,
        lock_timeout: float = 0.0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        allow_remote: bool = False,
        hnsw: dict[str, int] | None = None,
    ) -> "KnowledgeBase":
        """Open the knowledge base at ``path``, creating it when ``create`` and it does not exist.

        Args:
            path: the KB folder (manifest, image store and, in embedded mode, the Chroma data).
            embedder: a :class:`DualEncoder` or model id. ``None`` uses the one the KB was built
                with; a different one raises :class:`EmbedderMismatchError`. Required to create.
            url: a Chroma server (``"http://127.0.0.1:8000"``) holding the vectors; ``None`` uses
                the embedded store, or the server recorded when the KB was created.
            create: create a new KB when ``path`` holds none; with ``False`` that is an error.
            lock_timeout: seconds a writer waits for another writer to finish (0: fail at once).
            max_image_pixels, max_text_chars: ingestion limits (bigger items are rejected).
            allow_remote: let manifests reference http(s) image URLs that are fetched.
            hnsw: Chroma HNSW settings for a new KB (``ef_search``, ``ef_construction``,
                ``max_neighbors``); default ``{"ef_search": 400}``. Ignored for an existing KB.
        """
        path = Path(path).expanduser().resolve()
        if isinstance(embedder, (str, os.PathLike)):
            embedder = DualEncoder(embedder)
        bad = {k: v for k, v in (hnsw or {}).items()
               if k not in HNSW_KEYS or not isinstance(v, int) or isinstance(v, bool) or v <= 0}
        if bad:
            raise ConfigError(f"`hnsw` {bad!r}: keys must be {list(HNSW_KEYS)} and values positive integers.")
        if lock_timeout < 0:
            raise ConfigError(f"`lock_timeout` must be >= 0 seconds, got {lock_timeout!r}.")
        manifest_path = path / MANIFEST_NAME
        if manifest_path.exists():
            manifest = _read_manifest(manifest_path)
        elif path.is_file() or (path.is_dir() and not _is_unfinished_creation(path)):
            raise NotAKnowledgeBaseError(
                f"{str(path)!r} is not an mmrag knowledge base (no {MANIFEST_NAME}). "
                "Pass the folder you ingested into, or an empty/new folder to create one."
            )
        elif not create:
            raise NotAKnowledgeBaseError(
                f"No knowledge base at {str(path)!r}. Create one with `mmrag ingest SOURCE --kb {path}`."
            )
        else:
            if embedder is None:
                raise ConfigError("`embedder` is required to create a knowledge base: pass a DualEncoder or a model id.")
            manifest = _new_manifest(embedder, url)

        if url is not None and manifest["backend"] == "embedded":
            raise ConfigError(
                f"`url` is {url!r} but the knowledge base at {str(path)!r} keeps its vectors in embedded Chroma; "
                "drop `url` (or build a new KB against the server)."
            )
        if embedder is not None and embedder.model_id != manifest["embedder"]["model_id"]:
            raise EmbedderMismatchError(
                f"The knowledge base at {str(path)!r} was built with the embedder {manifest['embedder']['model_id']!r} "
                f"(dim {manifest['embedder']['dim']}), not {embedder.model_id!r}. Open it without an embedder to use "
                "its own, or ingest into a new KB."
            )
        url = url if url is not None else manifest.get("url")
        client = make_client(path / "chroma", None) if manifest["backend"] == "embedded" else make_client(None, url)
        is_new = not manifest_path.exists()
        if is_new and manifest["backend"] == "embedded":
            # a creation killed before its manifest left collections stamped for a KB that never
            # was (records are only written after the manifest): drop them and start again
            for name in manifest["collections"].values():
                with contextlib.suppress(NotFoundError):
                    client.delete_collection(name)
        vectors = VectorStore(
            client, manifest["collections"], create=is_new, hnsw=hnsw,
            collection_metadata={"mmrag_kb": manifest["kb_id"], "mmrag_embedder": manifest["embedder"]["model_id"]},
        )
        kb_stamp = (vectors.texts.metadata or {}).get("mmrag_kb")
        if kb_stamp != manifest["kb_id"]:
            raise KnowledgeBaseError(
                f"The Chroma collections {sorted(manifest['collections'].values())} belong to another knowledge base "
                f"(kb_id {kb_stamp!r}, expected {manifest['kb_id']!r}). Check `url`."
            )
        if is_new:
            path.mkdir(parents=True, exist_ok=True)
            if url is not None:
                manifest["url"] = url
            _write_json_atomic(manifest_path, manifest)
        kb = cls(path, manifest, vectors, embedder, lock_timeout=lock_timeout, max_image_pixels=max_image_pixels,
                 max_text_chars=max_text_chars, allow_remote=allow_remote)
        if (path / _JOURNAL).exists():
            kb._try_recover()
        return kb

    @property
    def embedder(self) -> DualEncoder:
        """The KB's dual encoder (the one it was built with), loaded lazily."""
        if self._embedder is None:
            self._embedder = DualEncoder(self.manifest["embedder"]["model_id"])
        return self._embedder

    @property
    def dim(self) -> int:
        return int(self.manifest["embedder"]["dim"])

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r}, count={self.count()}, embedder={self.manifest['embedder']['model_id']!r})"

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        """Number of records."""
        return self.vectors.count()

    def get(self, ids: str | Sequence[str]) -> list[Record]:
        """The records with these ids, in the given order; ids not in the KB are left out."""
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        found = self.vectors.get(ids)
        return [self._record(i, *found[i]) for i in ids if i in found]

    def _record(self, id: str, meta: dict, text: str) -> Record:
        return Record(id=id, text=text, image=str(self.images.path(meta[IMAGE_KEY])), metadata=decode_metadata(meta))

    def info(self) -> dict[str, Any]:
        """Counts, embedder and sizes, as ``mmrag kb info`` prints them."""
        return {
            "path": str(self.path),
            "backend": self.manifest["backend"],
            "url": self.manifest.get("url"),
            "count": self.count(),
            "image_vectors": self.vectors.images.count(),
            "text_vectors": self.vectors.texts.count(),
            "images_stored": sum(1 for _ in self.images),
            "embedder": self.manifest["embedder"]["model_id"],
            "dim": self.dim,
            "schema_version": self.manifest["schema_version"],
            "library_version": self.manifest["library_version"],
            "created_at": self.manifest["created_at"],
            "bytes_on_disk": _du(self.path),
        }

    def verify(self) -> dict[str, list[str]]:
        """Check the invariants crash safety promises; every list is empty on a healthy KB."""
        text_ids, image_ids = set(self.vectors.all_ids("texts")), set(self.vectors.all_ids("images"))
        metas = self.vectors.get(sorted(text_ids), include=["metadatas"])
        referenced = {m[IMAGE_KEY] for m, _ in metas.values()}
        stored = set(self.images)
        return {
            "only_in_texts": sorted(text_ids - image_ids),
            "only_in_images": sorted(image_ids - text_ids),
            "missing_images": sorted(referenced - stored),
            "orphan_images": sorted(stored - referenced),
        }

    # ------------------------------------------------------------------ writing
    def ingest(
        self,
        source: Any,
        *,
        batch_size: int = 64,
        progress: bool | Callable[[int], None] = False,
    ) -> IngestReport:
        """Validate, store and embed every item of ``source``; bad items are reported, not raised.

        ``source`` is a folder of images with ``.txt``/``.json`` sidecars, a ``.jsonl`` or ``.csv``
        manifest, WebDataset ``.tar`` shards, or an iterable of :class:`Record`. Re-ingesting a
        source adds nothing. ``progress=True`` shows a bar; a callable receives items done.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        items = iter_source(source, allow_remote=self.allow_remote)  # raises ConfigError on an unreadable source
        label = describe_source(source)
        report = IngestReport()
        start = time.perf_counter()
        bar = _progress_bar(progress)
        with self._write_lock():
            seen: dict[str, tuple[tuple, str]] = {}
            for prepared, rejected, notes, seconds in _prefetch(self._prepare_batches(items, label, batch_size)):
                report.time("prepare", seconds)
                report.rejected.extend(rejected)
                for note in notes:
                    report.note(note)
                self._write(prepared, report, seen)
                bar(len(prepared) + len(rejected))
        bar(None)
        report.seconds = time.perf_counter() - start
        return report

    def add(self, records: Iterable[Record], *, batch_size: int = 64) -> IngestReport:
        """Add records (``image`` a path, bytes or PIL image); same guarantees as :meth:`ingest`."""
        if isinstance(records, Record):
            records = [records]
        return self.ingest(list(records) if not isinstance(records, list) else records, batch_size=batch_size)

    def delete(self, ids: str | Sequence[str]) -> int:
        """Delete records from both collections and release images no other record uses.

        Returns the number of records deleted (ids not in the KB are ignored).
        """
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        with self._write_lock():
            found = self.vectors.get(ids, include=["metadatas"])
            if not found:
                return 0
            present = [i for i in ids if i in found]
            images = sorted({m[IMAGE_KEY] for m, _ in found.values()})
            self._journal({"op": "delete", "ids": present, "release": images})
            self._apply_journal(recovering=False)
        return len(present)

    # ------------------------------------------------------------------ internals: ingestion
    def _prepare_batches(self, items: Iterator[SourceItem], label: str, batch_size: int):
        """Yield ``(prepared, rejected, notes, seconds)`` per batch. Runs in a worker thread
        (decoding overlaps embedding), so it touches no shared state."""
        prepared: list[_Prepared] = []
        rejected: list[Rejection] = []
        notes: list[str] = []
        start = time.perf_counter()
        for item in items:
            try:
                with self._gate:
                    p = self._prepare(item, label)
                prepared.append(p)
                notes.extend(p.image.notes)
            except InvalidItemError as e:
                rejected.append(Rejection(ref=item.ref, reason=e.reason, source=item.source or label))
            if len(prepared) + len(rejected) >= batch_size:
                yield prepared, rejected, notes, time.perf_counter() - start
                prepared, rejected, notes = [], [], []
                start = time.perf_counter()
        if prepared or rejected:
            yield prepared, rejected, notes, time.perf_counter() - start

    def _prepare(self, item: SourceItem, label: str) -> _Prepared:
        if item.error is not None:
            raise InvalidItemError(item.error)
        text = prepare_text(item.text, max_chars=self.max_text_chars)
        if item.image is None:
            raise InvalidItemError("no image")
        image = prepare_image(item.image, max_pixels=self.max_image_pixels)
        if item.id is not None and (not isinstance(item.id, str) or not item.id.strip() or len(item.id) > 512):
            raise InvalidItemError(f"`id` must be a non-empty string of at most 512 characters, got {item.id!r}")
        record_id = item.id if item.id is not None else content_id(image.sha256, text)
        source = item.source or label
        try:
            metadata = encode_metadata(item.metadata or {}, image=self.images.relpath(image.sha256, image.ext),
                                       sha256=image.sha256, source=source)
        except ValueError as e:
            raise InvalidItemError(str(e)) from None
        return _Prepared(ref=item.ref, source=source, id=record_id, text=text, image=image, metadata=metadata)

    def _write(self, batch: list[_Prepared], report: IngestReport, seen: dict) -> None:
        # 1. drop repeats within this ingestion; a repeated user id with other content is an error
        fresh: dict[str, _Prepared] = {}
        for p in batch:
            if p.id in seen:
                fp, first_ref = seen[p.id]
                if fp == p.fingerprint:
                    report.duplicates += 1
                else:
                    report.rejected.append(Rejection(p.ref, f"id {p.id!r} repeats {first_ref} with other content", p.source))
                continue
            seen[p.id] = (p.fingerprint, p.ref)
            fresh[p.id] = p
        if not fresh:
            return
        # 2. compare with what the KB already holds
        t_lookup = time.perf_counter()
        existing = self.vectors.get(list(fresh), include=["metadatas", "documents"])
        report.time("lookup", time.perf_counter() - t_lookup)
        todo, is_new, release = [], [], []
        for rid, p in fresh.items():
            if rid in existing:
                meta, doc = existing[rid]
                if (meta[SHA_KEY], doc, json.dumps(meta, sort_keys=True)) == p.fingerprint:
                    report.existing += 1
                    continue
                report.updated += 1
                if meta[IMAGE_KEY] != p.metadata[IMAGE_KEY]:
                    release.append(meta[IMAGE_KEY])
            else:
                report.added += 1
            todo.append(p)
            is_new.append(rid not in existing)
        if not todo:
            return
        # 3. embed
        t0 = time.perf_counter()
        embedder = self.embedder
        truncated_before = embedder.texts_truncated
        image_vectors = embedder.embed_images([p.image.image for p in todo])
        text_vectors = embedder.embed_texts([p.text for p in todo])
        report.texts_truncated += embedder.texts_truncated - truncated_before
        if image_vectors.shape[1] != self.dim:
            raise EmbedderMismatchError(
                f"The embedder {embedder.model_id!r} makes {image_vectors.shape[1]}-d vectors but the knowledge base "
                f"holds {self.dim}-d vectors."
            )
        t1 = time.perf_counter()
        report.time("embed", t1 - t0)
        # 4. images, then records, each step journaled (see the module docstring). Decoding in the
        # prepare thread is paused meanwhile: on few cores it halves Chroma's write speed, while
        # overlapping it with embedding (the long stage) is what pays.
        with self._gate:
            self._store(todo, is_new, release, image_vectors, text_vectors)
        report.time("write", time.perf_counter() - t1)

    def _store(self, todo: list[_Prepared], is_new: list[bool], release: list[str],
               image_vectors: np.ndarray, text_vectors: np.ndarray) -> None:
        new_images = sorted({p.metadata[IMAGE_KEY] for p in todo if not self.images.path(p.metadata[IMAGE_KEY]).exists()})
        self._journal({"op": "images", "release": new_images})  # undone if we die before the next journal
        for p in todo:
            self.images.put(p.image.data, p.image.sha256, p.image.ext)
        self._journal(
            {"op": "upsert", "ids": [p.id for p in todo], "metadatas": [p.metadata for p in todo],
             "documents": [p.text for p in todo], "new": is_new, "release": release},
            vectors={"images": image_vectors, "texts": text_vectors},
        )
        self._apply_journal(recovering=False)

    # ------------------------------------------------------------------ internals: journal
    @property
    def revision(self) -> str:
        """Changes before and after records are written or deleted; the lexical index compares it
        with the revision it was built at (a build that saw it change is not kept)."""
        try:
            return (self.path / _REVISION).read_text().strip()
        except FileNotFoundError:
            return "0"

    def _bump_revision(self) -> None:
        _write_json_atomic(self.path / _REVISION, uuid.uuid4().hex)

    def _journal(self, entry: dict, vectors: dict[str, np.ndarray] | None = None) -> None:
        if entry["op"] != "images":
            # before the records change (a crash leaves derived indexes marked stale), and again after
            self._bump_revision()
        if vectors is not None:
            # write through a temporary name: the json journal's presence means "complete"
            tmp = self.path / f".{_JOURNAL_VECTORS}.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, **vectors)
            os.replace(tmp, self.path / _JOURNAL_VECTORS)
        _write_json_atomic(self.path / _JOURNAL, entry)

    def _apply_journal(self, recovering: bool = True) -> None:
        """Complete (or, for ``images``, undo) the journaled operation, then drop the journal.

        In normal operation ids the lookup found absent are written with Chroma's ``add`` (about
        20% faster than ``upsert``); recovery upserts everything, since part may have landed.
        """
        entry = json.loads((self.path / _JOURNAL).read_text())
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
            raise KnowledgeBaseError(f"Unknown journal operation {op!r} in {self.path / _JOURNAL}; remove the file by hand.")
        if op != "images":
            # again after the change: an index built while it was under way carries the earlier token
            self._bump_revision()
        self._release(entry.get("release", []))
        (self.path / _JOURNAL).unlink()
        (self.path / _JOURNAL_VECTORS).unlink(missing_ok=True)

    def _release(self, relpaths: list[str]) -> None:
        """Delete the stored images among ``relpaths`` that no record references."""
        if not relpaths:
            return
        by_sha = {Path(r).stem: r for r in relpaths}
        still_used = self.vectors.referenced_shas(by_sha)
        for sha, rel in by_sha.items():
            if sha not in still_used:
                self.images.delete(rel)

    def _recover(self) -> None:
        self.images.clear_tmp()
        (self.path / f".{_JOURNAL_VECTORS}.tmp").unlink(missing_ok=True)
        if (self.path / _JOURNAL).exists():
            logger.warning("Completing an interrupted write in %s", self.path)
            self._apply_journal()

    def _try_recover(self) -> None:
        """On open: repair after a killed writer, unless a live writer holds the lock (it will)."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return
        try:
            self._recover()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _write_lock(self):
        try:
            self._lock.acquire(timeout=self.lock_timeout)
        except Timeout:
            raise KnowledgeBaseLockedError(
                f"The knowledge base at {str(self.path)!r} is being written by {self._holder()}; wait for it to "
                "finish, or pass lock_timeout=SECONDS (--lock-timeout) to wait: writes to a knowledge base "
                "take turns."
            ) from None
        try:
            _write_json_atomic(self.path / _HOLDER, {
                "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
                "since": _now(),
            })
            self._recover()
            yield
        finally:
            (self.path / _HOLDER).unlink(missing_ok=True)
            self._lock.release()

    def _holder(self) -> str:
        try:
            h = json.loads((self.path / _HOLDER).read_text())
            return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']!r})"
        except (OSError, ValueError, KeyError):
            return "another process"


# ---------------------------------------------------------------------------- helpers
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_unfinished_creation(path: Path) -> bool:
    """An empty folder, or one a creation killed before its manifest left (Chroma's data, the lock)."""
    return {p.name for p in path.iterdir()} <= {"chroma", _LOCK, _HOLDER}


def _new_manifest(embedder: DualEncoder, url: str | None) -> dict:
    kb_id = uuid.uuid4().hex
    # In server mode many KBs share one Chroma; unique collection names keep them apart.
    prefix = "mmrag" if url is None else f"mmrag-{kb_id[:12]}"
    return {
        "format": "mmrag-knowledge-base",
        "schema_version": SCHEMA_VERSION,
        "library_version": __version__,
        "kb_id": kb_id,
        "created_at": _now(),
        "embedder": {"model_id": normalize_model_id(embedder.model_id), "dim": embedder.dim},
        "backend": "embedded" if url is None else "server",
        "url": url,
        "collections": {"images": f"{prefix}-images", "texts": f"{prefix}-texts"},
    }


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NotAKnowledgeBaseError(f"Cannot read the knowledge-base manifest {str(path)!r}: {e}.") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"The knowledge base {str(path.parent)!r} has schema version {version!r}; this mmrag "
            f"({__version__}) reads version {SCHEMA_VERSION}. Re-ingest with this version or use a matching mmrag."
        )
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _prefetch(gen: Iterator, depth: int = 2) -> Iterator:
    """Run ``gen`` in a worker thread, ``depth`` items ahead (image decoding overlaps embedding).
    Exceptions in the worker are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for x in gen:
                if not _put(x):
                    return
            _put(done)
        except BaseException as e:  # handed to the consumer, not swallowed
            _put(e)

    def _put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    t = threading.Thread(target=work, name="mmrag-ingest-prepare", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()  # a consumer that stops early (error, break) lets the worker exit


def _progress_bar(progress: bool | Callable[[int], None]) -> Callable[[int | None], None]:
    """``bar(n)`` advances by n items, ``bar(None)`` closes."""
    if callable(progress):
        return lambda n: None if n is None else progress(n)
    if not progress:
        return lambda n: None
    from tqdm.auto import tqdm

    t = tqdm(unit="item", desc="ingest", file=sys.stderr)
    return lambda n: t.close() if n is None else t.update(n)
