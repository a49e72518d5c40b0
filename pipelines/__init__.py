"""End-to-end pipelines, config loading, CLI and evaluation.

Names load on first use (PEP 562), so ``mmrag kb info`` does not pay for importing diffusers.
"""

from __future__ import annotations

from mmrag._lazy import lazy_exports

_EXPORTS = {
    "Config": "mmrag.pipelines.config",
    "load_config": "mmrag.pipelines.config",
    "open_knowledge_base": "mmrag.pipelines.builders",
    "build_embedder": "mmrag.pipelines.builders",
    "build_retriever": "mmrag.pipelines.builders",
    "build_reranker": "mmrag.pipelines.builders",
    "build_answerer": "mmrag.pipelines.builders",
    "build_generator": "mmrag.pipelines.builders",
    "RAGVQAPipeline": "mmrag.pipelines.vqa",
    "VQAOutput": "mmrag.pipelines.outputs",
    "EntityImagePipeline": "mmrag.pipelines.draw",
    "ImageOutput": "mmrag.pipelines.outputs",
    "match_sets": "mmrag.pipelines.match",
    "MatchResult": "mmrag.pipelines.match",
    "make_sample_set": "mmrag.pipelines.dev.sample_data",
    "build_tiny_models": "mmrag.pipelines.dev.tiny_models",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("mmrag.pipelines", globals(), _EXPORTS)
