"""Knowledge base, encoders, ingestion and retrieval for mmrag.

Names load on first use (PEP 562): ``from mmrag.retrievers import Hit`` imports the query module
alone, so a client or the command line can use the output classes without torch or Chroma.
"""

from __future__ import annotations

from mmrag._lazy import lazy_exports

_ERRORS = (
    "ConfigError", "EmbedderMismatchError", "InvalidItemError", "KnowledgeBaseError",
    "KnowledgeBaseLockedError", "MissingExtraError", "MMRAGError", "ModelLoadError",
    "NotAKnowledgeBaseError", "SchemaVersionError", "UnsafePathError", "WriteRefusedError",
)
_EXPORTS = {
    **{name: "mmrag.retrievers.errors" for name in _ERRORS},
    "DualEncoder": "mmrag.retrievers.encoders",
    "MultiVectorEncoder": "mmrag.retrievers.multivector",
    "FDEConfig": "mmrag.retrievers.muvera",
    "KnowledgeBase": "mmrag.retrievers.kb.knowledge_base",
    "Hit": "mmrag.retrievers.query",
    "DocumentPart": "mmrag.retrievers.query",
    "Hits": "mmrag.retrievers.query",
    "Query": "mmrag.retrievers.query",
    "IngestReport": "mmrag.retrievers.kb.records",
    "Record": "mmrag.retrievers.kb.records",
    "Rejection": "mmrag.retrievers.kb.records",
    "CrossEncoderReranker": "mmrag.retrievers.rerank",
    "DualEncoderReranker": "mmrag.retrievers.rerank",
    "Reranker": "mmrag.retrievers.rerank",
    "VLMReranker": "mmrag.retrievers.rerank",
    "reranker_from_config": "mmrag.retrievers.rerank",
    "CHANNELS": "mmrag.retrievers.settings",
    "RetrieverSettings": "mmrag.retrievers.settings",
    "MultimodalRetriever": "mmrag.retrievers.retriever",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
