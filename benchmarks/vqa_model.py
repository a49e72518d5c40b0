"""VLM answerer benchmark (a script, not a test): prints a markdown table per model.

Seconds of `generators.VLMAnswerer` per call, median of ``--rounds`` after one warm-up:

- ``answer`` with 0, 1, 3 and 5 reference images (plus one text-only reference each time), split into
  building the prompt (rendering, image processing, the context-budget check) and generating;
- ``answer_batch`` of ``--batch`` questions (3 reference images each) against the same questions
  answered one by one: the left-padded batch should cost well under the loop where the GPU has room;
- ``choose`` among 4 options (3 reference images): one teacher-forced forward pass for all options.

Models: the tiny test VLMs (default; they measure the Python overhead only), any ``--model`` directory
or Hub id, or ``--shape small``: a random-weight LLaVA-1.5-shaped model (CLIP ViT-L/14 at 336 px, so
576 tokens per image, and a 1.1B TinyLlama-shaped language model) built from the tiny LLaVA's
tokenizer and chat template and saved to a temporary directory. Random weights: answers are noise and
their length varies, so every call generates exactly ``--new-tokens`` (no end-of-sequence stop).

    python benchmarks/vqa_model.py [--model DIR_OR_ID ...] [--shape small] [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from common import machine
from mmrag.generators.vlm import Reference, VLMAnswerer

QUESTION = "Which animal appears in both of the reference images?"
CHOICES = ["A cat.", "A black dog.", "A small boat on a quiet lake.", "None of them."]
# CLIP ViT-L/14-336 (LLaVA-1.5's vision tower) and TinyLlama-1.1B's language model.
SMALL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14)
SMALL_TEXT = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, max_position_embeddings=4096)


def image(seed: int, size: int = 400) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def references(n_images: int) -> list[Reference]:
    with_images = [Reference(f"Reference photo {i} of an animal.", image(10 + i), score=1.0 - i / 10)
                   for i in range(n_images)]
    return with_images + [Reference("A text-only reference about cats and dogs.", score=0.01)]


# A mid-size model for CPU runs: CLIP ViT-B/16 at 224 px (196 tokens per image), a 12-layer 768-wide LM.
MID_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16)
MID_TEXT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=12, max_position_embeddings=4096)
# About 2B parameters: the ViT-L/14-336 tower (0.3B) and a 24-layer 2048-wide language model (1.6B).
TWO_B_TEXT = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, max_position_embeddings=8192)
SHAPES = {"small": (SMALL_VISION, SMALL_TEXT), "mid": (MID_VISION, MID_TEXT), "2b": (SMALL_VISION, TWO_B_TEXT)}


def build_small_llava(tokenizer_from: Path, target: Path, device: torch.device, shape: str = "small",
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random LLaVA-1.5-shaped model with the tiny LLaVA's tokenizer and chat template."""
    vision, text = SHAPES[shape]
    size, patch = vision["image_size"], vision["patch_size"]
    tiny = AutoProcessor.from_pretrained(tokenizer_from)
    tokenizer = tiny.tokenizer
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision),
                         text_config=LlamaConfig(**text, vocab_size=len(tokenizer), **ids),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(size // patch) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    with torch.device(device):  # random init on the GPU where there is one: seconds, not minutes
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.generation_config.update(do_sample=False, **ids)
    model.save_pretrained(target)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=tiny.chat_template).save_pretrained(target)
    return target


def median_seconds(call, rounds: int) -> tuple[float, object]:
    result = call()  # warm-up (kernels, caches)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(model_id: str, new_tokens: int, batch: int, rounds: int) -> list[tuple[str, str, str]]:
    answerer = VLMAnswerer(model_id, max_new_tokens=new_tokens).warm_up()
    # Random weights stop at random places; generate exactly new_tokens so every call does the same work.
    answerer.model.generation_config.eos_token_id = None
    query = image(0)
    rows = []
    for k in (0, 1, 3, 5):
        seconds, output = median_seconds(lambda: answerer.answer(QUESTION, query, references(k)), rounds)
        text, images = answerer.build_prompt(QUESTION, query, output.references)
        bos = answerer.processor.tokenizer.bos_token
        prompt_tokens = answerer.processor(text=text, images=images, add_special_tokens=not text.startswith(bos),
                                           return_tensors="pt")["input_ids"].shape[1]
        rows.append((f"answer, {k} reference images", f"{seconds:.3f}",
                     f"{prompt_tokens} prompt tokens ({output.num_image_tokens} image); prompt "
                     f"{output.timings['prompt']:.3f} s, generate {output.timings['generate']:.3f} s"))
    questions, images, refs = [QUESTION] * batch, [image(i) for i in range(batch)], [references(3)] * batch
    batched, _ = median_seconds(lambda: answerer.answer_batch(questions, images, refs), rounds)
    looped, _ = median_seconds(lambda: [answerer.answer(q, i, r) for q, i, r in zip(questions, images, refs)], rounds)
    rows.append((f"answer_batch of {batch}", f"{batched:.3f}", f"one by one {looped:.3f} s: x{looped / batched:.2f}"))
    seconds, _ = median_seconds(lambda: answerer.choose(QUESTION, CHOICES, query, references(3)), rounds)
    rows.append(("choose among 4, 3 reference images", f"{seconds:.3f}", "one forward pass"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model directory or Hub id (repeatable)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="add a random LLaVA-1.5-shaped model of this size")
    parser.add_argument("--tokenizer-from", type=Path, help="tiny LLaVA directory for --shape (default: built)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="vqa-bench-"))
    models = list(args.model or [])
    tiny_llava = args.tokenizer_from
    if not models or (args.shape and tiny_llava is None):
        from mmrag.pipelines.dev.tiny_models import ensure_tiny_model  # only here: it needs diffusers

        tiny_llava = tiny_llava or ensure_tiny_model("llava", cache)
        if not models:
            models = [str(tiny_llava), str(ensure_tiny_model("idefics3", cache))]
    if args.shape:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        models.append(str(build_small_llava(tiny_llava, cache / f"llava-{args.shape}", device, shape=args.shape)))

    print(f"{machine()}; {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"{args.new_tokens} new tokens, median of {args.rounds}\n")
    for model_id in models:
        print(f"### {Path(model_id).name}\n\n| call | seconds | notes |\n|---|---:|---|")
        for row in bench(model_id, args.new_tokens, args.batch, args.rounds):
            print("| " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main()
