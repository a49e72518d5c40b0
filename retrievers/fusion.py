"""Rank fusion and post-processing, as pure functions over ids, scores and vectors."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RRF_K = 60  # Cormack, Clarke & Buettcher (2009); also Chroma's and Elasticsearch's default

ChannelResults = Mapping[str, Sequence[tuple[str, float]]]  # channel -> [(id, score)] best first


def reciprocal_rank_fusion(results: ChannelResults, weights: Mapping[str, float] | None = None,
                           k: int = RRF_K) -> list[tuple[str, float]]:
    """``score(d) = sum_c w_c / (k + rank_c(d))`` with 1-based ranks; best first.

    Ranks, not scores, are fused, so channels with incomparable scales (cosine, BM25) mix fairly.
    """
    fused: dict[str, float] = {}
    for channel, hits in results.items():
        w = 1.0 if weights is None or weights.get(channel) is None else float(weights[channel])
        for rank, (rid, _) in enumerate(hits, start=1):
            fused[rid] = fused.get(rid, 0.0) + w / (k + rank)
    return _sorted(fused)


def weighted_score_fusion(results: ChannelResults, weights: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """``score(d) = sum_c w_c * minmax_c(score_c(d))``; a channel that missed ``d`` adds 0.

    Each channel's scores are min-max scaled over its own candidates first, because a cosine of
    0.3 and a BM25 score of 12 are not on one scale. A channel whose candidates all tie scores 1.
    """
    fused: dict[str, float] = {}
    for channel, hits in results.items():
        if not hits:
            continue
        w = 1.0 if weights is None or weights.get(channel) is None else float(weights[channel])
        scores = np.array([s for _, s in hits], dtype=np.float64)
        lo, hi = scores.min(), scores.max()
        scaled = np.ones_like(scores) if hi - lo <= 1e-12 else (scores - lo) / (hi - lo)
        for (rid, _), s in zip(hits, scaled):
            fused[rid] = fused.get(rid, 0.0) + w * float(s)
    return _sorted(fused)


def _sorted(scores: dict[str, float]) -> list[tuple[str, float]]:
    # ties broken by id so that results are deterministic
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def maximal_marginal_relevance(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Carbonell & Goldstein (1998): greedily pick ``argmax lam*rel(d) - (1-lam)*max_sel cos(d, s)``.

    ``relevance`` is min-max scaled to [0, 1] first so that ``lam`` means the same for any
    fusion method. Returns indices in selection order.
    """
    n = len(relevance)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min() if n else 0.0
    rel = np.ones(n) if span <= 1e-12 else (rel - rel.min()) / span
    sims = vectors @ vectors.T  # (n, n)
    selected: list[int] = []
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isinf(max_sim), 0.0, max_sim)
        score = np.where(available, lam * rel - (1 - lam) * penalty, -np.inf)
        i = int(np.argmax(score))
        selected.append(i)
        available[i] = False
        max_sim = np.maximum(max_sim, sims[i])
    return selected
