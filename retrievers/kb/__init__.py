"""Storage: the knowledge base, its image store and Chroma collections, the write journal,
ingestion sources, image checks and records. Names load on first use (PEP 562)."""

from __future__ import annotations

from mmrag._lazy import lazy_exports

_EXPORTS = {
    "MANIFEST_NAME": "mmrag.retrievers.kb.manifest",
    "KnowledgeBase": "mmrag.retrievers.kb.knowledge_base",
    "IngestReport": "mmrag.retrievers.kb.records",
    "Record": "mmrag.retrievers.kb.records",
    "Rejection": "mmrag.retrievers.kb.records",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
