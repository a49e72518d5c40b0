"""The parts of a knowledge base's documents: one row per passage or image, so a hit can say which
part matched.

A document record (``documents.py``) is stored like any record (its text the passages joined, its
image the first image part, its vector the mean of its parts' vectors); its parts go to a fourth
Chroma collection, ``<prefix>-parts`` (cosine space, the HNSW settings of the image collection),
with ids ``<doc id>#<index>``, the part's vector, its text as the Chroma document (``""`` for an
image) and the metadata ``mmrag_doc`` (the record id), ``mmrag_part`` (0-based index) and
``mmrag_kind`` (``"text"`` | ``"image"``); an image part also carries ``mmrag_image``,
``mmrag_sha256`` and ``mmrag_source_path``, as a record does, so that the image store counts it as
referenced (``referenced_paths``).

A Chroma collection rather than a sidecar file: releasing an image asks "does anything still point
at it?", which a metadata filter answers in one query, where sidecar files would all be read.

The collection is created with the first document (a KB without documents has none, and pays
nothing). It is written by the KB's journal, inside the same journaled ``upsert`` as the records
(the part vectors travel in the journal's vectors file) and emptied by the same ``delete``, so a
writer killed at any point leaves no half document (``journal.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from chromadb.errors import NotFoundError

from ..errors import KnowledgeBaseError
from .store import DEFAULT_HNSW, HNSW_KEYS, IMAGE_KEY, SOURCE_PATH_KEY, _RetryingReads

# On a document record: how many parts it has, and the digest of them all (so that a re-ingested
# document whose middle image changed is an update, not "already present").
PARTS_KEY = "mmrag_parts"
PARTS_SHA_KEY = "mmrag_parts_sha256"
# On a part row.
DOC_KEY = "mmrag_doc"
INDEX_KEY = "mmrag_part"
KIND_KEY = "mmrag_kind"
KINDS = ("text", "image")


def is_document(metadata: dict | None) -> bool:
    """Whether a record's stored (Chroma) metadata marks it as a document."""
    return bool((metadata or {}).get(PARTS_KEY))


def parts_collection_name(manifest: dict) -> str:
    """``<prefix>-parts`` beside the KB's ``<prefix>-images`` and ``<prefix>-texts``."""
    images = manifest["collections"]["images"]
    return f"{images.removesuffix('-images')}-parts"


@dataclass
class StoredPart:
    """One stored part of a document, as read back."""

    doc_id: str
    index: int
    kind: str  # "text" | "image"
    text: str | None  # the passage (text parts)
    image: str | None  # the image's path relative to the image store (image parts)
    source_path: str | None  # the image as its manifest wrote it
    vector: np.ndarray | None  # (dim,) float32, unit; None when not asked for


class PartStore:
    """The ``<prefix>-parts`` collection of one KB (see the module docstring). Every method is
    idempotent: the journal replays them after a crash."""

    def __init__(self, client, name: str, kb_id: str, hnsw_from=None):
        self.client = client
        self.name = name
        self.kb_id = kb_id
        self._hnsw_from = hnsw_from  # a collection whose HNSW settings a new parts collection takes
        self._collection = None
        self.max_batch = int(client.get_max_batch_size())

    def collection(self, create: bool = False):
        """The collection; None while the KB has never held a document (``create`` makes it).
        Looked up again until found: another process may have written the first document."""
        if self._collection is None:
            kwargs: dict[str, Any] = {"embedding_function": None}
            try:
                col = self.client.get_collection(self.name, **kwargs)
            except NotFoundError:
                if not create:
                    return None
                config = {"hnsw": {**DEFAULT_HNSW, **self._hnsw(), "space": "cosine"}}
                col = self.client.get_or_create_collection(self.name, configuration=config,
                                                           metadata={"mmrag_kb": self.kb_id}, **kwargs)
            stamp = (col.metadata or {}).get("mmrag_kb")
            if stamp != self.kb_id:
                raise KnowledgeBaseError(f"The Chroma collection {self.name!r} belongs to another knowledge base "
                                         f"(kb_id {stamp!r}, expected {self.kb_id!r}). Check `url`.")
            self._collection = _RetryingReads(col)
        return self._collection

    def _hnsw(self) -> dict:
        """The HNSW settings (``ef_search``, ...) of the collection named at construction."""
        if self._hnsw_from is None:
            return {}
        hnsw = (getattr(self._hnsw_from, "configuration_json", None) or {}).get("hnsw") or {}
        return {k: v for k, v in hnsw.items() if k in HNSW_KEYS and v is not None}

    def _chunks(self, items: Sequence) -> Iterable[list]:
        for start in range(0, len(items), self.max_batch):
            yield list(items[start:start + self.max_batch])

    # ------------------------------------------------------------------ writing (by the journal)
    def write(self, rows: Sequence[Sequence[tuple[dict, str]]], vectors: np.ndarray, replace: Sequence[str]) -> None:
        """Store parts: ``rows`` holds each record's ``(metadata, document)`` pairs (``[]`` for a plain
        record), ``vectors`` their vectors, concatenated in that order. The stored parts of the ids
        in ``replace`` (records written before: updates, a replay) are removed first, so that a
        document with fewer parts, or a plain record now, keeps none of its old ones."""
        flat = [row for record in rows for row in record]
        col = self.collection(create=bool(flat))
        if col is None:
            return
        if replace:
            self._delete_docs(col, replace)
        ids = [f"{meta[DOC_KEY]}#{meta[INDEX_KEY]}" for meta, _ in flat]
        for start in range(0, len(flat), self.max_batch):
            s = slice(start, start + self.max_batch)
            col.upsert(ids=ids[s], embeddings=vectors[s], metadatas=[m for m, _ in flat[s]],
                       documents=[d for _, d in flat[s]])

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Remove every part of these records."""
        col = self.collection()
        if col is not None and doc_ids:
            self._delete_docs(col, doc_ids)

    def _delete_docs(self, col, doc_ids: Sequence[str]) -> None:
        for chunk in self._chunks(list(dict.fromkeys(doc_ids))):
            col.delete(where={DOC_KEY: {"$in": chunk}})

    # ------------------------------------------------------------------ reading
    def of(self, doc_ids: Sequence[str], vectors: bool = True) -> dict[str, list[StoredPart]]:
        """``{doc id: its parts in document order}`` for the ids that have parts."""
        col = self.collection()
        out: dict[str, list[StoredPart]] = {}
        if col is None or not doc_ids:
            return out
        include = ["metadatas", "documents"] + (["embeddings"] if vectors else [])
        for chunk in self._chunks(list(dict.fromkeys(doc_ids))):
            res = col.get(where={DOC_KEY: {"$in": chunk}}, include=include)
            embs = res["embeddings"] if vectors else [None] * len(res["ids"])
            for meta, doc, emb in zip(res["metadatas"], res["documents"], embs):
                out.setdefault(meta[DOC_KEY], []).append(_part(meta, doc, emb))
        for parts in out.values():
            parts.sort(key=lambda p: p.index)
        return out

    def images_of(self, doc_ids: Sequence[str]) -> list[str]:
        """The stored image paths of these records' image parts."""
        return sorted({p.image for parts in self.of(doc_ids, vectors=False).values() for p in parts
                       if p.image is not None})

    def referenced_paths(self, relpaths: Iterable[str]) -> set[str]:
        """The subset of ``relpaths`` some stored part points to."""
        col = self.collection()
        relpaths = sorted(set(relpaths))
        if col is None or not relpaths:
            return set()
        found: set[str] = set()
        for chunk in self._chunks(relpaths):
            res = col.get(where={IMAGE_KEY: {"$in": chunk}}, include=["metadatas"])
            found.update(m[IMAGE_KEY] for m in res["metadatas"])
        return found

    def scan(self, page: int = 10_000) -> list[StoredPart] | None:
        """Every stored part without its vector (None when the KB never held a document)."""
        col = self.collection()
        if col is None:
            return None
        out: list[StoredPart] = []
        offset = 0
        while True:
            res = col.get(include=["metadatas", "documents"], limit=page, offset=offset)
            out.extend(_part(m, d, None) for m, d in zip(res["metadatas"], res["documents"]))
            if len(res["ids"]) < page:
                return out
            offset += page

    def count(self) -> int:
        col = self.collection()
        return 0 if col is None else col.count()


def _part(meta: dict, document: str | None, vector) -> StoredPart:
    kind = meta.get(KIND_KEY)
    return StoredPart(doc_id=meta[DOC_KEY], index=int(meta[INDEX_KEY]), kind=kind,
                      text=document if kind == "text" else None, image=meta.get(IMAGE_KEY),
                      source_path=meta.get(SOURCE_PATH_KEY),
                      vector=None if vector is None else np.asarray(vector, dtype=np.float32))


def pack_parts(part_vectors: Sequence[np.ndarray | None], dim: int) -> dict[str, np.ndarray]:
    """A batch's part vectors (None for a plain record) as two arrays for the journal's vectors
    file: ``part_vectors`` (all parts, concatenated) and ``part_counts`` (parts per record)."""
    counts = np.array([0 if v is None else len(v) for v in part_vectors], dtype=np.int64)
    present = [np.asarray(v, np.float32) for v in part_vectors if v is not None and len(v)]
    flat = np.concatenate(present) if present else np.zeros((0, dim), np.float32)
    return {"part_vectors": flat, "part_counts": counts}
