"""Knowledge base, encoders, ingestion and retrieval for mmrag."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mmrag")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

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
)
from .knowledge_base import KnowledgeBase
from .query import Hit, Query
from .records import IngestReport, Record, Rejection
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
    "VLMReranker",
    "reranker_from_config",
]
