"""A KB's late-interaction index: every record's token (patch) vectors, and one FDE per record.

- The token vectors live in a sidecar folder of the KB, ``multivector/``, one safetensors file per
  record (``ab/<sha1 of the id>.safetensors``, the id in its header). No pickle; a file is written
  under a temporary name and renamed, so a reader never sees half of one.
- Each record's Fixed Dimensional Encoding (``muvera.py``) is stored in a third Chroma collection
  (inner-product space, the records' metadata alongside so that ``where`` filters work), searched
  by ANN; exact Chamfer (MaxSim) over the token vectors then reranks the candidates.

Both are written by the KB's journal, inside the same journaled ``upsert`` as the record itself
(the token vectors travel in the journal's vectors file), and removed by the same ``delete``, so a
writer killed at any point leaves nothing the next open does not repair (``journal.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..errors import KnowledgeBaseError
from ..muvera import FDEConfig, FDEEncoder
from .store import DEFAULT_HNSW, _RetryingReads

MULTIVECTOR_DIR = "multivector"
TMP_SUFFIX = ".tmp"
_TENSOR = "vectors"


class MultiVectorStore:
    """The token-vector sidecar and the FDE collection of one KB (see the module docstring).

    Args:
        root: the sidecar folder (``<kb>/multivector``).
        client: the KB's Chroma client.
        spec: the manifest's ``late_interaction`` section (``model_id``, ``dim``, ``fde``, ``collection``).
        create: create the collection (a new KB) instead of opening it.
    """

    def __init__(self, root: Path, client, spec: dict[str, Any], *, create: bool,
                 collection_metadata: dict | None = None, hnsw: dict | None = None):
        self.root = Path(root)
        self.spec = spec
        self.dim = int(spec["dim"])
        self.fde = FDEEncoder(FDEConfig.from_dict(spec["fde"]))
        kwargs: dict[str, Any] = dict(embedding_function=None)
        try:
            if create:
                # an FDE's dot product approximates Chamfer similarity: inner-product space, not cosine
                config = {"hnsw": {**DEFAULT_HNSW, **(hnsw or {}), "space": "ip"}}
                col = client.get_or_create_collection(spec["collection"], configuration=config,
                                                      metadata=collection_metadata, **kwargs)
            else:
                col = client.get_collection(spec["collection"], **kwargs)
        except Exception as e:
            raise KnowledgeBaseError(f"The late-interaction collection {spec['collection']!r} is missing or "
                                     f"unreadable ({type(e).__name__}: {e}).") from e
        self.collection = _RetryingReads(col)
        self.max_batch = int(client.get_max_batch_size())

    # ------------------------------------------------------------------ files
    def path(self, record_id: str) -> Path:
        h = hashlib.sha1(record_id.encode("utf-8")).hexdigest()
        return self.root / h[:2] / f"{h}.safetensors"

    def temp_files(self) -> list[Path]:
        """What a killed write left (the caller holds the writer lock)."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob(f"*/*{TMP_SUFFIX}")]

    # ------------------------------------------------------------------ writing (by the journal)
    def write(self, ids: Sequence[str], tokens: Sequence[np.ndarray], metadatas: Sequence[dict],
              documents: Sequence[str]) -> None:
        """Store each record's token vectors, then its FDE. Idempotent (a replay rewrites the same)."""
        for rid, vecs in zip(ids, tokens):
            target = self.path(rid)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}{TMP_SUFFIX}")
            save_file({_TENSOR: np.ascontiguousarray(vecs, dtype=np.float32)}, str(tmp), metadata={"id": rid})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        fdes = self.fde.encode_documents(list(tokens)) if len(ids) else np.zeros((0, self.fde.output_dim))
        for start in range(0, len(ids), self.max_batch):
            s = slice(start, start + self.max_batch)
            self.collection.upsert(ids=list(ids[s]), embeddings=fdes[s], metadatas=list(metadatas[s]),
                                   documents=list(documents[s]))

    def delete(self, ids: Sequence[str]) -> None:
        """Remove records' FDEs, then their token files. Idempotent."""
        ids = list(ids)
        for start in range(0, len(ids), self.max_batch):
            self.collection.delete(ids=ids[start:start + self.max_batch])
        for rid in ids:
            self.path(rid).unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def tokens(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """``{id: (n_tokens, dim) float32}`` for the ids stored (others are absent)."""
        out: dict[str, np.ndarray] = {}
        for rid in ids:
            p = self.path(rid)
            try:
                with safe_open(str(p), framework="numpy") as f:
                    if (f.metadata() or {}).get("id") != rid:
                        raise KnowledgeBaseError(f"The token vectors in {p} belong to another record "
                                                 f"({(f.metadata() or {}).get('id')!r}, not {rid!r}).")
                    out[rid] = f.get_tensor(_TENSOR)
            except FileNotFoundError:
                continue
        return out

    def query(self, fde: np.ndarray, n: int, where: dict | None = None) -> list[tuple[str, float]]:
        """The ``n`` records whose FDE has the largest dot product with ``fde`` (Chroma's ``ip``
        distance is ``1 - <a, b>``)."""
        res = self.collection.query(query_embeddings=[fde], n_results=n, where=where, include=["distances"])
        return [(rid, 1.0 - float(d)) for rid, d in zip(res["ids"][0], res["distances"][0])]

    def ids(self, page: int = 10_000) -> list[str]:
        out: list[str] = []
        offset = 0
        while True:
            res = self.collection.get(include=[], limit=page, offset=offset)
            out.extend(res["ids"])
            if len(res["ids"]) < page:
                return out
            offset += page

    def file_ids(self) -> set[str]:
        """The record ids that have a token file (read from the files' headers)."""
        found: set[str] = set()
        if not self.root.is_dir():
            return found
        for p in self.root.glob("*/*.safetensors"):
            with safe_open(str(p), framework="numpy") as f:
                found.add((f.metadata() or {}).get("id"))
        return found

    def count(self) -> int:
        return self.collection.count()


def pack_tokens(tokens: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Token vectors of a batch as two arrays for the journal's vectors file (no object arrays)."""
    counts = np.array([len(t) for t in tokens], dtype=np.int64)
    dim = tokens[0].shape[1] if len(tokens) else 0
    flat = np.concatenate([np.asarray(t, np.float32) for t in tokens]) if len(tokens) else np.zeros((0, dim), np.float32)
    return {"mv_tokens": flat, "mv_counts": counts}


def unpack_tokens(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
