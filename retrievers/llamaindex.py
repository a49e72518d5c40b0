"""llama-index adapters (extra ``llamaindex``): an mmrag retriever as a llama-index retriever, an mmrag
reranker as a node postprocessor.

llama-index's own multimodal index keeps text and image hits in two unrelated lists and its
postprocessors cannot score images (see shared/reference/rag_anchors.md, section 1); its documented
plug-in points are a custom ``BaseRetriever`` and a custom ``BaseNodePostprocessor``, which is what
this module provides. Each mmrag hit becomes an ``ImageNode`` (record text, image path, metadata)::

    from llama_index.core.query_engine import RetrieverQueryEngine
    engine = RetrieverQueryEngine.from_args(
        MMRAGRetriever(MultimodalRetriever(kb), similarity_top_k=20), llm=llm,
        node_postprocessors=[MMRAGRerankPostprocessor(CrossEncoderReranker(model_id), top_n=5)])

The node metadata carries the record's own metadata plus ``mmrag_id`` and ``mmrag_scores`` (the
per-channel scores); both are hidden from the LLM and from embedding.

Importing this module without llama-index installed raises :class:`MissingExtraError` with the
install command; ``import retrievers`` never imports llama-index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from .errors import ConfigError, MissingExtraError
from .query import Hit, Query
from .kb.records import Record

INSTALL_COMMAND = 'pip install "mmrag[llamaindex]"'


try:
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import BaseNode, ImageNode, MetadataMode, NodeWithScore, QueryBundle
except ImportError as e:
    raise MissingExtraError(
        f"retrievers.llamaindex needs llama-index-core, which is not installed ({e}). "
        f"Install it with: {INSTALL_COMMAND}"
    ) from e

ID_KEY = "mmrag_id"
SCORES_KEY = "mmrag_scores"
_OUR_KEYS = (ID_KEY, SCORES_KEY)


# ------------------------------------------------------------------------------------- conversions
def query_from_bundle(query_bundle: QueryBundle) -> Query:
    """A llama-index query as an mmrag :class:`Query`.

    The text is ``custom_embedding_strs`` when given (llama-index's "embed this instead of the
    question"), else ``query_str``; the image is ``image_path``. A precomputed ``embedding`` is not
    used: it may come from another model (llama-index reuses one bundle across retrievers).
    """
    texts = [t for t in query_bundle.embedding_strs if t and t.strip()]
    if len(texts) > 1:
        raise ConfigError(
            f"The query bundle has {len(texts)} custom embedding strings {texts!r}; mmrag embeds one text per "
            "query: pass one string (or join them)."
        )
    text = texts[0] if texts else None
    image = Path(query_bundle.image_path) if query_bundle.image_path else None
    return Query.coerce(Query(text=text, image=image))


def hit_to_node(hit: Hit) -> NodeWithScore:
    """An mmrag :class:`Hit` as a llama-index ``NodeWithScore`` around an ``ImageNode``."""
    record = hit.record
    image_path = str(record.image) if isinstance(record.image, (str, Path)) else None
    node = ImageNode(
        id_=hit.id,
        text=record.text,
        image_path=image_path,
        metadata={**record.metadata, ID_KEY: hit.id, SCORES_KEY: dict(hit.scores)},
        # Ids and scores are bookkeeping, not context: keep them out of prompts and embeddings.
        excluded_llm_metadata_keys=list(_OUR_KEYS),
        excluded_embed_metadata_keys=list(_OUR_KEYS),
    )
    return NodeWithScore(node=node, score=hit.score)


def node_to_hit(node_with_score: NodeWithScore, rank: int = 0) -> Hit:
    """A ``NodeWithScore`` (ours or any other retriever's) back as a :class:`Hit`.

    The record is rebuilt from the node: its text, its ``image_path`` (nodes without one become
    text-only records; an image given only as base64 or a URL is not fetched) and its metadata
    minus mmrag's own keys. A node without a score gets 0.0.
    """
    node: BaseNode = node_with_score.node
    metadata = dict(node.metadata)
    rid = str(metadata.pop(ID_KEY, node.node_id))
    scores = {str(k): float(v) for k, v in (metadata.pop(SCORES_KEY, None) or {}).items()}
    image = getattr(node, "image_path", None) or None
    record = Record(text=node.get_content(metadata_mode=MetadataMode.NONE), image=image, id=rid, metadata=metadata)
    score = node_with_score.score
    return Hit(id=rid, record=record, score=float(score) if score is not None else 0.0, scores=scores, rank=rank)


# ----------------------------------------------------------------------------------------- retriever
class MMRAGRetriever(BaseRetriever):
    """Any mmrag retriever (``retrieve(query, k=..., where=...) -> list[Hit]``, e.g.
    :class:`retrievers.retriever.MultimodalRetriever`) as a llama-index retriever.

    Args:
        retriever: the mmrag retriever.
        similarity_top_k: hits per query (llama-index's name for ``k``).
        where: a Chroma metadata filter applied to every query.
        callback_manager: llama-index callbacks (default: a fresh, empty manager).
    """

    def __init__(self, retriever: Any, similarity_top_k: int = 10, where: dict | None = None,
                 callback_manager: Optional[CallbackManager] = None):
        if not callable(getattr(retriever, "retrieve", None)):
            raise ConfigError(
                f"`retriever` must have a retrieve(query, k=..., where=...) method, got {type(retriever).__name__}."
            )
        if not isinstance(similarity_top_k, int) or isinstance(similarity_top_k, bool) or similarity_top_k <= 0:
            raise ConfigError(f"`similarity_top_k` must be a positive integer, got {similarity_top_k!r}.")
        super().__init__(callback_manager=callback_manager if callback_manager is not None else CallbackManager())
        self.mmrag_retriever = retriever
        self.similarity_top_k = similarity_top_k
        self.where = where

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        hits = self.mmrag_retriever.retrieve(query_from_bundle(query_bundle), k=self.similarity_top_k, where=self.where)
        return [hit_to_node(hit) for hit in hits]

    def image_to_image_retrieve(self, str_or_query_bundle: str | QueryBundle) -> List[NodeWithScore]:
        """Retrieve with an image only (what ``SimpleMultiModalQueryEngine.image_query`` calls)."""
        if isinstance(str_or_query_bundle, str):
            str_or_query_bundle = QueryBundle(query_str="", image_path=str_or_query_bundle)
        return self.retrieve(str_or_query_bundle)


# -------------------------------------------------------------------------------------- postprocessor
class MMRAGRerankPostprocessor(BaseNodePostprocessor):
    """Any mmrag reranker (``rank(query, hits, top_k) -> list[Hit]``) as a llama-index node postprocessor.

    Nodes are turned back into hits (see :func:`node_to_hit`), ranked against the query bundle
    (see :func:`query_from_bundle`), and returned best first with the reranker's score as their
    score, ``"rerank"`` added to ``mmrag_scores``, and at most ``top_n`` of them.
    """

    top_n: Optional[int] = Field(default=None, description="Nodes to keep after reranking (None: all).")
    _reranker: Any = PrivateAttr()

    def __init__(self, reranker: Any, top_n: Optional[int] = None, **kwargs: Any):
        if not callable(getattr(reranker, "rank", None)):
            raise ConfigError(f"`reranker` must have a rank(query, hits, top_k) method, got {type(reranker).__name__}.")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n <= 0):
            raise ConfigError(f"`top_n` must be a positive integer or None, got {top_n!r}.")
        super().__init__(top_n=top_n, **kwargs)
        self._reranker = reranker

    @classmethod
    def class_name(cls) -> str:
        return "MMRAGRerankPostprocessor"

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ConfigError("MMRAGRerankPostprocessor needs the query: call postprocess_nodes(nodes, query_bundle=...).")
        if not nodes:
            return []
        hits = [node_to_hit(n, rank) for rank, n in enumerate(nodes, start=1)]
        by_id = {}
        for hit, n in zip(hits, nodes):
            if hit.id in by_id:
                raise ConfigError(f"Two nodes share the id {hit.id!r}; the reranker needs unique node ids.")
            by_id[hit.id] = n
        ranked = self._reranker.rank(query_from_bundle(query_bundle), hits, top_k=self.top_n)
        out = []
        for hit in ranked:
            node = by_id[hit.id].node
            # A copy with the new scores: the input nodes may be shared with the caller.
            metadata = {**node.metadata, SCORES_KEY: dict(hit.scores)}
            out.append(NodeWithScore(node=node.model_copy(update={"metadata": metadata}), score=hit.score))
        return out
