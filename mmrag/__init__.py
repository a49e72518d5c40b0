"""mmrag: retrieval-augmented multimodal generation.

A knowledge base of (image, text) records in Chroma, a multimodal retriever with fusion and
reranking, and two generators fed by it: a vision-language model that answers questions about an
image (:class:`~mmrag.pipelines.RAGVQAPipeline`) and a diffusion model that draws a prompt grounded
on reference images (:class:`~mmrag.pipelines.EntityImagePipeline`).

The subpackages are ``mmrag.retrievers`` (storage and retrieval), ``mmrag.generators`` (the VLM
answerer, the diffusion generator, guidance), ``mmrag.prompts`` (templates) and
``mmrag.pipelines`` (config, end-to-end pipelines, CLI). The main classes are exported here and
load on first use (PEP 562), so ``import mmrag`` stays cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from ._lazy import lazy_exports

try:
    __version__ = _version("mmrag")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "Config": "mmrag.pipelines.config",
    "load_config": "mmrag.pipelines.config",
    "RAGVQAPipeline": "mmrag.pipelines.vqa",
    "VQAOutput": "mmrag.pipelines.outputs",
    "EntityImagePipeline": "mmrag.pipelines.draw",
    "ImageOutput": "mmrag.pipelines.outputs",
    "open_knowledge_base": "mmrag.pipelines.builders",
    "build_retriever": "mmrag.pipelines.builders",
    "KnowledgeBase": "mmrag.retrievers",
    "MultimodalRetriever": "mmrag.retrievers",
    "DualEncoder": "mmrag.retrievers",
    "Query": "mmrag.retrievers",
    "Hit": "mmrag.retrievers",
    "Record": "mmrag.retrievers",
    "MMRAGError": "mmrag.errors",
    "ReferenceDiffusionGenerator": "mmrag.generators",
    "VLMAnswerer": "mmrag.generators",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports("mmrag", globals(), _EXPORTS)
