"""MultimodalRetriever: channels -> fusion -> post-processing (the rerank stage is the pipelines').

Channels (each over-fetches ``n_candidates`` and reports its own score):

- ``text_to_image`` / ``text_to_text``: the query text's vector against image / text vectors;
- ``image_to_image`` / ``image_to_text``: the query image's vector against image / text vectors;
- ``composed``: reference image + modifier text, training-free (``composed_method``):
  WeiMoCIR (Wu et al. 2024), PDV (Tursun et al., WACV 2026) or CIReVL (Karthik et al., ICLR 2024);
- ``lexical``: BM25 over record texts.

Dense scores are cosine similarities (Chroma's cosine distance is ``1 - cos``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .fusion import maximal_marginal_relevance, reciprocal_rank_fusion, weighted_score_fusion
from .hubness import METHODS as HUBNESS_METHODS, HubnessBanks, normalise as hubness_normalise
from .kb import KnowledgeBase
from .lexical import LexicalIndex
from .query import Hit, Query, QueryLike
from .kb.records import Record
from .kb.store import IMAGE_KEY, decode_metadata

# channel -> (needs text, needs image)
CHANNELS: dict[str, tuple[bool, bool]] = {
    "text_to_image": (True, False),
    "text_to_text": (True, False),
    "image_to_image": (False, True),
    "image_to_text": (False, True),
    "composed": (True, True),
    "lexical": (True, False),
}
FUSIONS = ("rrf", "weighted")
COMPOSED_METHODS = ("weimocir", "pdv", "cirevl")


@dataclass
class RetrieverSettings:
    """Everything ``retrieve(**overrides)`` may change for one call. Defaults follow the papers."""

    channels: tuple[str, ...] | None = None  # None: every channel the query's contents allow
    fusion: str = "rrf"
    rrf_k: int = 60
    weights: dict[str, float] = field(default_factory=dict)  # per channel, default 1.0
    n_candidates: int = 50  # per channel
    composed_method: str = "weimocir"
    weimocir_alpha: float = 0.8  # weight of the text in the fused query
    weimocir_beta: float = 0.1  # weight of the text-vector similarity in the score
    pdv_alpha_image: float = 1.0
    pdv_alpha_text: float = 1.0
    pdv_beta: float = 0.7
    pdv_compose: str = "{reference}, {modifier}"  # composed description when no rewriter is injected
    near_duplicate_threshold: float | None = 0.95  # cosine between image vectors; None: keep all
    mmr_lambda: float | None = None  # None: no diversity re-ordering
    hubness: str | None = None  # "qbnorm" | "dbnorm"
    hubness_beta: float = 20.0
    hubness_gallery_beta: float = 20.0
    hubness_bank_size: int = 2048
    rerank_candidates: int = 30  # fused hits handed to the reranker

    def validate(self) -> "RetrieverSettings":
        if self.channels is not None:
            chans = (self.channels,) if isinstance(self.channels, str) else tuple(self.channels)
            unknown = [c for c in chans if c not in CHANNELS]
            if unknown or not chans:
                raise ConfigError(f"`channels` {list(chans)!r} has unknown or no channels; choose from {list(CHANNELS)}.")
            self.channels = chans
        _choice("fusion", self.fusion, FUSIONS)
        _choice("composed_method", self.composed_method, COMPOSED_METHODS)
        if self.hubness is not None:
            _choice("hubness", self.hubness, HUBNESS_METHODS)
        for name in ("rrf_k", "n_candidates", "rerank_candidates", "hubness_bank_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"`{name}` must be a positive integer, got {v!r}.")
        for name in ("weimocir_alpha", "weimocir_beta", "pdv_beta"):
            _unit_interval(name, getattr(self, name))
        if self.near_duplicate_threshold is not None:
            _unit_interval("near_duplicate_threshold", self.near_duplicate_threshold, low=-1.0)
        if self.mmr_lambda is not None:
            _unit_interval("mmr_lambda", self.mmr_lambda)
        bad = {c: w for c, w in self.weights.items() if c not in CHANNELS or not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise ConfigError(f"`weights` {bad!r}: keys must be channels {list(CHANNELS)} and values numbers >= 0.")
        if "{modifier}" not in self.pdv_compose:
            raise ConfigError(f"`pdv_compose` must contain '{{modifier}}', got {self.pdv_compose!r}.")
        return self


def _choice(name: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"`{name}` must be one of {list(valid)}, got {value!r}.")


def _unit_interval(name: str, value: Any, low: float = 0.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= 1:
        raise ConfigError(f"`{name}` must be a number in [{low:g}, 1], got {value!r}.")


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

    def vectors(self, collection: str, ids: Sequence[str]) -> np.ndarray:
        self.fetch(ids, collection)
        return np.stack([self.vecs[collection][i] for i in ids]) if ids else np.zeros((0, self.kb.dim), np.float32)

    def record(self, rid: str) -> Record:
        meta, doc = self.meta[rid]
        return Record(id=rid, text=doc, image=str(self.kb.images.path(meta[IMAGE_KEY])), metadata=decode_metadata(meta))


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
        self._banks: HubnessBanks | None = None

    @staticmethod
    def _merge(base: RetrieverSettings, overrides: Mapping[str, Any]) -> RetrieverSettings:
        valid = {f.name for f in dataclasses.fields(RetrieverSettings)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"Unknown retriever option(s) {unknown}; valid options: {sorted(valid)}.")
        return dataclasses.replace(base, **overrides).validate()

    # ------------------------------------------------------------------ public
    def retrieve(self, query: QueryLike, k: int = 10, where: dict | None = None, **overrides: Any) -> list[Hit]:
        """Top-``k`` hits for ``query`` (a str, a PIL image, an image path, or a :class:`Query`).

        ``where`` is a Chroma metadata filter; ``overrides`` change any setting for this call.
        """
        s = self._merge(self.settings, overrides) if overrides else self.settings
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
        q = Query.coerce(query)
        where = validate_where(where)
        channels = self._channels_for(q, s)
        pool = _Pool(self.kb)
        # 1. embed the query once
        emb = self.kb.embedder
        tv = emb.embed_texts([q.text])[0] if q.has_text else None
        iv = emb.embed_images([q.image])[0] if q.has_image else None
        # A single prefix-stable channel (dense or lexical, ranked by RRF, no MMR or hubness)
        # first fetches only 2k candidates: the near-duplicate walk keeps the same prefix whatever
        # follows, so if k hits survive it the answer is exactly the full fetch's, at a fraction of
        # the cost. Otherwise it fetches n_candidates.
        prefix_stable = (len(channels) == 1 and channels[0] != "composed" and s.fusion == "rrf"
                         and s.weights.get(channels[0], 1.0) > 0  # a zero weight ties every score
                         and not (channels[0] == "lexical" and where is not None)  # filtered after scoring
                         and s.mmr_lambda is None and s.hubness is None)
        sizes = [min(2 * k, s.n_candidates), s.n_candidates] if prefix_stable else [s.n_candidates]
        limit = k
        for n in dict.fromkeys(sizes):
            ids, scores, per_channel, exhausted = self._fused(q, tv, iv, channels, s, n, where, pool, limit)
            if len(ids) >= k or exhausted:
                break
        hits = [Hit(id=rid, record=pool.record(rid), score=float(sc), rank=r,
                    scores={c: per_channel[c][rid] for c in channels if rid in per_channel[c]})
                for r, (rid, sc) in enumerate(zip(ids[:limit], scores[:limit]), start=1)]
        return hits

    def _fused(self, q: Query, tv, iv, channels: tuple[str, ...], s: RetrieverSettings, n: int, where,
               pool: _Pool, limit: int) -> tuple[list[str], np.ndarray, dict[str, dict[str, float]], bool]:
        """Stages 2-4 with ``n`` candidates per channel: the first ``limit`` ids and scores after
        fusion and post-processing (all of them with MMR), each channel's scores, and whether no
        channel had more to give."""
        s = dataclasses.replace(s, n_candidates=n)
        # 2. run the channels
        results = {c: self._run_channel(c, q, tv, iv, s, where, pool) for c in channels}
        # 3. fuse into one list per record id
        weights = {c: s.weights.get(c, 1.0) for c in channels}
        fused = (reciprocal_rank_fusion(results, weights, s.rrf_k) if s.fusion == "rrf"
                 else weighted_score_fusion(results, weights))[:n]
        # 4. post-process: near-duplicate collapse, then optional MMR diversity
        if s.mmr_lambda is None:
            ids, scores = self._walk(fused, s.near_duplicate_threshold, pool, limit)
        else:  # MMR weighs every candidate against the others: walk them all first
            ids, scores = self._walk(fused, s.near_duplicate_threshold, pool, len(fused))
            if ids:
                order = maximal_marginal_relevance(scores, pool.vectors("images", ids), len(ids), s.mmr_lambda)
                ids, scores = [ids[i] for i in order], scores[order]
        exhausted = all(len(r) < n for r in results.values())
        return ids, scores, {c: dict(r) for c, r in results.items()}, exhausted

    @staticmethod
    def _walk(fused: list[tuple[str, float]], threshold: float | None, pool: _Pool,
              limit: int) -> tuple[list[str], np.ndarray]:
        """The first ``limit`` fused hits that still exist and are not near-duplicates of a better
        one. The walk is greedy and best first, so it only looks up (records, image vectors) the
        prefix it needs, in chunks, instead of every candidate."""
        kept: list[tuple[str, float]] = []
        kept_vecs: list[np.ndarray] = []
        step = max(2 * limit, 16)
        for start in range(0, len(fused), step):
            chunk = fused[start:start + step]
            # records deleted since a channel saw them (the lexical index may lag a writer) drop out
            pool.fetch([rid for rid, _ in chunk if rid not in pool.meta])
            chunk = [(rid, sc) for rid, sc in chunk if rid in pool.meta]
            vecs = pool.vectors("images", [rid for rid, _ in chunk]) if threshold is not None else [None] * len(chunk)
            for (rid, sc), v in zip(chunk, vecs):
                if threshold is not None and kept_vecs and float(np.max(np.stack(kept_vecs) @ v)) >= threshold:
                    continue
                kept.append((rid, sc))
                if threshold is not None:
                    kept_vecs.append(v)
                if len(kept) >= limit:
                    return [rid for rid, _ in kept], np.array([sc for _, sc in kept])
        return [rid for rid, _ in kept], np.array([sc for _, sc in kept])

    def refresh_hubness_banks(self, size: int | None = None, seed: int = 0) -> HubnessBanks:
        """(Re)sample the hubness banks from the KB now and store them beside it."""
        self._banks = HubnessBanks.build(self.kb, self.settings.hubness_bank_size if size is None else size, seed)
        return self._banks

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
        hits = self._dense(query_vec, collection, n, where, pool)
        if s.hubness is not None and hits:
            ids = [i for i, _ in hits]
            if self._banks is None:
                self._banks = HubnessBanks.load_or_build(self.kb, s.hubness_bank_size)
            new = hubness_normalise(s.hubness, np.array([sc for _, sc in hits]), ids, pool.vectors(collection, ids),
                                    self._banks, query="text" if c.startswith("text") else "image",
                                    gallery="image" if collection == "images" else "text",
                                    beta=s.hubness_beta, gallery_beta=s.hubness_gallery_beta)
            hits = sorted(zip(ids, new.tolist()), key=lambda t: (-t[1], t[0]))
        return hits

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
            cand = dict(self._dense(fused, "images", n, where, pool))
            cand.update(self._dense(fused, "texts", n, where, pool))
            ids = sorted(cand)
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
