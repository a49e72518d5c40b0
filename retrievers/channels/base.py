"""The channel interface: one way of scoring a KB's records against a query.

A channel fills in one method, :meth:`Channel.search` (the ``retrieve``/``_retrieve`` split of
llama-index's retrievers: :class:`MultimodalRetriever` owns the public call, normalises the
query, encodes it once, fuses the channels and post-processes). A channel sees the query as a
:class:`ChannelQuery` and reads the KB only through ``kb.vectors`` (never a Chroma collection of
its own), so one contract test suite covers every channel.

What channels share lives in :class:`ChannelResources`, owned by the retriever: the whole-gallery
vector cache (exact scoring), the hubness banks and the injected captioner and rewriter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..hubness import EXACT_GALLERY_MAX_RECORDS, GalleryCache, HubnessBanks, StoredVectors
from ..kb.records import Record
from ..kb.store import decode_record
from ..query import Query
from ..settings import RetrieverSettings

if TYPE_CHECKING:
    from ..kb import KnowledgeBase

# (record id, channel score), best first
Scored = list[tuple[str, float]]


class CandidatePool:
    """Per-call cache of what channels already fetched: records and stored vectors by id.

    The ANN queries fetch vectors only (ids, distances, embeddings); the records themselves
    (metadata, text) are read by :meth:`describe` for what survives post-processing: Chroma's
    metadata and documents cost more to return than the search (measured: a top-20 query with them
    1.4x one without, at 20k records).
    """

    def __init__(self, kb: "KnowledgeBase"):
        self.kb = kb
        self.meta: dict[str, tuple[dict, str]] = {}
        self.vecs: dict[str, dict[str, np.ndarray]] = {"images": {}, "texts": {}}

    def absorb(self, collection: str, res: dict) -> None:
        """Keep what a query or get returned: the vectors, and the records when it included them."""
        metas, docs = res.get("metadatas"), res.get("documents")
        for i, (rid, e) in enumerate(zip(res["ids"], res["embeddings"])):
            self.vecs[collection][rid] = np.asarray(e, dtype=np.float32)
            if metas is not None:
                self.meta[rid] = (metas[i], docs[i])

    def known(self, rid: str) -> bool:
        """Whether a query or fetch of this call found ``rid`` in the KB."""
        return rid in self.meta or rid in self.vecs["images"] or rid in self.vecs["texts"]

    def describe(self, ids: Sequence[str]) -> list[str]:
        """Read the records (metadata, text) of ``ids`` the pool lacks; the ids the KB holds, in order.
        A record deleted since a channel found it drops out."""
        missing = [i for i in ids if i not in self.meta]
        if missing:
            res = self.kb.vectors.fetch("texts", missing, include=("metadatas", "documents"))
            self.meta.update(zip(res["ids"], zip(res["metadatas"], res["documents"])))
        return [i for i in ids if i in self.meta]

    def fetch(self, ids: Sequence[str], collection: str = "texts") -> None:
        """Load what the pool lacks for ``ids``; ids no longer in the KB stay absent."""
        missing = [i for i in ids if i not in self.vecs[collection]]
        if missing:
            self.absorb(collection, self.kb.vectors.fetch(collection, missing))

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


@dataclasses.dataclass
class ChannelQuery:
    """A query as every channel of one call sees it: encoded once, with the call's settings.

    ``text_vector`` / ``image_vector`` are the KB embedder's unit vectors of the query's text and
    image (None when the query has none). ``pool`` collects what channels fetch, for the
    retriever's post-processing.
    """

    query: Query
    text_vector: np.ndarray | None
    image_vector: np.ndarray | None
    settings: RetrieverSettings
    pool: CandidatePool


class ChannelResources:
    """What the channels of one retriever share, built lazily and kept across calls."""

    def __init__(self, kb: "KnowledgeBase", captioner: Callable[[Any], str] | None = None,
                 rewriter: Callable[[str, str], str] | None = None):
        self.kb = kb
        self.captioner = captioner
        self.rewriter = rewriter
        self.gallery = GalleryCache(kb)  # stored vectors for exact scoring; filled on first use only
        self._banks: dict[int, HubnessBanks] = {}  # per bank size, so a call's hubness_bank_size is honoured

    def exact(self, s: RetrieverSettings) -> bool:
        """Whether whole-gallery methods score every stored vector (see ``scoring_scope``)."""
        if s.scoring_scope == "auto":
            return self.gallery.count() <= EXACT_GALLERY_MAX_RECORDS
        return s.scoring_scope == "gallery"

    def banks(self, size: int) -> HubnessBanks:
        banks = self._banks.get(size)
        if banks is None:
            banks = self._banks[size] = HubnessBanks.load_or_build(self.kb, size)
        return banks

    def refresh_banks(self, size: int, seed: int = 0) -> HubnessBanks:
        self._banks[size] = HubnessBanks.build(self.kb, size, seed)
        return self._banks[size]


class Channel:
    """One scoring of records against a query. Subclasses set the class attributes and fill in
    :meth:`search`; the retriever does everything else.

    Contract (``tests/test_channels.py`` holds every channel to it): ``search`` returns at most
    ``n`` ``(id, score)`` pairs of distinct records that exist and match ``where``, best (highest)
    score first; the same inputs give the same list.
    """

    name: ClassVar[str]
    needs_text: ClassVar[bool] = False
    needs_image: ClassVar[bool] = False

    def __init__(self, resources: ChannelResources):
        self.resources = resources
        self.kb = resources.kb

    def unavailable(self) -> str | None:
        """Why this channel cannot run on this KB (an index it needs is missing), or None."""
        return None

    def prefix_stable(self, q: ChannelQuery, where: dict | None) -> bool:
        """Whether the top ``n`` of this channel are always the first ``n`` of its top ``m > n``
        (then the retriever may fetch a short list first and stop there)."""
        return False

    def search(self, q: ChannelQuery, n: int, where: dict | None) -> Scored:
        raise NotImplementedError


# ---------------------------------------------------------------------------- shared steps
def dense_search(kb: "KnowledgeBase", vec: np.ndarray, collection: str, n: int, where: dict | None,
                 pool: CandidatePool) -> Scored:
    """ANN search of ``collection``; scores are cosine similarities (Chroma's distance is ``1 - cos``).
    The vectors that come back go into ``pool``, so post-processing does not fetch them again."""
    res = kb.vectors.query(collection, [vec], n, where, include=("distances", "embeddings"))
    pool.absorb(collection, {"ids": res["ids"][0], "embeddings": res["embeddings"][0]})
    return [(rid, 1.0 - float(d)) for rid, d in zip(res["ids"][0], res["distances"][0])]


def top_of_gallery(kb: "KnowledgeBase", gal: StoredVectors, scores: np.ndarray, n: int, where: dict | None,
                   collection: str, pool: CandidatePool) -> Scored:
    """The best ``n`` of exact scores over every stored record (``-inf``: excluded), ordered like
    the other channels (score, then id). Their image vectors go into the pool, so the
    near-duplicate walk does not fetch them again."""
    if where is not None:
        allowed = np.zeros(len(gal.ids), bool)
        allowed[[gal.row[i] for i in kb.vectors.ids_where(collection, where) if i in gal.row]] = True
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


def by_score(ids: Sequence[str], scores: Sequence[float], n: int) -> Scored:
    """``(id, score)`` pairs, best first and then by id, at most ``n``."""
    return sorted(zip(ids, (float(s) for s in scores)), key=lambda t: (-t[1], t[0]))[:n]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
