"""Session-wide fixtures: tiny models built once, offline, through the project's own builder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub
# Before torch loads: idle OpenMP threads must sleep, not spin. On a busy machine two spinning threads
# ran toy-model training up to 10x slower (a 90-s test took over 900 s while other jobs ran).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

from mmrag.pipelines.dev.tiny_models import ensure_tiny_model
from mmrag.retrievers import DualEncoder, KnowledgeBase


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_clip(tiny_models_dir) -> Path:
    return ensure_tiny_model("clip", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_colpali(tiny_models_dir) -> Path:
    """A tiny ColPaliForRetrieval (late interaction: one vector per image position and query token)."""
    return ensure_tiny_model("colpali", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_siglip(tiny_models_dir) -> Path:
    return ensure_tiny_model("siglip", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sd(tiny_models_dir) -> tuple[Path, Path]:
    """The tiny Stable Diffusion pipeline and its IP-Adapter (h94 layout)."""
    return ensure_tiny_model("sd", tiny_models_dir), ensure_tiny_model("ip-adapter", tiny_models_dir)


@pytest.fixture
def tiny_config(tmp_path, tiny_models_dir, tiny_clip) -> Path:
    """A config file for the CLI: the tiny CLIP, from the session's tiny-model folder (no rebuild)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    return cfg


@pytest.fixture(scope="session")
def clip_encoder(tiny_clip) -> DualEncoder:
    return DualEncoder(tiny_clip, device="cpu").warm_up()


@pytest.fixture
def kb(tmp_path, clip_encoder) -> KnowledgeBase:
    return KnowledgeBase.open(tmp_path / "kb", clip_encoder)


# The in-process references that served results are compared with (a module that asks for them defines `config`).
@pytest.fixture(scope="module")
def search_ref(config):
    from mmrag.pipelines.search import SearchPipeline

    return SearchPipeline.from_config(config)


@pytest.fixture(scope="module")
def vqa_ref(config):
    from mmrag.pipelines.vqa import RAGVQAPipeline

    return RAGVQAPipeline.from_config(config)


@pytest.fixture(scope="module")
def draw_ref(config):
    from mmrag.pipelines.draw import EntityImagePipeline

    return EntityImagePipeline.from_config(config)
