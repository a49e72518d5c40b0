"""ReferenceDiffusionGenerator on tiny, seeded SD 1.x and SDXL models with a tiny IP-Adapter.

The references the loop is checked against are independent of it:
- a hand-written loop below, which evaluates every condition with its OWN UNet call (batch 1), takes
  the image embeddings from diffusers' `prepare_ip_adapter_image_embeds` and combines the predictions
  with the guidance formulas written out again here;
- diffusers' own `StableDiffusionPipeline.__call__` / `StableDiffusionXLPipeline.__call__` with
  `ip_adapter_image`, which our `cfg` must reproduce.
"""

from __future__ import annotations

import shutil

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from mmrag.generators import (
    ClassifierFreeGuidance,
    GenerationError,
    GeneratorLoadError,
    GuidanceError,
    InterleavedGuidance,
    JointGuidance,
    ReferenceDiffusionGenerator,
)
from mmrag.pipelines.dev.tiny_models import ensure_tiny_model
from mmrag.prompts import render

PROMPT = "a photo of a cat sitting on a red sofa"
STEPS = 3
W_T, W_R = 4.0, 2.5  # distinct text and reference scales, so swapping them cannot pass


def random_image(seed: int, size=(40, 36)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


REFS = [random_image(1), random_image(2, (48, 48))]
OTHER_REFS = [random_image(3), random_image(4)]


@pytest.fixture(scope="session")
def sd_dirs(tiny_models_dir):
    return ensure_tiny_model("sd", tiny_models_dir), ensure_tiny_model("ip-adapter", tiny_models_dir)


@pytest.fixture(scope="session")
def generator(sd_dirs) -> ReferenceDiffusionGenerator:
    sd, ip_adapter = sd_dirs
    return ReferenceDiffusionGenerator(sd, ip_adapter=ip_adapter, device="cpu").warm_up()


@pytest.fixture
def unet_batches(generator, monkeypatch) -> list[int]:
    """The batch size of every UNet call, recorded by a wrapper around the real forward."""
    unet, calls = generator.pipeline.unet, []
    forward = unet.forward

    def counting_forward(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting_forward)
    return calls


# --------------------------------------------------------------------------------- hand-written loop
TEXT_ENHANCED = lambda e: W_T * e["cond"] - (W_T - 1) * e["drop_text"]  # noqa: E731
REFERENCE_ENHANCED = lambda e: W_R * e["cond"] - (W_R - 1) * e["drop_reference"]  # noqa: E731
JOINT = lambda e: (e["cond"] + (W_T - 1) * (e["cond"] - e["drop_text"])  # noqa: E731
                   + (W_R - 1) * (e["cond"] - e["drop_reference"]))
CFG = lambda e: e["drop_both"] + W_T * (e["cond"] - e["drop_both"])  # noqa: E731
CONDITIONED = lambda e: e["cond"]  # noqa: E731


@torch.no_grad()
def hand_loop(pipe, combine, references=REFS, seed=0, steps=STEPS, size=32, ip_adapter_scale=0.5):
    """Final latents of a DDIM loop with four separate UNet calls per step; ``combine(step, eps)``."""
    pipe.set_ip_adapter_scale(ip_adapter_scale)
    text, null_text = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    if references:
        null_image, image = pipe.prepare_ip_adapter_image_embeds([references], None, "cpu", 1, True)[0].chunk(2)
    else:  # the IP-Adapter's "no image": zero embeddings
        image = null_image = torch.zeros(1, 1, pipe.image_encoder.config.projection_dim)
    latents = pipe.prepare_latents(1, 4, size, size, text.dtype, "cpu", torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(steps)
    for i, t in enumerate(pipe.scheduler.timesteps):
        x = pipe.scheduler.scale_model_input(latents, t)
        eps = {row: pipe.unet(x, t, encoder_hidden_states=txt, added_cond_kwargs={"image_embeds": [img]}).sample
               for row, txt, img in [("cond", text, image), ("drop_text", null_text, image),
                                     ("drop_reference", text, null_image), ("drop_both", null_text, null_image)]}
        latents = pipe.scheduler.step(combine(i, eps), t, latents).prev_sample
    return latents


def assert_latents_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- (a, c) guidance against the hand loop
@pytest.mark.parametrize("guidance, combine", [
    (ClassifierFreeGuidance(W_T), lambda i, e: CFG(e)),
    (JointGuidance(W_T, W_R), lambda i, e: JOINT(e)),
    (InterleavedGuidance(W_T, W_R, eta=1.0), lambda i, e: TEXT_ENHANCED(e)),
    (InterleavedGuidance(W_T, W_R, eta=0.0), lambda i, e: REFERENCE_ENHANCED(e)),
    # eta = 1/2 over 3 steps: floor((i+1)/2) - floor(i/2) = 1 only for i = 1.
    (InterleavedGuidance(W_T, W_R, eta=0.5), lambda i, e: TEXT_ENHANCED(e) if i == 1 else REFERENCE_ENHANCED(e)),
], ids=["cfg", "joint", "interleaved-eta1-text", "interleaved-eta0-reference", "interleaved-eta0.5"])
def test_guidance_matches_separate_denoiser_calls_combined_by_hand(generator, guidance, combine):
    out = generator(PROMPT, REFS, guidance=guidance, num_inference_steps=STEPS, seed=0, output_type="latent")
    assert_latents_close(out.images, hand_loop(generator.pipeline, combine))
    assert out.guidance == guidance.to_dict() and out.references_used == 2 and out.fallback is None


def test_text_and_reference_enhanced_runs_really_differ(generator):
    """Guards the test above: on these tiny models the two directions must lead to different latents."""
    text = hand_loop(generator.pipeline, lambda i, e: TEXT_ENHANCED(e))
    reference = hand_loop(generator.pipeline, lambda i, e: REFERENCE_ENHANCED(e))
    unguided = hand_loop(generator.pipeline, lambda i, e: CONDITIONED(e))
    assert (text - reference).abs().max() > 1e-2 and (text - unguided).abs().max() > 1e-2


# --------------------------------------------------------------------------- (d) scales of one
def test_scales_of_one_give_the_fully_conditioned_prediction(generator):
    expected = hand_loop(generator.pipeline, lambda i, e: CONDITIONED(e))
    images = []
    for guidance in (ClassifierFreeGuidance(1.0), JointGuidance(1.0, 1.0), InterleavedGuidance(1.0, 1.0, eta=0.5)):
        assert_latents_close(generator(PROMPT, REFS, guidance=guidance, num_inference_steps=STEPS, seed=0,
                                       output_type="latent").images, expected)
        images.append(generator(PROMPT, REFS, guidance=guidance, num_inference_steps=STEPS, seed=0,
                                output_type="np").images)
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)
    np.testing.assert_allclose(images[0], images[2], atol=1e-5)


# ------------------------------------------------------------------------------ (b) rows per step
@pytest.mark.parametrize("guidance, rows", [("cfg", 2), ("joint", 3), ("interleaved", 2)])
def test_one_batched_unet_call_per_step_with_the_guidance_rows(generator, unet_batches, guidance, rows):
    calls_at_step_end = []

    def mark_step(gen, step, timestep, tensors):
        calls_at_step_end.append(len(unet_batches))
        return tensors

    prompts, per_prompt = ["a red bus", "a black dog"], 2
    out = generator(prompts, REFS, guidance=guidance, num_inference_steps=4, num_images_per_prompt=per_prompt,
                    seed=0, callback_on_step_end=mark_step, output_type="latent")
    assert calls_at_step_end == [1, 2, 3, 4]  # exactly one UNet call per step
    assert unet_batches == [rows * len(prompts) * per_prompt] * 4
    assert out.rows_per_step == [rows] * 4


# ------------------------------------------------------------------------ (e) seeds and batches
def test_a_seed_reproduces_the_image_and_another_seed_differs(generator):
    first = generator(PROMPT, REFS, num_inference_steps=STEPS, seed=7, output_type="np").images
    again = generator(PROMPT, REFS, num_inference_steps=STEPS, seed=7, output_type="np").images
    other = generator(PROMPT, REFS, num_inference_steps=STEPS, seed=8, output_type="np").images
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_prompts_times_images_per_prompt_images(generator):
    out = generator(["a red bus", "a black dog", "a bowl of fruit"], REFS, num_inference_steps=2,
                    num_images_per_prompt=2, seed=0)
    assert len(out.images) == 6 and all(image.size == (32, 32) for image in out.images)
    assert generator(PROMPT, REFS, num_inference_steps=2, height=48, width=64, seed=0,
                     output_type="np").images.shape == (1, 48, 64, 3)


def test_each_prompt_keeps_its_own_references_in_a_batch(generator):
    """Per-sample image embeddings (diffusers issue #9813): a batch equals the calls made one by one."""
    batch = generator(["a red bus", "a black dog"], [REFS, OTHER_REFS], num_inference_steps=STEPS,
                      generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
                      output_type="latent").images
    alone = [generator(prompt, refs, num_inference_steps=STEPS, seed=seed, output_type="latent").images
             for prompt, refs, seed in [("a red bus", REFS, 0), ("a black dog", OTHER_REFS, 1)]]
    assert_latents_close(batch, torch.cat(alone))
    swapped = generator("a red bus", OTHER_REFS, num_inference_steps=STEPS, seed=0, output_type="latent").images
    assert (swapped - alone[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------- (f) parity with diffusers
@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpm++"])
@pytest.mark.parametrize("prompts, per_prompt", [(PROMPT, 1), (["a red bus", "a black dog"], 2)])
def test_cfg_reproduces_diffusers_own_ip_adapter_pipeline(sd_dirs, generator, scheduler, prompts, per_prompt):
    sd, ip_adapter = sd_dirs
    if scheduler is not None:  # its own pipeline: the scheduler is swapped on the pipeline object
        generator = ReferenceDiffusionGenerator(sd, ip_adapter=ip_adapter, device="cpu", scheduler=scheduler)
    ours = generator(prompts, REFS, guidance=ClassifierFreeGuidance(5.0), num_inference_steps=4,
                     num_images_per_prompt=per_prompt, seed=3, output_type="np").images
    theirs = generator.pipeline(prompts, ip_adapter_image=[REFS], guidance_scale=5.0, num_inference_steps=4,
                                num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(3),
                                output_type="np").images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_negative_prompt_is_the_dropped_text_as_in_diffusers(generator):
    prompts = ["a red bus", "a black dog"]
    ours = generator(prompts, REFS, guidance="cfg", negative_prompt="blurry, low quality", num_inference_steps=3,
                     seed=2, output_type="np").images
    theirs = generator.pipeline(prompts, ip_adapter_image=[REFS], negative_prompt=["blurry, low quality"] * 2,
                                guidance_scale=7.5, num_inference_steps=3, generator=torch.Generator().manual_seed(2),
                                output_type="np").images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    default = generator(prompts, REFS, guidance="cfg", num_inference_steps=3, seed=2, output_type="np").images
    assert np.abs(ours - default).max() > 1e-3


# --------------------------------------------------------------------------- fallback and prompts
def test_no_references_falls_back_to_cfg_at_the_text_scale(generator):
    out = generator(PROMPT, None, guidance=InterleavedGuidance(W_T, W_R), num_inference_steps=STEPS, seed=0,
                    output_type="latent")
    assert out.fallback is not None and "interleaved" in out.fallback and str(W_T) in out.fallback
    assert out.guidance == {"name": "cfg", "scale": W_T} and out.references_used == 0
    assert out.rows_per_step == [2] * STEPS
    assert_latents_close(out.images, hand_loop(generator.pipeline, lambda i, e: CFG(e), references=None))
    explicit = generator(PROMPT, [], guidance="cfg", num_inference_steps=STEPS, seed=0, output_type="latent")
    assert explicit.fallback is None


def test_reference_texts_are_folded_into_the_prompt_through_the_template(generator):
    texts = ["a tabby cat", "a velvet sofa"]
    folded = generator(PROMPT, REFS, reference_texts=texts, num_inference_steps=STEPS, seed=0,
                       output_type="latent").images
    rendered = render("reference_prompt", references="; ".join(texts), prompt=PROMPT)
    assert texts[0] in rendered and PROMPT in rendered
    by_hand = generator(rendered, REFS, num_inference_steps=STEPS, seed=0, output_type="latent").images
    plain = generator(PROMPT, REFS, num_inference_steps=STEPS, seed=0, output_type="latent").images
    torch.testing.assert_close(folded, by_hand)
    assert (folded - plain).abs().max() > 1e-3


def test_ip_adapter_scale_override_is_used_for_the_call(generator):
    joint = JointGuidance(W_T, W_R)
    base = generator(PROMPT, REFS, guidance=joint, num_inference_steps=STEPS, seed=0, output_type="latent").images
    zero = generator(PROMPT, REFS, guidance=joint, num_inference_steps=STEPS, seed=0, ip_adapter_scale=0.0,
                     output_type="latent").images
    assert (base - zero).abs().max() > 1e-3
    assert_latents_close(zero, hand_loop(generator.pipeline, lambda i, e: JOINT(e), ip_adapter_scale=0.0))


# ---------------------------------------------------------------------------------------- callback
def test_callback_gets_only_the_tensors_asked_for_and_can_replace_latents(generator):
    seen = []

    def zero_last_step(gen, step, timestep, tensors):
        seen.append(set(tensors))
        assert gen is generator and all(isinstance(t, torch.Tensor) for t in tensors.values())
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else tensors

    out = generator(PROMPT, REFS, num_inference_steps=STEPS, seed=0, callback_on_step_end=zero_last_step,
                    output_type="latent")
    assert seen == [{"latents"}] * STEPS
    assert torch.count_nonzero(out.images) == 0

    seen.clear()
    generator(PROMPT, REFS, num_inference_steps=STEPS, seed=0, callback_on_step_end=lambda *a: seen.append(a[3]) or {},
              callback_on_step_end_tensor_inputs=["noise_pred", "latents"], output_type="latent")
    assert [set(tensors) for tensors in seen] == [{"noise_pred", "latents"}] * STEPS


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, error, match", [
    ({"prompt": ""}, GenerationError, "`prompt`"),
    ({"prompt": None}, GenerationError, "`prompt`"),
    ({"prompt": []}, GenerationError, "`prompt`"),
    ({"prompt": ["a cat", "   "]}, GenerationError, "`prompt`"),
    ({"height": 33}, GenerationError, "`height` must be a positive multiple of 2"),
    ({"width": 0}, GenerationError, "`width`"),
    ({"guidance": {"name": "interleaved", "eta": 1.5}}, GuidanceError, "`eta`"),
    ({"guidance": "reimagen"}, GuidanceError, "'cfg', 'joint', 'interleaved'"),
    ({"references": ["ref.jpg"]}, GenerationError, r"`references\[0\]` must be a PIL.Image.Image"),
    ({"references": [REFS[0], np.zeros((8, 8, 3))]}, GenerationError, r"`references\[1\]`"),
    ({"references": [[REFS[0]], [REFS[1]]]}, GenerationError, "2 lists for 1 prompts"),
    ({"prompt": ["a", "b"], "references": [REFS, REFS[:1]]}, GenerationError, "same number"),
    ({"references": REFS, "reference_texts": ["only one"]}, GenerationError, "`reference_texts`"),
    ({"num_inference_steps": 0}, GenerationError, "`num_inference_steps` must be a positive integer"),
    ({"num_inference_steps": 2.5}, GenerationError, "`num_inference_steps`"),
    ({"num_images_per_prompt": -1}, GenerationError, "`num_images_per_prompt`"),
    ({"callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}, GenerationError, "'noise_pred'"),
    ({"output_type": "pt"}, GenerationError, "'pil', 'np', 'latent'"),
    ({"seed": 1, "generator": torch.Generator()}, GenerationError, "not both"),
    ({"generator": [torch.Generator()] * 2}, GenerationError, "one per image"),
    ({"ip_adapter_scale": -0.5}, GenerationError, "`ip_adapter_scale`"),
    ({"negative_prompt": ["one", "two"]}, GenerationError, "`negative_prompt`"),
])
def test_bad_inputs_are_typed_errors(generator, unet_batches, kwargs, error, match):
    kwargs = {"prompt": PROMPT, "references": REFS, "num_inference_steps": 2} | kwargs
    with pytest.raises(error, match=match):
        generator(**kwargs)
    assert unet_batches == []  # rejected before any denoising


def test_callback_must_return_a_dict(generator):
    with pytest.raises(GenerationError, match="must return a dict"):
        generator(PROMPT, REFS, num_inference_steps=2, callback_on_step_end=lambda *args: None)


def test_constructor_and_loading_errors(tmp_path, sd_dirs):
    with pytest.raises(GenerationError, match="'ddim', 'euler', 'euler_a', 'dpm\\+\\+'"):
        ReferenceDiffusionGenerator(sd_dirs[0], scheduler="heun")
    with pytest.raises(GenerationError, match="`dtype`"):
        ReferenceDiffusionGenerator(sd_dirs[0], dtype="float8")
    with pytest.raises(GeneratorLoadError, match="model_index.json"):
        ReferenceDiffusionGenerator(tmp_path, device="cpu").warm_up()
    with pytest.raises(GeneratorLoadError, match="IP-Adapter"):
        ReferenceDiffusionGenerator(sd_dirs[0], ip_adapter=tmp_path, device="cpu").warm_up()


def test_warm_up_is_idempotent_and_from_pipeline_wraps_a_loaded_pipeline(generator):
    assert generator.warm_up().pipeline is generator.pipeline
    wrapped = ReferenceDiffusionGenerator.from_pipeline(generator.pipeline)
    assert wrapped.pipeline is generator.pipeline
    assert_latents_close(wrapped(PROMPT, REFS, num_inference_steps=2, seed=0, output_type="latent").images,
                         generator(PROMPT, REFS, num_inference_steps=2, seed=0, output_type="latent").images)


# -------------------------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="session")
def sdxl_dirs(tmp_path_factory, sd_dirs):
    """A tiny SDXL (two text encoders, text_time added conditions) and a matching IP-Adapter."""
    sd, ip_adapter = sd_dirs
    root = tmp_path_factory.mktemp("tiny-sdxl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
        text_config = CLIPTextConfig.from_pretrained(sd / "text_encoder", projection_dim=32)
        unet_config = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text
                           cross_attention_dim=64)  # both encoders' hidden states side by side
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config),
                                         text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         feature_extractor=CLIPImageProcessorPil(
                                             size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
                                         add_watermarker=False)
        pipe.save_pretrained(root / "sdxl", safe_serialization=True)
        # The adapter: the tiny SD one's image encoder, new projection and key/value layers for 64-d text.
        models = root / "ip-adapter" / "sdxl_models"
        shutil.copytree(ip_adapter / "models" / "image_encoder", models / "image_encoder")
        vision = CLIPVisionConfig.from_pretrained(models / "image_encoder")
        projection = ImageProjection(image_embed_dim=vision.projection_dim, cross_attention_dim=64,
                                     num_image_text_embeds=4)
        state = {f"image_proj.proj.{n}": projection.image_embeds.get_parameter(n) for n in ("weight", "bias")}
        state |= {f"image_proj.norm.{n}": projection.norm.get_parameter(n) for n in ("weight", "bias")}
        cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
        for index, name in enumerate(cross):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for layer in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{2 * index + 1}.{layer}.weight"] = torch.nn.Linear(64, hidden, bias=False).weight
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in state.items()},
                                    models / "ip-adapter_sdxl.safetensors")
    return root / "sdxl", root / "ip-adapter"


@pytest.fixture(scope="session")
def sdxl_generator(sdxl_dirs):
    sdxl, ip_adapter = sdxl_dirs
    return ReferenceDiffusionGenerator(sdxl, ip_adapter=ip_adapter, ip_adapter_subfolder="sdxl_models",
                                       ip_adapter_weight_name="ip-adapter_sdxl.safetensors", device="cpu").warm_up()


def test_sdxl_is_detected_and_its_cfg_reproduces_diffusers(sdxl_generator):
    assert isinstance(sdxl_generator.pipeline, StableDiffusionXLPipeline)
    ours = sdxl_generator(["a red bus", "a black dog"], REFS, guidance="cfg", num_inference_steps=3,
                          num_images_per_prompt=2, seed=5, height=32, width=32, output_type="np").images
    theirs = sdxl_generator.pipeline(["a red bus", "a black dog"], ip_adapter_image=[REFS], guidance_scale=7.5,
                                     num_inference_steps=3, num_images_per_prompt=2,
                                     generator=torch.Generator().manual_seed(5), height=32, width=32,
                                     output_type="np").images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_sdxl_interleaved_and_joint_batch_their_rows(sdxl_generator):
    for guidance, rows in (("interleaved", 2), ("joint", 3)):
        out = sdxl_generator(PROMPT, REFS, guidance=guidance, num_inference_steps=2, seed=0, height=32, width=32)
        assert out.rows_per_step == [rows, rows] and out.images[0].size == (32, 32)
