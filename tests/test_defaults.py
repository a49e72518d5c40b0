"""Pipelines own their defaults: a call argument left at None means "as configured", every default
has one source of truth, a configured reranker is built wherever the config is used, and a model
that cannot load fails at once with one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from mmrag.generators.guidance import InterleavedGuidance, JointGuidance
from mmrag.pipelines import EntityImagePipeline, RAGVQAPipeline, load_config
from mmrag.pipelines.cli import build_parser, main
from mmrag.pipelines.config import CONFIG_DIR, Config, RetrieverConfig
from mmrag.pipelines.search import SearchPipeline
from mmrag.retrievers import ConfigError, DualEncoder, KnowledgeBase, ModelLoadError, Record, RetrieverSettings
from mmrag.retrievers.rerank import DualEncoderReranker, VLMReranker


def _shape(colour, box) -> Image.Image:
    im = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(im).ellipse(box, fill=colour)
    return im


@pytest.fixture(scope="module")
def kb_path(tmp_path_factory, tiny_clip):
    path = tmp_path_factory.mktemp("defaults") / "kb"
    kb = KnowledgeBase.open(path, DualEncoder(tiny_clip))
    kb.add([Record(id=f"r{i}", text=f"a {c} thing number {i}", image=_shape((40 * i % 255, 90, 200 - 30 * i), (i, 2, 30, 28)))
            for i, c in enumerate(["red", "blue", "green", "black", "white"])])
    return path


@pytest.fixture(scope="module")
def config(tiny_models_dir, tiny_sd, tiny_clip, kb_path) -> dict:
    """The tiny preset on this session's tiny models, near-duplicate collapse off (the random
    tiny encoder sees every image as one)."""
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["tiny_models"] = {"cache_dir": str(tiny_models_dir)}
    data["kb"] = {"path": str(kb_path)}
    data.setdefault("retriever", {})["near_duplicate_threshold"] = None
    return data


def _with(config: dict, section: str, **values) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    out.setdefault(section, {})
    out[section] = {**out[section], **values}
    return out


# ---------------------------------------------------------------------------- one source of truth
def test_retriever_config_and_settings_cannot_disagree():
    """RetrieverConfig is generated from RetrieverSettings: same fields, same defaults."""
    settings = {f.name: getattr(RetrieverSettings(), f.name) for f in dataclasses.fields(RetrieverSettings)}
    assert set(RetrieverConfig.model_fields) == set(settings)
    assert RetrieverConfig().model_dump() == settings
    assert Config().retriever.model_dump() == settings


def test_default_yaml_guidance_and_library_defaults_agree():
    """configs/default.yaml, Config() and the guidance classes state the same numbers."""
    assert load_config("default") == Config()
    assert Config().draw.guidance == InterleavedGuidance().to_dict()
    assert JointGuidance().reference_scale == InterleavedGuidance().reference_scale
    raw = yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())
    assert raw["draw"]["guidance"] == InterleavedGuidance().to_dict()
    assert {k: v for k, v in raw["retriever"].items()} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in Config().retriever.model_dump().items()}


def test_cli_flags_do_not_restate_config_values():
    """A flag the user did not give is None, so the config's value stands (not a parser default)."""
    parser = build_parser()
    ask = parser.parse_args(["ask", "q", "--kb", "x"])
    draw = parser.parse_args(["draw", "p", "--kb", "x"])
    assert ask.k is None and ask.rerank is None
    assert (draw.k, draw.steps, draw.guidance, draw.rerank) == (None, None, None, None)


def test_load_config_override_to_none_sets_none():
    cfg = load_config("default", {"vlm.seed": 7, "retriever.near_duplicate_threshold": None, "vqa.min_score": None})
    assert cfg.vlm.seed == 7 and cfg.retriever.near_duplicate_threshold is None and cfg.vqa.min_score is None
    with pytest.raises(ConfigError, match="batch_size"):
        load_config("default", {"ingest.batch_size": None})  # None is a value: and not a valid one here


def test_bad_retriever_value_fails_when_the_config_loads():
    with pytest.raises(ConfigError, match="n_candidates"):
        load_config(None, {"retriever.n_candidates": 0})


# ---------------------------------------------------------------------------- pipelines' defaults
def test_draw_configured_for_joint_draws_joint_by_default(config):
    cfg = _with(config, "draw", guidance={"name": "joint", "text_scale": 4.0, "reference_scale": 2.0}, k=1,
                num_inference_steps=2)
    pipe = EntityImagePipeline.from_config(cfg)
    rows: list[int] = []
    unet = pipe.generator.pipeline.unet
    hook = unet.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    try:
        out = pipe("a red thing", seed=1)
    finally:
        hook.remove()
    assert out.guidance == {"name": "joint", "text_scale": 4.0, "reference_scale": 2.0}
    assert rows == [3, 3]  # joint: three denoiser rows per image, for the configured 2 steps
    assert len(out.references) == 1  # draw.k
    explicit = pipe("a red thing", seed=1, guidance=JointGuidance(text_scale=4.0, reference_scale=2.0),
                    num_inference_steps=2, k=1)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(explicit.images[0]))
    interleaved = pipe("a red thing", seed=1, guidance="interleaved")
    assert interleaved.guidance["name"] == "interleaved"
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(interleaved.images[0]))


def test_vqa_k_comes_from_the_config(config):
    pipe = RAGVQAPipeline.from_config(_with(config, "vqa", k=2))
    assert pipe.k == 2
    out = pipe("what is it?", image=_shape((10, 200, 10), (3, 3, 29, 29)))
    assert len(out.references) == 2
    assert len(pipe("what is it?", image=_shape((10, 200, 10), (3, 3, 29, 29)), k=4).references) == 4


# ---------------------------------------------------------------------------- rerankers from the config
def test_dual_encoder_reranker_with_the_tiny_preset_stays_offline(config, tiny_clip):
    search = SearchPipeline.from_config(_with(config, "reranker", name="dual_encoder"))
    assert isinstance(search.reranker, DualEncoderReranker)
    hits = search("a blue thing", k=3)
    assert "rerank" in hits[0].scores and len(hits) == 3
    # the reranker's order is its own scores', not the retriever's
    assert [h.scores["rerank"] for h in hits] == sorted((h.scores["rerank"] for h in hits), reverse=True)


def test_vlm_reranker_is_built_for_search_and_draw(config):
    cfg = _with(config, "reranker", name="vlm")
    search = SearchPipeline.from_config(cfg)
    assert isinstance(search.reranker, VLMReranker)
    assert len(search("a green thing", k=2)) == 2
    draw = EntityImagePipeline.from_config(_with(cfg, "draw", num_inference_steps=1, k=1))
    assert isinstance(draw.reranker, VLMReranker)
    assert len(draw("a green thing", seed=0).references) == 1


def test_reranker_runs_once_per_search(config):
    search = SearchPipeline.from_config(_with(config, "reranker", name="dual_encoder"))
    calls = []
    real = search.reranker.rank
    search.reranker.rank = lambda q, hits, top_k=None: calls.append(len(hits)) or real(q, hits, top_k=top_k)
    search("a white thing", k=2)
    assert calls == [5]  # every fused candidate (rerank_candidates 30 > the 5 records), reranked once


# ---------------------------------------------------------------------------- fail fast, speak briefly
def _cli(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmrag.pipelines.cli", *map(str, argv)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 # a closed local port: the Hub "is not reachable", without any network
                                 {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_default_preset_without_the_hub_fails_with_one_line(tmp_path, env):
    (tmp_path / "src").mkdir()
    _shape((1, 2, 3), (1, 1, 20, 20)).save(tmp_path / "src" / "a.png")
    run = _cli("ingest", tmp_path / "src", "--kb", tmp_path / "kb", "--config", "default",
               env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "openai/clip-vit-base-patch32" in lines[0] and "--config tiny" in lines[0]
    assert "Retrying" not in run.stderr


def test_check_hub_model_refuses_uncached_ids_offline(monkeypatch, tmp_path):
    from mmrag.pipelines.hub import check_hub_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        check_hub_model("someone/not-cached")
    check_hub_model(str(tmp_path))  # a local folder is never checked against the Hub


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_line(tmp_path, capsys, kb_path):
    code = main(["search", "x", "--kb", str(kb_path), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "CUDA is not available" in err[0] and "cpu" in err[0]
    assert main(["search", "x", "--kb", str(kb_path), "--device", "potato"]) == 2
    assert "not a device" in capsys.readouterr().err


def test_version_and_help_texts(capsys):
    import mmrag

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mmrag {mmrag.__version__}"
    parser = build_parser()
    missing = []
    for action in parser._subparsers._group_actions[0].choices.values():
        subs = [action]
        for a in action._actions:
            if isinstance(a, type(parser._subparsers._group_actions[0])):
                subs += list(a.choices.values())
        for sub in subs:
            missing += [f"{sub.prog} {o.option_strings or o.dest}" for o in sub._actions if not o.help]
    assert not missing, missing


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_components_refuse_a_missing_device_with_a_typed_error(tiny_clip, tiny_sd):
    """Not torch's AssertionError at the first .to(): an error naming `device`, the value and the fix."""
    from mmrag.generators import GenerationError, ReferenceDiffusionGenerator, VLMAnswerer
    from mmrag.retrievers.rerank import CrossEncoderReranker

    for build in (lambda: DualEncoder(tiny_clip, device="cuda"), lambda: CrossEncoderReranker("x", device="cuda:3")):
        with pytest.raises(ConfigError, match=r"`device` 'cuda(:3)?': CUDA is not available .*use cpu"):
            build()
    for build in (lambda: ReferenceDiffusionGenerator(tiny_sd[0], ip_adapter=tiny_sd[1], device="cuda"),
                  lambda: VLMAnswerer("x", device="cuda")):
        with pytest.raises(GenerationError, match="CUDA is not available"):
            build()
    with pytest.raises(ConfigError, match="not a device"):
        DualEncoder(tiny_clip, device="gpu0")
