"""Ingestion: validate and normalise source items, embed them in batches, write them journaled.

Decoding runs one batch ahead in a worker thread (it overlaps embedding, the long stage); Chroma
writes pause it (on few cores decoding halves Chroma's write speed). A bad item becomes a
:class:`Rejection` in the report and never costs a good record; ids are the user's or derived
from content, so re-running an interrupted ingestion finds what already landed.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..errors import EmbedderMismatchError, InvalidItemError, WriteRefusedError
from .documents import PreparedPart, document_vector, part_rows, prepare_document
from .images import PreparedImage, prepare_image
from .multivector import pack_tokens
from .parts import PARTS_KEY, PARTS_SHA_KEY, pack_parts
from .records import IngestReport, Rejection, SourceItem, content_id
from .sources import prepare_text
from .store import IMAGE_KEY, SHA_KEY, SOURCE_PATH_KEY, ImageStore, check_text, encode_metadata

if TYPE_CHECKING:
    from .knowledge_base import KnowledgeBase


@dataclass
class PreparedItem:
    """A validated item: normalised image and text, ready to embed."""

    ref: str
    source: str
    id: str
    text: str
    image: PreparedImage  # a document's: its first image part
    metadata: dict[str, Any]  # already encoded for Chroma
    parts: list[PreparedPart] | None = None  # a document's parts, in order (documents.py)

    @property
    def fingerprint(self) -> tuple:
        """What a stored record must equal for this item to be already present."""
        return (self.image.sha256, self.text, json.dumps(self.metadata, sort_keys=True))

    @property
    def content(self) -> tuple:
        """The fingerprint without the source path: the same content found at a second place in
        one ingestion (a copied file) is a duplicate of the first, not a conflicting record."""
        meta = {k: v for k, v in self.metadata.items() if k != SOURCE_PATH_KEY}
        return (self.image.sha256, self.text, json.dumps(meta, sort_keys=True))


@dataclass
class _Write:
    """One record to write: ``new`` when the KB lacked its id at lookup (written with Chroma's
    faster ``add`` unless ``upsert``), ``old_image`` the image an update releases."""

    item: PreparedItem
    new: bool
    old_image: str | None
    upsert: bool = False
    part_vectors: np.ndarray | None = None  # a document's (n_parts, dim), once embedded


class Ingestion:
    """One ingestion run into ``kb`` (the caller holds the writer lock)."""

    def __init__(self, kb: "KnowledgeBase", label: str):
        self.kb = kb
        self.label = label
        self.report = IngestReport()
        self._seen: dict[str, tuple[tuple, str]] = {}  # id -> (content, first ref), this run

    def run(self, items: Iterator[SourceItem], batch_size: int, bar: Callable[[int | None], None]) -> IngestReport:
        report = self.report
        for prepared, rejected, notes, seconds in prefetch(self.prepare_batches(items, self.label, batch_size)):
            report.time("prepare", seconds)
            self.consume(prepared, rejected, notes)
            bar(len(prepared) + len(rejected))
        return report

    def prepare_batches(self, items: Iterator[SourceItem], label: str, batch_size: int):
        """Yield ``(prepared, rejected, notes, seconds)`` per batch. Runs in a worker thread
        (decoding overlaps embedding), so it touches no shared state."""
        prepared: list[PreparedItem] = []
        rejected: list[Rejection] = []
        notes: list[str] = []
        start = time.perf_counter()
        for item in items:
            try:
                with self.kb.gate:
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

    def _prepare(self, item: SourceItem, label: str) -> PreparedItem:
        return prepare_item(item, label, max_text_chars=self.kb.max_text_chars, max_image_pixels=self.kb.max_image_pixels)

    def consume(self, prepared: list[PreparedItem], rejected: list[Rejection], notes: list[str],
                vectors: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """Write one batch prepared elsewhere (another thread, or Ray workers): its rejections
        and notes go to the report, its items through :meth:`write`, embedded already when
        ``vectors`` maps their ids to ``(image vector, text vector)``."""
        self.report.rejected.extend(rejected)
        for note in notes:
            self.report.note(note)
        self.write(prepared, self.report, self._seen, vectors)

    def write(self, batch: list[PreparedItem], report: IngestReport, seen: dict,
              vectors: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        # 1. drop repeats within this ingestion; a repeated user id with other content is an error
        fresh: dict[str, PreparedItem] = {}
        for p in batch:
            if p.id in seen:
                content, first_ref = seen[p.id]
                if content == p.content:
                    report.duplicates += 1
                else:
                    report.rejected.append(Rejection(p.ref, f"id {p.id!r} repeats {first_ref} with other content", p.source))
                continue
            seen[p.id] = (p.content, p.ref)
            fresh[p.id] = p
        if not fresh:
            return
        # 2. compare with what the KB already holds
        t_lookup = time.perf_counter()
        existing = self.kb.vectors.get(list(fresh), include=["metadatas", "documents"])
        report.time("lookup", time.perf_counter() - t_lookup)
        todo: list[_Write] = []
        for rid, p in fresh.items():
            if rid not in existing:
                todo.append(_Write(p, new=True, old_image=None))
                continue
            meta, doc = existing[rid]
            if (meta.get(SHA_KEY), doc, json.dumps(meta, sort_keys=True)) == p.fingerprint:
                report.existing += 1
                continue
            old_image = meta.get(IMAGE_KEY)
            if old_image == p.metadata[IMAGE_KEY]:
                old_image = None  # the same image stays in use
            elif not self.kb.images.is_safe(old_image):
                # someone wrote this path to Chroma: it is not ours to release (journal.release
                # would leave it alone too); say so rather than drop it silently
                report.note("an updated record pointed at a file outside the image store; left that file alone")
                old_image = None
            todo.append(_Write(p, new=False, old_image=old_image))
        if not todo:
            return
        # 3. embed (what arrived embedded is not embedded again)
        t0 = time.perf_counter()
        image_vectors, text_vectors, part_vectors = self._vectors(todo, report, vectors or {})
        for w, pv in zip(todo, part_vectors):
            w.part_vectors = pv
        tokens = self._tokens(todo)
        t1 = time.perf_counter()
        report.time("embed", t1 - t0)
        todo, image_vectors, text_vectors, tokens = self._drop_non_finite(todo, image_vectors, text_vectors, tokens,
                                                                          report)
        # 4. images, then records, each step journaled (see the module docstring). Decoding in the
        # prepare thread is paused meanwhile: on few cores it halves Chroma's write speed, while
        # overlapping it with embedding (the long stage) is what pays.
        with self.kb.gate:
            refused = self._store_isolating(todo, image_vectors, text_vectors, tokens)
        for w, reason in refused:
            report.rejected.append(Rejection(w.item.ref, reason, w.item.source))
        refused_ids = {w.item.id for w, _ in refused}
        for w in todo:
            if w.item.id not in refused_ids:
                if w.new:
                    report.added += 1
                else:
                    report.updated += 1
        report.time("write", time.perf_counter() - t1)

    def _vectors(self, todo: list[_Write], report: IngestReport, given: Mapping[str, tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
        """``(image vectors, text vectors, part vectors)`` in ``todo``'s order: ``given`` ones, the rest
        embedded here. Documents are always embedded here: their vectors come from their parts."""
        missing = [w for w in todo if w.item.id not in given or w.item.parts is not None]
        if len(missing) == len(todo):
            return self._embed(todo, report)
        embedded = dict(zip((w.item.id for w in missing), zip(*self._embed(missing, report)))) if missing else {}
        rows = [embedded.get(w.item.id) or given[w.item.id] for w in todo]
        part_vectors = [r[2] if len(r) > 2 else None for r in rows]
        image_vectors = np.stack([np.asarray(r[0], dtype=np.float32) for r in rows])
        text_vectors = np.stack([np.asarray(r[1], dtype=np.float32) for r in rows])
        if image_vectors.shape[1] != self.kb.dim or text_vectors.shape[1] != self.kb.dim:
            raise EmbedderMismatchError(
                f"The vectors given for this batch are {image_vectors.shape[1]}-d (images) and {text_vectors.shape[1]}-d "
                f"(texts) but the knowledge base holds {self.kb.dim}-d vectors: embed with its model, "
                f"{self.kb.manifest['embedder']['model_id']!r}.")
        return image_vectors, text_vectors, part_vectors

    def _tokens(self, todo: list[_Write]) -> list[np.ndarray] | None:
        """Each image's token vectors, for a KB with a late-interaction index (else None)."""
        encoder = self.kb.multivector_encoder
        if encoder is None:
            return None
        tokens = encoder.embed_images([w.item.image.image for w in todo])
        dim = self.kb.multivector.dim
        bad = [t.shape for t in tokens if t.ndim != 2 or t.shape[1] != dim or not len(t)]
        if bad:
            raise EmbedderMismatchError(
                f"The late-interaction encoder {encoder.model_id!r} made token vectors of shape {bad[0]} but the "
                f"index holds {dim}-d vectors (at least one per image).")
        return tokens

    def _embed(self, todo: list[_Write], report: IngestReport
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
        """Embed plain records' images and texts and documents' parts, in one call per modality."""
        embedder = self.kb.embedder
        truncated_before = embedder.texts_truncated
        images = [w.item.image.image for w in todo if w.item.parts is None]
        texts = [w.item.text for w in todo if w.item.parts is None]
        parts = [p for w in todo for p in (w.item.parts or [])]
        image_vectors = embedder.embed_images(images + [p.image.image for p in parts if p.kind == "image"])
        text_vectors = embedder.embed_texts(texts + [p.text for p in parts if p.kind == "text"])
        report.texts_truncated += embedder.texts_truncated - truncated_before
        if image_vectors.shape[1] != self.kb.dim:
            raise EmbedderMismatchError(
                f"The embedder {embedder.model_id!r} makes {image_vectors.shape[1]}-d vectors but the knowledge base "
                f"holds {self.kb.dim}-d vectors."
            )
        if not parts:
            return image_vectors, text_vectors, [None] * len(todo)
        # the documents' rows: each part's vector in document order, then the document's vector
        next_image, next_text = iter(image_vectors[len(images):]), iter(text_vectors[len(texts):])
        plain_images, plain_texts = iter(image_vectors[:len(images)]), iter(text_vectors[:len(texts)])
        out_images, out_texts, out_parts = [], [], []
        for w in todo:
            if w.item.parts is None:
                out_images.append(next(plain_images))
                out_texts.append(next(plain_texts))
                out_parts.append(None)
                continue
            pv = np.stack([next(next_image) if p.kind == "image" else next(next_text) for p in w.item.parts])
            doc = document_vector(pv)  # (dim,)
            out_images.append(doc)
            out_texts.append(doc)
            out_parts.append(pv)  # (n_parts, dim)
        return np.stack(out_images), np.stack(out_texts), out_parts

    @staticmethod
    def _drop_non_finite(todo: list[_Write], image_vectors: np.ndarray, text_vectors: np.ndarray,
                         tokens: list[np.ndarray] | None, report: IngestReport):
        """Chroma refuses a NaN or infinite vector (and with it the whole batch): reject those
        items here, before anything is journaled."""
        ok = np.isfinite(image_vectors).all(axis=1) & np.isfinite(text_vectors).all(axis=1)
        ok &= np.array([w.part_vectors is None or bool(np.isfinite(w.part_vectors).all()) for w in todo], dtype=bool)
        if tokens is not None:
            ok &= np.array([bool(np.isfinite(t).all()) for t in tokens])
        if ok.all():
            return todo, image_vectors, text_vectors, tokens
        for w in (w for w, good in zip(todo, ok) if not good):
            report.rejected.append(Rejection(w.item.ref, "the embedder gave a non-finite (NaN or infinite) vector "
                                             "for this item; Chroma stores finite vectors only", w.item.source))
        kept_tokens = None if tokens is None else [t for t, good in zip(tokens, ok) if good]
        return [w for w, good in zip(todo, ok) if good], image_vectors[ok], text_vectors[ok], kept_tokens

    def _store_isolating(self, todo: list[_Write], image_vectors: np.ndarray, text_vectors: np.ndarray,
                         tokens: list[np.ndarray] | None = None) -> list[tuple[_Write, str]]:
        """Store ``todo``; when Chroma refuses the write (rolled back by the journal) store each half
        again, down to the single records it refuses: ``(write, reason)`` for those. Our checks
        (encode_metadata) catch every rule known; this keeps an unknown one from costing the
        batch's good records. A record stored in a retry upserts: part of the batch may have landed."""
        if not todo:
            return []
        try:
            self._store([w.item for w in todo], [w.new and not w.upsert for w in todo],
                        [w.old_image for w in todo if w.old_image is not None], image_vectors, text_vectors, tokens,
                        [w.part_vectors for w in todo])
            return []
        except WriteRefusedError as e:
            if len(todo) == 1:
                return [(todo[0], e.reason)]
        retry = [dataclasses.replace(w, upsert=True) for w in todo]
        mid = len(todo) // 2
        halves = (None, None) if tokens is None else (tokens[:mid], tokens[mid:])
        return (self._store_isolating(retry[:mid], image_vectors[:mid], text_vectors[:mid], halves[0])
                + self._store_isolating(retry[mid:], image_vectors[mid:], text_vectors[mid:], halves[1]))

    def _store(self, todo: list[PreparedItem], is_new: list[bool], release: list[str],
               image_vectors: np.ndarray, text_vectors: np.ndarray, tokens: list[np.ndarray] | None = None,
               part_vectors: list[np.ndarray | None] | None = None) -> None:
        """One journaled write; ``is_new``: written with ``add`` (the id was absent at lookup).
        ``tokens`` (a late-interaction index's token vectors) and documents' parts (``part_vectors``,
        None for a plain record) travel in the same journal entry."""
        images = {p.metadata[IMAGE_KEY]: p.image for p in todo}
        images.update((part.relpath, part.image) for p in todo for part in (p.parts or []) if part.kind == "image")
        new_images = sorted(rel for rel in images if not self.kb.images.path(rel).exists())
        self.kb.journal.record({"op": "images", "release": new_images})  # undone if we die before the next journal
        for image in images.values():
            self.kb.images.put(image.data, image.sha256, image.ext)
        # an updated document's old part images are released (those the new version still uses stay)
        updated = [p.id for p, new in zip(todo, is_new) if not new]
        release = release + (self.kb.parts.images_of(updated) if updated else [])
        entry = {"op": "upsert", "ids": [p.id for p in todo], "metadatas": [p.metadata for p in todo],
                 "documents": [p.text for p in todo], "new": is_new, "release": release}
        vectors = {"images": image_vectors, "texts": text_vectors, **(pack_tokens(tokens) if tokens is not None else {})}
        if any(p.parts for p in todo):
            entry["parts"] = [part_rows(p.id, p.parts) if p.parts else [] for p in todo]
            vectors.update(pack_parts(part_vectors or [None] * len(todo), self.kb.dim))
        self.kb.journal.record(entry, vectors=vectors)
        self.kb.journal.apply(recovering=False)


def prepare_item(item: SourceItem, label: str, *, max_text_chars: int, max_image_pixels: int) -> PreparedItem:
    """Validate and normalise one source item (raises :class:`InvalidItemError` with the reason).
    A pure function of the item and the KB's limits, so Ray workers run it without the KB."""
    if item.error is not None:
        raise InvalidItemError(item.error)
    document = None
    if item.parts is not None:  # an interleaved document (documents.py): every part checked, or none kept
        if item.text is not None or item.image is not None:
            raise InvalidItemError("a document item has `parts`; its text and image come from them (leave both None)")
        document = prepare_document(item.parts, max_text_chars=max_text_chars, max_image_pixels=max_image_pixels)
        text, image = document.text, document.image
    else:
        text = prepare_text(item.text, max_chars=max_text_chars)
        if item.image is None:
            raise InvalidItemError("no image")
        image = prepare_image(item.image, max_pixels=max_image_pixels)
    if item.id is not None and (not isinstance(item.id, str) or not item.id.strip() or len(item.id) > 512):
        raise InvalidItemError(f"`id` must be a non-empty string of at most 512 characters, got {item.id!r}")
    record_id = item.id if item.id is not None else content_id(image.sha256 if document is None else document.digest,
                                                               text)
    source = item.source or label
    try:
        check_text("`id`", record_id)
        check_text("text", text)
        metadata = encode_metadata(item.metadata or {}, image=ImageStore.relpath(image.sha256, image.ext),
                                   sha256=image.sha256, source=source, source_path=item.source_path)
    except ValueError as e:
        raise InvalidItemError(str(e)) from None
    if document is not None:
        metadata.update({PARTS_KEY: len(document.parts), PARTS_SHA_KEY: document.digest})
    return PreparedItem(ref=item.ref, source=source, id=record_id, text=text, image=image, metadata=metadata,
                        parts=document.parts if document is not None else None)


def prefetch(gen: Iterator, depth: int = 2) -> Iterator:
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


def progress_bar(progress: bool | Callable[[int], None], total: int | None = None) -> Callable[[int | None], None]:
    """``bar(n)`` advances by n items, ``bar(None)`` closes. With ``total`` (the number of items,
    see :func:`~retrievers.kb.sources.count_source`) the bar shows a percentage and an ETA."""
    if callable(progress):
        return lambda n: None if n is None else progress(n)
    if not progress:
        return lambda n: None
    from tqdm.auto import tqdm

    t = tqdm(total=total, unit="item", desc="ingest", file=sys.stderr)
    return lambda n: t.close() if n is None else t.update(n)
