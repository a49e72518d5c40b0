"""Reference-grounded text-to-image generation: Stable Diffusion (1.x or XL) + one IP-Adapter, with
the guidance objects of `generators.guidance` driving a denoising loop of our own.

Why our own loop: diffusers' pipelines batch exactly [uncond, cond] every step, with text and
references dropped together, and their step callbacks cannot switch which condition is dropped. Our
loop reuses the pipeline's parts (`encode_prompt`, `encode_image`, `prepare_latents`, the scheduler,
the UNet, the VAE) and, at each step, evaluates only the rows the guidance object asks for, batched
into ONE UNet call: Re-Imagen's interleaved guidance costs two rows per image like plain CFG, the
joint baseline three.

Conditions per batch row (B = prompts x images per prompt, k = references per prompt)::

    text       encoder_hidden_states (B, L, D): the prompt, or the negative/empty prompt when dropped
    reference  image_embeds [(B, k, D_img)]: the k references' CLIP image embeddings, all attended at
               once by the IP-Adapter; dropped = the adapter's unconditional embeddings (zeros for the
               plain adapter, the encoder of a black image for the "Plus" ones)
    SDXL only  text_embeds (B, D_pool) follows the text condition; time_ids (B, 6) is shared

The references are encoded once per call and per sample (not through diffusers'
`prepare_ip_adapter_image_embeds`, which repeats one set of embeddings over the whole batch:
diffusers issue #9813), so each prompt in a batch can have its own references.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from mmrag._devices import device_problem
from mmrag.generators.dtypes import parse_dtype
from mmrag.generators.errors import GenerationError, GeneratorLoadError
from mmrag.generators.guidance import Guidance, Row, guidance_from_config
from mmrag.prompts import render

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
PIPELINES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
OUTPUT_TYPES = ("pil", "np", "latent")
# What a step callback may ask for: the latents after the step (which it may replace) and the guided
# noise prediction that made them (read only).
CALLBACK_TENSOR_INPUTS = ("latents", "noise_pred")

# Which conditions each guidance row keeps: (text, reference).
_KEEPS: dict[Row, tuple[bool, bool]] = {
    "cond": (True, True),
    "drop_text": (False, True),
    "drop_reference": (True, False),
    "drop_both": (False, False),
}

References = Sequence[PIL.Image.Image] | Sequence[Sequence[PIL.Image.Image]] | None
StepCallback = Callable[["ReferenceDiffusionGenerator", int, torch.Tensor, dict[str, torch.Tensor]], Mapping]


@dataclasses.dataclass
class GenerationOutput:
    """What a generator call returns.

    images: PIL images, a (N, H, W, 3) float array in [0, 1] ("np"), or latents ("latent"); N = number
        of prompts x ``num_images_per_prompt``, grouped by prompt.
    guidance: ``to_dict()`` of the guidance actually used (after any fallback).
    references_used: reference images per prompt (0 without references).
    fallback: why the requested guidance was replaced, or None.
    rows_per_step: denoiser rows per image at each step (the UNet batch is this times N).
    timings: seconds per stage ("encode_text", "encode_references", "denoise", "decode", "total").
    nsfw_content_detected: the pipeline's safety checker verdicts, None where it has none.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    guidance: dict[str, Any]
    references_used: int
    fallback: str | None
    rows_per_step: list[int]
    timings: dict[str, float]
    nsfw_content_detected: list[bool] | None = None


@dataclasses.dataclass
class _Conditions:
    """Per-sample conditions, each in its kept and dropped form; `batch` stacks the rows of one step."""

    text: dict[bool, torch.Tensor]  # keep -> (B, L, D)
    image: dict[bool, torch.Tensor]  # keep -> (B, k, D_img) or (B, k, seq, D_img)
    pooled: dict[bool, torch.Tensor] | None  # SDXL: keep -> (B, D_pool)
    time_ids: torch.Tensor | None  # SDXL: (B, 6)

    def batch(self, rows: tuple[Row, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        keeps = [_KEEPS[row] for row in rows]
        text = torch.cat([self.text[keep_text] for keep_text, _ in keeps])  # (R*B, L, D)
        added = {"image_embeds": [torch.cat([self.image[keep_ref] for _, keep_ref in keeps])]}  # [(R*B, k, D_img)]
        if self.pooled is not None:
            added["text_embeds"] = torch.cat([self.pooled[keep_text] for keep_text, _ in keeps])  # (R*B, D_pool)
            added["time_ids"] = self.time_ids.repeat(len(rows), 1)  # (R*B, 6)
        return text, added


class ReferenceDiffusionGenerator:
    """Draws prompts grounded on reference images (see the module docstring).

    The constructor only stores parameters; `warm_up()` (or first use) loads the pipeline from
    ``model`` (a Hub id or a directory with a diffusers ``model_index.json``), then the IP-Adapter
    ``ip_adapter/ip_adapter_subfolder/ip_adapter_weight_name`` with its image encoder.

    ``scheduler`` replaces the model's own ("ddim", "euler", "euler_a", "dpm++"; None keeps it).
    ``ip_adapter_scale`` weighs the references' cross-attention; 0.5 is the IP-Adapter authors'
    balanced value. ``guidance`` is the default for calls (a name, a dict or a Guidance object).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        ip_adapter: str | os.PathLike = "h94/IP-Adapter",
        ip_adapter_subfolder: str = "models",
        ip_adapter_weight_name: str = "ip-adapter_sd15.safetensors",
        image_encoder_folder: str = "image_encoder",
        ip_adapter_scale: float = 0.5,
        scheduler: str | None = None,
        guidance: str | Mapping[str, Any] | Guidance = "interleaved",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        variant: str | None = None,
    ):
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise GenerationError(f"`scheduler` must be one of {', '.join(map(repr, SCHEDULERS))} or None "
                                  f"(the model's own), got {scheduler!r}.")
        dtype = parse_dtype(dtype)
        _check_scale("ip_adapter_scale", ip_adapter_scale)
        self.model = str(model)
        self.ip_adapter = str(ip_adapter)
        self.ip_adapter_subfolder = ip_adapter_subfolder
        self.ip_adapter_weight_name = ip_adapter_weight_name
        self.image_encoder_folder = image_encoder_folder
        self.ip_adapter_scale = ip_adapter_scale
        self.scheduler = scheduler
        self.guidance = guidance_from_config(guidance)
        problem = device_problem(device)
        if problem is not None:
            raise GenerationError(f"`device` {problem}.")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
        self.dtype = (torch.float16 if self.device.type == "cuda" else torch.float32) if dtype is None else dtype
        self.variant = variant
        self._pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline | None = None

    @classmethod
    def from_pipeline(cls, pipeline: DiffusionPipeline, **params: Any) -> ReferenceDiffusionGenerator:
        """Wrap a pipeline already built and holding one IP-Adapter (shared pipelines, benchmarks).

        The generator uses the pipeline object itself: a ``scheduler`` given here replaces its scheduler.
        """
        name = getattr(pipeline, "name_or_path", None)
        generator = cls("<in-memory pipeline>" if name is None else name, device=pipeline.device,
                        dtype=pipeline.dtype, **params)
        generator._pipeline = generator._configure(pipeline)
        return generator

    # ------------------------------------------------------------------------------------- loading
    def warm_up(self) -> ReferenceDiffusionGenerator:
        """Load the pipeline and the IP-Adapter (once; later calls return at once)."""
        if self._pipeline is not None:
            return self
        try:
            class_name = DiffusionPipeline.load_config(self.model)["_class_name"]
        except Exception as error:  # OSError, EnvironmentError, JSON errors: all mean "not a pipeline here"
            raise GeneratorLoadError(f"`model` {self.model!r} is not a readable diffusers pipeline "
                                     f"(no model_index.json): {error}") from error
        if class_name not in PIPELINES:
            raise GeneratorLoadError(f"`model` {self.model!r} is a {class_name}; supported pipelines are "
                                     f"{', '.join(PIPELINES)}.")
        try:
            pipeline = PIPELINES[class_name].from_pretrained(self.model, dtype=self.dtype, use_safetensors=True,
                                                             variant=self.variant)
            pipeline.load_ip_adapter(self.ip_adapter, subfolder=self.ip_adapter_subfolder,
                                     weight_name=self.ip_adapter_weight_name,
                                     image_encoder_folder=self.image_encoder_folder)
        except (OSError, ValueError) as error:
            raise GeneratorLoadError(f"Could not load `model` {self.model!r} with the IP-Adapter "
                                     f"{self.ip_adapter!r} ({self.ip_adapter_subfolder}/"
                                     f"{self.ip_adapter_weight_name}): {error}") from error
        self._pipeline = self._configure(pipeline.to(self.device))
        return self

    @property
    def pipeline(self) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """The loaded diffusers pipeline (loaded on first access)."""
        return self.warm_up()._pipeline

    def _configure(self, pipeline: DiffusionPipeline) -> DiffusionPipeline:
        projection = getattr(pipeline.unet, "encoder_hid_proj", None)
        if not isinstance(projection, MultiIPAdapterImageProjection) or projection.num_ip_adapters != 1:
            raise GeneratorLoadError("The pipeline must hold exactly one IP-Adapter (pipeline.load_ip_adapter).")
        if getattr(pipeline, "image_encoder", None) is None:
            raise GeneratorLoadError("The pipeline has no `image_encoder`; load the IP-Adapter with its encoder.")
        if self.scheduler is not None:
            pipeline.scheduler = SCHEDULERS[self.scheduler].from_config(pipeline.scheduler.config)
        return pipeline

    # ------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        references: References = None,
        *,
        guidance: str | Mapping[str, Any] | Guidance | None = None,
        num_inference_steps: int = 30,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        ip_adapter_scale: float | None = None,
        reference_texts: Sequence[str] | Sequence[Sequence[str]] | None = None,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        output_type: str = "pil",
    ) -> GenerationOutput:
        """Generate ``num_images_per_prompt`` images for each prompt.

        ``references``: one list of PIL images shared by every prompt, or one list per prompt (each the
        same length); None or [] generates without references, falling back to plain CFG at the
        guidance's text scale. ``reference_texts`` (same nesting) are folded into the prompt through
        the "reference_prompt" template, so they belong to the text condition. ``seed`` (or
        ``generator``, one or one per image) makes the call reproducible. ``callback_on_step_end(self,
        step, timestep, tensors)`` gets the tensors named in ``callback_on_step_end_tensor_inputs``
        (from `CALLBACK_TENSOR_INPUTS`) after each step and may return new "latents".
        """
        start = time.perf_counter()
        pipe = self.pipeline
        guidance = self.guidance if guidance is None else guidance_from_config(guidance)
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        if height is None or width is None:
            default_height, default_width = _default_size(pipe)
            height = default_height if height is None else height
            width = default_width if width is None else width
        self.check_inputs(prompts, references, num_inference_steps, num_images_per_prompt, seed, generator, height,
                          width, negative_prompt, ip_adapter_scale, reference_texts, callback_on_step_end_tensor_inputs,
                          output_type)
        per_prompt = _per_prompt(references, len(prompts))
        num_references = len(per_prompt[0])
        fallback = None
        if num_references == 0 and guidance.name != "cfg":
            fallback = (f"no references: plain classifier-free guidance at the text scale {guidance.text_scale} "
                        f"instead of {guidance.name!r} guidance")
            guidance = guidance.without_references()
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same image on any device
        pipe.set_ip_adapter_scale(self.ip_adapter_scale if ip_adapter_scale is None else ip_adapter_scale)
        batch_size = len(prompts) * num_images_per_prompt
        timings = {}

        # 1. text conditions: the prompt (with the references' texts folded in) and the dropped text
        mark = time.perf_counter()
        if reference_texts is not None:
            texts = _per_prompt(reference_texts, len(prompts))
            prompts = [render("reference_prompt", references="; ".join(t), prompt=p) for p, t in zip(prompts, texts)]
        if negative_prompt is not None:  # encode_prompt wants the prompts' type: a list, one per prompt
            negative_prompt = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                               else list(negative_prompt))
        text, pooled, time_ids = self._encode_text(prompts, negative_prompt, num_images_per_prompt, height, width)
        timings["encode_text"] = self._elapsed(mark)

        # 2. reference conditions, encoded once for the whole call
        mark = time.perf_counter()
        image = self._encode_references(per_prompt, num_images_per_prompt)
        conditions = _Conditions(text=text, image=image, pooled=pooled, time_ids=time_ids)
        timings["encode_references"] = self._elapsed(mark)

        # 3. denoise: one batched UNet call per step over the rows the guidance asks for
        mark = time.perf_counter()
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, self.device)
        latents = pipe.prepare_latents(batch_size, pipe.unet.config.in_channels, height, width, text[True].dtype,
                                       self.device, generator)  # (B, C, h, w)
        step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)  # DDIM's eta = 0: deterministic
        batches, rows_per_step = {}, []
        for i, t in enumerate(timesteps):
            rows = guidance.rows(i, len(timesteps))
            if rows not in batches:  # interleaving alternates between two row sets: build each once
                batches[rows] = conditions.batch(rows)
            encoder_hidden_states, added_cond_kwargs = batches[rows]
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * len(rows)), t)  # (R*B, C, h, w)
            eps = pipe.unet(model_input, t, encoder_hidden_states=encoder_hidden_states,
                            added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]  # (R*B, C, h, w)
            noise_pred = guidance.forward(i, len(timesteps), dict(zip(rows, eps.chunk(len(rows)))))  # (B, C, h, w)
            latents = pipe.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            rows_per_step.append(len(rows))
            if callback_on_step_end is not None:
                offered = {"latents": latents, "noise_pred": noise_pred}
                returned = callback_on_step_end(self, i, t, {k: offered[k] for k in callback_on_step_end_tensor_inputs})
                if not isinstance(returned, Mapping):
                    raise GenerationError(f"`callback_on_step_end` must return a dict (of tensors to replace, "
                                          f"e.g. the one it was given), got {type(returned).__name__}.")
                latents = returned.get("latents", latents)
        timings["denoise"] = self._elapsed(mark)

        # 4. decode
        mark = time.perf_counter()
        images, nsfw = self._decode(latents, output_type, generator)
        timings["decode"] = self._elapsed(mark)
        timings["total"] = time.perf_counter() - start
        return GenerationOutput(images=images, guidance=guidance.to_dict(), references_used=num_references,
                                fallback=fallback, rows_per_step=rows_per_step, timings=timings,
                                nsfw_content_detected=nsfw)

    def check_inputs(self, prompts, references, num_inference_steps, num_images_per_prompt, seed, generator, height,
                     width, negative_prompt, ip_adapter_scale, reference_texts, callback_tensor_inputs, output_type):
        """Raise `GenerationError` for the first invalid argument (names it, shows it, says the fix)."""
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise GenerationError(f"`prompt` must be a non-empty string or a non-empty list of them, got {prompts!r}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and (
                not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(prompts)):
            raise GenerationError(f"`negative_prompt` must be a string or a list of {len(prompts)} strings (one per "
                                  f"prompt), got {negative_prompt!r}.")
        _check_references("references", references, len(prompts), PIL.Image.Image)
        if reference_texts is not None:
            _check_references("reference_texts", reference_texts, len(prompts), str)
            sizes = [len(r) for r in _per_prompt(references, len(prompts))]
            if [len(t) for t in _per_prompt(reference_texts, len(prompts))] != sizes:
                raise GenerationError(f"`reference_texts` must match `references` one text per image "
                                      f"({sizes} per prompt), got {reference_texts!r}.")
        for name, value in (("num_inference_steps", num_inference_steps),
                            ("num_images_per_prompt", num_images_per_prompt)):
            if not _is_int(value) or value <= 0:
                raise GenerationError(f"`{name}` must be a positive integer, got {value!r}.")
        factor = self.pipeline.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not _is_int(value) or value <= 0 or value % factor:
                raise GenerationError(f"`{name}` must be a positive multiple of {factor} (the VAE's scale "
                                      f"factor), got {value!r}.")
        if seed is not None and generator is not None:
            raise GenerationError("Give `seed` or `generator`, not both.")
        if seed is not None and not _is_int(seed):
            raise GenerationError(f"`seed` must be an integer, got {seed!r}.")
        if isinstance(generator, list) and len(generator) != len(prompts) * num_images_per_prompt:
            raise GenerationError(f"`generator` lists {len(generator)} generators for "
                                  f"{len(prompts) * num_images_per_prompt} images; give one per image, or one.")
        if ip_adapter_scale is not None:
            _check_scale("ip_adapter_scale", ip_adapter_scale)
        unknown = [name for name in callback_tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
        if isinstance(callback_tensor_inputs, str) or unknown:
            raise GenerationError(f"`callback_on_step_end_tensor_inputs` must list names from "
                                  f"{list(CALLBACK_TENSOR_INPUTS)}, got {callback_tensor_inputs!r}.")
        if output_type not in OUTPUT_TYPES:
            raise GenerationError(f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}, "
                                  f"got {output_type!r}.")

    # ------------------------------------------------------------------------------------- stages
    def _encode_text(self, prompts, negative_prompt, num_images_per_prompt, height, width):
        """Kept and dropped text conditions, (B, L, D) each; SDXL also pooled embeds and time ids."""
        pipe, n = self._pipeline, num_images_per_prompt
        if not isinstance(pipe, StableDiffusionXLPipeline):
            cond, null = pipe.encode_prompt(prompts, self.device, n, True, negative_prompt)
            return {True: cond, False: null}, None, None
        cond, null, pooled, null_pooled = pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=n,
                                                             do_classifier_free_guidance=True,
                                                             negative_prompt=negative_prompt)
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
        # SDXL's micro-conditioning: original size, crop corner, target size; the same for every row.
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                          text_encoder_projection_dim=projection_dim)  # (1, 6)
        return ({True: cond, False: null}, {True: pooled, False: null_pooled},
                time_ids.to(self.device).repeat(len(prompts) * n, 1))  # (B, 6)

    def _encode_references(self, per_prompt: list[list[PIL.Image.Image]], num_images_per_prompt: int):
        """Kept and dropped reference conditions, (B, k, D_img) each, every prompt with its own images."""
        pipe = self._pipeline
        # The plain adapter takes the projected image embedding; the "Plus" ones the penultimate hidden
        # states (diffusers' own test, in prepare_ip_adapter_image_embeds).
        hidden_states = not isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
        shared = all(images is per_prompt[0] for images in per_prompt)
        if not per_prompt[0]:
            # No references: every row gets the adapter's "no image" embeddings (a black image's negative).
            _, null = pipe.encode_image([PIL.Image.new("RGB", (64, 64))], self.device, 1, hidden_states)
            embeds, null = null, null  # (1, ...)
        else:
            flat = per_prompt[0] if shared else [image for images in per_prompt for image in images]
            embeds, null = pipe.encode_image(flat, self.device, 1, hidden_states)  # (P*k or k, ...)
        k = max(len(per_prompt[0]), 1)
        embeds, null = embeds.unflatten(0, (-1, k)), null.unflatten(0, (-1, k))  # (P or 1, k, ...)
        batch = len(per_prompt) * num_images_per_prompt
        if embeds.shape[0] == 1:
            embeds, null = embeds.expand(batch, *embeds.shape[1:]), null.expand(batch, *null.shape[1:])
        else:  # one set per prompt, repeated for that prompt's images (encode_prompt's order)
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
            null = null.repeat_interleave(num_images_per_prompt, dim=0)
        return {True: embeds, False: null}  # (B, k, ...)

    def _decode(self, latents, output_type, generator):
        pipe = self._pipeline
        if output_type == "latent":
            return latents, None
        vae = pipe.vae
        # SDXL's VAE overflows in float16 (its config says force_upcast): decode in float32, as diffusers does.
        upcast = isinstance(pipe, StableDiffusionXLPipeline) and vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False, generator=generator)[0]  # (B, 3, H, W) in [-1, 1]
        if upcast:
            vae.to(torch.float16)
        nsfw = None
        if getattr(pipe, "safety_checker", None) is not None:
            image, nsfw = pipe.run_safety_checker(image, self.device, latents.dtype)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw

    def _elapsed(self, since: float) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - since


# ------------------------------------------------------------------------------------------ helpers
def _default_size(pipe) -> tuple[int, int]:
    """The model's native image size: the UNet's sample size times the VAE's scale factor."""
    sample_size = pipe.unet.config.sample_size
    if sample_size is None:
        raise GenerationError("Give `height` and `width`: this UNet's config has no sample_size to default to.")
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor


def _per_prompt(references, num_prompts: int) -> list[list]:
    """One list per prompt; a shared flat list becomes the same list object for every prompt."""
    if not references:
        return [[]] * num_prompts
    if not isinstance(references[0], (list, tuple)):
        shared = list(references)
        return [shared] * num_prompts
    return [list(r) for r in references]


def _check_references(argument: str, references, num_prompts: int, kind: type) -> None:
    if references is None:
        return
    if not isinstance(references, (list, tuple)):
        raise GenerationError(f"`{argument}` must be a list ({kind.__name__} items shared by every prompt, or one "
                              f"list per prompt) or None, got {type(references).__name__}.")
    if references and any(isinstance(r, (list, tuple)) for r in references):
        if not all(isinstance(r, (list, tuple)) for r in references):
            raise GenerationError(f"`{argument}` mixes lists and single items; give one flat list shared by every "
                                  "prompt, or one list per prompt.")
        if len(references) != num_prompts:
            raise GenerationError(f"`{argument}` has {len(references)} lists for {num_prompts} prompts; give one "
                                  "list per prompt, or one flat list shared by all.")
        if len({len(r) for r in references}) != 1:
            raise GenerationError(f"`{argument}` must give every prompt the same number of items (they are "
                                  f"batched together), got {[len(r) for r in references]}; call once per group.")
        items = [(f"{argument}[{i}][{j}]", item) for i, r in enumerate(references) for j, item in enumerate(r)]
    else:
        items = [(f"{argument}[{i}]", item) for i, item in enumerate(references)]
    for where, item in items:
        if not isinstance(item, kind):
            raise GenerationError(f"`{where}` must be a {kind.__module__}.{kind.__name__}, got "
                                  f"{type(item).__name__} {item!r:.80}; open files with PIL.Image.open first."
                                  if kind is PIL.Image.Image else
                                  f"`{where}` must be a {kind.__name__}, got {type(item).__name__} {item!r:.80}.")


def _check_scale(argument: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise GenerationError(f"`{argument}` must be a number >= 0 (0 ignores the references), got {value!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
