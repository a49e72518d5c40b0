"""Build library components from a :class:`~pipelines.config.Config`."""

from __future__ import annotations

import json
from pathlib import Path

from retrievers import DualEncoder, KnowledgeBase
from retrievers.knowledge_base import MANIFEST_NAME

from .config import TINY_PREFIX, Config


def build_embedder(config: Config) -> DualEncoder:
    e = config.embedder
    return DualEncoder(config.resolve_model(e.model), device=e.device, dtype=e.dtype, batch_size=e.batch_size,
                       trust_remote_code=e.trust_remote_code)


def open_knowledge_base(config: Config, *, create: bool = True) -> KnowledgeBase:
    """Open (or create) the KB at ``config.kb.path``.

    An existing KB keeps the embedder it was built with unless the config names one explicitly
    (then a different one is refused with :class:`EmbedderMismatchError`). A KB built with a tiny
    model whose cache folder is gone gets the model rebuilt (it is seeded, so it is the same model).
    """
    kb = config.kb
    path = Path(kb.path).expanduser()
    exists = (path / MANIFEST_NAME).exists()
    embedder = None
    if not exists or "model" in config.embedder.model_fields_set:
        embedder = build_embedder(config)
    elif exists:
        _rebuild_missing_tiny_model(path, config)
    return KnowledgeBase.open(path, embedder, kb.url, create=create, lock_timeout=kb.lock_timeout,
                              max_image_pixels=kb.max_image_pixels, max_text_chars=kb.max_text_chars,
                              allow_remote=kb.allow_remote)


def _rebuild_missing_tiny_model(path: Path, config: Config) -> None:
    try:
        model_id = json.loads((path / MANIFEST_NAME).read_text())["embedder"]["model_id"]
    except (OSError, ValueError, KeyError):
        return  # KnowledgeBase.open reports an unreadable manifest properly
    model_path = Path(model_id)
    cache = Path(config.tiny_models.cache_dir).expanduser().resolve()
    if model_path.is_absolute() and not model_path.exists() and model_path.parent == cache:
        config.resolve_model(TINY_PREFIX + model_path.name)
