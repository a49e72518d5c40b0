"""Generation benchmark on a GPU at Stable Diffusion 1.5 size (a script, not a test): prints a
markdown table.

Random weights with SD 1.5's shapes (UNet 320/640/1280/1280 with 768-d cross-attention, its VAE, a
12-layer CLIP text encoder) and the SD 1.5 IP-Adapter's (ViT-H/14 image encoder, 4 image tokens),
all built directly on the device in float16: nothing is downloaded. Times, per image, at 512 px and
30 steps with two references, at batch 1 and 8: diffusers' own `StableDiffusionPipeline.__call__`
with the IP-Adapter, and `ReferenceDiffusionGenerator` with cfg, joint and interleaved guidance. One
warm-up each, then rotating order, best of ``--rounds``, `torch.cuda.synchronize` around each.
Target at batch 8: interleaved / joint <= 0.75 (two denoiser rows per step instead of three).

Needs torch, transformers, accelerate and diffusers; run from the repository root, with mmrag installed
(or PYTHONPATH=.):

    python benchmarks/generation_gpu.py                      # ~2 minutes on an H200
    python benchmarks/generation_gpu.py --device cpu --quick # tiny shapes: checks the script runs
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import torch
import transformers

from generation import CPU_SHAPE, benchmark, build_pipeline, table

SD15_SHAPE = {
    "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8),
    "vae": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
    # h94/IP-Adapter's models/image_encoder: OpenCLIP ViT-H/14.
    "vision": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 64 px, 3 steps, batches 1 and 2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shape, size, steps, batches = (CPU_SHAPE, 64, 3, (1, 2)) if args.quick else (SD15_SHAPE, 512, 30, (1, 8))
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)

    pipeline = build_pipeline(shape, args.device, dtype)
    results = {batch: benchmark(pipeline, batch, size, steps, args.rounds, sync) for batch in batches}
    device = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    print(f"{device}; torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
          f"{transformers.__version__}; random-weight {'tiny' if args.quick else 'SD 1.5-size'} model, {size} px, "
          f"{steps} steps, 2 references, {str(dtype).removeprefix('torch.')}; best of {args.rounds}\n")
    print(table(results))
    best, _ = results[batches[-1]]
    print(f"\nbatch {batches[-1]}: interleaved / joint = {best['ours: interleaved'] / best['ours: joint']:.3f} "
          f"(target <= 0.75)")


if __name__ == "__main__":
    main()
