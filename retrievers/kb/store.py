"""Storage under a knowledge base: the content-addressed image store and the two Chroma collections.

The knowledge base (``knowledge_base.py``) orchestrates these two with a journal so that a write
killed at any moment can be completed or undone on the next open; this module only knows how to
put, get and delete.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
from chromadb.errors import BatchSizeExceededError, DuplicateIDError, InvalidArgumentError, InvalidDimensionException

from ..errors import ConfigError, KnowledgeBaseError, UnsafePathError
from .records import Record

# System metadata keys. User metadata keys may not start with this prefix.
RESERVED_PREFIX = "mmrag_"
IMAGE_KEY = "mmrag_image"  # image path relative to the KB folder
SHA_KEY = "mmrag_sha256"
SOURCE_KEY = "mmrag_source"
SOURCE_PATH_KEY = "mmrag_source_path"  # where in its source the item came from (Record.source_path)
JSON_KEYS = "mmrag_json"  # JSON list of user keys whose values were JSON-encoded
_SCALARS = (str, int, float, bool)
# Chroma stores ints as int64: a bigger one comes back as a float (2**63 -> 9.223372036854776e18).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Chroma 1.5 refuses keys that are empty or start with "$" or "#" (its operator and reserved
# prefixes; measured: InvalidArgumentError "Invalid metadata at index i", which fails the whole
# batch), and the key "chroma:document" (its full-text index of the document).
_CHROMA_KEY_PREFIXES = ("$", "#")
_CHROMA_KEYS = ("chroma:document",)
# What Chroma raises for a write whose content it refuses (the same content is refused again on
# every retry); anything else (a lost connection, a full disk) may pass and is retried instead.
WRITE_REFUSALS = (InvalidArgumentError, DuplicateIDError, BatchSizeExceededError, InvalidDimensionException,
                  ValueError, TypeError)
# The only relative paths an image store hands out: ``ab/ab<62 more hex>.<ext>``.
_RELPATH = re.compile(r"([0-9a-f]{2})/\1[0-9a-f]{62}\.[a-z0-9]{1,8}")
# Chroma's ef_search of 100 gives recall@10 of ~0.86 on 20k 512-d vectors of intrinsic dimension 64;
# 400 gives 0.996 for +1 ms per query (measured here, see benchmarks/retrieval.py). What every collection
# mmrag makes starts with; a KB raises its records' ef_search as it grows (hnsw.py).
DEFAULT_HNSW = {"ef_search": 400}
# The record collections' graph: max_neighbors 32 (Chroma's default is 16) gives recall@10 0.999 at 100k
# records with ef_search 800, where 16 needs 1600 for 0.998, at 1.07x the query time of 32's; at 400,
# 32 gives 0.989-0.997 and 16 0.93. +5% on disk, inserts 1.16x (benchmarks/hnsw_curve.py). Fixed at
# creation; ef_search is raised with the KB's size (hnsw.py).
RECORD_HNSW = {**DEFAULT_HNSW, "max_neighbors": 32}
HNSW_KEYS = ("ef_search", "ef_construction", "max_neighbors")


# ---------------------------------------------------------------------------- image store
class ImageStore:
    """Images stored once per content: ``<root>/ab/abcdef....jpg`` where ``abcdef...`` is the sha256.

    Writes go to a temporary file and are renamed into place, so a reader (or a killed writer) never
    sees a half-written image under its final name.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tmp = self.root / ".tmp"  # where writes go before their rename (cleaned under the writer lock)
        self._made: set[str] = set()  # folders known to exist (saves a syscall per image)
        self._resolved_root: tuple[tuple[int, int], str] | None = None  # ((st_dev, st_ino), realpath) of the root

    @staticmethod
    def relpath(sha256: str, ext: str) -> str:
        """Where an image of this content lives in any store (the same in every KB)."""
        return f"{sha256[:2]}/{sha256}{ext}"

    def is_safe(self, relpath: Any) -> bool:
        """Whether ``relpath`` names a file of this store: ``ab/<sha256>.<ext>`` and, symlinks
        followed, inside the root. Paths come back from Chroma metadata, which anyone who can
        write to a shared server can set (``"../../x"``, ``"/etc/x"``): each is checked before use."""
        if not isinstance(relpath, str) or not _RELPATH.fullmatch(relpath):
            return False
        # retrieve() checks every hit: resolving the whole path each time cost ~0.1 ms (an lstat per
        # component). The root's realpath is kept while the root is the same directory (one stat);
        # below it, a valid path has two components, resolved only when one of them is a link.
        try:
            st = os.stat(self.root)
        except OSError:  # no store (yet): nothing below the root, so no link out of it either
            return True
        if self._resolved_root is None or self._resolved_root[0] != (st.st_dev, st.st_ino):
            self._resolved_root = ((st.st_dev, st.st_ino), os.path.realpath(self.root))
        root = self._resolved_root[1]
        folder = os.path.join(self.root, relpath[:2])
        path = os.path.join(folder, relpath[3:])
        if not os.path.islink(folder) and not os.path.islink(path):
            return True  # the root resolves to `root` and nothing below it is a link
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    def path(self, relpath: str, record_id: str | None = None) -> Path:
        """The absolute path of the stored image ``relpath``; :class:`UnsafePathError` when it
        names anything else (``record_id`` says which record carried it)."""
        if not self.is_safe(relpath):
            whose = f"Record {record_id!r} has" if record_id is not None else "The knowledge base holds"
            raise UnsafePathError(
                f"{whose} the image path {IMAGE_KEY}={relpath!r}, which is not a file of the image store "
                f"{str(self.root)!r} (it must read 'ab/<sha256>.<ext>'): something other than mmrag wrote it to Chroma. "
                "It is neither read nor deleted: `mmrag kb verify` lists such records; delete them "
                "(kb.delete(ids)) and ingest them again."
            )
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
            os.makedirs(self.tmp, exist_ok=True)
            self._made.add(folder)
        tmp = os.path.join(self.tmp, uuid.uuid4().hex + ext)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return rel

    def delete(self, relpath: str) -> bool:
        try:
            self.path(relpath).unlink()  # raises for a path outside the store: never delete those
            return True
        except FileNotFoundError:
            return False

    def __iter__(self) -> Iterator[str]:
        """Relative paths of every stored image."""
        if not self.root.exists():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and sub.name != self.tmp.name:
                for f in sorted(sub.iterdir()):
                    yield f"{sub.name}/{f.name}"


# ---------------------------------------------------------------------------- metadata codec
def encode_metadata(user: dict[str, Any], *, image: str, sha256: str, source: str,
                    source_path: str | None = None) -> dict[str, Any]:
    """Flatten user metadata for Chroma: scalars stay as they are (so ``where`` filters work on
    them); ``None``, lists and dicts are JSON-encoded and listed under ``mmrag_json`` so that
    :func:`decode_metadata` gives back exactly what the user stored. ``source_path`` is kept under
    a system key (absent when None: Chroma stores no None), apart from the user's keys.

    Raises ``ValueError`` (the reason) for anything Chroma would refuse or change: checking here,
    before the write is journaled, keeps one bad item from failing its whole batch (and a refused
    journal from being replayed on every open)."""
    check_text("`source`", source)
    meta: dict[str, Any] = {IMAGE_KEY: image, SHA_KEY: sha256, SOURCE_KEY: source}
    if source_path is not None:
        if not isinstance(source_path, str) or not source_path:
            raise ValueError(f"`source_path` must be a non-empty string or None, got {source_path!r}")
        check_text("`source_path`", source_path)
        meta[SOURCE_PATH_KEY] = source_path
    encoded = []
    for key, value in user.items():
        _check_key(key)
        meta[key], as_json = _encode_value(key, value)
        if as_json:
            encoded.append(key)
    if encoded:
        meta[JSON_KEYS] = json.dumps(encoded)
    return meta


def check_text(what: str, text: str) -> None:
    """Chroma stores UTF-8 only: a lone surrogate (what Python makes of undecodable bytes in a file
    name, ``surrogateescape``) fails the whole batch with UnicodeEncodeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 text (lone surrogate {text[e.start]!r} at position "
                         f"{e.start}, e.g. from a file name that is not UTF-8); Chroma stores UTF-8 only") from None


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
    if key.startswith(RESERVED_PREFIX):
        raise ValueError(f"metadata key {key!r} uses the reserved prefix {RESERVED_PREFIX!r}; rename it")
    if key.startswith(_CHROMA_KEY_PREFIXES) or key in _CHROMA_KEYS:
        raise ValueError(f"metadata key {key!r} is one Chroma refuses (keys may not start with '$' or '#', "
                         f"nor be {' or '.join(map(repr, _CHROMA_KEYS))}); rename it")
    check_text(f"metadata key {key!r}", key)


def _encode_value(key: str, value: Any) -> tuple[Any, bool]:
    """``(what Chroma stores, whether it is JSON-encoded)`` for one user value."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"metadata value of {key!r} is {value}, outside Chroma's int64 range "
                         f"[-2**63, 2**63 - 1] (it would come back as a float); store it as a string")
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"metadata value of {key!r} is {value!r}; Chroma stores finite numbers only "
                         "(use None for a missing value)")
    if isinstance(value, _SCALARS):
        if isinstance(value, str):
            check_text(f"metadata value of {key!r}", value)
        return value, False
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata value of {key!r} is not JSON-serialisable ({e})") from None
    check_text(f"metadata value of {key!r}", text)
    return text, True


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
    return Record(id=record_id, text=document, image=str(images.path(meta.get(IMAGE_KEY), record_id)),
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


# Embedded Chroma read while another process writes the same folder can fail with
# chromadb's InternalError "Error finding id" (measured: 26 of 217 queries with a writer in another
# process): the reader's index lags the files the writer changed. Reads retry a bounded number of
# times (0.05 + 0.1 + 0.2 + 0.4 s), then fail with a typed error that says to use a server, which
# is the supported way to read and write from several processes.
READ_RETRIES = 4
READ_BACKOFF_S = 0.05


class _RetryingReads:
    """A Chroma collection whose reads (``get``, ``query``, ``count``) retry the embedded-mode race
    above; everything else passes through unchanged."""

    def __init__(self, collection):
        self._collection = collection

    def __getattr__(self, name: str):
        return getattr(self._collection, name)

    def get(self, *args, **kwargs):
        return self._read("get", args, kwargs)

    def query(self, *args, **kwargs):
        return self._read("query", args, kwargs)

    def count(self):
        return self._read("count", (), {})

    def _read(self, method: str, args: tuple, kwargs: dict):
        from chromadb.errors import InternalError

        attempt = 0
        while True:
            try:
                return getattr(self._collection, method)(*args, **kwargs)
            except InternalError as e:
                if "error finding id" not in str(e).lower():
                    raise
                if attempt == READ_RETRIES:
                    raise KnowledgeBaseError(
                        f"Reading the collection {self._collection.name!r} failed while another process wrote "
                        f"it ({e}). Embedded Chroma is not safe with a writer in another process: run a Chroma "
                        "server (`chroma run --host 127.0.0.1`) and give its URL (--url) to every process."
                    ) from None
                time.sleep(READ_BACKOFF_S * 2 ** attempt)
                attempt += 1


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
            config = {"hnsw": {**RECORD_HNSW, **(hnsw or {}), "space": "cosine"}}
            get = lambda name: client.get_or_create_collection(
                name, configuration=config, metadata=collection_metadata, **kwargs
            )
        else:
            get = lambda name: client.get_collection(name, **kwargs)
        try:
            self.images = _RetryingReads(get(names["images"]))
            self.texts = _RetryingReads(get(names["texts"]))
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

    def get(self, ids: Sequence[str], include: Iterable[str] = ("metadatas", "documents"),
            which: str = "texts") -> dict[str, tuple]:
        """``{id: (metadata, document)}`` for the ids present in the ``which`` collection."""
        col = self.texts if which == "texts" else self.images
        found: dict[str, tuple] = {}
        for s in self._chunks(len(ids)):
            res = col.get(ids=list(ids[s]), include=list(include))
            metas = res.get("metadatas") or [None] * len(res["ids"])
            docs = res.get("documents") or [None] * len(res["ids"])
            for i, m, d in zip(res["ids"], metas, docs):
                found[i] = (m, d)
        return found

    def make_consistent(self, ids: Sequence[str]) -> list[str]:
        """Delete, from both collections, the ids among ``ids`` whose two halves disagree (in one
        collection only, or with another metadata or document): what a write refused half way
        leaves. The old half of a half-updated record cannot be restored (its vector is
        overwritten), so the record goes; the refused journal keeps the new one. Returns them."""
        images, texts = self.get(ids, which="images"), self.get(ids)
        torn = [i for i in dict.fromkeys(ids) if images.get(i) != texts.get(i)]
        if torn:
            self.delete(torn)
        return torn

    def referenced_paths(self, relpaths: Iterable[str]) -> set[str]:
        """The subset of ``relpaths`` (stored images) that some record in either collection still
        points to."""
        relpaths = sorted(set(relpaths))
        found: set[str] = set()
        for s in self._chunks(len(relpaths)):
            for col in (self.images, self.texts):
                res = col.get(where={IMAGE_KEY: {"$in": relpaths[s]}}, include=["metadatas"])
                found.update(m[IMAGE_KEY] for m in res["metadatas"])
        return found

    def image_paths(self, which: str = "texts", page: int = 10_000) -> dict[str, Any]:
        """``{id: stored image path}`` for every record of the ``which`` collection (None where a
        record has none)."""
        col = self.texts if which == "texts" else self.images
        out: dict[str, Any] = {}
        offset = 0
        while True:
            res = col.get(include=["metadatas"], limit=page, offset=offset)
            out.update((i, (m or {}).get(IMAGE_KEY)) for i, m in zip(res["ids"], res["metadatas"]))
            if len(res["ids"]) < page:
                return out
            offset += page

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

    # The reads retrieval channels make. They go through here, not through the collections, so that
    # a channel never depends on how (or in which store) the vectors are kept.
    def collection(self, which: str):
        """The ``"images"`` or ``"texts"`` collection."""
        if which == "images":
            return self.images
        if which == "texts":
            return self.texts
        raise ValueError(f"unknown collection {which!r}; expected 'images' or 'texts'")

    def query(self, which: str, vectors: Sequence[np.ndarray] | np.ndarray, n: int, where: dict | None = None,
              include: Sequence[str] = ()) -> dict[str, list]:
        """Nearest ``n`` records of ``which`` for each query vector (Chroma's batched result:
        ``ids``, and the fields in ``include``, each a list per query vector). Fewer come back
        when the collection, or the filter, holds fewer."""
        return self.collection(which).query(query_embeddings=vectors, n_results=n, where=where, include=list(include))

    def fetch(self, which: str, ids: Sequence[str],
              include: Sequence[str] = ("embeddings", "metadatas", "documents")) -> dict[str, list]:
        """Chroma's ``get`` of ``ids`` in ``which``; ids not stored are absent from the result."""
        return self.collection(which).get(ids=list(ids), include=list(include))

    def ids_where(self, which: str, where: dict, ids: Sequence[str] | None = None) -> list[str]:
        """The ids of ``which`` (among ``ids`` when given) whose metadata matches ``where``."""
        kwargs = {} if ids is None else {"ids": list(ids)}
        return self.collection(which).get(where=where, include=[], **kwargs)["ids"]
