"""Knowledge base, encoders, ingestion and retrieval for mmrag."""

from .encoders import DualEncoder
from .errors import (
    ConfigError,
    EmbedderMismatchError,
    InvalidItemError,
    KnowledgeBaseError,
    KnowledgeBaseLockedError,
    MissingExtraError,
    MMRAGError,
    ModelLoadError,
    NotAKnowledgeBaseError,
    SchemaVersionError,
    UnsafePathError,
    WriteRefusedError,
)
from .kb import KnowledgeBase
from .query import Hit, Hits, Query
from .kb.records import IngestReport, Record, Rejection
from .rerank import CrossEncoderReranker, DualEncoderReranker, Reranker, VLMReranker, reranker_from_config
from .retriever import CHANNELS, MultimodalRetriever, RetrieverSettings

__all__ = [
    "CHANNELS",
    "ConfigError",
    "CrossEncoderReranker",
    "DualEncoder",
    "DualEncoderReranker",
    "EmbedderMismatchError",
    "Hit",
    "Hits",
    "IngestReport",
    "InvalidItemError",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "KnowledgeBaseLockedError",
    "MMRAGError",
    "MissingExtraError",
    "ModelLoadError",
    "MultimodalRetriever",
    "NotAKnowledgeBaseError",
    "Query",
    "Record",
    "Rejection",
    "Reranker",
    "RetrieverSettings",
    "SchemaVersionError",
    "UnsafePathError",
    "VLMReranker",
    "WriteRefusedError",
    "reranker_from_config",
]
