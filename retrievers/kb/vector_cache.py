"""A KB's cache of rerank-model image vectors: each image is embedded by a reranker's model once.

A dual-encoder reranker re-embeds every candidate's image with its (larger) model on every query;
with this cache a candidate seen before costs a file read. Layout, in the KB folder::

    vector-cache/<model key>/model.json          what the key was made from (for people)
    vector-cache/<model key>/ab/<sha256>.safetensors   one float32 vector: that image, that model
    vector-cache/.tmp/                           writes in flight (renamed into place)

**Keys.** An entry is keyed by (model key, the image's sha256). The image store is content-addressed
(``images/ab/<sha256>.<ext>``), so a record's image path names its bytes, and a vector depends only
on the model and those bytes. Invalidation on update is by construction: a record updated with a
new image points at a new sha and never reads the old image's vector; the old one is dropped when
its image is released. The model key is a hash of everything the vector depends on besides the
image: the model id, its revision (Hub) or its files' sizes and modification times (a local
directory, e.g. one retrained in place), dim, dtype, device type (and GPU name), the torch,
transformers and mmrag versions (preprocessing and kernels change between them) and
:data:`CACHE_FORMAT`. A vector read back is bit-equal to the float32 vector that was embedded (the
embedding itself moves in the last bits with the batch an image is embedded in, as a reranker's
``batch_size`` does: about 1e-8 here).

**Writers.** Entries are written at query time by readers, several processes at once, without the
KB's writer lock and never holding any lock while embedding: each file goes to a temporary name
(``.tmp/<sha>.<pid>.<uuid>.tmp``) and is renamed into place, so a reader sees a whole file or
none; two readers caching the same image write identical content and either rename wins. No
fsync (a query should not wait on the disk): each file carries a CRC32 of its vector, and a file
that does not parse, or does not check, is ignored with a warning and rewritten.

**Deletion and kills.** When the journal releases an image no record uses (``Journal.release``),
that sha's entries of every model go with it, inside the journaled operation, so a writer killed
there has them dropped again by the replay. An entry a reader writes while the image is being
deleted is left behind: harmless (it is still the right vector for those bytes, should they come
back) and listed by ``kb.verify()`` as ``orphan_cached_vectors``; ``kb.prune_vector_cache()``
drops such entries. Temporary files of killed writers are listed by ``journal.temp_files`` once
they are :data:`STALE_TMP_S` old, so the next repair (under the writer lock) removes them but never
the file of a live writer; a writer whose temporary file was removed anyway just does not cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_tensors

from .store import ImageStore

logger = logging.getLogger(__name__)

VECTOR_CACHE_DIR = "vector-cache"
CACHE_FORMAT = 1  # bump when mmrag's image preprocessing (records.open_image) changes what a vector is
STALE_TMP_S = 60.0  # a write takes milliseconds: a temporary file this old belongs to a killed writer
_TMP_DIR = ".tmp"
_TMP_SUFFIX = ".tmp"
_SUFFIX = ".safetensors"
_TENSOR = "vector"
_SHA = re.compile(r"[0-9a-f]{64}")
# errors after which this process stops trying to write (a read-only KB): one warning, not one per query
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def encoder_identity(encoder) -> dict[str, Any]:
    """What a :class:`~mmrag.retrievers.encoders.DualEncoder`'s image vectors depend on, besides
    the image (loads the model)."""
    import torch
    import transformers

    from mmrag import __version__

    model = encoder.model
    device = torch.device(encoder.device)
    return {
        "format": CACHE_FORMAT,
        "encoder": type(encoder).__name__,
        "model_class": type(model).__name__,
        "model_id": encoder.model_id,
        "revision": getattr(model.config, "_commit_hash", None),
        "files": _fingerprint(encoder.model_id),
        "dim": encoder.dim,
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mmrag": __version__,
    }


def model_key(identity: dict[str, Any]) -> str:
    """``<model name>-<16 hex digits of the identity's sha256>``: a folder name that changes with
    any part of the identity."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(identity["model_id"])).name)[:48].strip("._") or "model"
    return f"{name}-{digest}"


def _fingerprint(model_id: str) -> list[list] | None:
    """``[name, size, mtime_ns]`` of a local model directory's files (None for a Hub id): cheap,
    and it changes when the model is re-saved in place (a retrained toy model)."""
    try:
        entries = sorted(os.scandir(model_id), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [[e.name, st.st_size, st.st_mtime_ns] for e in entries if e.is_file() for st in (e.stat(),)]


class ImageVectorCache:
    """One model's cached image vectors in one KB (see the module docstring). Get one with
    :meth:`KnowledgeBase.vector_cache`.

    Args:
        root: the KB's cache folder (``<kb>/vector-cache``).
        images: the KB's image store: only images stored there (by content) are cached.
        encoder: the model whose vectors these are (loaded here, for its identity).
    """

    def __init__(self, root: Path, images: ImageStore, encoder):
        self.root = Path(root)
        self.images = images
        self.identity = encoder_identity(encoder)
        self.key = model_key(self.identity)
        self.dim = int(self.identity["dim"])
        self.folder = self.root / self.key
        self._writable = True

    def __repr__(self) -> str:
        return f"ImageVectorCache({str(self.folder)!r})"

    def sha_of(self, image: Any) -> str | None:
        """The sha256 of ``image`` (a record's image) when it is a file of this KB's image store,
        else None (a PIL image, bytes, a file elsewhere: not cached)."""
        if not isinstance(image, (str, os.PathLike)):
            return None
        rel = os.path.relpath(os.fspath(image), self.images.root)
        if not self.images.is_safe(rel):
            return None
        return os.path.basename(rel).split(".", 1)[0]

    def path(self, sha: str) -> Path:
        return self.folder / sha[:2] / f"{sha}{_SUFFIX}"

    # ------------------------------------------------------------------ reading
    def get(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """``{sha: (dim,) float32}`` for the shas cached; a missing entry is absent, and so is an
        unreadable or corrupt one (logged: the caller embeds the image and :meth:`put` rewrites it)."""
        out: dict[str, np.ndarray] = {}
        for sha in dict.fromkeys(shas):
            vector = self._read(sha)
            if vector is not None:
                out[sha] = vector
        return out

    def _read(self, sha: str) -> np.ndarray | None:
        p = self.path(sha)
        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
                vector = f.get_tensor(_TENSOR)
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError, ValueError) as e:
            logger.warning("Ignored the cached image vector %s (%s: %s); it is embedded again and rewritten.",
                           p, type(e).__name__, e)
            return None
        problem = None
        if meta.get("sha256") != sha or meta.get("model") != self.key:
            problem = f"it is labelled {meta.get('model')!r}/{meta.get('sha256')!r}"
        elif vector.dtype != np.float32 or vector.shape != (self.dim,):
            problem = f"it holds {vector.dtype} {vector.shape}, not float32 ({self.dim},)"
        elif meta.get("crc32") != str(zlib.crc32(vector.tobytes())):
            problem = "its vector does not match its CRC32 (a torn or damaged file)"
        if problem is not None:
            logger.warning("Ignored the cached image vector %s: %s; it is embedded again and rewritten.", p, problem)
            return None
        return vector

    # ------------------------------------------------------------------ writing (by readers, no lock)
    def put(self, vectors: dict[str, np.ndarray]) -> int:
        """Cache ``{sha: (dim,) vector}``; returns how many were written. Never raises for the
        file system: a failed write is logged and the image is embedded again next time."""
        if not self._writable or not vectors:
            return 0
        written = 0
        try:
            # folders made on every write (a syscall next to an embedding): the cache may be deleted meanwhile
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "model.json").exists():
                self._write(self.folder / "model.json", json.dumps(self.identity, indent=2).encode("utf-8"))
            for sha, vector in vectors.items():
                if not _SHA.fullmatch(sha):
                    raise ValueError(f"`vectors` keys must be sha256 hex digests, got {sha!r}.")
                vector = np.ascontiguousarray(vector, dtype=np.float32)
                if vector.shape != (self.dim,):
                    raise ValueError(f"`vectors[{sha!r}]` has shape {vector.shape}; this cache holds ({self.dim},).")
                data = save_tensors({_TENSOR: vector}, metadata={
                    "sha256": sha, "model": self.key, "crc32": str(zlib.crc32(vector.tobytes()))})
                target = self.path(sha)
                target.parent.mkdir(exist_ok=True)
                self._write(target, data)
                written += 1
        except OSError as e:
            if e.errno in _UNWRITABLE:
                self._writable = False
            logger.warning("Could not cache image vectors in %s (%s: %s); %s", self.folder, type(e).__name__, e,
                           "caching is off for this process." if not self._writable else
                           "the images are embedded again next time.")
        return written

    def _write(self, target: Path, data: bytes) -> None:
        tmp_dir = self.root / _TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        # pid and uuid: writers in several processes (and threads) never share a temporary file
        tmp = tmp_dir / f"{target.stem}.{os.getpid()}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------- KB-wide (every model)
def model_folders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name != _TMP_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return []


def drop(root: Path, shas: Iterable[str]) -> int:
    """Delete the cached vectors of ``shas`` for every model (idempotent); returns how many."""
    folders = model_folders(root)
    dropped = 0
    for sha in shas:
        for folder in folders:
            try:
                (folder / sha[:2] / f"{sha}{_SUFFIX}").unlink()
                dropped += 1
            except FileNotFoundError:
                pass
    return dropped


def sha_of_relpath(relpath: str) -> str:
    """The sha256 in an image store path (``ab/<sha256>.<ext>``, checked by the caller)."""
    return relpath.rsplit("/", 1)[-1].split(".", 1)[0]


def entries(root: Path) -> dict[str, set[str]]:
    """``{model key: shas cached}`` over every model."""
    out: dict[str, set[str]] = {}
    for folder in model_folders(root):
        out[folder.name] = {p.name[: -len(_SUFFIX)] for p in folder.glob(f"*/*{_SUFFIX}")}
    return out


def stale_temp_files(root: Path, older_than: float = STALE_TMP_S) -> list[Path]:
    """Temporary files of writes that are not in flight: at least ``older_than`` seconds old."""
    try:
        found = list((Path(root) / _TMP_DIR).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    limit = time.time() - older_than
    stale = []
    for p in found:
        try:
            if p.stat().st_mtime <= limit:
                stale.append(p)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
    return stale

