"""The tiny-model builder: every model reloads offline through the ordinary loading path and runs."""

from __future__ import annotations

import multiprocessing
import pathlib

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from mmrag.pipelines.dev import tiny_models as builder
from mmrag.pipelines.dev.tiny_models import (
    COMPLETE_MARKER,
    TINY_MODEL_NAMES,
    build_dual_encoder,
    build_tiny_model,
    build_tiny_models,
    ensure_tiny_model,
)
from mmrag.retrievers.errors import ConfigError

LONG_TEXT = " ".join(["a photo of a small red boat on a quiet lake"] * 10)


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    """Any attempt to reach the Hub fails, so a passing load proved it needed none."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once, at import; what transformers and diffusers consult:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, pathlib.Path]:
    messages = []
    built = build_tiny_models(tmp_path_factory.mktemp("tiny-models"), progress=messages.append)
    assert len(messages) == len(TINY_MODEL_NAMES)
    return built


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # Not square and not 30 px, so the processors must resize and crop.
    return [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(3)]


def _weights(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*.safetensors"))}


def _assert_loaded_as_saved(module: torch.nn.Module, weights: pathlib.Path) -> None:
    """Every parameter came from the file, bit for bit: none renamed away or left at a fresh random
    init (which `from_pretrained` only warns about)."""
    saved, loaded = safetensors.torch.load_file(weights), module.state_dict()
    assert {name for name, _ in module.named_parameters()} <= saved.keys() <= loaded.keys()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)


@pytest.mark.parametrize("family, padding", [("clip", True), ("siglip", "max_length")])
def test_dual_encoder_reloads_and_embeds(tiny_models, images, family, padding):
    model = AutoModel.from_pretrained(tiny_models[family], use_safetensors=True)
    processor = AutoProcessor.from_pretrained(tiny_models[family])
    limit = model.config.text_config.max_position_embeddings

    tokenizer = processor.tokenizer
    assert tokenizer.model_max_length == limit
    assert len(tokenizer(LONG_TEXT).input_ids) > limit  # the long text really needs truncating
    text_inputs = processor(text=["a cat", LONG_TEXT], return_tensors="pt", padding=padding, truncation=True)
    assert text_inputs["input_ids"].shape[1] == limit
    assert text_inputs["input_ids"][1, -1] == tokenizer.eos_token_id  # truncation keeps the end token
    image_inputs = processor(images=images, return_tensors="pt")
    assert image_inputs["pixel_values"].shape == (3, 3, 30, 30)

    _assert_loaded_as_saved(model, tiny_models[family] / "model.safetensors")
    with torch.no_grad():
        text_embeds = model.get_text_features(**text_inputs).pooler_output
        image_embeds = model.get_image_features(**image_inputs).pooler_output
    assert text_embeds.shape == (2, 32)
    assert image_embeds.shape == (3, 32)
    assert torch.isfinite(text_embeds).all() and torch.isfinite(image_embeds).all()
    # the inputs reach the embeddings: other texts and other images give other vectors
    assert (text_embeds[0] - text_embeds[1]).abs().max() > 1e-3
    assert min((image_embeds[i] - image_embeds[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3


def test_llava_answers_about_three_interleaved_images(tiny_models, images):
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"], use_safetensors=True)
    processor = AutoProcessor.from_pretrained(tiny_models["llava"])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A boat."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"},
        ]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "USER: <image>\nWhat is this? ASSISTANT: A boat. </s>USER: Compare <image>\nwith <image>\nASSISTANT:"
    )

    inputs = processor(images=images, text=prompt, return_tensors="pt")
    vision = model.config.vision_config
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2  # the CLS token is dropped ("default")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 3 * tokens_per_image

    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_blip_itm_reloads_and_tells_images_apart(tiny_models, images):
    from transformers import BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(tiny_models["blip-itm"], use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_models["blip-itm"])
    tokenizer = processor.tokenizer
    # The WordPiece vocabulary covers any ASCII text: unseen words split into characters, never [UNK].
    assert tokenizer.unk_token_id not in tokenizer("The Zorblax, 42 striped teal stars!").input_ids
    inputs = processor(images=images, text=["a cat"] * 3, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 30, 30)
    with torch.no_grad():
        itm = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[:, 1]
    assert itm.shape == (3,) and torch.isfinite(itm).all()
    # BLIP's default vision init (std 1e-10) would give every image the same features and score.
    assert len({round(p, 7) for p in itm.tolist()}) == 3


@pytest.fixture()
def sd_pipe(tiny_models) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_models["sd"], use_safetensors=True)


def _generate(pipe, prompt="a red boat", seed=0, **kwargs) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


def test_stable_diffusion_generates(tiny_models, sd_pipe):
    for name, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        _assert_loaded_as_saved(getattr(sd_pipe, name), tiny_models["sd"] / name / f"{weights}.safetensors")
    image = _generate(sd_pipe, height=32, width=32)
    assert image.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(_generate(sd_pipe), image)  # the UNet's sample size is the default
    # the prompt and the seed reach the image; the decoder gives a picture, not a flat field
    assert np.abs(_generate(sd_pipe, prompt="a black dog") - image).max() > 1e-3
    assert np.abs(_generate(sd_pipe, seed=1) - image).max() > 1e-3
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 1e-2


def test_ip_adapter_checkpoint_has_the_h94_layout(tiny_models, sd_pipe):
    state = safetensors.torch.load_file(tiny_models["ip-adapter"] / "models" / "ip-adapter_sd15.safetensors")
    unet = sd_pipe.unet
    cross_attention = [unet.get_submodule(name.removesuffix(".processor"))
                       for name in unet.attn_processors if name.endswith("attn2.processor")]
    # h94 numbers all attention layers in order and stores the odd (cross-attention) ones: 1, 3, 5, ...
    expected = {f"image_proj.{layer}.{param}" for layer in ("proj", "norm") for param in ("weight", "bias")}
    for i, attention in enumerate(cross_attention):
        for kv in ("to_k_ip", "to_v_ip"):
            expected.add(f"ip_adapter.{2 * i + 1}.{kv}.weight")
            assert state[f"ip_adapter.{2 * i + 1}.{kv}.weight"].shape == attention.to_k.weight.shape
    assert set(state) == expected
    # The plain adapter turns one image embedding into 4 extra cross-attention tokens.
    assert state["image_proj.proj.weight"].shape == (4 * unet.config.cross_attention_dim, 32)


def test_ip_adapter_loads_and_conditions_on_two_references(tiny_models, sd_pipe, images):
    sd_pipe.load_ip_adapter(
        str(tiny_models["ip-adapter"]), subfolder="models", weight_name="ip-adapter_sd15.safetensors"
    )
    references = [[images[0], images[1]]]  # one adapter, two reference images

    embeds = sd_pipe.prepare_ip_adapter_image_embeds(references, None, "cpu", 1, True)
    assert [tuple(e.shape) for e in embeds] == [(2, 2, 32)]  # (unconditional + conditional, images, dim)

    sd_pipe.set_ip_adapter_scale(1.0)
    with_references = _generate(sd_pipe, ip_adapter_image=references)
    sd_pipe.set_ip_adapter_scale(0.0)
    without = _generate(sd_pipe, ip_adapter_image=references)
    assert with_references.shape == (1, 32, 32, 3)
    assert np.abs(with_references - without).max() > 1e-3


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny_models, tmp_path):
    session_dir = next(iter(tiny_models.values())).parent
    again = build_tiny_models(tmp_path / "again")
    for name in TINY_MODEL_NAMES:
        files = sorted(p.relative_to(again[name]) for p in again[name].rglob("*") if p.is_file())
        assert files and all((again[name] / f).read_bytes() == (session_dir / name / f).read_bytes() for f in files)

    other = build_tiny_models(tmp_path / "other", seed=1)
    for name in TINY_MODEL_NAMES:
        original, reseeded = _weights(session_dir / name), _weights(other[name])
        assert original.keys() == reseeded.keys()
        assert all(original[key] != reseeded[key] for key in original)


def test_build_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("clip", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_build_refuses_an_existing_directory(tmp_path):
    (tmp_path / "sd").mkdir()
    with pytest.raises(ConfigError, match="ensure_tiny_model"):
        build_tiny_model("sd", tmp_path)


def test_ensure_builds_once(tmp_path):
    path = ensure_tiny_model("clip", tmp_path)
    assert path == tmp_path / "clip" and (path / COMPLETE_MARKER).is_file()
    weights = path / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert ensure_tiny_model("clip", tmp_path) == path
    assert weights.stat().st_mtime_ns == built_at


def test_ensure_rebuilds_a_partial_directory(tmp_path):
    partial = tmp_path / "clip"
    partial.mkdir()
    (partial / "config.json").write_text("{")  # a killed build: files but no completion marker
    stale_staging = tmp_path / ".clip-building-killed"
    stale_staging.mkdir()

    path = ensure_tiny_model("clip", tmp_path)
    assert (path / COMPLETE_MARKER).is_file() and not stale_staging.exists()
    AutoModel.from_pretrained(path, use_safetensors=True)  # config.json was rewritten whole


def _ensure_in_step(barrier, builds, name: str, cache_dir: pathlib.Path) -> None:
    build = builder.build_tiny_model

    def counted_build(*args, **kwargs):
        with builds.get_lock():
            builds.value += 1
        return build(*args, **kwargs)

    builder.build_tiny_model = counted_build  # in this child process only
    barrier.wait()  # both processes have imported everything: ask at the same moment
    ensure_tiny_model(name, cache_dir)


def test_ensure_is_safe_across_processes(tmp_path):
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
    barrier, builds = context.Barrier(2), context.Value("i", 0)
    processes = [context.Process(target=_ensure_in_step, args=(barrier, builds, "sd", tmp_path)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=600)  # only a bound on a hang: each build takes seconds
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0, 0]
    assert builds.value == 1  # the second process waited for the first one's build and reused it
    assert (tmp_path / "sd" / COMPLETE_MARKER).is_file()
    assert not list(tmp_path.glob(".sd-building-*"))


@pytest.mark.parametrize(
    "call, argument, value",
    [
        (lambda tmp: build_tiny_model("gpt2", tmp), "name", "gpt2"),
        (lambda tmp: build_tiny_models(tmp, names=["clip", "blip"]), "names", "blip"),
        (lambda tmp: ensure_tiny_model("sdxl", tmp), "name", "sdxl"),
        (lambda tmp: build_dual_encoder(tmp, family="align"), "family", "align"),
        (lambda tmp: build_dual_encoder(tmp, size="large"), "size", "large"),
    ],
)
def test_unknown_choice_names_the_argument_and_the_valid_values(tmp_path, call, argument, value):
    with pytest.raises(ConfigError) as error:
        call(tmp_path)
    message = str(error.value)
    assert f"`{argument}`" in message and repr(value) in message
    if argument in ("name", "names"):
        assert all(repr(name) in message for name in TINY_MODEL_NAMES)
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_base_dual_encoder_has_the_vit_b32_shape(tmp_path):
    path = build_dual_encoder(tmp_path, family="clip", size="base")
    config = AutoModel.from_pretrained(path, use_safetensors=True).config
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.patch_size, vision.image_size) == (32, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (512, 12, 8)
    assert config.projection_dim == 512


def test_idefics3_wraps_each_image_in_its_own_tokens_and_stops_at_end_of_utterance(tiny_models, images):
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["idefics3"], use_safetensors=True)
    processor = AutoProcessor.from_pretrained(tiny_models["idefics3"])
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "Idefics3ImageProcessorPil"  # no torchvision needed
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Compare with"}, {"type": "image"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>User:<image>Compare with<image><image><end_of_utterance>\nAssistant:"

    # The template writes the BOS itself, as apply_chat_template(tokenize=True) knows.
    inputs = processor(images=images, text=prompt, add_special_tokens=False, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 3, 30, 30)  # (prompts, images, ...): one 30-px tile each
    vision = model.config.vision_config
    tokens_per_image = (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    around = "<fake_token_around_image>"
    wrapped = [around, "<global-img>"] + ["<image>"] * tokens_per_image + [around]
    start = tokens.index("<fake_token_around_image>")
    assert tokens[start : start + len(wrapped)] == wrapped
    assert tokens.count("<image>") == 3 * tokens_per_image == 75

    end_of_utterance = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert end_of_utterance in model.generation_config.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5)
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
