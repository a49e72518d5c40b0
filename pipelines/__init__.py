"""End-to-end pipelines, config loading, CLI and evaluation.

Names load on first use (PEP 562), so ``mmrag kb info`` does not pay for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Config": "pipelines.config",
    "load_config": "pipelines.config",
    "open_knowledge_base": "pipelines.components",
    "build_embedder": "pipelines.components",
    "build_retriever": "pipelines.components",
    "build_reranker": "pipelines.components",
    "build_answerer": "pipelines.components",
    "build_generator": "pipelines.components",
    "RAGVQAPipeline": "pipelines.vqa",
    "VQAOutput": "pipelines.vqa",
    "EntityImagePipeline": "pipelines.draw",
    "ImageOutput": "pipelines.draw",
    "make_sample_set": "pipelines.sample_data",
    "build_tiny_models": "pipelines.tiny_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
