"""The knowledge base: (image, text) records in two Chroma collections plus an image store.

Responsibilities live in their own modules: opening and creating (the manifest, ``manifest.py``),
crash-safe writes (the journal and writer lock, ``journal.py``), ingestion (``ingest.py``), and
the storage primitives (``store.py``). This class is the façade users call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from chromadb.errors import NotFoundError

from ..encoders import DualEncoder
from ..errors import ConfigError, KnowledgeBaseError
from .hnsw import creation_record, tune
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .ingest import Ingestion, progress_bar
from .journal import Journal, clean_temp_files, hold_writer_lock, writer_lock
from .manifest import MANIFEST_NAME, check_creatable, check_manifest, new_manifest, read_manifest, write_json_atomic
from .multivector import MULTIVECTOR_DIR, MultiVectorStore
from .parts import PARTS_KEY, PartStore, parts_collection_name
from .records import IngestReport, Record
from .sources import DEFAULT_MAX_TEXT_CHARS, count_source, describe_source, iter_source
from .store import HNSW_KEYS, IMAGE_KEY, ImageStore, VectorStore, decode_record, make_client
from .vector_cache import VECTOR_CACHE_DIR, ImageVectorCache, sha_of_relpath
from .vector_cache import drop as drop_cached, entries as cached_entries

__all__ = ["MANIFEST_NAME", "KnowledgeBase"]

log = logging.getLogger(__name__)


class KnowledgeBase:
    """A persistent multimodal knowledge base. Create or open one with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, vectors: VectorStore, embedder: DualEncoder | None, *,
                 lock_timeout: float, max_image_pixels: int, max_text_chars: int, allow_remote: bool,
                 multivector: MultiVectorStore | None = None, multivector_encoder=None):
        self.path = path
        self.manifest = manifest
        self.vectors = vectors
        self.multivector = multivector  # the late-interaction index, when the KB has one
        # the parts of its interleaved documents (parts.py), in a collection made with the first one
        self.parts = PartStore(vectors.client, parts_collection_name(manifest), manifest["kb_id"],
                               hnsw_from=vectors.images)
        self.images = ImageStore(path / "images")
        self._embedder = embedder
        self._multivector_encoder = multivector_encoder
        self.max_image_pixels = max_image_pixels
        self.max_text_chars = max_text_chars
        self.allow_remote = allow_remote
        self.journal = Journal(path, vectors, self.images, lock_timeout, multivector=multivector, parts=self.parts)
        self.gate = threading.Lock()  # serialises item decoding with Chroma writes (see ingest.py)

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
        late_interaction: Any = None,
        fde: Any = None,
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
                ``max_neighbors``); default ``RECORD_HNSW`` (``ef_search`` 400, ``max_neighbors`` 32),
                with ``ef_search`` raised as the KB grows (see :meth:`tune_hnsw`). A key given here
                is never changed. Ignored for an existing KB.
            late_interaction: a :class:`~mmrag.retrievers.multivector.MultiVectorEncoder` (or model id)
                to give a new KB a late-interaction index (the ``late_interaction`` channel): every
                record's token vectors and its FDE. For an existing KB it must be the one it was
                built with; ``None`` uses that one.
            fde: the index's :class:`~mmrag.retrievers.muvera.FDEConfig` (default: ``DEFAULT_FDE`` at
                the encoder's dimension). Only for a new KB.
        """
        path = Path(path).expanduser().resolve()
        if isinstance(embedder, (str, os.PathLike)):
            embedder = DualEncoder(embedder)
        if isinstance(late_interaction, (str, os.PathLike)):
            from ..multivector import MultiVectorEncoder

            late_interaction = MultiVectorEncoder(late_interaction)
        bad = {k: v for k, v in (hnsw or {}).items()
               if k not in HNSW_KEYS or not isinstance(v, int) or isinstance(v, bool) or v <= 0}
        if bad:
            raise ConfigError(f"`hnsw` {bad!r}: keys must be {list(HNSW_KEYS)} and values positive integers.")
        if lock_timeout < 0:
            raise ConfigError(f"`lock_timeout` must be >= 0 seconds, got {lock_timeout!r}.")
        created = None
        if not (path / MANIFEST_NAME).exists() and check_creatable(path, embedder, create):
            created = _create(path, embedder, url, hnsw, lock_timeout, late_interaction, fde)
        if created is not None:
            manifest, (vectors, multivector) = created
        else:  # an existing KB, or one another process created while this one waited for the lock
            manifest = read_manifest(path / MANIFEST_NAME)
            check_manifest(manifest, path, embedder, url, late_interaction)
            if fde is not None:
                raise ConfigError("`fde` only applies to a new knowledge base; the one at "
                                  f"{str(path)!r} keeps the FDE settings it was created with.")
            vectors, multivector = _connect(path, manifest, url if url is not None else manifest.get("url"), None,
                                            is_new=False)
        kb = cls(path, manifest, vectors, embedder, lock_timeout=lock_timeout, max_image_pixels=max_image_pixels,
                 max_text_chars=max_text_chars, allow_remote=allow_remote, multivector=multivector,
                 multivector_encoder=late_interaction)
        if kb.journal.needs_recovery():
            kb.journal.try_recover()
        return kb

    @property
    def lock_timeout(self) -> float:
        """Seconds a writer waits for another writer to finish (0: fail at once)."""
        return self.journal.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        self.journal.lock_timeout = seconds

    @property
    def embedder(self) -> DualEncoder:
        """The KB's dual encoder (the one it was built with), loaded lazily."""
        if self._embedder is None:
            self._embedder = DualEncoder(self.manifest["embedder"]["model_id"])
        return self._embedder

    @property
    def multivector_encoder(self):
        """The multi-vector encoder of the KB's late-interaction index (None without one), loaded lazily."""
        if self.multivector is None:
            return None
        if self._multivector_encoder is None:
            from ..multivector import MultiVectorEncoder

            self._multivector_encoder = MultiVectorEncoder(self.manifest["late_interaction"]["model_id"])
        return self._multivector_encoder

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
        return decode_record(id, meta, text, self.images)

    def vector_cache(self, encoder: DualEncoder) -> ImageVectorCache:
        """The cache, in this KB's folder, of ``encoder``'s vectors of the KB's images (a dual-encoder
        reranker's: each image is embedded by it once, see ``vector_cache.py``). Loads the encoder."""
        return ImageVectorCache(self.path / VECTOR_CACHE_DIR, self.images, encoder)

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
            **({"late_interaction": self.manifest["late_interaction"]["model_id"],
                "fde_vectors": self.multivector.count()} if self.multivector is not None else {}),
            **({"document_parts": n} if (n := self.parts.count()) else {}),
        }

    def verify(self) -> dict[str, list[str]]:
        """Check the invariants crash safety promises; every list is empty on a healthy KB.

        ``unsafe_paths`` lists the records whose stored image path (in either collection) is not a
        file of the image store (written to Chroma by something else than mmrag): reading them
        raises :class:`UnsafePathError`; delete them and ingest them again. With a rerank vector
        cache, ``orphan_cached_vectors`` lists its entries (``model key/sha256``) whose image no record
        uses: harmless, left by a query that cached an image while it was deleted;
        :meth:`prune_vector_cache` drops them."""
        paths = {which: self.vectors.image_paths(which) for which in ("texts", "images")}
        text_ids, image_ids = set(paths["texts"]), set(paths["images"])
        unsafe = {i for p in paths.values() for i, rel in p.items() if not self.images.is_safe(rel)}
        referenced = {rel for p in paths.values() for i, rel in p.items() if i not in unsafe}
        parts = self._verify_parts(unsafe, referenced)  # adds the documents' part images to `referenced`
        stored = set(self.images)
        return {
            "only_in_texts": sorted(text_ids - image_ids),
            "only_in_images": sorted(image_ids - text_ids),
            "missing_images": sorted(referenced - stored),
            "orphan_images": sorted(stored - referenced),
            "unsafe_paths": sorted(unsafe),
            **(self._verify_multivector(text_ids) if self.multivector is not None else {}),
            **parts,
            **({"orphan_cached_vectors": self._orphan_cached_vectors(referenced)}
               if (self.path / VECTOR_CACHE_DIR).is_dir() else {}),
        }

    def _orphan_cached_vectors(self, referenced: set[str]) -> list[str]:
        used = {sha_of_relpath(rel) for rel in referenced}
        return sorted(f"{key}/{sha}" for key, shas in cached_entries(self.path / VECTOR_CACHE_DIR).items()
                      for sha in shas - used)

    def prune_vector_cache(self) -> int:
        """Drop the rerank vector cache's entries whose image no record uses (``verify()``'s
        ``orphan_cached_vectors``), under the writer lock; returns how many."""
        with self.journal.write_lock():  # no write changes what is referenced meanwhile
            orphans = self.verify().get("orphan_cached_vectors", [])
            return drop_cached(self.path / VECTOR_CACHE_DIR, sorted({o.rsplit("/", 1)[1] for o in orphans}))

    def _verify_parts(self, unsafe: set[str], referenced: set[str]) -> dict[str, list[str]]:
        """Each document record has all its parts (``missing_parts``) and each stored part a document
        (``orphan_parts``); a part's image counts as referenced, and a document with a part image
        outside the image store is unsafe. No keys for a KB that never held a document."""
        stored = self.parts.scan()
        if stored is None:
            return {}
        res = self.vectors.texts.get(where={PARTS_KEY: {"$gte": 1}}, include=["metadatas"])
        expected = {i: int(m[PARTS_KEY]) for i, m in zip(res["ids"], res["metadatas"])}
        indices: dict[str, list[int]] = {}
        for part in stored:
            indices.setdefault(part.doc_id, []).append(part.index)
            if part.kind == "image":
                if self.images.is_safe(part.image):
                    referenced.add(part.image)
                else:
                    unsafe.add(part.doc_id)
        return {
            "missing_parts": sorted(i for i, n in expected.items() if sorted(indices.get(i, [])) != list(range(n))),
            "orphan_parts": sorted(set(indices) - set(expected)),
        }

    def _verify_multivector(self, record_ids: set[str]) -> dict[str, list[str]]:
        """The late-interaction index holds exactly the KB's records: an FDE and a token file each."""
        fdes, files = set(self.multivector.ids()), self.multivector.file_ids()
        return {
            "missing_multivectors": sorted(record_ids - (fdes & files)),
            "orphan_multivectors": sorted((fdes | files) - record_ids),
        }

    # ------------------------------------------------------------------ writing
    def ingest(
        self,
        source: Any,
        *,
        batch_size: int = 64,
        progress: bool | Callable[[int], None] = False,
        base_dir: str | os.PathLike | None = None,
    ) -> IngestReport:
        """Validate, store and embed every item of ``source``; bad items are reported, not raised.

        ``source`` is a folder of images with ``.txt``/``.json`` sidecars, a ``.jsonl`` or ``.csv``
        manifest, WebDataset ``.tar`` shards, or an iterable of :class:`Record`. Each record keeps
        where it came from as :attr:`Record.source_path`. Re-ingesting a source adds nothing.
        ``progress=True`` shows a bar with the item total and an ETA (the source is counted first,
        cheaply, see :func:`count_source`); a callable receives items done. ``base_dir`` lets a
        manifest's image paths, relative or absolute, point anywhere inside that folder (by default
        they must stay inside the manifest's own folder). ``report.all_rejected`` tells an ingestion
        that stored nothing because every item was bad.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        # raises ConfigError on an unreadable source or a bad base_dir
        items = iter_source(source, allow_remote=self.allow_remote, base_dir=base_dir)
        label = describe_source(source)
        start = time.perf_counter()
        total = count_source(source) if progress and not callable(progress) else None  # a callable gets no total
        bar = progress_bar(progress, total=total)
        with self.journal.write_lock():
            report = Ingestion(self, label).run(items, batch_size, bar)
            if report.added:
                self._tune_hnsw_after(report)
        bar(None)
        report.seconds = time.perf_counter() - start
        return report

    def add(self, records: Iterable[Record], *, batch_size: int = 64) -> IngestReport:
        """Add records (``image`` a path, bytes or PIL image); same guarantees as :meth:`ingest`.
        A record's own ``source_path`` is kept (none by default)."""
        if isinstance(records, Record):
            records = [records]
        return self.ingest(list(records) if not isinstance(records, list) else records, batch_size=batch_size)

    def delete(self, ids: str | Sequence[str]) -> int:
        """Delete records from both collections (a document with its parts) and release images no other record uses.

        Returns the number of records deleted (ids not in the KB are ignored).
        """
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        with self.journal.write_lock():
            found = self.vectors.get(ids, include=["metadatas"])
            if not found:
                return 0
            present = [i for i in ids if i in found]
            # a path outside the image store is dropped by release() (and logged), never deleted
            images = [m.get(IMAGE_KEY) for m, _ in found.values()]
            images += self.parts.images_of([i for i in present if (found[i][0] or {}).get(PARTS_KEY)])
            self.journal.record({"op": "delete", "ids": present, "release": images})
            self.journal.apply(recovering=False)
        return len(present)

    @property
    def revision(self) -> str:
        """Changes before and after records are written or deleted (see :class:`Journal`)."""
        return self.journal.revision

    def tune_hnsw(self) -> dict | None:
        """Raise the collections' HNSW ``ef_search`` to what the KB's size needs (``hnsw.py``:
        :data:`~mmrag.retrievers.kb.hnsw.EF_SEARCH_BY_SIZE`), unless it was set explicitly, and
        record it in the manifest (``"hnsw"``). :meth:`ingest` does this after every ingestion that
        adds records; call it after writing to the collections another way. Chroma applies the new
        value when the index is next loaded: the next process to open the KB, or a restarted
        server. Returns what was recorded, or None when nothing changed."""
        with self.journal.write_lock():
            return self._tune_hnsw()

    def _tune_hnsw(self) -> dict | None:
        manifest = read_manifest(self.path / MANIFEST_NAME)  # as it is now: another process may have tuned it
        section = tune(manifest.get("hnsw"), self.vectors, self.count())
        if section is None:
            return None
        manifest["hnsw"] = self.manifest["hnsw"] = section
        write_json_atomic(self.path / MANIFEST_NAME, manifest)
        return section["tuned"][-1]

    def _tune_hnsw_after(self, report: IngestReport) -> None:
        try:
            entry = self._tune_hnsw()
        except Exception as e:  # the records are stored: a tuning Chroma refused must not fail the ingestion
            log.warning("HNSW tuning after ingestion into %s failed: %s: %s", self.path, type(e).__name__, e)
            report.note(f"HNSW ef_search not raised ({type(e).__name__}: {e}); retry with kb.tune_hnsw()")
            return
        if entry is not None:
            report.note(f"HNSW ef_search raised from {entry['previous']} to {entry['ef_search']} at "
                        f"{entry['count']:,} records (applies when the index is next loaded)")


# ---------------------------------------------------------------------------- helpers
def _create(path: Path, embedder: DualEncoder, url: str | None, hnsw: dict[str, int] | None,
            lock_timeout: float, late_interaction=None, fde=None) -> tuple[dict, tuple] | None:
    """Create the KB at ``path`` under its writer lock (two creators take turns, the second waiting
    ``lock_timeout``), or None when the manifest appeared while this one waited (the KB to open).
    The manifest is written last: a folder without one is a creation to redo."""
    fde_spec = None
    if late_interaction is not None:
        import dataclasses

        from ..muvera import DEFAULT_FDE, FDEConfig

        if fde is not None and not isinstance(fde, FDEConfig):
            raise ConfigError(f"`fde` must be an FDEConfig, got {type(fde).__name__}.")
        fde_spec = (fde or dataclasses.replace(DEFAULT_FDE, dim=late_interaction.dim)).to_dict()
        if fde_spec["dim"] != late_interaction.dim:
            raise ConfigError(f"`fde` has dim={fde_spec['dim']} but the late-interaction encoder "
                              f"{late_interaction.model_id!r} makes {late_interaction.dim}-d vectors: set "
                              f"FDEConfig(dim={late_interaction.dim}, ...).")
    # loads the embedders (for their dims): not while holding the lock
    manifest = new_manifest(embedder, url, late_interaction, fde_spec)
    manifest["hnsw"] = creation_record(hnsw)
    path.mkdir(parents=True, exist_ok=True)
    with hold_writer_lock(writer_lock(path), path, lock_timeout):
        if (path / MANIFEST_NAME).exists():
            return None
        clean_temp_files(path)  # a killed creation's, e.g. the manifest's before its rename
        vectors = _connect(path, manifest, url, hnsw, is_new=True)
        write_json_atomic(path / MANIFEST_NAME, manifest)
    return manifest, vectors


def _connect(path: Path, manifest: dict, url: str | None, hnsw: dict[str, int] | None,
             is_new: bool) -> tuple[VectorStore, MultiVectorStore | None]:
    """The KB's two Chroma collections, checked to be this KB's (not another's on a shared server),
    and its late-interaction index when the manifest names one."""
    client = make_client(path / "chroma", None) if manifest["backend"] == "embedded" else make_client(None, url)
    if is_new and manifest["backend"] == "embedded":
        # a creation killed before its manifest left collections stamped for a KB that never
        # was (records are only written after the manifest): drop them and start again
        names = list(manifest["collections"].values())
        names += [manifest["late_interaction"]["collection"]] if "late_interaction" in manifest else []
        names.append(parts_collection_name(manifest))
        for name in names:
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
    multivector = None
    if "late_interaction" in manifest:
        multivector = MultiVectorStore(path / MULTIVECTOR_DIR, client, manifest["late_interaction"], create=is_new,
                                       collection_metadata={"mmrag_kb": manifest["kb_id"]}, hnsw=hnsw)
    return vectors, multivector


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total
