"""Storage under a knowledge base: the content-addressed image store and the two Chroma collections.

The knowledge base (``knowledge_base.py``) orchestrates these two with a journal so that a write
killed at any moment can be completed or undone on the next open; this module only knows how to
put, get and delete.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np

from ..errors import ConfigError, KnowledgeBaseError
from .records import Record

# System metadata keys. User metadata keys may not start with this prefix.
RESERVED_PREFIX = "mmrag_"
IMAGE_KEY = "mmrag_image"  # image path relative to the KB folder
SHA_KEY = "mmrag_sha256"
SOURCE_KEY = "mmrag_source"
SOURCE_PATH_KEY = "mmrag_source_path"  # where in its source the item came from (Record.source_path)
JSON_KEYS = "mmrag_json"  # JSON list of user keys whose values were JSON-encoded
_SCALARS = (str, int, float, bool)
# Chroma's ef_search of 100 gives recall@10 of ~0.86 on 20k 512-d vectors of intrinsic dimension 64;
# 400 gives 0.996 for +1 ms per query (measured here, see benchmarks/retrieval.py). Fixed at creation.
DEFAULT_HNSW = {"ef_search": 400}
HNSW_KEYS = ("ef_search", "ef_construction", "max_neighbors")


# ---------------------------------------------------------------------------- image store
class ImageStore:
    """Images stored once per content: ``<root>/ab/abcdef....jpg`` where ``abcdef...`` is the sha256.

    Writes go to a temporary file and are renamed into place, so a reader (or a killed writer) never
    sees a half-written image under its final name.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._tmp = self.root / ".tmp"
        self._made: set[str] = set()  # folders known to exist (saves a syscall per image)

    def relpath(self, sha256: str, ext: str) -> str:
        return f"{sha256[:2]}/{sha256}{ext}"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def put(self, data: bytes, sha256: str, ext: str) -> str:
        """Store ``data`` (idempotent) and return its path relative to the store root."""
        rel = self.relpath(sha256, ext)
        final = os.path.join(self.root, rel)
        if os.path.exists(final):
            return rel
        folder = os.path.dirname(final)
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            os.makedirs(self._tmp, exist_ok=True)
            self._made.add(folder)
        tmp = os.path.join(self._tmp, uuid.uuid4().hex + ext)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return rel

    def delete(self, relpath: str) -> bool:
        try:
            (self.root / relpath).unlink()
            return True
        except FileNotFoundError:
            return False

    def __iter__(self) -> Iterator[str]:
        """Relative paths of every stored image."""
        if not self.root.exists():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and sub.name != self._tmp.name:
                for f in sorted(sub.iterdir()):
                    yield f"{sub.name}/{f.name}"

    def clear_tmp(self) -> int:
        """Remove temporary files a killed writer left behind."""
        n = 0
        if self._tmp.exists():
            for f in self._tmp.iterdir():
                f.unlink(missing_ok=True)
                n += 1
        return n


# ---------------------------------------------------------------------------- metadata codec
def encode_metadata(user: dict[str, Any], *, image: str, sha256: str, source: str,
                    source_path: str | None = None) -> dict[str, Any]:
    """Flatten user metadata for Chroma: scalars stay as they are (so ``where`` filters work on
    them); ``None``, lists and dicts are JSON-encoded and listed under ``mmrag_json`` so that
    :func:`decode_metadata` gives back exactly what the user stored. ``source_path`` is kept under
    a system key (absent when None: Chroma stores no None), apart from the user's keys."""
    meta: dict[str, Any] = {IMAGE_KEY: image, SHA_KEY: sha256, SOURCE_KEY: source}
    if source_path is not None:
        if not isinstance(source_path, str) or not source_path:
            raise ValueError(f"`source_path` must be a non-empty string or None, got {source_path!r}")
        meta[SOURCE_PATH_KEY] = source_path
    encoded = []
    for key, value in user.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r} uses the reserved prefix {RESERVED_PREFIX!r}; rename it")
        if isinstance(value, _SCALARS) and not (isinstance(value, float) and not np.isfinite(value)):
            meta[key] = value
        else:
            try:
                meta[key] = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata value of {key!r} is not JSON-serialisable ({e})") from None
            encoded.append(key)
    if encoded:
        meta[JSON_KEYS] = json.dumps(encoded)
    return meta


def decode_metadata(meta: dict[str, Any] | None) -> dict[str, Any]:
    """User metadata back from a Chroma metadata dict (system keys removed)."""
    meta = dict(meta or {})
    encoded = json.loads(meta.pop(JSON_KEYS, "[]"))
    user = {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX)}
    for k in encoded:
        user[k] = json.loads(user[k])
    return user


def decode_record(record_id: str, meta: dict[str, Any], document: str, images: ImageStore) -> Record:
    """A stored record (Chroma metadata and document) as the :class:`Record` users see: the image
    as its absolute path in ``images``, user metadata, and the system keys users read
    (``source_path``). Every reader of the collections builds its records here."""
    return Record(id=record_id, text=document, image=str(images.path(meta[IMAGE_KEY])),
                  metadata=decode_metadata(meta), source_path=meta.get(SOURCE_PATH_KEY))


# ---------------------------------------------------------------------------- chroma
def make_client(chroma_path: str | os.PathLike | None = None, url: str | None = None):
    """An embedded ``PersistentClient`` at ``chroma_path``, or an ``HttpClient`` for ``url``."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if url is None:
        Path(chroma_path).mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(chroma_path), settings=settings)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"`url` must look like 'http://127.0.0.1:8000', got {url!r}.")
    port = parsed.port or (443 if parsed.scheme == "https" else 8000)
    try:
        client = chromadb.HttpClient(host=parsed.hostname, port=port, ssl=parsed.scheme == "https", settings=settings)
        client.heartbeat()
    except Exception as e:  # chromadb raises assorted connection errors
        raise KnowledgeBaseError(
            f"Cannot reach the Chroma server at {url!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Start one with `chroma run --host 127.0.0.1 --port PORT --path DIR`, or drop `url` for embedded mode."
        ) from e
    return client


class VectorStore:
    """Two Chroma collections sharing record ids: image vectors and text vectors (cosine space).

    Both carry the same metadata and the record text as the document, so a filter or a ``get``
    works on either.
    """

    def __init__(self, client, names: dict[str, str], *, create: bool, collection_metadata: dict | None = None,
                 hnsw: dict | None = None):
        self.client = client
        self.names = dict(names)
        kwargs: dict[str, Any] = dict(embedding_function=None)  # never let Chroma load its default model
        if create:
            # Chroma's default space is l2; our vectors are unit-normalised and scored by cosine.
            config = {"hnsw": {**DEFAULT_HNSW, **(hnsw or {}), "space": "cosine"}}
            get = lambda name: client.get_or_create_collection(
                name, configuration=config, metadata=collection_metadata, **kwargs
            )
        else:
            get = lambda name: client.get_collection(name, **kwargs)
        try:
            self.images = get(names["images"])
            self.texts = get(names["texts"])
        except Exception as e:
            raise KnowledgeBaseError(
                f"The Chroma collections {sorted(names.values())} are missing or unreadable ({type(e).__name__}: {e})."
            ) from e
        self.max_batch = int(client.get_max_batch_size())

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.max_batch):
            yield slice(start, min(n, start + self.max_batch))

    def write(
        self,
        ids: Sequence[str],
        image_vectors: np.ndarray,
        text_vectors: np.ndarray,
        metadatas: Sequence[dict],
        documents: Sequence[str],
        *,
        upsert: bool = True,
    ) -> None:
        """Write records to both collections. ``upsert=False`` uses the faster ``add``, which
        Chroma turns into a silent no-op for ids already present: only for ids known to be new."""
        for s in self._chunks(len(ids)):
            for col, vecs in ((self.images, image_vectors), (self.texts, text_vectors)):
                op = col.upsert if upsert else col.add
                op(ids=list(ids[s]), embeddings=vecs[s], metadatas=list(metadatas[s]), documents=list(documents[s]))

    def delete(self, ids: Sequence[str]) -> None:
        for s in self._chunks(len(ids)):
            self.images.delete(ids=list(ids[s]))
            self.texts.delete(ids=list(ids[s]))

    def get(self, ids: Sequence[str], include: Iterable[str] = ("metadatas", "documents")) -> dict[str, tuple]:
        """``{id: (metadata, document)}`` for the ids present in the text collection."""
        found: dict[str, tuple] = {}
        for s in self._chunks(len(ids)):
            res = self.texts.get(ids=list(ids[s]), include=list(include))
            metas = res.get("metadatas") or [None] * len(res["ids"])
            docs = res.get("documents") or [None] * len(res["ids"])
            for i, m, d in zip(res["ids"], metas, docs):
                found[i] = (m, d)
        return found

    def referenced_shas(self, shas: Iterable[str]) -> set[str]:
        """The subset of ``shas`` that some record in either collection still points to."""
        shas = sorted(set(shas))
        found: set[str] = set()
        for s in self._chunks(len(shas)):
            for col in (self.images, self.texts):
                res = col.get(where={SHA_KEY: {"$in": shas[s]}}, include=["metadatas"])
                found.update(m[SHA_KEY] for m in res["metadatas"])
        return found

    def all_ids(self, which: str = "texts", page: int = 10_000) -> list[str]:
        col = self.texts if which == "texts" else self.images
        out: list[str] = []
        offset = 0
        while True:
            res = col.get(include=[], limit=page, offset=offset)
            out.extend(res["ids"])
            if len(res["ids"]) < page:
                return out
            offset += page

    def count(self) -> int:
        return self.texts.count()
