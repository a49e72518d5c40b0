"""SearchPipeline: retrieve, then rerank. The one search stage that the VQA and drawing pipelines,
``mmrag search`` and ``mmrag eval retrieval`` share, so that a reranker runs exactly once, here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from mmrag.retrievers import ConfigError, Hits, KnowledgeBase, KnowledgeBaseError, MultimodalRetriever, Query
from mmrag.retrievers.query import QueryLike

from .config import Config, load_config


class SearchPipeline:
    """Top-``k`` hits for a query: the retriever's fused candidates, reordered by ``reranker``.

    Args:
        retriever: a :class:`MultimodalRetriever` over the KB.
        reranker: optional, anything with ``rank(query, hits, top_k) -> list[Hit]``. With one,
            ``retriever.settings.rerank_candidates`` fused candidates are fetched and reranked.
    """

    def __init__(self, retriever: MultimodalRetriever, reranker: Any = None):
        if not isinstance(retriever, MultimodalRetriever):
            raise ConfigError(f"`retriever` must be a MultimodalRetriever, got {type(retriever).__name__}.")
        if reranker is not None and not callable(getattr(reranker, "rank", None)):
            raise ConfigError(f"`reranker` must have a rank(query, hits, top_k) method, got {type(reranker).__name__}.")
        self.retriever = retriever
        self.reranker = reranker

    @classmethod
    def from_config(cls, config: str | Path | Mapping | Config | None = None, *, kb_path: str | None = None,
                    vlm: Any = None) -> "SearchPipeline":
        """The config's KB, retriever and reranker (``vlm`` serves a ``vlm`` reranker; built from
        the config when it names one and none is given)."""
        from .builders import build_reranker, build_retriever, open_knowledge_base

        cfg = load_config(config, {} if kb_path is None else {"kb.path": kb_path})
        kb = open_knowledge_base(cfg, create=False)
        return cls(build_retriever(cfg, kb), build_reranker(cfg, vlm=vlm, kb=kb))

    @property
    def kb(self) -> KnowledgeBase:
        return self.retriever.kb

    def __call__(self, query: QueryLike, k: int = 10, where: dict | None = None, *, rerank: bool = True,
                 rerank_query: QueryLike | None = None, timings: dict[str, float] | None = None,
                 **overrides: Any) -> Hits:
        """``k`` hits for ``query`` (a list, with ``.collapsed``: near-duplicates left out); ``rerank=False`` skips the reranker, ``rerank_query`` (default
        ``query``) is what the reranker scores against. ``overrides`` change retriever settings
        for this call. Stage seconds are added to ``timings`` ("retrieve", "rerank")."""
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
        timings = {} if timings is None else timings
        query = Query.coerce(query)  # once: an image path is read here, not again for the reranker
        use_reranker = rerank and self.reranker is not None
        settings = self.retriever.settings
        candidates = overrides.get("rerank_candidates", settings.rerank_candidates)
        n = max(k, candidates) if use_reranker else k
        t = time.perf_counter()
        retrieved = self.retriever.retrieve(query, k=n, where=where, **overrides)
        timings["retrieve"] = timings.get("retrieve", 0.0) + time.perf_counter() - t
        hits = list(retrieved)
        if use_reranker and hits:
            t = time.perf_counter()
            hits = self.reranker.rank(Query.coerce(query if rerank_query is None else rerank_query), hits, top_k=k)
            timings["rerank"] = timings.get("rerank", 0.0) + time.perf_counter() - t
        return Hits(hits[:k], requested=k, collapsed=getattr(retrieved, "collapsed", 0))

    # the retriever's interface, so that evaluation and adapters take either
    retrieve = __call__


def require_records(kb: KnowledgeBase) -> None:
    """Answering or drawing from an empty KB is an error that says what to do."""
    if kb.count() == 0:
        raise KnowledgeBaseError(f"The knowledge base at {str(kb.path)!r} is empty: ingest records first "
                                 "(mmrag ingest SOURCE --kb DIR), or pass references.")
