"""Generation benchmark (a script, not a test): prints a markdown table.

Seconds per image of `generators.ReferenceDiffusionGenerator` with cfg, joint and interleaved
guidance, and of diffusers' own `StableDiffusionPipeline.__call__` with the same IP-Adapter inputs,
on the same pipeline object, the same steps and size, two references per prompt. Targets:
interleaved / diffusers <= 1.05 (our loop costs no more than diffusers' for the same two rows), and
interleaved / joint well under 1 where the denoiser is compute-bound (two rows per step, not three).

Methods run in rotating order after one warm-up each; best of ``--rounds``. Our generator's own
timings also give the denoising loop alone, where the guidance's row count is all that differs.
The models have random weights, built in memory from the shapes below (no download): a UNet
bigger than the test one, tiny text and image encoders. `generation_gpu.py` reuses the
builder at Stable Diffusion 1.5 size.

    python benchmarks/generation.py [--size 128] [--steps 10] [--batch 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from common import machine
from mmrag.generators import ReferenceDiffusionGenerator

# Shapes for CPU: a two-level UNet (64, 128 channels, attention in the lower level), a VAE that halves
# once, and the test suite's tiny text/image encoders (hidden size 32, 30-px images).
CPU_SHAPE = {
    "unet": dict(block_out_channels=(64, 128), layers_per_block=1, down_block_types=("DownBlock2D",
                 "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8),
    "vae": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2),
    "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=1000),
    "vision": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                   patch_size=6, projection_dim=32),
}
PROMPTS = ["a photo of a cat on a red sofa", "a black dog in a green park", "a small boat on a quiet lake",
           "a red bus in a busy street"]


def clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP's byte-level tokenizer with no merges: every byte is a token, so any text encodes."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=max_length)


def build_pipeline(shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight Stable Diffusion pipeline of ``shape`` with one plain IP-Adapter, built on ``device``."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(shape["text"]["max_position_embeddings"])
    with torch.device(device):  # parameters are created on the device: no host copy of big models
        text_encoder = CLIPTextModel(CLIPTextConfig(**shape["text"], bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(**shape["unet"])
        vae = AutoencoderKL(**shape["vae"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**shape["vision"]))
        ip_adapter = ip_adapter_state(unet, shape["vision"]["projection_dim"])
    image_size = shape["vision"]["image_size"]
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        # SD 1.x's noise schedule, as the tiny test model and the released checkpoints.
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, requires_safety_checker=False, image_encoder=image_encoder,
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size}),
    )
    if dtype != torch.float32:  # modules are built in float32
        pipeline.to(dtype=dtype)
    pipeline.load_ip_adapter(ip_adapter, subfolder="", weight_name="")  # a state dict: no files
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def ip_adapter_state(unet: UNet2DConditionModel, image_embed_dim: int) -> dict[str, dict[str, torch.Tensor]]:
    """A plain IP-Adapter for ``unet`` in the original checkpoint's layout (4 image tokens; one key and
    one value projection per cross-attention layer, numbered 1, 3, 5, ... in processor order)."""
    dim = unet.config.cross_attention_dim
    proj, norm = torch.nn.Linear(image_embed_dim, 4 * dim), torch.nn.LayerNorm(dim)
    image_proj = {"proj.weight": proj.weight, "proj.bias": proj.bias, "norm.weight": norm.weight,
                  "norm.bias": norm.bias}
    layers = {}
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * index + 1}.{projection}.weight"] = torch.nn.Linear(dim, hidden, bias=False).weight
    detach = lambda state: {key: value.detach() for key, value in state.items()}  # noqa: E731
    return {"image_proj": detach(image_proj), "ip_adapter": detach(layers)}


def references(count: int = 2, px: int = 256) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(count)]


def time_methods(methods: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    """Best wall-clock seconds of each method: one warm-up each, then ``rounds`` rounds, the order
    rotated every round so that no method always follows the same one (GPU clocks, caches). As
    `timeit`, the garbage collector is off while a method runs: a collection over the pipeline's many
    Python objects would land in whichever run happened to cross its threshold."""
    for method in methods.values():
        method()
    best = dict.fromkeys(methods, math.inf)
    names = list(methods)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            gc.collect()
            sync()
            gc.disable()
            start = time.perf_counter()
            methods[name]()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
            gc.enable()
    return best


def generation_methods(pipeline: StableDiffusionPipeline, batch: int, size: int, steps: int,
                       denoise: dict[str, float]) -> dict[str, Callable]:
    """diffusers' own call and ours with each guidance: same prompts, references, size, steps, output.
    Our calls also record their best denoising-loop time (`GenerationOutput.timings`) in ``denoise``."""
    generator = ReferenceDiffusionGenerator.from_pipeline(pipeline)
    prompts, refs = (PROMPTS * batch)[:batch], references()
    common = dict(num_inference_steps=steps, height=size, width=size, output_type="np")

    def diffusers_call():
        pipeline(prompts, ip_adapter_image=[refs], guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                 **common)

    def ours(name: str, guidance: str):
        def call():
            seconds = generator(prompts, refs, guidance=guidance, seed=0, **common).timings["denoise"]
            denoise[name] = min(denoise.get(name, math.inf), seconds)
        return call

    return {"diffusers (cfg)": diffusers_call, **{f"ours: {g}": ours(f"ours: {g}", g)
                                                  for g in ("cfg", "joint", "interleaved")}}


def benchmark(pipeline, batch: int, size: int, steps: int, rounds: int, sync) -> tuple[dict, dict]:
    """(best seconds per call, best denoising-loop seconds per call of our methods) for one batch size."""
    denoise = {}
    return time_methods(generation_methods(pipeline, batch, size, steps, denoise), rounds, sync), denoise


def table(results: dict[int, tuple[dict[str, float], dict[str, float]]]) -> str:
    """Markdown: seconds per image per method and batch, then the ratios per batch."""
    lines = ["| method | batch | s / image | vs diffusers | denoising loop s / image |", "|---|---:|---:|---:|---:|"]
    for batch, (best, denoise) in results.items():
        for name, seconds in best.items():
            loop = f"{denoise[name] / batch:.4f}" if name in denoise else "-"
            lines.append(f"| {name} | {batch} | {seconds / batch:.4f} | {seconds / best['diffusers (cfg)']:.3f} "
                         f"| {loop} |")
    lines += ["", "| batch | interleaved / diffusers | interleaved / joint | same, denoising loops only |",
              "|---:|---:|---:|---:|"]
    for batch, (best, denoise) in results.items():
        interleaved = best["ours: interleaved"]
        lines.append(f"| {batch} | {interleaved / best['diffusers (cfg)']:.3f} | "
                     f"{interleaved / best['ours: joint']:.3f} | "
                     f"{denoise['ours: interleaved'] / denoise['ours: joint']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="prompts per call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    pipeline = build_pipeline(CPU_SHAPE, "cpu", torch.float32)
    result = benchmark(pipeline, args.batch, args.size, args.steps, args.rounds, sync=lambda: None)
    print(f"{machine()}; random-weight SD "
          f"(UNet {CPU_SHAPE['unet']['block_out_channels']}), {args.size} px, {args.steps} steps, 2 references, "
          f"fp32; best of {args.rounds}\n")
    print(table({args.batch: result}))


if __name__ == "__main__":
    main()
