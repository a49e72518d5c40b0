"""Hubness reduction at query time: QB-Norm and DBNorm with banks sampled from the knowledge base.

In CLIP-like spaces a few items (hubs) are the nearest neighbour of many queries. Both methods
rescale a candidate g by how similar it is to a bank of other vectors (log form, rank-equivalent
to the papers' products of softmaxes):

- QB-Norm (Bogolin et al., CVPR 2022), inverted softmax with a query bank B_q:
  ``s'(q, g) = b * s(q, g) - logsumexp_{b in B_q}(b * s(b, g))``
- DBNorm / dual inverted softmax ("Balance Act", Wang et al., EMNLP 2023), adding a gallery
  bank B_g of the gallery's modality:
  ``s'(q, g) = (b1 + b2) * s(q, g) - logsumexp(b1 * s(B_q, g)) - logsumexp(b2 * s(B_g, g))``

The banks are KB vectors, so a candidate's own record would sit in them (its own caption in the
text bank, its own image in the image bank) and punish it for being in the sample; those terms
are masked out. Only the ANN candidates are rescored (the papers normalise the whole gallery).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from .kb import KnowledgeBase

METHODS = ("qbnorm", "dbnorm")
_FILE = "hubness-banks.npz"
Modality = Literal["text", "image"]


class HubnessBanks:
    """Text and image vectors sampled once from a KB and stored beside it."""

    def __init__(self, ids: dict[str, np.ndarray], vectors: dict[str, np.ndarray], meta: dict):
        self.ids = ids  # modality -> (B,) record ids
        self.vectors = vectors  # modality -> (B, d) unit vectors
        self.meta = meta

    @classmethod
    def build(cls, kb: "KnowledgeBase", size: int = 2048, seed: int = 0) -> "HubnessBanks":
        """Sample ``size`` records (all, if fewer) and store their text and image vectors."""
        if size <= 0:
            raise ConfigError(f"`size` must be a positive integer, got {size!r}.")
        all_ids = sorted(kb.vectors.all_ids())
        if not all_ids:
            raise ConfigError("The knowledge base is empty: ingest records before building hubness banks.")
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(all_ids), size=min(size, len(all_ids)), replace=False).tolist())
        sample = [all_ids[i] for i in chosen]
        ids, vectors = {}, {}
        for modality, col in (("text", kb.vectors.texts), ("image", kb.vectors.images)):
            res = col.get(ids=sample, include=["embeddings"])
            ids[modality] = np.asarray(res["ids"])
            vectors[modality] = np.asarray(res["embeddings"], dtype=np.float32)
        meta = {"size": size, "sampled": len(sample), "seed": seed, "revision": kb.revision}
        tmp = kb.path / f".{_FILE}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:  # then renamed: a killed build never leaves a half-written file
            np.savez(f, text_ids=ids["text"], text_vecs=vectors["text"], image_ids=ids["image"],
                     image_vecs=vectors["image"], meta=np.asarray(json.dumps(meta)))
        os.replace(tmp, kb.path / _FILE)
        return cls(ids, vectors, meta)

    @classmethod
    def load_or_build(cls, kb: "KnowledgeBase", size: int = 2048, seed: int = 0) -> "HubnessBanks":
        """The stored banks; built when absent or sampled with another size or seed. They are a
        sample, so records added later do not make them wrong; refresh them on demand
        (``MultimodalRetriever.refresh_hubness_banks``) after the KB changed a lot."""
        path = kb.path / _FILE
        if not path.exists():
            return cls.build(kb, size, seed)
        with np.load(path, allow_pickle=False) as f:
            ids = {"text": f["text_ids"], "image": f["image_ids"]}
            vectors = {"text": f["text_vecs"], "image": f["image_vecs"]}
            meta = json.loads(str(f["meta"]))
        if (meta.get("size"), meta.get("seed")) != (size, seed):
            return cls.build(kb, size, seed)
        return cls(ids, vectors, meta)


def _log_partition(bank_vecs: np.ndarray, bank_ids: np.ndarray, cand_vecs: np.ndarray,
                   cand_ids: Sequence[str], beta: float) -> np.ndarray:
    """``logsumexp_b(beta * cos(b, g))`` per candidate g, leaving out g's own record."""
    logits = beta * (cand_vecs @ bank_vecs.T)  # (n, B)
    logits[np.asarray(cand_ids)[:, None] == bank_ids[None, :]] = -np.inf
    m = logits.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]


def normalise(method: str, scores: np.ndarray, cand_ids: Sequence[str], cand_vecs: np.ndarray, banks: HubnessBanks,
              query: Modality, gallery: Modality, beta: float = 20.0, gallery_beta: float = 20.0) -> np.ndarray:
    """Rescore candidates of one channel (``query`` modality searching the ``gallery`` one)."""
    if method not in METHODS:
        raise ConfigError(f"`hubness` must be one of {list(METHODS)} or None, got {method!r}.")
    s = np.asarray(scores, dtype=np.float64)
    out = beta * s - _log_partition(banks.vectors[query], banks.ids[query], cand_vecs, cand_ids, beta)
    if method == "dbnorm":
        out += gallery_beta * s - _log_partition(banks.vectors[gallery], banks.ids[gallery], cand_vecs, cand_ids,
                                                 gallery_beta)
    return out
