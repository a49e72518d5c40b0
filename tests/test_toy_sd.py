"""toy:sd + toy:ip-adapter's trainer: the exported layout reproduces the training model through the
library's loading path, a killed run resumes exactly, and the batches follow their recipe."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from mmrag.generators.diffusion import ReferenceDiffusionGenerator
from mmrag.pipelines.toyworld import ToyWorld
from mmrag.pipelines.toyworld.checkpoints import CHECKPOINTS, latest_checkpoint
from mmrag.pipelines.toyworld.models import shipped_model_dir
from mmrag.pipelines.toyworld.train_sd import (
    IP_WEIGHT_NAME,
    P_DROP_REFERENCE,
    P_DROP_TEXT,
    ToySD,
    export,
    step_batch,
    train_toy_sd,
)
from mmrag.retrievers.errors import ConfigError


@pytest.fixture(scope="module")
def small_world():
    return ToyWorld(0, n_train=40, n_validation_groups=1, n_heldout_groups=2)


def test_export_loads_through_load_ip_adapter_and_predicts_what_training_predicted(tmp_path, small_world):
    torch.manual_seed(0)
    models = ToySD(shipped_model_dir("clip"))
    # Give every adapter weight a non-trivial value, so a dropped or misnamed tensor shows.
    with torch.no_grad():
        for name, p in models.unet.named_parameters():
            if ".processor." in name or name.startswith("encoder_hid_proj."):
                p.normal_(0, 0.05)
    models.vae.register_to_config(scaling_factor=0.9)
    export(models, tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "ip-adapter" / "models" / IP_WEIGHT_NAME)
    assert {k.split(".")[0] for k in saved} == {"image_proj", "ip_adapter"}
    cross_attention = [n for n in models.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted({int(k.split(".")[1]) for k in saved if k.startswith("ip_adapter.")}) == \
        list(range(1, 2 * len(cross_attention), 2))

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    pipe.load_ip_adapter(str(tmp_path / "ip-adapter"), subfolder="models", weight_name=IP_WEIGHT_NAME,
                         image_encoder_folder="image_encoder")
    assert pipe.vae.config.scaling_factor == 0.9
    entity = small_world.entities("heldout")[0]
    reference = small_world.render(entity, 0)
    with torch.no_grad():
        embeds, null = pipe.encode_image([reference], "cpu", 1, False)  # (1, 128) each
        # the same towers, loaded two ways (attention kernels may differ in the last bits)
        torch.testing.assert_close(embeds, models.encode_references([reference]), rtol=0, atol=1e-5)
        assert torch.count_nonzero(null) == 0  # the dropped reference training used: zeros
        prompt = f"a photo of the {entity.name}"
        text, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        torch.testing.assert_close(text, models.encode_text([prompt]), rtol=0, atol=1e-5)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([500])
        kwargs = dict(encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds[:, None]]})
        trained = models.unet(latents, t, **kwargs).sample
        loaded = pipe.unet(latents, t, **kwargs).sample
        without = pipe.unet(latents, t, encoder_hidden_states=text,
                            added_cond_kwargs={"image_embeds": [torch.zeros_like(embeds)[:, None]]}).sample
    # measured 1.5e-6 apart (float32 summation order); a swapped or dropped adapter layer moves it by > 1e-3
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert (loaded - without).abs().max() > 1e-3  # the reference reaches the prediction

    # and the library's generator draws with it
    generator = ReferenceDiffusionGenerator(tmp_path / "sd", ip_adapter=tmp_path / "ip-adapter", device="cpu",
                                            ip_adapter_scale=1.0)
    out = generator([prompt], references=[[reference]], num_inference_steps=2, seed=0)
    assert out.images[0].size == (32, 32)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, small_world):
    kwargs = dict(vae_steps=2, unet_steps=2, seed=3, threads=1, batch_size=2, checkpoint_every=1, world=small_world)
    train_toy_sd(tmp_path / "whole", **kwargs)
    train_toy_sd(tmp_path / "cut", stop_after=3, **kwargs)  # killed after the first UNet step
    assert latest_checkpoint(tmp_path / "cut").name == "step-000003"
    train_toy_sd(tmp_path / "cut", **kwargs)
    whole = safetensors.torch.load_file(latest_checkpoint(tmp_path / "whole") / "trainable.safetensors")
    cut = safetensors.torch.load_file(latest_checkpoint(tmp_path / "cut") / "trainable.safetensors")
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    log = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [(line["step"], line["phase"]) for line in log] == [(3, "unet"), (4, "unet")]  # each step logged once
    assert len(sorted((tmp_path / "cut" / CHECKPOINTS).glob("step-*"))) == 2  # only the last two kept
    exported = json.loads((tmp_path / "cut" / "sd" / "vae" / "config.json").read_text())
    assert exported["scaling_factor"] != 0.18215  # set from the trained VAE's latents


def test_batches_follow_the_recipe(small_world):
    assert step_batch(small_world, 0, 5, 4)["prompts"] == step_batch(small_world, 0, 5, 4)["prompts"]
    assert step_batch(small_world, 0, 5, 4)["prompts"] != step_batch(small_world, 0, 6, 4)["prompts"]
    rows = [step_batch(small_world, 0, s, 50) for s in range(40)]  # 2,000 rows
    keep_text = torch.cat([r["keep_text"] for r in rows]).float().mean().item()
    keep_reference = torch.cat([r["keep_reference"] for r in rows]).float().mean().item()
    # binomial spread at n = 2000 is about 0.009; 0.04 is over 4 sigma
    assert abs(keep_text - (1 - P_DROP_TEXT)) < 0.04
    assert abs(keep_reference - (1 - P_DROP_REFERENCE)) < 0.04
    names = {e.name for e in small_world.entities("train")}
    held_out = {e.name for e in small_world.entities("heldout")}
    prompts = [p for r in rows for p in r["prompts"]]
    assert not any(name in p for p in prompts for name in held_out)  # training never names a held-out entity
    assert sum(any(name in p for name in names) for p in prompts) > len(prompts) / 2


def test_bad_arguments_name_themselves(tmp_path, small_world):
    with pytest.raises(ConfigError, match="`unet_steps`"):
        train_toy_sd(tmp_path / "a", vae_steps=1, unet_steps=0, world=small_world)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stray.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        train_toy_sd(tmp_path / "b", vae_steps=1, unet_steps=1, world=small_world)


def test_toy_models_train_installs_loadable_models_where_toy_names_are_looked_up(tmp_path, monkeypatch, small_world):
    """The `mmrag toy-models train` path with the recipe shortened (the path is under test, not the quality)."""
    from mmrag.pipelines.toyworld import models, train_sd

    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "no-weights")  # as if the package lacked them
    with pytest.raises(ConfigError, match="mmrag toy-models train --only sd"):
        models.ensure_toy_model("sd", tmp_path / "cache")
    monkeypatch.setattr(models, "TOY_CLIP_RECIPE", dict(steps=2, seed=0, threads=1))
    monkeypatch.setattr(models, "TOY_SD_RECIPE", dict(vae_steps=1, unet_steps=1, seed=0, threads=1, batch_size=2))
    monkeypatch.setattr(train_sd, "ToyWorld", lambda: small_world)
    built = models.train_toy_models(tmp_path / "cache", ["ip-adapter"])  # trains sd with it
    assert built == {"sd": tmp_path / "cache" / "toy-sd", "ip-adapter": tmp_path / "cache" / "toy-ip-adapter"}
    assert models.ensure_toy_model("sd", tmp_path / "cache") == built["sd"]
    assert models.ensure_toy_model("ip-adapter", tmp_path / "cache") == built["ip-adapter"]
    assert not (built["sd"] / CHECKPOINTS).exists() and (built["sd"] / "train_log.jsonl").is_file()
    generator = ReferenceDiffusionGenerator(built["sd"], ip_adapter=built["ip-adapter"], device="cpu")
    entity = small_world.entities("heldout")[0]
    out = generator([f"the {entity.name}"], references=[[small_world.render(entity, 0)]], num_inference_steps=1, seed=0)
    assert out.images[0].size == (32, 32)


def test_cli_toy_models_train_names_a_bad_model_in_one_line(capsys):
    from mmrag.pipelines.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["toy-models", "train", "--only", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
