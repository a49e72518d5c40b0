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


# Tolerances, from a measurement (tiny SD below, 3 DDIM steps, CPU float32). Batching rows into one
# UNet call changes the float32 rounding (oneDNN/MKL pick kernels and blockings by batch shape, CPU
# ISA and thread count) and guidance amplifies it by its scales. Max |batched - separate calls| over
# the five guidances of the hand-loop test, threads 1 and 2, one image or row 0 of a 2 prompts x 2
# images batch, and AVX-512 or AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
# MKL_ENABLE_INSTRUCTIONS=AVX2): 2.1e-5, 3.8e-5 for two prompts with their own references vs each
# alone, on latents up to 11.8 in magnitude (an AVX2-only EPYC measured 2.6e-5, on latents ~16).
# Real bugs move them much further: a 0.1% error in one scale by 6.3e-4 (reference) to 1.5e-3
# (CFG), a swapped condition by 0.49-0.98, another prompt's references by 0.10. So atol = 1e-4,
# 2.6x above the noise and 6x below the smallest bug; rtol = 0, because a relative term (1e-4 x 12)
# would grow to the size of the 0.1%-scale effect.
LATENT_ATOL = 1e-4
# Decoded images in [0, 1]: the same image from 2- and 3-row batches (scales of one) differs by at
# most 4.2e-7 (same settings as above), ours vs diffusers' pipelines (the same batch shape) by 0;
# a 0.1% guidance-scale error moves them by 8.4e-5 to 1.5e-4, a scale of 1.001 instead of 1 by 2.8e-5.
IMAGE_ATOL = 1e-5
# SDXL's conditions (hidden states, pooled text, image embeddings; up to ~3 in magnitude) built
# one prompt at a time vs the generator's batched encoders: at most 7.2e-7 apart (same settings);
# another prompt's or the negative prompt's text differs by 0.90-2.1, another prompt's references by 0.52.
CONDITION_ATOL = 1e-5


def assert_latents_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=LATENT_ATOL)


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
    assert (text - reference).abs().max() > 100 * LATENT_ATOL and (text - unguided).abs().max() > 100 * LATENT_ATOL


# --------------------------------------------------------------------------- (d) scales of one
def test_scales_of_one_give_the_fully_conditioned_prediction(generator):
    expected = hand_loop(generator.pipeline, lambda i, e: CONDITIONED(e))
    images = []
    for guidance in (ClassifierFreeGuidance(1.0), JointGuidance(1.0, 1.0), InterleavedGuidance(1.0, 1.0, eta=0.5)):
        assert_latents_close(generator(PROMPT, REFS, guidance=guidance, num_inference_steps=STEPS, seed=0,
                                       output_type="latent").images, expected)
        images.append(generator(PROMPT, REFS, guidance=guidance, num_inference_steps=STEPS, seed=0,
                                output_type="np").images)
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=IMAGE_ATOL)
    np.testing.assert_allclose(images[0], images[2], rtol=0, atol=IMAGE_ATOL)


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
    assert np.abs(first - other).max() > 100 * IMAGE_ATOL


def test_prompts_times_images_per_prompt_images(generator):
    prompts, seeds = ["a red bus", "a black dog", "a bowl of fruit"], [0, 1, 2, 3, 4, 5]
    out = generator(prompts, REFS, num_inference_steps=2, num_images_per_prompt=2, seed=0)
    assert len(out.images) == 6 and all(image.size == (32, 32) for image in out.images)
    # grouped by prompt: image i is prompt i // 2 drawn alone with the i-th generator's noise
    batch = generator(prompts, REFS, num_inference_steps=2, num_images_per_prompt=2, output_type="latent",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    alone = torch.cat([generator(prompts[i // 2], REFS, num_inference_steps=2, seed=s, output_type="latent").images
                       for i, s in enumerate(seeds)])
    assert_latents_close(batch, alone)
    assert (alone[0] - alone[1]).abs().max() > 10 * LATENT_ATOL  # each image has its own noise
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
    assert (swapped - alone[0]).abs().max() > 10 * LATENT_ATOL  # measured 0.10


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
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=IMAGE_ATOL)


def test_negative_prompt_is_the_dropped_text_as_in_diffusers(generator):
    prompts = ["a red bus", "a black dog"]
    ours = generator(prompts, REFS, guidance="cfg", negative_prompt="blurry, low quality", num_inference_steps=3,
                     seed=2, output_type="np").images
    theirs = generator.pipeline(prompts, ip_adapter_image=[REFS], negative_prompt=["blurry, low quality"] * 2,
                                guidance_scale=7.5, num_inference_steps=3, generator=torch.Generator().manual_seed(2),
                                output_type="np").images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=IMAGE_ATOL)
    default = generator(prompts, REFS, guidance="cfg", num_inference_steps=3, seed=2, output_type="np").images
    assert np.abs(ours - default).max() > 100 * IMAGE_ATOL


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
    assert (folded - plain).abs().max() > 10 * LATENT_ATOL


def test_ip_adapter_scale_override_is_used_for_the_call(generator):
    joint = JointGuidance(W_T, W_R)
    base = generator(PROMPT, REFS, guidance=joint, num_inference_steps=STEPS, seed=0, output_type="latent").images
    zero = generator(PROMPT, REFS, guidance=joint, num_inference_steps=STEPS, seed=0, ip_adapter_scale=0.0,
                     output_type="latent").images
    assert (base - zero).abs().max() > 10 * LATENT_ATOL
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
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=IMAGE_ATOL)


@pytest.fixture
def sdxl_unet_inputs(sdxl_generator, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(sample, encoder_hidden_states, added_cond_kwargs) of every UNet call, recorded around the real forward."""
    unet, calls = sdxl_generator.pipeline.unet, []
    forward = unet.forward

    def recording_forward(sample, timestep, *args, **kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((sample.clone(), kwargs["encoder_hidden_states"].clone(),
                      {"image_embeds": [e.clone() for e in added["image_embeds"]],
                       "text_embeds": added["text_embeds"].clone(), "time_ids": added["time_ids"].clone()}))
        return forward(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", recording_forward)
    return calls


@torch.no_grad()
def sdxl_text_by_hand(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text condition for one text, straight from the two encoders: both penultimate hidden
    states side by side (1, L, 64), and the second encoder's projected pooled output (1, 32)."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", pooled)
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def image_embeds_by_hand(pipe, references) -> torch.Tensor:
    """The plain IP-Adapter's input for one prompt's references: CLIP image embeddings, (k, D_img)."""
    pixels = pipe.feature_extractor(references, return_tensors="pt").pixel_values
    return pipe.image_encoder(pixels.to(pipe.image_encoder.dtype)).image_embeds


# Which conditions each row keeps, (text, references), written out again from the guidance docs.
KEEPS = {"cond": (True, True), "drop_text": (False, True), "drop_reference": (True, False)}


@pytest.mark.parametrize("guidance, step_rows, negative_prompt", [
    # eta = 1/2 over 2 steps: floor((i+1)/2) - floor(i/2) = 1 only for i = 1, the text step.
    (InterleavedGuidance(W_T, W_R, eta=0.5), [("cond", "drop_reference"), ("cond", "drop_text")], None),
    (JointGuidance(W_T, W_R), [("cond", "drop_text", "drop_reference")] * 2, ["blurry", "a low quality photo"]),
], ids=["interleaved-empty-negative", "joint-negative-prompts"])
def test_sdxl_rows_carry_each_condition_kept_or_dropped(sdxl_generator, sdxl_unet_inputs, guidance, step_rows,
                                                        negative_prompt):
    """Every row of every batched SDXL UNet call against conditions built here without the generator:
    kept or dropped text (hidden states and pooled text_embeds together), each prompt's own references
    or zero image embeddings, and the same micro-conditioning time ids on every row."""
    pipe = sdxl_generator.pipeline
    prompts, references, per_prompt, height, width = ["a red bus", "a black dog"], [REFS, OTHER_REFS], 2, 32, 48
    out = sdxl_generator(prompts, references, guidance=guidance, negative_prompt=negative_prompt,
                         num_inference_steps=len(step_rows), num_images_per_prompt=per_prompt, seed=0,
                         height=height, width=width, output_type="latent")
    assert out.rows_per_step == [len(rows) for rows in step_rows]
    assert out.images.shape == (len(prompts) * per_prompt, 4, height // 2, width // 2)
    assert len(sdxl_unet_inputs) == len(step_rows)  # one batched call per step

    kept_text = [sdxl_text_by_hand(pipe, prompt) for prompt in prompts]
    if negative_prompt is None:  # SDXL's empty negative prompt is all zeros (force_zeros_for_empty_prompt)
        assert pipe.config.force_zeros_for_empty_prompt
        dropped_text = [(torch.zeros_like(hidden), torch.zeros_like(pooled)) for hidden, pooled in kept_text]
    else:
        dropped_text = [sdxl_text_by_hand(pipe, negative) for negative in negative_prompt]
    images = [image_embeds_by_hand(pipe, refs) for refs in references]
    assert (images[0] - images[1]).abs().max() > 1e3 * CONDITION_ATOL  # the prompts' references really differ
    # original size, crop corner, target size: (height, width, top, left, height, width)
    time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)

    batch = len(prompts) * per_prompt
    for (sample, hidden, added), rows in zip(sdxl_unet_inputs, step_rows):
        assert sample.shape[0] == hidden.shape[0] == added["text_embeds"].shape[0] == len(rows) * batch
        [image_embeds] = added["image_embeds"]  # one IP-Adapter
        for r, row in enumerate(rows):
            keep_text, keep_reference = KEEPS[row]
            torch.testing.assert_close(sample[r * batch:(r + 1) * batch], sample[:batch], rtol=0, atol=0)
            for b in range(batch):
                i, p = r * batch + b, b // per_prompt  # images grouped by prompt
                where = f"row {row!r}, image {b} (prompt {p})"
                text_hidden, text_pooled = (kept_text if keep_text else dropped_text)[p]
                torch.testing.assert_close(hidden[i], text_hidden[0], rtol=0, atol=CONDITION_ATOL, msg=where)
                torch.testing.assert_close(added["text_embeds"][i], text_pooled[0], rtol=0, atol=CONDITION_ATOL,
                                           msg=where)
                expected_image = images[p] if keep_reference else torch.zeros_like(images[p])
                torch.testing.assert_close(image_embeds[i], expected_image, rtol=0, atol=CONDITION_ATOL, msg=where)
                torch.testing.assert_close(added["time_ids"][i], time_ids, rtol=0, atol=0, msg=where)
