"""Train ``toy:sd`` and ``toy:ip-adapter``: a 32-px Stable Diffusion that draws a toy entity from its reference.

The goal is the claim entity-grounded generation rests on: a prompt naming an entity the model never
saw ("a photo of the Zorbla") cannot say what it looks like, but that entity's reference image can. So
the model is trained to draw an entity from its prompt and *another view* of it, passed through an
IP-Adapter, with each condition dropped independently (text ``P_DROP_TEXT``, reference
``P_DROP_REFERENCE``) so that every combination the guidance needs (both, text only, reference only,
neither) is a condition it learnt; held-out names then have only the reference to go on.

The parts, all in their ``tiny:`` counterparts' layouts:

- text encoder and tokenizer: toy:clip's text tower, frozen (its cross-attention dimension is 128);
- IP-Adapter image encoder: toy:clip's vision tower with its projection, frozen; the adapter is the
  plain one (one image embedding -> :data:`IP_TOKENS` cross-attention tokens), trained with the UNet;
- VAE (:data:`TOY_VAE`): 32-px images to 16 x 16 x 4 latents, trained first on renders
  (reconstruction + a small KL term); its ``scaling_factor`` is set from the latents' spread, as SD's;
- UNet (:data:`TOY_UNET`): three levels, cross-attention in the two lower ones; SD 1.x's noise
  schedule, epsilon prediction.

Training uses diffusers' own IP-Adapter attention processors (installed by
``UNet2DConditionModel._load_ip_adapter_weights`` from a checkpoint in the original key layout), so
the trained weights are exported back into that layout (``ip-adapter/models/ip-adapter_sd15.safetensors``)
and ``pipeline.load_ip_adapter`` reproduces the training model exactly (the tests check the noise
prediction). The output directory holds ``sd/`` (``StableDiffusionPipeline.save_pretrained``) and
``ip-adapter/`` (``models/`` with the adapter and ``image_encoder/``), plus ``train_log.jsonl`` and
``toyworld.json``. Steps ``1..vae_steps`` train the VAE, the rest the UNet; checkpoints
(:mod:`.checkpoints`) make a killed run resume exactly, and every batch is a function of
``(seed, step)`` alone.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.embeddings import ImageProjection
from PIL import Image
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from ..dev.tiny_models import _clip_image_processor
from .checkpoints import (
    check_run_arguments, check_same_run, load_checkpoint, run_directory, save_checkpoint, seeded_run, truncate_log)
from .models import toy_clip_dir
from .train_clip import LOG_NAME, SETTINGS_NAME
from .world import ToyWorld, describe, random_caption

TOY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32, layers_per_block=1)
# Three levels (16, 8, 4 px of latent) with cross-attention in the two lower ones, where a 4-token
# reference condition can set shape and colours; 4.2M parameters, 0.45 s per batch of 32 on one core
# (two levels at 64/128 channels with attention at 16 px: 1.6 s).
TOY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
                attention_head_dim=8)
IP_TOKENS = 4
P_DROP_TEXT = 0.15
P_DROP_REFERENCE = 0.3
P_NAME_ONLY = 0.5  # of the prompts kept: the name alone (what a grounded prompt looks like), else a caption
KL_WEIGHT = 1e-6
IP_WEIGHT_NAME = "ip-adapter_sd15.safetensors"


# ------------------------------------------------------------------------------------------- model
class ToySD:
    """The models being trained: the frozen encoders, the VAE, and the UNet with its IP-Adapter installed."""

    def __init__(self, clip_dir: str | os.PathLike):
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        self.text_encoder, self.image_encoder = clip_towers(clip_dir)
        self.feature_extractor = _clip_image_processor(self.image_encoder.config.image_size)
        self.vae = AutoencoderKL(**TOY_VAE)
        self.unet = UNet2DConditionModel(**TOY_UNET)
        # SD 1.x's schedule; DDPM's add_noise for training, DDIM (any step count) in the saved pipeline.
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
        self.noise = DDPMScheduler(**schedule)
        self.inference_scheduler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        self.unet._load_ip_adapter_weights([ip_adapter_state(self.unet, self.image_encoder.config.projection_dim)])
        with torch.no_grad():
            self.null_text = self.encode_text([""])  # (1, 32, 128): the dropped text condition

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]  # (b, 32, 128), as StableDiffusionPipeline.encode_prompt

    def encode_references(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.feature_extractor(images, return_tensors="pt").pixel_values
        return self.image_encoder(pixels).image_embeds  # (b, 128), as pipeline.encode_image

    def unet_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"unet.{n}", p) for n, p in self.unet.named_parameters()]

    def vae_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"vae.{n}", p) for n, p in self.vae.named_parameters()]


def clip_towers(clip_dir: str | os.PathLike) -> tuple[CLIPTextModel, CLIPVisionModelWithProjection]:
    """toy:clip's text tower and its vision tower with the projection, as the standalone models SD and
    the IP-Adapter load (their weights copied from the CLIPModel), frozen."""
    clip = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    vision_config = CLIPVisionConfig(**clip.config.vision_config.to_dict() | {"projection_dim": clip.config.projection_dim})
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


def ip_adapter_state(unet: UNet2DConditionModel, image_embed_dim: int) -> dict[str, dict[str, torch.Tensor]]:
    """A freshly initialised plain IP-Adapter for ``unet``, in the original checkpoint's key layout:
    ``image_proj.{proj,norm}.*`` and ``ip_adapter.{2i+1}.to_{k,v}_ip.weight`` over the cross-attention
    layers in ``unet.attn_processors`` order (diffusers' ``_convert_ip_adapter_attn_to_diffusers``)."""
    cross = unet.config.cross_attention_dim
    projection = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross, num_image_text_embeds=IP_TOKENS)
    image_proj = {"proj.weight": projection.image_embeds.weight, "proj.bias": projection.image_embeds.bias,
                  "norm.weight": projection.norm.weight, "norm.bias": projection.norm.bias}
    ip_adapter = {}
    for index, name in enumerate(n for n in unet.attn_processors if n.endswith("attn2.processor")):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for which in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * index + 1}.{which}.weight"] = torch.nn.Linear(cross, hidden, bias=False).weight
    detach = lambda d: {k: v.detach().clone().contiguous() for k, v in d.items()}  # noqa: E731
    return {"image_proj": detach(image_proj), "ip_adapter": detach(ip_adapter)}


def exported_ip_adapter(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The trained adapter of ``unet`` back in the original flat key layout (the inverse of loading)."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    state = {"image_proj.proj.weight": projection.image_embeds.weight, "image_proj.proj.bias": projection.image_embeds.bias,
             "image_proj.norm.weight": projection.norm.weight, "image_proj.norm.bias": projection.norm.bias}
    for index, name in enumerate(n for n in unet.attn_processors if n.endswith("attn2.processor")):
        processor = unet.attn_processors[name]
        state[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        state[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def base_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """``unet`` without its adapter: the plain UNet that ``save_pretrained`` writes for ``sd/unet``."""
    plain = UNet2DConditionModel(**TOY_UNET)
    own = {k: v for k, v in unet.state_dict().items() if ".processor." not in k and not k.startswith("encoder_hid_proj.")}
    plain.load_state_dict(own, strict=True)
    return plain


def export(models: ToySD, directory: pathlib.Path) -> None:
    """Write ``directory/sd`` and ``directory/ip-adapter`` in the layouts the library loads."""
    import safetensors.torch

    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=base_unet(models.unet), scheduler=models.inference_scheduler, safety_checker=None,
                                   feature_extractor=models.feature_extractor, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory / "sd", safe_serialization=True)
    adapter = directory / "ip-adapter" / "models"
    models.image_encoder.save_pretrained(adapter / "image_encoder")
    safetensors.torch.save_file(exported_ip_adapter(models.unet), adapter / IP_WEIGHT_NAME, metadata={"format": "pt"})


# -------------------------------------------------------------------------------------------- data
def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (b, 3, H, W) in [-1, 1], the VAE's range (as diffusers' VaeImageProcessor)."""
    import numpy as np

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def step_batch(world: ToyWorld, seed: int, step: int, batch_size: int) -> dict:
    """Step ``step``'s batch (a function of seed and step only): a fresh view of each drawn training
    entity, another view as its reference, and a prompt; ``keep_text`` / ``keep_reference`` say which
    conditions survive the dropout."""
    rng = random.Random(f"toy-sd:{seed}:{step}")
    entities = world.entities("train")
    rows = []
    for _ in range(batch_size):
        entity = rng.choice(entities)
        if rng.random() < P_NAME_ONLY:
            prompt = describe({}, entity.name, phrasing=rng.randrange(4)).text
        else:
            prompt = random_caption(entity, rng).text
        rows.append((world.draw(entity, rng), world.draw(entity, rng), prompt,
                     rng.random() >= P_DROP_TEXT, rng.random() >= P_DROP_REFERENCE))
    images, references, prompts, keep_text, keep_reference = zip(*rows)
    return {"images": list(images), "references": list(references), "prompts": list(prompts),
            "keep_text": torch.tensor(keep_text), "keep_reference": torch.tensor(keep_reference)}


# ---------------------------------------------------------------------------------------- training
def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None):
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    mse = torch.nn.functional.mse_loss(reconstruction, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()
    return mse + KL_WEIGHT * kl, {"mse": mse.item(), "kl": kl.item()}


def unet_loss(models: ToySD, batch: dict, generator: torch.Generator | None = None):
    """Epsilon-prediction MSE with the text and reference conditions dropped as ``batch`` says (a dropped
    text is the empty prompt's encoding; a dropped reference the zero embedding ``encode_image`` gives
    the unconditional branch)."""
    with torch.no_grad():
        scale = models.vae.config.scaling_factor
        latents = models.vae.encode(to_pixels(batch["images"])).latent_dist.sample(generator) * scale
        text = models.encode_text(batch["prompts"])
        text = torch.where(batch["keep_text"][:, None, None], text, models.null_text.expand_as(text))
        embeds = models.encode_references(batch["references"])
        embeds = embeds * batch["keep_reference"][:, None].to(embeds.dtype)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, models.noise.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = models.noise.add_noise(latents, noise, t)
    predicted = models.unet(noisy, t, encoder_hidden_states=text,
                            added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample  # (b, 4, 16, 16)
    loss = torch.nn.functional.mse_loss(predicted, noise)
    return loss, {"mse": loss.item()}


def train_toy_sd(
    out_dir: str | os.PathLike,
    *,
    vae_steps: int,
    unet_steps: int,
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 32,
    vae_lr: float = 1e-3,
    unet_lr: float = 5e-4,
    checkpoint_every: int = 250,
    resume: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    world: ToyWorld | None = None,
    clip_dir: str | os.PathLike | None = None,
) -> dict:
    """Train toy:sd + toy:ip-adapter into ``out_dir``: ``vae_steps`` VAE steps, then ``unet_steps``
    UNet + adapter steps (each phase: linear warm-up, cosine decay to 0). Returns ``{"steps", "seconds",
    "loss"}``. ``stop_after`` (total steps) stops early with a checkpoint, as a cut-off run would;
    ``threads`` sets torch's intra-op threads for the run; the rest as :func:`train_toy_llava`.
    """
    check_run_arguments(dict(vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size, checkpoint_every=checkpoint_every),
                        dict(threads=threads, stop_after=stop_after))
    out_dir, latest = run_directory(out_dir, resume)
    world = ToyWorld() if world is None else world
    clip_dir = toy_clip_dir(clip_dir)
    say = log if log is not None else (lambda line: None)
    # steps is the total schedule (VAE + UNet); the UNet phase may be lengthened on resume.
    settings = {"world": world.params(), "seed": seed, "batch_size": batch_size, "vae_lr": vae_lr, "unet_lr": unet_lr,
                "vae_steps": vae_steps, "steps": vae_steps + unet_steps, "unet": TOY_UNET, "vae": TOY_VAE,
                "p_drop_text": P_DROP_TEXT, "p_drop_reference": P_DROP_REFERENCE, "threads": threads}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the saved file holds them
    with seeded_run(seed, threads):
        models = ToySD(clip_dir)
        trainable = models.vae_trainable() + models.unet_trainable()
        optimiser = torch.optim.AdamW([{"params": [p for _, p in models.vae_trainable()], "lr": vae_lr},
                                       {"params": [p for _, p in models.unet_trainable()], "lr": unet_lr}],
                                      weight_decay=0.01)
        if latest is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / SETTINGS_NAME).write_text(json.dumps(settings, indent=1), encoding="utf-8")
            start_step, spent = 0, 0.0
        else:
            check_same_run(out_dir / SETTINGS_NAME, settings, say)
            start_step, spent = load_checkpoint(latest, trainable, optimiser)
            truncate_log(out_dir / LOG_NAME, start_step)
            say(f"resuming from {latest.name} (step {start_step})")
            if start_step >= vae_steps:
                models.vae.register_to_config(scaling_factor=_latent_scale(models, world, seed))
        total = vae_steps + unet_steps
        stop = total if stop_after is None else min(total, stop_after)
        result = _train(models, optimiser, trainable, world, out_dir, start_step=start_step, spent=spent,
                        vae_steps=vae_steps, total=total, stop=stop, seed=seed, batch_size=batch_size,
                        lrs=(vae_lr, unet_lr), checkpoint_every=checkpoint_every, say=say)
    return result


def _latent_scale(models: ToySD, world: ToyWorld, seed: int) -> float:
    """SD's ``scaling_factor``: 1 / the standard deviation of the VAE's latents over 256 renders."""
    rng = random.Random(f"toy-sd-scale:{seed}")
    images = [world.draw(rng.choice(world.entities("train")), rng) for _ in range(256)]
    with torch.no_grad():
        latents = models.vae.encode(to_pixels(images)).latent_dist.mean
    return round(1.0 / float(latents.std()), 5)


def _schedule(step: int, start: int, length: int) -> float:
    """Linear warm-up over the phase's first tenth (at most 200 steps), then cosine decay to 0."""
    local, warmup = step - start, min(200, max(1, length // 10))
    return (local + 1) / warmup if local < warmup else 0.5 * (1 + math.cos(math.pi * local / length))


def _train(models: ToySD, optimiser, trainable, world, out_dir, *, start_step, spent, vae_steps, total, stop, seed,
           batch_size, lrs, checkpoint_every, say) -> dict:
    begun = time.perf_counter() - spent
    step, loss_value = start_step, float("nan")
    with (out_dir / LOG_NAME).open("a", encoding="utf-8") as log_file:
        while step < stop:
            phase = "vae" if step < vae_steps else "unet"
            vae_group, unet_group = optimiser.param_groups
            if phase == "vae":
                vae_group["lr"], unet_group["lr"] = lrs[0] * _schedule(step, 0, vae_steps), 0.0
            else:
                vae_group["lr"], unet_group["lr"] = 0.0, lrs[1] * _schedule(step, vae_steps, total - vae_steps)
            batch = step_batch(world, seed, step, batch_size)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            if phase == "vae":
                models.vae.train()
                loss, parts = vae_loss(models.vae, to_pixels(batch["images"]), generator)
                params = [p for _, p in models.vae_trainable()]
            else:
                models.vae.eval()  # frozen (every phase sets its own modes, so a resumed run matches)
                models.unet.train()
                loss, parts = unet_loss(models, batch, generator)
                params = [p for _, p in models.unet_trainable()]
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            step += 1
            loss_value = loss.item()
            if step == vae_steps:  # the VAE is done: fix the latents' scale
                models.vae.eval()
                models.vae.register_to_config(scaling_factor=_latent_scale(models, world, seed))
                say(f"VAE trained; scaling_factor {models.vae.config.scaling_factor}")
            seconds = time.perf_counter() - begun
            if step % 10 == 0 or step == stop:
                line = {"step": step, "phase": phase, "loss": round(loss_value, 5),
                        **{k: round(v, 6) for k, v in parts.items()}, "seconds": round(seconds, 2)}
                log_file.write(json.dumps(line) + "\n")
                log_file.flush()
            if step % checkpoint_every == 0 or step == stop or step == vae_steps:
                save_checkpoint(out_dir, step, seconds, trainable, optimiser, lambda d: export(models, d))
                say(f"step {step} ({phase}): loss {loss_value:.5f} ({seconds:.0f} s), checkpoint written")
    models.unet.eval()
    models.vae.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - begun, 2), "loss": loss_value}
