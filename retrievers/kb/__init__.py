"""Storage: the knowledge base, its image store and Chroma collections, the write journal,
ingestion sources, image checks and records."""

from .knowledge_base import MANIFEST_NAME, KnowledgeBase
from .records import IngestReport, Record, Rejection

__all__ = ["MANIFEST_NAME", "IngestReport", "KnowledgeBase", "Record", "Rejection"]
