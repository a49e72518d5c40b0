"""MultimodalRetriever: channels -> fusion -> post-processing (the rerank stage is the pipelines').

The retriever normalises the query, embeds it once, asks each channel (``channels/``, one
``search(query, n, where)`` each) for ``max(n_candidates, k)`` candidates with its own score, fuses
them and post-processes. The channels:

- ``text_to_image`` / ``text_to_text``: the query text's vector against image / text vectors;
- ``image_to_image`` / ``image_to_text``: the query image's vector against image / text vectors;
- ``composed``: reference image + modifier text, training-free (``composed_method``):
  WeiMoCIR (Wu et al. 2024), PDV (Tursun et al., WACV 2026) or CIReVL (Karthik et al., ICLR 2024);
- ``lexical``: BM25 over record texts.

``retriever.channel(name)`` is the retriever's instance of one, e.g. to call ``search`` directly.

Dense scores are cosine similarities (Chroma's cosine distance is ``1 - cos``).

Two methods are defined over the whole gallery in their papers: hubness normalisation (QB-Norm,
DBNorm; ``hubness.py``) and WeiMoCIR's score. With ``scoring_scope="gallery"``, and by default up to
``EXACT_GALLERY_MAX_RECORDS`` records, they score every stored vector exactly. The vectors are
fetched once per KB revision. Plain channels always use the ANN index.

``retrieve()`` returns :class:`Hits`, a list that also says how many hits were asked for and how
many candidates the near-duplicate pass collapsed. When that pass leaves fewer than ``k``, the
channels fetch geometrically more candidates until ``k`` survive or the gallery runs out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .channels import CHANNEL_TYPES, CandidatePool, Channel, ChannelQuery, ChannelResources
from .errors import ConfigError
from .fusion import maximal_marginal_relevance, reciprocal_rank_fusion, weighted_score_fusion
from .hubness import HubnessBanks
from .kb import KnowledgeBase
from .kb.parts import is_document
from .passages import best_parts
from .query import Hit, Hits, Query, QueryLike
from .settings import CHANNELS, MAX_K, RetrieverSettings


def validate_where(where: Any) -> dict | None:
    """Check a Chroma metadata filter now, with an error that says what is wrong."""
    if where is None:
        return None
    from chromadb.api.types import validate_where as chroma_validate

    try:
        chroma_validate(where)
    except ValueError as e:
        raise ConfigError(
            f"`where` {where!r} is not a valid metadata filter: {e}. Example: "
            "{'breed': 'chortai'} or {'$and': [{'year': {'$gte': 1990}}, {'kind': {'$in': ['dog', 'cat']}}]}."
        ) from None
    return where


class MultimodalRetriever:
    """Find the records of a KB that match a text, an image, or an image + text query.

    Args:
        kb: the knowledge base.
        channels: the channels to run (default: all the query allows); see the module docstring.
        fusion: ``"rrf"`` (reciprocal rank fusion, k=60) or ``"weighted"`` (min-max scaled scores).
        captioner: ``image -> str``, injected by a pipeline (e.g. a VLM) for PDV's reference
            description and CIReVL when the query has no ``reference_text``.
        rewriter: ``(caption, modifier) -> str``, the CIReVL edit (a VLM with a prompts/ template).
        **settings: any :class:`RetrieverSettings` field, the defaults for every call.
    """

    def __init__(self, kb: KnowledgeBase, channels: Sequence[str] | None = None, fusion: str = "rrf", *,
                 captioner: Callable[[Any], str] | None = None,
                 rewriter: Callable[[str, str], str] | None = None, **settings: Any):
        if not isinstance(kb, KnowledgeBase):
            raise ConfigError(f"`kb` must be a KnowledgeBase, got {type(kb).__name__}.")
        self.kb = kb
        self.settings = self._merge(RetrieverSettings(), dict(settings, channels=channels, fusion=fusion))
        self.resources = ChannelResources(kb, captioner, rewriter)
        self._channels: dict[str, Channel] = {}

    @property
    def captioner(self) -> Callable[[Any], str] | None:
        return self.resources.captioner

    @captioner.setter
    def captioner(self, fn: Callable[[Any], str] | None) -> None:
        self.resources.captioner = fn

    @property
    def rewriter(self) -> Callable[[str, str], str] | None:
        return self.resources.rewriter

    @rewriter.setter
    def rewriter(self, fn: Callable[[str, str], str] | None) -> None:
        self.resources.rewriter = fn

    @staticmethod
    def _merge(base: RetrieverSettings, overrides: Mapping[str, Any]) -> RetrieverSettings:
        valid = {f.name for f in dataclasses.fields(RetrieverSettings)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"Unknown retriever option(s) {unknown}; valid options: {sorted(valid)}.")
        return dataclasses.replace(base, **overrides).validate()

    # ------------------------------------------------------------------ public
    def retrieve(self, query: QueryLike | ChannelQuery, k: int = 10, where: dict | None = None,
                 **overrides: Any) -> Hits:
        """Top-``k`` hits for ``query`` (a str, a PIL image, an image path, or a :class:`Query`).

        ``where`` is a Chroma metadata filter; ``overrides`` change any setting for this call.
        ``k`` is at most :data:`MAX_K`. The result is a :class:`Hits` list; ``hits.collapsed``
        counts the near-duplicates dropped.

        ``query`` may also be what :meth:`encode` returned: then it is not embedded again (to
        embed a batch once, or to time retrieval alone), and ``overrides`` apply on top of the
        settings it was encoded with.
        """
        encoded = query if isinstance(query, ChannelQuery) else None
        base = self.settings if encoded is None else encoded.settings
        s = self._merge(base, overrides) if overrides else base
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
        if k > MAX_K:
            raise ConfigError(f"`k` must be at most MAX_K = {MAX_K}, got {k!r}: ask for fewer hits, or narrow "
                              "the query with a `where` filter.")
        q = Query.coerce(query) if encoded is None else encoded.query
        where = validate_where(where)
        channels = self._channels_for(q, s)
        cq = self._encode(q, s) if encoded is None else self._reuse(encoded, s)  # 1. embed the query once
        # Every channel fetches at least k, so that k hits can come back. A single prefix-stable
        # channel (dense or lexical, ranked by RRF, no MMR or hubness) first fetches only 2k: the
        # near-duplicate walk keeps the same prefix whatever follows, so if k hits survive it the
        # answer is exactly the full fetch's, at a fraction of the cost.
        full = max(s.n_candidates, k)
        prefix_stable = (len(channels) == 1 and s.fusion == "rrf" and s.mmr_lambda is None
                         and s.weights.get(channels[0], 1.0) > 0  # a zero weight ties every score
                         and self.channel(channels[0]).prefix_stable(cq, where))
        n = min(2 * k, full) if prefix_stable else full
        while True:
            ids, scores, per_channel, exhausted, collapsed = self._fused(cq, channels, n, where, k)
            # near-duplicates (or records deleted meanwhile) ate the candidates: fetch more, doubling,
            # until k survive, or every channel returned fewer than asked, or n covers the collection
            if len(ids) >= k or exhausted or n >= self.resources.gallery.count():
                break
            n = full if n < full else 2 * n
        # 5. passage-level rerank: each document hit's best parts for the query (passages.py)
        parts = best_parts(self.kb, [rid for rid in ids[:k] if is_document(cq.pool.meta[rid][0])],
                           [v for v in (cq.text_vector, cq.image_vector) if v is not None], s.document_parts)
        return Hits([Hit(id=rid, record=cq.pool.record(rid), score=float(sc), rank=r,
                         scores={c: per_channel[c][rid] for c in channels if rid in per_channel[c]},
                         parts=parts.get(rid, []))
                     for r, (rid, sc) in enumerate(zip(ids[:k], scores[:k]), start=1)],
                    requested=k, collapsed=collapsed)

    def encode(self, query: QueryLike, **overrides: Any) -> ChannelQuery:
        """The query as channels see it (embedded once, with this call's settings): what
        ``retriever.channel(name).search(encoded, n, where)`` and :meth:`retrieve` take."""
        return self._encode(Query.coerce(query), self._merge(self.settings, overrides) if overrides else self.settings)

    def _reuse(self, cq: ChannelQuery, s: RetrieverSettings) -> ChannelQuery:
        """An encoded query for one more call: its vectors, this call's settings and a new pool
        (what an earlier call fetched may be stale)."""
        mine, theirs = self.kb.manifest["embedder"], cq.pool.kb.manifest["embedder"]
        if theirs != mine:
            raise ConfigError(f"The encoded query was embedded by {theirs['model_id']!r} (dim {theirs['dim']}), but "
                              f"the knowledge base at {self.kb.path} uses {mine['model_id']!r} (dim {mine['dim']}): "
                              "encode it with this retriever's `encode()`.")
        return dataclasses.replace(cq, settings=s, pool=CandidatePool(self.kb))

    def _encode(self, q: Query, s: RetrieverSettings) -> ChannelQuery:
        emb = self.kb.embedder
        return ChannelQuery(q, text_vector=emb.embed_texts([q.text])[0] if q.has_text else None,
                            image_vector=emb.embed_images([q.image])[0] if q.has_image else None,
                            settings=s, pool=CandidatePool(self.kb))

    def _fused(self, cq: ChannelQuery, channels: tuple[str, ...], n: int, where,
               limit: int) -> tuple[list[str], np.ndarray, dict[str, dict[str, float]], bool, int]:
        """Stages 2-4 with ``n`` candidates per channel: the first ``limit`` ids and scores after
        fusion and post-processing (all of them with MMR), each channel's scores, whether no
        channel had more to give, and how many candidates the near-duplicate pass dropped."""
        s, pool = cq.settings, cq.pool
        # 2. run the channels
        results = {c: self.channel(c).search(cq, n, where) for c in channels}
        # 3. fuse into one list per record id
        weights = {c: s.weights.get(c, 1.0) for c in channels}
        fused = (reciprocal_rank_fusion(results, weights, s.rrf_k) if s.fusion == "rrf"
                 else weighted_score_fusion(results, weights))[:n]
        # 4. post-process: near-duplicate collapse, then optional MMR diversity (which weighs every
        # candidate against the others: all are walked first)
        ids, scores, collapsed = self._walk(fused, s.near_duplicate_threshold, pool,
                                            limit if s.mmr_lambda is None else len(fused))
        # the records of what is left (the ANN queries fetched vectors only); one deleted meanwhile drops out
        described = set(pool.describe(ids))
        if len(described) < len(ids):
            mask = np.array([i in described for i in ids], dtype=bool)
            ids, scores = [i for i, m in zip(ids, mask) if m], scores[mask]
        if s.mmr_lambda is not None:
            keep = set(pool.present("images", ids))  # MMR compares image vectors
            mask = np.array([i in keep for i in ids], dtype=bool)
            ids, scores = [i for i, m in zip(ids, mask) if m], scores[mask]
            if ids:
                order = maximal_marginal_relevance(scores, pool.vectors("images", ids), len(ids), s.mmr_lambda)
                ids, scores = [ids[i] for i in order], scores[order]
        exhausted = all(len(r) < n for r in results.values())
        return ids, scores, {c: dict(r) for c, r in results.items()}, exhausted, collapsed

    @staticmethod
    def _walk(fused: list[tuple[str, float]], threshold: float | None, pool: CandidatePool,
              limit: int) -> tuple[list[str], np.ndarray, int]:
        """The first ``limit`` fused hits that still exist and are not near-duplicates of a better
        one, and how many near-duplicates were dropped on the way.

        The walk is greedy and best first: a candidate is dropped when its image vector's cosine
        with one already kept reaches ``threshold`` (a dropped one drops nothing). It looks up
        (image vectors, candidates no channel fetched) only the prefix it needs, in chunks, and
        compares each chunk with two matrix products, against what was kept before it and against
        itself, in float64, so that a decision does not depend on how the candidates were chunked
        (the doubling fetch in :meth:`retrieve` walks a longer list and must keep the same prefix)."""
        kept_ids: list[str] = []
        kept_scores: list[float] = []
        kept_vecs = None  # (len(kept_ids), d) float64 once something is kept
        collapsed = 0
        step = max(2 * limit, 16)
        for start in range(0, len(fused), step):
            chunk = fused[start:start + step]
            # records deleted since a channel saw them (the lexical index may lag a writer) drop out
            pool.fetch([rid for rid, _ in chunk if not pool.known(rid)])
            chunk = [(rid, sc) for rid, sc in chunk if pool.known(rid)]
            if threshold is None:
                chunk = chunk[:limit - len(kept_ids)]
                kept_ids += [rid for rid, _ in chunk]
                kept_scores += [sc for _, sc in chunk]
            else:  # compares image vectors: a record not (or no longer) in that collection drops out
                present = set(pool.present("images", [rid for rid, _ in chunk]))
                chunk = [(rid, sc) for rid, sc in chunk if rid in present]
                if not chunk:
                    continue
                vecs = pool.vectors("images", [rid for rid, _ in chunk]).astype(np.float64)  # (c, d)
                # to_kept[i]: candidate i is a near-duplicate of one kept before the chunk; better[i]:
                # the better candidates of the chunk it is a near-duplicate of (few, usually none)
                to_kept = ((np.max(vecs @ kept_vecs.T, axis=1) >= threshold).tolist() if len(kept_ids)
                           else [False] * len(chunk))
                better: dict[int, list[int]] = {}
                for i, j in zip(*(x.tolist() for x in np.nonzero(np.tril(vecs @ vecs.T >= threshold, -1)))):
                    better.setdefault(i, []).append(j)
                taken: list[int] = []
                is_taken = [False] * len(chunk)
                for i in range(len(chunk)):
                    if to_kept[i] or any(is_taken[j] for j in better.get(i, ())):
                        collapsed += 1
                        continue
                    taken.append(i)
                    is_taken[i] = True
                    if len(kept_ids) + len(taken) >= limit:
                        break
                kept_ids += [chunk[i][0] for i in taken]
                kept_scores += [chunk[i][1] for i in taken]
                kept_vecs = vecs[taken] if kept_vecs is None else np.concatenate([kept_vecs, vecs[taken]])
            if len(kept_ids) >= limit:
                break
        return kept_ids, np.array(kept_scores), collapsed

    def refresh_hubness_banks(self, size: int | None = None, seed: int = 0) -> HubnessBanks:
        """(Re)sample the hubness banks of ``size`` (default: the ``hubness_bank_size`` setting)
        from the KB now and store them beside it; calls with that bank size use them."""
        size = self.settings.hubness_bank_size if size is None else size
        return self.resources.refresh_banks(size, seed)

    # ------------------------------------------------------------------ channels
    def channel(self, name: str) -> Channel:
        """The retriever's instance of channel ``name`` (built on first use)."""
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = CHANNEL_TYPES[name](self.resources)
        return ch

    def _channels_for(self, q: Query, s: RetrieverSettings) -> tuple[str, ...]:
        def allowed(c: str) -> bool:
            needs_text, needs_image = CHANNELS[c]
            return (q.has_text or not needs_text) and (q.has_image or not needs_image)

        if s.channels is None:  # every channel the query allows and the KB can serve
            return tuple(c for c in CHANNELS if allowed(c) and self.channel(c).unavailable() is None)
        for c in s.channels:
            if not allowed(c):
                needs = " and ".join(w for w, n in zip(("text", "an image"), CHANNELS[c]) if n)
                raise ConfigError(f"Channel {c!r} needs {needs} in the query; the query has "
                                  f"{'text' if q.has_text else 'no text'} and {'an image' if q.has_image else 'no image'}.")
            why = self.channel(c).unavailable()
            if why is not None:
                raise ConfigError(f"Channel {c!r} cannot run on the knowledge base at {self.kb.path}: {why}")
        return s.channels
