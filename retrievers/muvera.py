"""Fixed Dimensional Encodings (FDE) for late-interaction (multi-vector) retrieval, after MUVERA.

Dhulipala, Hadian, Jayaram, Lee, Mirrokni: "MUVERA: Multi-Vector Retrieval via Fixed Dimensional
Encodings", arXiv 2405.19504 (reference C++: google/graph-mining,
``sketching/point_cloud/fixed_dimensional_encoding.cc``).

A point cloud (a query's token vectors, a page's patch vectors) becomes ONE vector whose dot product
approximates the Chamfer / MaxSim score ``sum_q max_d <q, d>``; single-vector search then finds
candidates, and exact Chamfer reranks them. Per repetition r = 1..R:

1. SimHash: k_sim Gaussian hyperplanes put each vector in one of B = 2**k_sim buckets (the sign
   bits as a binary number; only equality and Hamming distance of bucket codes matter, so the
   reference's Gray-code labelling is not needed).
2. Inner projection (``d_proj``): ``psi(x) = S x / sqrt(d_proj)``, S uniform +-1, so that
   ``E <psi x, psi y> = <x, y>``. None keeps the vectors as they are (identity).
3. Per bucket: a query SUMS its vectors; a document AVERAGES its vectors and fills an empty bucket
   with the (projected) document vector whose SimHash code is nearest in Hamming distance to the
   bucket (first such vector on ties, as in the reference). The fill makes a query vector in
   bucket b always meet some nearby document vector, so that ``<FDE(q), FDE(d)>`` approximates
   ``sum_q <q, d near q>``; a query's empty buckets stay zero (they hold no query vector to score).
4. The R blocks of B * d_proj numbers are concatenated; an optional final Count Sketch
   (``final_dim``; each coordinate added with a random sign into one random output coordinate, as
   the reference does) shrinks the result, again preserving inner products in expectation.

All random matrices come from one ``np.random.default_rng(seed)``, drawn once, in a fixed order.

Why not a package (the wheels on PyPI were downloaded and read):

- ``fastembed`` 0.9.1, ``fastembed.postprocess.muvera.Muvera``: importing it imports fastembed's
  model base classes, hence onnxruntime, huggingface-hub, loguru, mmh3 (too heavy for a core
  dependency); it encodes one point cloud at a time with a Python loop per vector, and has no final
  projection.
- ``muvera-python`` 0.2.0: numpy only, but "Development Status :: 3 - Alpha", one author, a
  per-platform Rust extension; its inner projection is an AMS sketch (one +-1 per row) rather than
  the paper's dense +-1 matrix; the random matrices of repetition r are seeded ``seed + r`` for both
  the SimHash and the projection (encoders with seeds 0 and 1 share 19 of 20 repetitions); errors
  are bare ValueErrors without a fix; an empty point cloud encodes silently to zeros; the final
  Count Sketch loops in Python per row.

Both would be a dependency for about 150 lines of numpy; this module is those lines, vectorised
over a batch (a loop over repetitions only) and encoded in chunks of documents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmrag.retrievers.errors import ConfigError

__all__ = [
    "DEFAULT_FDE",
    "DEFAULT_RERANK_CANDIDATES",
    "FDEConfig",
    "FDEEncoder",
    "chamfer",
    "chamfer_many",
    "fde_search",
    "synthetic_late_interaction",
]

MAX_K_SIM = 10  # 1024 buckets; more leaves almost every bucket empty for clouds of a few hundred vectors
_CHUNK = 512  # documents encoded (or scored) at once: bounds the (chunk, R * B * d_proj) intermediate


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class FDEConfig:
    """The parameters of an FDE; a stored index records them (``to_dict``) next to its vectors.

    ``dim``: input vector dimension. ``k_sim``: SimHash hyperplanes per repetition (2**k_sim
    buckets). ``r_reps``: repetitions. ``d_proj``: inner random +-1 projection dimension (None:
    identity). ``final_dim``: final Count Sketch dimension (None: none). ``fill_empty``: fill a
    document's empty buckets (the paper does). ``seed``: of every random matrix.
    """

    dim: int
    k_sim: int = 2
    r_reps: int = 32
    d_proj: int | None = 8
    final_dim: int | None = None
    fill_empty: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.dim) or self.dim < 1:
            raise ConfigError(f"`dim` must be a positive integer (the input vectors' dimension), got {self.dim!r}.")
        if not _is_int(self.k_sim) or not 0 <= self.k_sim <= MAX_K_SIM:
            raise ConfigError(f"`k_sim` must be an integer in [0, {MAX_K_SIM}] (2**k_sim buckets per repetition), "
                              f"got {self.k_sim!r}.")
        if not _is_int(self.r_reps) or self.r_reps < 1:
            raise ConfigError(f"`r_reps` must be a positive integer (repetitions), got {self.r_reps!r}.")
        if self.d_proj is not None and (not _is_int(self.d_proj) or not 1 <= self.d_proj <= self.dim):
            raise ConfigError(f"`d_proj` must be None (no inner projection) or an integer in [1, dim={self.dim}], "
                              f"got {self.d_proj!r}.")
        inner = self.r_reps * 2**self.k_sim * (self.dim if self.d_proj is None else self.d_proj)
        if self.final_dim is not None and (not _is_int(self.final_dim) or not 1 <= self.final_dim < inner):
            raise ConfigError(f"`final_dim` must be None (no final projection) or an integer in [1, {inner - 1}] "
                              f"(below r_reps * 2**k_sim * d_proj = {inner}), got {self.final_dim!r}.")
        if not isinstance(self.fill_empty, (bool, np.bool_)):
            raise ConfigError(f"`fill_empty` must be True or False, got {self.fill_empty!r}.")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"`seed` must be a non-negative integer, got {self.seed!r}.")

    @property
    def n_buckets(self) -> int:
        return 2**self.k_sim

    @property
    def proj_dim(self) -> int:
        """Dimension of one bucket's block: ``d_proj``, or ``dim`` without an inner projection."""
        return self.dim if self.d_proj is None else self.d_proj

    @property
    def inner_dim(self) -> int:
        """Dimension before the final projection: ``r_reps * 2**k_sim * proj_dim``."""
        return self.r_reps * self.n_buckets * self.proj_dim

    @property
    def output_dim(self) -> int:
        return self.inner_dim if self.final_dim is None else self.final_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for a manifest; ``FDEConfig.from_dict`` reads it back."""
        def plain(v: Any) -> Any:
            return v if v is None or isinstance(v, bool) else int(v)
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FDEConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict):
            raise ConfigError(f"an FDE config must be a mapping with keys {names}, got {data!r}.")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown FDE config key(s) {unknown}: the valid keys are {names}.")
        if "dim" not in data:
            raise ConfigError(f"the FDE config {data!r} has no `dim`: add the input vectors' dimension.")
        return cls(**data)


# The defaults (the dataclass's, for any `dim`), measured: `synthetic_late_interaction(5000, 100,
# dim=64, seed=s)` (16-64 patches per document, 4-16 query tokens), FDE top-N, exact Chamfer rerank,
# mean recall@10 against brute-force Chamfer top-10, for corpus seeds s = 0 / 1 / 2:
#
#   k_sim r_reps d_proj  FDE dim   N=100            N=200            N=300            N=500
#   2     32     8       1024      .884 .891 .864   .957 .971 .962   .976 .988 .982   .993 .998 .993
#   3     16     8       1024      .883 .900 .863   .954 .966 .945   .974 .983 .972   .995 .991 .990
#   3     16     16      2048      .925 .923  -     .979 .987  -     -    .992  -     -    .998  -
#   3     32     8       2048      .918  -   .911   .979  -   .983   .990  -   .993   .998  -   .999
#   4     16     16      4096      .941  -    -     .992  -    -
#   5     20     16      10240     .962  -    -     .995  -    -      (the paper's ColBERT setting)
#   4 20 16 + final_dim 1024       .846  -    -     .933  -    -      (worse than a native 1024)
#   mean pooling (sum q . mean d)  .671 .677 .634   .788 .803 .767   .849  -   .835   .910  -   .909
#
# Small clouds (16-64 vectors) want few buckets and many repetitions; reranking 300 candidates costs
# far less than scanning a larger FDE, so the 1024-d encoding (4 KiB a document, half of a
# 32 x 64 float32 store) with N = 300 is the default: recall@10 0.976-0.988 at 5,000 documents.
# N has to grow with the corpus: benchmarks/late_interaction.py (32 patches, 8 query tokens)
# measured recall@10 0.947 at 10k documents and 0.807 at 100k with N = 300; 0.953 at 100k with
# N = 1000, 1.000 with N = 3000, still ~0.1x the latency of brute-force Chamfer.
DEFAULT_FDE = FDEConfig(dim=64)
DEFAULT_RERANK_CANDIDATES = 300


class FDEEncoder:
    """Encodes point clouds into FDEs; ``encode_queries(q) @ encode_documents(d).T ~ Chamfer(q, d)``.

    Deterministic: the same config gives the same matrices, hence the same encodings, on any
    machine numpy's ``default_rng`` streams agree on.
    """

    def __init__(self, config: FDEConfig):
        if not isinstance(config, FDEConfig):
            raise ConfigError(f"`config` must be an FDEConfig, got {type(config).__name__}.")
        self.config = c = config
        rng = np.random.default_rng(c.seed)
        # the drawing order is part of the format: SimHash planes, inner projections, Count Sketch
        planes = rng.standard_normal((c.r_reps, c.dim, c.k_sim))  # (R, dim, k)
        # stored transposed and stacked, (R * k, dim): all repetitions in one matmul
        self._planes = planes.transpose(0, 2, 1).reshape(-1, c.dim).astype(np.float32)
        self._proj = None
        if c.d_proj is not None:
            signs = rng.integers(0, 2, (c.r_reps, c.dim, c.d_proj)) * 2 - 1  # (R, dim, d_proj)
            self._proj = (signs / np.sqrt(c.d_proj)).transpose(0, 2, 1).reshape(-1, c.dim).astype(np.float32)
        self._sketch = None
        if c.final_dim is not None:
            target = rng.integers(0, c.final_dim, c.inner_dim)  # (inner,) output coordinate of each input one
            sign = (rng.integers(0, 2, c.inner_dim) * 2 - 1).astype(np.float32)
            order = np.argsort(target, kind="stable")
            sorted_target = target[order]
            starts = np.flatnonzero(np.r_[True, sorted_target[1:] != sorted_target[:-1]])
            self._sketch = (order, sign[order], starts, sorted_target[starts])
        self._bit_values = 1 << np.arange(c.k_sim, dtype=np.int64)  # (k,)
        buckets = np.arange(c.n_buckets)
        self._popcount = np.array([int(b).bit_count() for b in buckets], np.uint8)  # (B,)
        self._buckets = buckets

    def __repr__(self) -> str:
        return f"FDEEncoder({self.config!r})"

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def encode_queries(self, queries: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """``(B, output_dim)`` float32: per bucket SUM of a query's vectors, empty buckets left zero."""
        return self._encode(_as_clouds(queries, "queries", self.config.dim), is_query=True)

    def encode_documents(self, documents: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """``(B, output_dim)`` float32: per bucket AVERAGE of a document's vectors, empty buckets
        filled with the nearest vector by SimHash Hamming distance (when ``fill_empty``)."""
        return self._encode(_as_clouds(documents, "documents", self.config.dim), is_query=False)

    def _encode(self, clouds: list[np.ndarray], *, is_query: bool) -> np.ndarray:
        out = np.empty((len(clouds), self.config.output_dim), np.float32)
        for s in range(0, len(clouds), _CHUNK):
            chunk = clouds[s:s + _CHUNK]
            fde = self._encode_chunk(chunk, is_query).reshape(len(chunk), -1)  # (b, inner)
            out[s:s + len(chunk)] = fde if self._sketch is None else self._count_sketch(fde)
        return out

    def _encode_chunk(self, clouds: list[np.ndarray], is_query: bool) -> np.ndarray:
        """``(b, R, B, p)``: every repetition at once; a "cell" is one (repetition, cloud, bucket)."""
        c = self.config
        nb, reps, n_buckets, p = len(clouds), c.r_reps, c.n_buckets, c.proj_dim
        lengths = np.array([len(x) for x in clouds])
        points_t = np.concatenate(clouds).T  # (dim, N)
        n = points_t.shape[1]
        owner = np.repeat(np.arange(nb), lengths)  # (N,)
        first = np.cumsum(lengths) - lengths  # (b,) index of each cloud's first point
        if self._proj is None:
            proj = np.broadcast_to(points_t, (reps, p, n))  # (R, p, N), identity, no copy
        else:
            proj = (self._proj @ points_t).reshape(reps, p, n)  # (R, p, N), one BLAS call
        bits = (self._planes @ points_t).reshape(reps, c.k_sim, n) > 0  # (R, k, N)
        codes = (bits * self._bit_values[:, None]).sum(axis=1)  # (R, N) bucket of each point
        cell = (np.arange(reps)[:, None] * nb + owner) * n_buckets + codes  # (R, N)
        n_cells = reps * nb * n_buckets
        # per-cell sums: one weighted bincount per output coordinate (3x faster than sort + reduceat,
        # 4x than np.add.at, and it accumulates in float64)
        flat_cell = cell.ravel()
        sums = np.stack([np.bincount(flat_cell, weights=proj[:, j].ravel(), minlength=n_cells) for j in range(p)],
                        axis=-1).reshape(reps, nb, n_buckets, p)  # (R, b, B, p)
        if not is_query:
            counts = np.bincount(flat_cell, minlength=n_cells).reshape(reps, nb, n_buckets)  # (R, b, B)
            sums /= np.maximum(counts, 1)[..., None]
            if c.fill_empty and not counts.all():
                r, doc, bucket = np.nonzero(counts == 0)
                nearest = self._nearest_points(codes, owner, first, lengths)  # (R, b, B)
                sums[r, doc, bucket] = proj[r, :, nearest[r, doc, bucket]]  # (n_empty, p)
        return sums.transpose(1, 0, 2, 3).astype(np.float32)  # (b, R, B, p)

    def _nearest_points(self, codes: np.ndarray, owner: np.ndarray, first: np.ndarray,
                        lengths: np.ndarray) -> np.ndarray:
        """``(R, b, B)``: for each repetition, cloud and bucket, the index (into the chunk's points)
        of the cloud's first point whose code is nearest to the bucket in Hamming distance."""
        reps, n = codes.shape
        distance = self._popcount[codes[:, :, None] ^ self._buckets]  # (R, N, B)
        padded = np.full((reps, len(lengths), lengths.max(), self.config.n_buckets), 255, np.uint8)  # k <= 10 < 255
        padded[:, owner, np.arange(n) - first[owner]] = distance  # (R, b, Lmax, B)
        return first[:, None] + padded.argmin(axis=2)  # argmin: the first minimum, like the reference

    def _count_sketch(self, fde: np.ndarray) -> np.ndarray:
        order, sign, starts, targets = self._sketch
        out = np.zeros((len(fde), self.config.final_dim), np.float32)
        out[:, targets] = np.add.reduceat(fde[:, order] * sign, starts, axis=1)  # (b, final)
        return out


def _as_clouds(clouds: Sequence[np.ndarray] | np.ndarray, name: str, dim: int | None) -> list[np.ndarray]:
    """A non-empty list of finite float32 ``(n_i >= 1, dim)`` arrays; a 3-D array is a batch."""
    if isinstance(clouds, np.ndarray) and clouds.ndim == 2:
        raise ConfigError(f"`{name}` is one 2-D array of shape {clouds.shape}: pass a list of point clouds "
                          f"(wrap a single one: [cloud]) or a 3-D array (batch, n, dim).")
    if isinstance(clouds, (str, bytes)) or not isinstance(clouds, (Sequence, np.ndarray)):
        raise ConfigError(f"`{name}` must be a list of (n, dim) arrays, got {type(clouds).__name__}.")
    if len(clouds) == 0:
        raise ConfigError(f"`{name}` is empty: pass at least one point cloud.")
    out = []
    for i, cloud in enumerate(clouds):
        out.append(_as_cloud(cloud, f"{name}[{i}]", dim))
    return out


def _as_cloud(cloud: Any, name: str, dim: int | None) -> np.ndarray:
    try:
        x = np.asarray(cloud, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`{name}` must be a numeric (n, dim) array: {e}.") from None
    want = "(n, dim)" if dim is None else f"(n, {dim})"
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ConfigError(f"`{name}` must have shape {want}, got {x.shape}.")
    if len(x) == 0:
        raise ConfigError(f"`{name}` has no vectors: a point cloud needs at least one (Chamfer of an empty "
                          f"set is undefined); drop it before encoding.")
    if not np.isfinite(x).all():
        raise ConfigError(f"`{name}` holds NaN or infinite values; clean the embeddings before encoding.")
    return x


def chamfer(query: np.ndarray, document: np.ndarray) -> float:
    """Exact Chamfer / MaxSim: ``sum_i max_j <query_i, document_j>``."""
    return float(chamfer_many(query, [document])[0])


def chamfer_many(query: np.ndarray, documents: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Exact Chamfer of one query against each document, ``(len(documents),)`` float32.

    A 3-D array ``(n_docs, m, dim)`` is scored without copying it (the brute-force baseline) and
    is not scanned for NaN up front (that would cost as much as the scoring): a non-finite score is
    reported instead. A list may hold clouds of different lengths; each is checked.
    """
    q = _as_cloud(query, "query", None)
    dim = q.shape[1]
    if isinstance(documents, np.ndarray) and documents.ndim == 3 and documents.shape[1] > 0:
        if documents.shape[2] != dim:
            raise ConfigError(f"`documents` must have shape (n, m, {dim}) to match the query, got {documents.shape}.")
        docs, lengths = documents, None
    else:
        docs = _as_clouds(documents, "documents", dim)
        lengths = np.array([len(x) for x in docs])
    scores = np.empty(len(docs), np.float32)
    step = 4 * _CHUNK
    for s in range(0, len(docs), step):
        if lengths is None:
            m = docs.shape[1]
            flat = docs[s:s + step].reshape(-1, dim)  # (b * m, dim), a view
            sims = (q @ flat.T).reshape(len(q), -1, m)  # (n_q, b, m)
            scores[s:s + step] = sims.max(axis=2).sum(axis=0)
        else:
            chunk_len = lengths[s:s + step]
            flat = np.concatenate(docs[s:s + step])
            sims = q @ flat.T  # (n_q, N)
            best = np.maximum.reduceat(sims, np.cumsum(chunk_len) - chunk_len, axis=1)  # (n_q, b)
            scores[s:s + step] = best.sum(axis=0)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ConfigError(f"`documents[{bad[0]}]` (and {len(bad) - 1} more) gave a non-finite Chamfer score: "
                          f"it holds NaN or infinite values; clean the embeddings.")
    return scores


def fde_search(encoder: FDEEncoder, query: np.ndarray, document_fdes: np.ndarray,
               documents: Sequence[np.ndarray] | np.ndarray, k: int = 10,
               n_candidates: int = DEFAULT_RERANK_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by exact Chamfer among the ``n_candidates`` best by FDE dot product.

    Returns ``(indices, chamfer_scores)``, best first. ``document_fdes`` is
    ``encoder.encode_documents(documents)``.
    """
    if not _is_int(k) or k < 1:
        raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
    if not _is_int(n_candidates) or n_candidates < k:
        raise ConfigError(f"`n_candidates` must be an integer >= k={k}, got {n_candidates!r}.")
    if document_fdes.ndim != 2 or document_fdes.shape != (len(documents), encoder.output_dim):
        raise ConfigError(f"`document_fdes` must have shape ({len(documents)}, {encoder.output_dim}) "
                          f"(encoder.encode_documents(documents)), got {document_fdes.shape}.")
    # 1. candidates by FDE inner product
    q_fde = encoder.encode_queries([query])[0]  # (D,)
    approx = document_fdes @ q_fde  # (n_docs,)
    n = min(n_candidates, len(approx))
    cand = np.argpartition(-approx, n - 1)[:n] if n < len(approx) else np.arange(n)
    # 2. exact Chamfer rerank
    picked = documents[cand] if isinstance(documents, np.ndarray) else [documents[i] for i in cand]
    exact = chamfer_many(query, picked)
    top = np.argsort(-exact, kind="stable")[:k]
    return cand[top], exact[top]


def synthetic_late_interaction(n_docs: int, n_queries: int, dim: int = 64, patches: tuple[int, int] = (16, 64),
                               query_tokens: tuple[int, int] = (4, 16), doc_noise: float = 0.5,
                               query_noise: float = 0.5, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(documents, queries)``: clustered unit point clouds shaped like late-interaction embeddings,
    the data DEFAULT_FDE was measured on (kept here so that the measurement can be rerun). Iid
    Gaussian clouds have no structure: every Chamfer score is alike, and mean pooling does as well.

    A shared vocabulary of ``4 * sqrt(n_docs)`` concept directions (a page shows a few of many
    topics); a document draws 2-6 concepts, and each patch is a noisy copy of one of them (noise of
    norm ~``doc_noise``). A query is a noisy copy (``query_noise``) of a random subset of one
    document's patches. Lengths are uniform in the given inclusive ranges.
    """
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    concepts = unit(rng.standard_normal((max(8, int(4 * np.sqrt(n_docs))), dim)))  # (C, dim)
    docs = []
    for _ in range(n_docs):
        centres = concepts[rng.choice(len(concepts), rng.integers(2, 7), replace=False)]
        m = rng.integers(patches[0], patches[1] + 1)
        noise = rng.standard_normal((m, dim)) * (doc_noise / np.sqrt(dim))  # norm ~ doc_noise
        docs.append(unit(centres[rng.integers(0, len(centres), m)] + noise))  # (m, dim)
    queries = []
    for _ in range(n_queries):
        doc = docs[rng.integers(n_docs)]
        n = min(len(doc), rng.integers(query_tokens[0], query_tokens[1] + 1))
        picked = doc[rng.choice(len(doc), n, replace=False)]
        queries.append(unit(picked + rng.standard_normal(picked.shape) * (query_noise / np.sqrt(dim))))
    return docs, queries
