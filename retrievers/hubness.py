"""Hubness reduction at query time (QB-Norm, DBNorm), and the full-gallery vectors exact scoring uses.

In CLIP-like spaces a few gallery items (hubs) are the nearest neighbour of many queries. Both
methods divide ``exp(beta * s(q, g))`` by how strongly a bank of other vectors pulls g. We score in
the log form, rank-equivalent to the papers' products of softmaxes and stable (logsumexp):

- QB-Norm (Bogolin et al., CVPR 2022; code ``ioanacroi/qb-norm``, ``dynamic_inverted_softmax.py``),
  inverted softmax (IS, Smith et al. 2017) with a query bank B_q of the query's modality:
  ``IS(q, g) = beta * s(q, g) - log Z_q(g)``, ``log Z_q(g) = logsumexp_{b in B_q}(beta * s(b, g))``.
  **Dynamic** IS (the paper's method, the default here): the activation set A is the gallery items
  that are the top-1 of some bank query (k=1). As in the reference ``qb_norm``
  (``get_index_to_normalize``), the gate is per *query*: a query whose raw top-1 item is in A gets
  IS scores for every gallery item; any other query keeps its raw cosine similarities, unchanged.
  ``beta = 20`` is the reference code's default.
- DBNorm / dual inverted softmax ("Balance Act", Wang, Jian, Xue, EMNLP 2023; code
  ``yimuwangcs/Better_Cross_Modal_Retrieval/DBNorm/dbnorm.py``): the product of an IS over the query
  bank (temperature ``beta1 = 1/1.99``) and one over a gallery bank B_g of the gallery's modality
  (``beta2 = 3``), the released defaults:
  ``s'(q, g) = (beta1 + beta2) * s(q, g) - log Z_q(g) - log Z_g(g)``.
  The released ``db_norm`` feeds the gallery-bank matrix where the test matrix belongs; this is the
  formula of the paper, not that line. Its default is the static DualIS
  (``dynamic_normalized=False``). The dynamic form (DualDIS, ``hubness_dynamic=True``) gates each
  factor as QB-Norm does, with its own bank's activation set. Adaptation: a gated-off factor keeps
  its numerator ``beta * s`` and drops only ``log Z``. The reference multiplies by the raw cosine
  there, which does not define a ranking once cosines can be negative. When no factor is on, the
  raw cosine is kept, as in QB-Norm.

Adaptations, both forced by the banks being sampled from the knowledge base itself (the papers
use training queries and images disjoint from the test gallery):

- a gallery item's own record is left out of its ``Z`` (otherwise its own caption or image, at
  cosine ~1, would punish it for being in the sample);
- and out of the activation set (a bank image's own top-1 would always be itself).

Scope (``scoring_scope``): the papers normalise every gallery item. ``"gallery"`` does the same,
exactly. It scores the query against every stored vector of the gallery collection, which is
fetched once per KB revision (:class:`GalleryCache`), with ``log Z`` and A per gallery item
precomputed and cached.

- Cost: one bank x gallery pass per revision and temperature (2048 x 2*10^8 dot products at 10^5
  records). Measured at 20k 512-d records on 2 cores: 1.4 s to fetch the vectors and 1.4 s per
  bank, then about 5 ms per query.
- ``"candidates"`` rescores only a channel's ANN candidates, as before, and finds A with one
  ANN queries of the bank. That is a poor approximation: on a 2000-record tiny-CLIP KB, 50
  candidates share 40% of exact QB-Norm's top-10 (DBNorm: 73%). Reaching 95% takes 1600
  candidates for QB-Norm and 200 for DBNorm.
- ``"auto"`` (the default) is exact up to :data:`EXACT_GALLERY_MAX_RECORDS` records.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from .kb import KnowledgeBase
    from .kb.store import VectorStore

METHODS = ("qbnorm", "dbnorm")
SCOPES = ("auto", "gallery", "candidates")
# Exact scoring keeps every vector of a collection in memory: 10^5 x 512-d float32 is 200 MB per
# collection, and one query against it is a 5*10^7-flop matvec (milliseconds). Above this, "auto"
# falls back to rescoring the ANN candidates.
EXACT_GALLERY_MAX_RECORDS = 100_000
QBNORM_BETA = 20.0  # qb-norm dynamic_inverted_softmax.py: --beta default 20
DBNORM_BETA_QUERY = 1 / 1.99  # dbnorm.py db_norm(beta1=1 / 1.99): the query-bank IS
DBNORM_BETA_GALLERY = 3.0  # dbnorm.py db_norm(beta2=3): the gallery-bank IS
_FILE = "hubness-banks.npz"
_CHUNK = 4096  # gallery rows per bank x gallery block: 4096 x 2048 float64 logits = 64 MB
Modality = Literal["text", "image"]


class HubnessBanks:
    """Text and image vectors sampled once from a KB and stored beside it."""

    def __init__(self, ids: dict[str, np.ndarray], vectors: dict[str, np.ndarray], meta: dict):
        self.ids = ids  # modality -> (B,) record ids
        self.vectors = vectors  # modality -> (B, d) unit vectors
        self.meta = meta
        # statistics derived from these banks are cached under this token, never under id(self),
        # which a later object may reuse
        self.token = uuid.uuid4().hex

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


# ---------------------------------------------------------------------------- full gallery
@dataclass(frozen=True)
class StoredVectors:
    """Every record of one collection: ``ids`` (N,), ``vecs`` (N, d) float32, ``row`` id -> index.

    What is computed from a snapshot (per-item hubness statistics) is cached on the snapshot itself
    (:meth:`cached`), so it can never be paired with another snapshot of another size: a write
    between two fetches made exactly that happen under a concurrent writer."""

    ids: np.ndarray
    vecs: np.ndarray
    row: dict[str, int]
    _derived: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._derived:
                self._derived[key] = build()
            return self._derived[key]


class GalleryCache:
    """Every stored vector of a KB's collections, and what is derived from them, per KB revision.

    Used only by exact (full-gallery) scoring: hubness normalisation and WeiMoCIR. Plain channels
    never touch it. Any write changes ``kb.revision`` (before and after the change), so an entry is
    never served once a write has completed. An entry built while the revision moved is used for
    that call only, not kept.
    """

    def __init__(self, kb: "KnowledgeBase", page: int = 10_000):
        self.kb = kb
        self.page = page
        self._lock = threading.RLock()  # one build at a time; derived builds nest vectors()
        self._revision: str | None = None
        self._data: dict[tuple, Any] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The value cached under ``key`` at the current revision, built now if absent."""
        revision = self.kb.revision
        with self._lock:
            if revision != self._revision:
                self._data, self._revision = {}, revision
            data = self._data
            if key in data:
                return data[key]
            value = build()
            if self.kb.revision == revision:
                data[key] = value
            return value

    def count(self) -> int:
        return self.get(("count",), self.kb.vectors.count)

    def vectors(self, collection: str) -> StoredVectors:
        """All of ``collection`` (``"images"`` or ``"texts"``), paged out of Chroma."""
        return self.get(("vectors", collection), lambda: self._fetch(collection))

    def _fetch(self, collection: str) -> StoredVectors:
        col = self.kb.vectors.collection(collection)
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        offset = 0
        while True:
            res = col.get(include=["embeddings"], limit=self.page, offset=offset)
            ids.extend(res["ids"])
            if len(res["ids"]):
                blocks.append(np.asarray(res["embeddings"], dtype=np.float32))
            if len(res["ids"]) < self.page:
                break
            offset += self.page
        vecs = np.concatenate(blocks) if blocks else np.zeros((0, self.kb.dim), np.float32)
        return StoredVectors(np.asarray(ids), vecs, {rid: i for i, rid in enumerate(ids)})

    def paired(self, collection: str, other: str) -> tuple[StoredVectors, StoredVectors, np.ndarray]:
        """Both collections and, for each record of ``collection``, its row in ``other`` (-1 if
        absent: only while a write is under way, since both are written together), built together
        from one fetch of each so that the three always agree in size."""
        def build() -> tuple[StoredVectors, StoredVectors, np.ndarray]:
            a, b = self.vectors(collection), self.vectors(other)
            rows = np.fromiter((b.row.get(i, -1) for i in a.ids.tolist()), dtype=np.int64, count=len(a.ids))
            return a, b, rows

        return self.get(("paired", collection, other), build)


# ---------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class BankStats:
    """One inverted softmax's statistics for every gallery item: ``log_z`` (N,) and ``active``
    (N,), whether the item is the top-1 of some bank vector (QB-Norm's activation set)."""

    log_z: np.ndarray
    active: np.ndarray


def bank_stats(bank_vecs: np.ndarray, bank_ids: np.ndarray, gallery: StoredVectors, beta: float) -> BankStats:
    """``logsumexp_b(beta * cos(b, g))`` for every gallery item g, and each bank vector's top-1 item,
    leaving out g's own record. Blocked over the gallery so memory stays at _CHUNK x B."""
    n, bsize = len(gallery.ids), len(bank_ids)
    own = np.fromiter((gallery.row.get(b, -1) for b in bank_ids.tolist()), dtype=np.int64, count=bsize)  # (B,)
    log_z = np.empty(n, np.float64)
    best = np.full(bsize, -np.inf)
    best_row = np.full(bsize, -1, np.int64)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        sims = (gallery.vecs[start:stop] @ bank_vecs.T).astype(np.float64)  # (c, B)
        mine = np.flatnonzero((own >= start) & (own < stop))
        sims[own[mine] - start, mine] = -np.inf  # a bank vector's own record
        log_z[start:stop] = _logsumexp(beta * sims)
        top = np.argmax(sims, axis=0)  # (B,) each bank vector's best row in this block
        val = sims[top, np.arange(bsize)]
        better = val > best
        best[better], best_row[better] = val[better], top[better] + start
    active = np.zeros(n, bool)
    active[best_row[best_row >= 0]] = True
    return BankStats(log_z, active)


def ann_activation(store: "VectorStore", collection: str, bank_vecs: np.ndarray, bank_ids: np.ndarray,
                   batch: int = 512) -> frozenset[str]:
    """QB-Norm's activation set from the ANN index (candidates scope): each bank vector's top-1
    record other than its own (hence 2 results), found with batched queries."""
    active: set[str] = set()
    for start in range(0, len(bank_ids), batch):
        res = store.query(collection, bank_vecs[start:start + batch], 2)
        for found, own in zip(res["ids"], bank_ids[start:start + batch].tolist()):
            active.update([r for r in found if r != own][:1])
    return frozenset(active)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise; rows that are all -inf give -inf."""
    m = x.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


@dataclass(frozen=True)
class Normaliser:
    """One channel's hubness normalisation with its settings resolved to the papers' defaults.

    ``factors`` holds one ``(bank modality, temperature)`` per inverted softmax: the query bank for
    QB-Norm; the query bank and the gallery bank for DBNorm.
    """

    method: str
    factors: tuple[tuple[str, float], ...]
    dynamic: bool

    @classmethod
    def resolve(cls, method: str, query: Modality, gallery: Modality, beta: float | None = None,
                gallery_beta: float | None = None, dynamic: bool | None = None) -> "Normaliser":
        """``None`` means the method's reference default (see the module docstring)."""
        if method not in METHODS:
            raise ConfigError(f"`hubness` must be one of {list(METHODS)} or None, got {method!r}.")
        if method == "qbnorm":
            return cls(method, ((query, QBNORM_BETA if beta is None else float(beta)),),
                       True if dynamic is None else dynamic)
        return cls(method, ((query, DBNORM_BETA_QUERY if beta is None else float(beta)),
                            (gallery, DBNORM_BETA_GALLERY if gallery_beta is None else float(gallery_beta))),
                   False if dynamic is None else dynamic)

    def combine(self, raw: np.ndarray, log_z: Sequence[np.ndarray], on: Sequence[bool]) -> np.ndarray:
        """Scores from raw cosines (n,) and each factor's ``log Z`` (n,); ``on`` says which factors
        the dynamic gate let through (all of them when static)."""
        raw = np.asarray(raw, dtype=np.float64)
        if self.dynamic and not any(on):
            return raw  # DIS: a query whose top-1 is no bank query's top-1 keeps its raw scores
        out = np.zeros_like(raw)
        for (_, beta), lz, gate in zip(self.factors, log_z, on):
            out += beta * raw - (lz if gate or not self.dynamic else 0.0)
        return out

    def gallery_scores(self, raw: np.ndarray, stats: Sequence[BankStats]) -> np.ndarray:
        """Exact scope: every gallery item (``raw`` (N,) cosines, ``stats`` one per factor)."""
        if not len(raw):
            return np.asarray(raw, dtype=np.float64)
        top1 = int(np.argmax(raw))
        return self.combine(raw, [st.log_z for st in stats], [bool(st.active[top1]) for st in stats])

    def candidate_scores(self, raw: np.ndarray, cand_ids: Sequence[str], cand_vecs: np.ndarray, banks: HubnessBanks,
                         on: Sequence[bool]) -> np.ndarray:
        """Candidates scope: ``log Z`` computed for the candidates only."""
        log_z = [_candidate_log_z(banks.vectors[m], banks.ids[m], cand_vecs, cand_ids, beta) for m, beta in self.factors]
        return self.combine(raw, log_z, on)


def _candidate_log_z(bank_vecs: np.ndarray, bank_ids: np.ndarray, cand_vecs: np.ndarray, cand_ids: Sequence[str],
                     beta: float) -> np.ndarray:
    """``logsumexp_b(beta * cos(b, g))`` per candidate g, leaving out g's own record."""
    logits = beta * (cand_vecs @ bank_vecs.T).astype(np.float64)  # (n, B)
    logits[np.asarray(cand_ids)[:, None] == bank_ids[None, :]] = -np.inf
    return _logsumexp(logits)
