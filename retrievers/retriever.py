"""MultimodalRetriever: channels -> fusion -> post-processing (the rerank stage is the pipelines').

Channels (each over-fetches ``max(n_candidates, k)`` and reports its own score):

- ``text_to_image`` / ``text_to_text``: the query text's vector against image / text vectors;
- ``image_to_image`` / ``image_to_text``: the query image's vector against image / text vectors;
- ``composed``: reference image + modifier text, training-free (``composed_method``):
  WeiMoCIR (Wu et al. 2024), PDV (Tursun et al., WACV 2026) or CIReVL (Karthik et al., ICLR 2024);
- ``lexical``: BM25 over record texts.

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

from .errors import ConfigError
from .fusion import (
    maximal_marginal_relevance,
    reciprocal_rank_fusion,
    weighted_score_fusion,
)
from .hubness import (
    EXACT_GALLERY_MAX_RECORDS,
    GalleryCache,
    HubnessBanks,
    Normaliser,
    StoredVectors,
    ann_activation,
    bank_stats,
)
from .kb import KnowledgeBase
from .kb.records import Record
from .kb.store import decode_record
from .lexical import LexicalIndex
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


class _Pool:
    """Per-call cache of what channels already fetched: records and stored vectors by id."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.meta: dict[str, tuple[dict, str]] = {}
        self.vecs: dict[str, dict[str, np.ndarray]] = {"images": {}, "texts": {}}

    def absorb(self, collection: str, res: dict) -> None:
        for rid, m, d, e in zip(res["ids"], res["metadatas"], res["documents"], res["embeddings"]):
            self.meta[rid] = (m, d)
            self.vecs[collection][rid] = np.asarray(e, dtype=np.float32)

    def fetch(self, ids: Sequence[str], collection: str = "texts") -> None:
        """Load what the pool lacks for ``ids``; ids no longer in the KB stay absent."""
        missing = [i for i in ids if i not in self.vecs[collection]]
        if missing:
            col = self.kb.vectors.images if collection == "images" else self.kb.vectors.texts
            self.absorb(collection, col.get(ids=missing, include=["embeddings", "metadatas", "documents"]))

    def present(self, collection: str, ids: Sequence[str]) -> list[str]:
        """``ids`` that ``collection`` holds, in order. A concurrent writer adds a record to the image
        collection before the text one (and a delete may leave it in one for a moment): such a
        half-written record is skipped by what needs both, never a KeyError."""
        self.fetch(ids, collection)
        return [i for i in ids if i in self.vecs[collection]]

    def vectors(self, collection: str, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of ``ids``, which must be :meth:`present` in ``collection``."""
        self.fetch(ids, collection)
        return np.stack([self.vecs[collection][i] for i in ids]) if ids else np.zeros((0, self.kb.dim), np.float32)

    def record(self, rid: str) -> Record:
        meta, doc = self.meta[rid]
        return decode_record(rid, meta, doc, self.kb.images)


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
        self.captioner = captioner
        self.rewriter = rewriter
        self.settings = self._merge(RetrieverSettings(), dict(settings, channels=channels, fusion=fusion))
        self._lexical: LexicalIndex | None = None
        # per bank size, so that a call's hubness_bank_size override is honoured
        self._banks: dict[int, HubnessBanks] = {}
        self._gallery = GalleryCache(kb)  # stored vectors for exact scoring; filled on first use only

    @staticmethod
    def _merge(base: RetrieverSettings, overrides: Mapping[str, Any]) -> RetrieverSettings:
        valid = {f.name for f in dataclasses.fields(RetrieverSettings)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"Unknown retriever option(s) {unknown}; valid options: {sorted(valid)}.")
        return dataclasses.replace(base, **overrides).validate()

    # ------------------------------------------------------------------ public
    def retrieve(self, query: QueryLike, k: int = 10, where: dict | None = None, **overrides: Any) -> Hits:
        """Top-``k`` hits for ``query`` (a str, a PIL image, an image path, or a :class:`Query`).

        ``where`` is a Chroma metadata filter; ``overrides`` change any setting for this call.
        ``k`` is at most :data:`MAX_K`. The result is a :class:`Hits` list; ``hits.collapsed``
        counts the near-duplicates dropped.
        """
        s = self._merge(self.settings, overrides) if overrides else self.settings
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
        if k > MAX_K:
            raise ConfigError(f"`k` must be at most MAX_K = {MAX_K}, got {k!r}: ask for fewer hits, or narrow "
                              "the query with a `where` filter.")
        q = Query.coerce(query)
        where = validate_where(where)
        channels = self._channels_for(q, s)
        pool = _Pool(self.kb)
        # 1. embed the query once
        emb = self.kb.embedder
        tv = emb.embed_texts([q.text])[0] if q.has_text else None
        iv = emb.embed_images([q.image])[0] if q.has_image else None
        # Every channel fetches at least k, so that k hits can come back. A single prefix-stable
        # channel (dense or lexical, ranked by RRF, no MMR or hubness) first fetches only 2k: the
        # near-duplicate walk keeps the same prefix whatever follows, so if k hits survive it the
        # answer is exactly the full fetch's, at a fraction of the cost.
        full = max(s.n_candidates, k)
        prefix_stable = (len(channels) == 1 and channels[0] != "composed" and s.fusion == "rrf"
                         and s.weights.get(channels[0], 1.0) > 0  # a zero weight ties every score
                         and not (channels[0] == "lexical" and where is not None)  # filtered after scoring
                         and s.mmr_lambda is None and s.hubness is None)
        n = min(2 * k, full) if prefix_stable else full
        while True:
            ids, scores, per_channel, exhausted, collapsed = self._fused(q, tv, iv, channels, s, n, where, pool, k)
            # near-duplicates (or records deleted meanwhile) ate the candidates: fetch more, doubling,
            # until k survive, or every channel returned fewer than asked, or n covers the collection
            if len(ids) >= k or exhausted or n >= self._gallery.count():
                break
            n = full if n < full else 2 * n
        return Hits([Hit(id=rid, record=pool.record(rid), score=float(sc), rank=r,
                         scores={c: per_channel[c][rid] for c in channels if rid in per_channel[c]})
                     for r, (rid, sc) in enumerate(zip(ids[:k], scores[:k]), start=1)],
                    requested=k, collapsed=collapsed)

    def _fused(self, q: Query, tv, iv, channels: tuple[str, ...], s: RetrieverSettings, n: int, where,
               pool: _Pool, limit: int) -> tuple[list[str], np.ndarray, dict[str, dict[str, float]], bool, int]:
        """Stages 2-4 with ``n`` candidates per channel: the first ``limit`` ids and scores after
        fusion and post-processing (all of them with MMR), each channel's scores, whether no
        channel had more to give, and how many candidates the near-duplicate pass dropped."""
        s = dataclasses.replace(s, n_candidates=n)
        # 2. run the channels
        results = {c: self._run_channel(c, q, tv, iv, s, where, pool) for c in channels}
        # 3. fuse into one list per record id
        weights = {c: s.weights.get(c, 1.0) for c in channels}
        fused = (reciprocal_rank_fusion(results, weights, s.rrf_k) if s.fusion == "rrf"
                 else weighted_score_fusion(results, weights))[:n]
        # 4. post-process: near-duplicate collapse, then optional MMR diversity
        if s.mmr_lambda is None:
            ids, scores, collapsed = self._walk(fused, s.near_duplicate_threshold, pool, limit)
        else:  # MMR weighs every candidate against the others: walk them all first
            ids, scores, collapsed = self._walk(fused, s.near_duplicate_threshold, pool, len(fused))
            keep = set(pool.present("images", ids))  # MMR compares image vectors
            mask = np.array([i in keep for i in ids], dtype=bool)
            ids, scores = [i for i, m in zip(ids, mask) if m], scores[mask]
            if ids:
                order = maximal_marginal_relevance(scores, pool.vectors("images", ids), len(ids), s.mmr_lambda)
                ids, scores = [ids[i] for i in order], scores[order]
        exhausted = all(len(r) < n for r in results.values())
        return ids, scores, {c: dict(r) for c, r in results.items()}, exhausted, collapsed

    @staticmethod
    def _walk(fused: list[tuple[str, float]], threshold: float | None, pool: _Pool,
              limit: int) -> tuple[list[str], np.ndarray, int]:
        """The first ``limit`` fused hits that still exist and are not near-duplicates of a better
        one, and how many near-duplicates were dropped on the way. The walk is greedy and best
        first, so it only looks up (records, image vectors) the prefix it needs, in chunks,
        instead of every candidate."""
        kept: list[tuple[str, float]] = []
        kept_vecs: list[np.ndarray] = []
        collapsed = 0
        step = max(2 * limit, 16)

        def result():
            return [rid for rid, _ in kept], np.array([sc for _, sc in kept]), collapsed

        for start in range(0, len(fused), step):
            chunk = fused[start:start + step]
            # records deleted since a channel saw them (the lexical index may lag a writer) drop out
            pool.fetch([rid for rid, _ in chunk if rid not in pool.meta])
            chunk = [(rid, sc) for rid, sc in chunk if rid in pool.meta]
            if threshold is not None:  # compares image vectors: a record not (or no longer) in that collection drops out
                present = set(pool.present("images", [rid for rid, _ in chunk]))
                chunk = [(rid, sc) for rid, sc in chunk if rid in present]
            vecs = pool.vectors("images", [rid for rid, _ in chunk]) if threshold is not None else [None] * len(chunk)
            for (rid, sc), v in zip(chunk, vecs):
                if threshold is not None and kept_vecs and float(np.max(np.stack(kept_vecs) @ v)) >= threshold:
                    collapsed += 1
                    continue
                kept.append((rid, sc))
                if threshold is not None:
                    kept_vecs.append(v)
                if len(kept) >= limit:
                    return result()
        return result()

    def refresh_hubness_banks(self, size: int | None = None, seed: int = 0) -> HubnessBanks:
        """(Re)sample the hubness banks of ``size`` (default: the ``hubness_bank_size`` setting)
        from the KB now and store them beside it; calls with that bank size use them."""
        size = self.settings.hubness_bank_size if size is None else size
        self._banks[size] = HubnessBanks.build(self.kb, size, seed)
        return self._banks[size]

    def _banks_for(self, size: int) -> HubnessBanks:
        banks = self._banks.get(size)
        if banks is None:
            banks = self._banks[size] = HubnessBanks.load_or_build(self.kb, size)
        return banks

    def _exact(self, s: RetrieverSettings) -> bool:
        """Whether whole-gallery methods score every stored vector (see ``scoring_scope``)."""
        if s.scoring_scope == "auto":
            return self._gallery.count() <= EXACT_GALLERY_MAX_RECORDS
        return s.scoring_scope == "gallery"

    # ------------------------------------------------------------------ channels
    def _channels_for(self, q: Query, s: RetrieverSettings) -> tuple[str, ...]:
        def allowed(c: str) -> bool:
            needs_text, needs_image = CHANNELS[c]
            return (q.has_text or not needs_text) and (q.has_image or not needs_image)

        if s.channels is None:
            return tuple(c for c in CHANNELS if allowed(c))
        for c in s.channels:
            if not allowed(c):
                needs = " and ".join(w for w, n in zip(("text", "an image"), CHANNELS[c]) if n)
                raise ConfigError(f"Channel {c!r} needs {needs} in the query; the query has "
                                  f"{'text' if q.has_text else 'no text'} and {'an image' if q.has_image else 'no image'}.")
        return s.channels

    def _run_channel(self, c: str, q: Query, tv, iv, s: RetrieverSettings, where, pool: _Pool) -> list[tuple[str, float]]:
        n = s.n_candidates
        if c == "lexical":
            if self._lexical is None:
                self._lexical = LexicalIndex(self.kb)
            return self._lexical.search(q.text, n, where)
        if c == "composed":
            return self._composed(q, tv, iv, s, where, pool)
        query_vec, collection = {
            "text_to_image": (tv, "images"), "text_to_text": (tv, "texts"),
            "image_to_image": (iv, "images"), "image_to_text": (iv, "texts"),
        }[c]
        if s.hubness is None:
            return self._dense(query_vec, collection, n, where, pool)
        norm = Normaliser.resolve(s.hubness, query="text" if c.startswith("text") else "image",
                                  gallery="image" if collection == "images" else "text", beta=s.hubness_beta,
                                  gallery_beta=s.hubness_gallery_beta, dynamic=s.hubness_dynamic)
        if self._exact(s):
            return self._hubness_gallery(norm, s.hubness_bank_size, query_vec, collection, n, where, pool)
        return self._hubness_candidates(norm, s.hubness_bank_size, query_vec, collection, n, where, pool)

    def _hubness_gallery(self, norm: Normaliser, bank_size: int, vec: np.ndarray, collection: str, n: int,
                         where, pool: _Pool) -> list[tuple[str, float]]:
        """QB-Norm / DBNorm as the papers define them: every gallery item normalised. ``log Z`` and
        the activation set come from the whole gallery, and the DIS gate from the query's top-1
        over it. A ``where`` filter only restricts which items are returned."""
        gal = self._gallery.vectors(collection)
        if not len(gal.ids):
            return []  # an empty KB has no banks to sample
        banks = self._banks_for(bank_size)
        stats = [gal.cached(("hubness", m, beta, banks.token),  # on this snapshot: its sizes match
                            lambda m=m, beta=beta: bank_stats(banks.vectors[m], banks.ids[m], gal, beta))
                 for m, beta in norm.factors]
        scores = norm.gallery_scores((gal.vecs @ vec).astype(np.float64), stats)  # (N,)
        return self._top_of_gallery(gal, scores, n, where, collection, pool)

    def _hubness_candidates(self, norm: Normaliser, bank_size: int, vec: np.ndarray, collection: str, n: int,
                            where, pool: _Pool) -> list[tuple[str, float]]:
        """The approximation for large KBs: only the ANN candidates rescored."""
        hits = self._dense(vec, collection, n, where, pool)
        if not hits:
            return hits
        banks = self._banks_for(bank_size)
        ids = [i for i, _ in hits]
        on = [True] * len(norm.factors)
        if norm.dynamic:
            col = self.kb.vectors.images if collection == "images" else self.kb.vectors.texts
            # the gate looks at the query's top-1 in the whole gallery, as in exact scope
            top1 = ids[0] if where is None else col.query(query_embeddings=[vec], n_results=1, include=[])["ids"][0][0]
            on = [top1 in self._gallery.get(("activation", collection, m, banks.token),
                                            lambda m=m: ann_activation(col, banks.vectors[m], banks.ids[m]))
                  for m, _ in norm.factors]
        new = norm.candidate_scores(np.array([sc for _, sc in hits]), ids, pool.vectors(collection, ids), banks, on)
        return sorted(zip(ids, new.tolist()), key=lambda t: (-t[1], t[0]))

    def _top_of_gallery(self, gal: StoredVectors, scores: np.ndarray, n: int, where, collection: str,
                        pool: _Pool) -> list[tuple[str, float]]:
        """The best ``n`` of exact scores over every stored record (``-inf``: excluded), ordered like
        the other channels (score, then id). Their image vectors go into the pool, so the
        near-duplicate walk does not fetch them again."""
        if where is not None:
            col = self.kb.vectors.images if collection == "images" else self.kb.vectors.texts
            allowed = np.zeros(len(gal.ids), bool)
            allowed[[gal.row[i] for i in col.get(where=where, include=[])["ids"] if i in gal.row]] = True
            scores = np.where(allowed, scores, -np.inf)
        n = min(n, int(np.isfinite(scores).sum()))
        if n == 0:
            return []
        # every row tied with the n-th best, then the (score, id) order picks among the ties
        kth = np.partition(scores, len(scores) - n)[len(scores) - n]
        top = np.flatnonzero(scores >= kth)
        top = top[np.lexsort((gal.ids[top], -scores[top]))][:n]
        if collection == "images":
            pool.vecs["images"].update(zip(gal.ids[top].tolist(), gal.vecs[top]))
        return list(zip(gal.ids[top].tolist(), scores[top].tolist()))

    def _dense(self, vec: np.ndarray, collection: str, n: int, where, pool: _Pool) -> list[tuple[str, float]]:
        col = self.kb.vectors.images if collection == "images" else self.kb.vectors.texts
        # Chroma returns fewer than n_results when the collection (or the filter) holds fewer
        res = col.query(query_embeddings=[vec], n_results=n, where=where,
                        include=["metadatas", "documents", "distances", "embeddings"])
        pool.absorb(collection, {k: res[k][0] for k in ("ids", "metadatas", "documents", "embeddings")})
        return [(rid, 1.0 - float(d)) for rid, d in zip(res["ids"][0], res["distances"][0])]

    def _composed(self, q: Query, tv, iv, s: RetrieverSettings, where, pool: _Pool) -> list[tuple[str, float]]:
        n, emb = s.n_candidates, self.kb.embedder
        if s.composed_method == "weimocir":
            # WeiMoCIR: q = N((1-a) v + a t); score = (1-b) cos(q, image) + b cos(q, text)
            fused = _unit((1 - s.weimocir_alpha) * iv + s.weimocir_alpha * tv)
            if self._exact(s):  # the paper scores the whole gallery
                images, texts, rows = self._gallery.paired("images", "texts")  # rows: (N,) each image's text row
                paired = rows >= 0  # False only for a record a concurrent writer has half-written
                text_sims = np.zeros(len(rows))
                text_sims[paired] = (texts.vecs @ fused).astype(np.float64)[rows[paired]]
                score = (1 - s.weimocir_beta) * (images.vecs @ fused).astype(np.float64) + s.weimocir_beta * text_sims
                score[~paired] = -np.inf
                return self._top_of_gallery(images, score, n, where, "images", pool)
            # candidates: the union of both ANN lists (misses items strong on neither alone)
            cand = dict(self._dense(fused, "images", n, where, pool))
            cand.update(self._dense(fused, "texts", n, where, pool))
            ids = pool.present("texts", pool.present("images", sorted(cand)))  # both halves written
            sims_i = pool.vectors("images", ids) @ fused
            sims_t = pool.vectors("texts", ids) @ fused
            score = (1 - s.weimocir_beta) * sims_i + s.weimocir_beta * sims_t
            return sorted(zip(ids, score.tolist()), key=lambda t: (-t[1], t[0]))[:n]
        reference = q.reference_text
        if reference is None:
            if self.captioner is None:
                raise ConfigError(f"composed_method={s.composed_method!r} needs a description of the query image: "
                                  "pass Query(reference_text=...) or a retriever built with captioner=.")
            reference = self.captioner(q.image)
        if s.composed_method == "cirevl":
            # CIReVL: caption, rewrite with the modifier, retrieve images by the edited text alone
            if self.rewriter is None:
                raise ConfigError("composed_method='cirevl' needs a rewriter (caption, modifier) -> text; "
                                  "build the retriever with rewriter= (a pipeline injects a VLM).")
            edited = self.rewriter(reference, q.text).strip() or q.text  # the paper falls back to the modifier
            return self._dense(emb.embed_texts([edited])[0], "images", n, where, pool)
        # PDV: d = t_comp - t_ref; v' = v + a_I d; t' = t_ref + a_T d; q = N((1-b) v' + b t')
        composed = (self.rewriter(reference, q.text) if self.rewriter is not None
                    else s.pdv_compose.format(reference=reference, modifier=q.text))
        t_ref, t_comp = emb.embed_texts([reference, composed])
        d = t_comp - t_ref
        query_vec = _unit((1 - s.pdv_beta) * (iv + s.pdv_alpha_image * d) + s.pdv_beta * (t_ref + s.pdv_alpha_text * d))
        return self._dense(query_vec, "images", n, where, pool)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
