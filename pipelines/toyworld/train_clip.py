"""Train ``toy:clip``: a small CLIP, contrastively, on toy-world captions drawn fresh every step.

Why it learns attributes rather than entities: each step draws a new view (position, size,
rotation) of each training entity and a new caption of it, all four attributes or a random subset,
sometimes with the name. A partial caption ("a red circle") truly describes every image in the batch
with those attributes, so the loss counts all of them as correct (multi-positive InfoNCE): with
``P[i, j]`` true when caption ``i`` matches image ``j`` and ``s`` the scaled cosine logits,

    loss_t2i = mean_i [ logsumexp_j s[i, j] - logsumexp_{j: P[i, j]} s[i, j] ]

and the same over images for image->text; the loss is their mean. Plain InfoNCE would push a red
circle's caption away from every other red circle in the batch.

The weights are saved with ``save_pretrained`` (safetensors) next to a ``CLIPProcessor``, the layout of
the tiny CLIP, so :class:`mmrag.retrievers.DualEncoder` loads them; ``train_log.jsonl`` (step, loss,
seconds, then the final metrics) and ``toyworld.json`` (the world and training settings) go beside them.

On a busy CPU run with ``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set before torch
starts): busy-waiting OpenMP threads that share cores with other work were measured up to 10x slower.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from mmrag.retrievers.errors import ConfigError
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from ..dev.tiny_models import _clip_image_processor, _special_ids, clip_tokenizer
from .checkpoints import seeded_run
from .world import ToyWorld, full_caption, random_caption

# hidden 128, 3 layers, 32-px images in 8-px patches (16 tokens + CLS); about 1M parameters, 4 MB.
TOY_CLIP_SHAPE = {
    "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   image_size=32, patch_size=8),
    "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=32),
    "projection_dim": 128,
}
LOG_NAME = "train_log.jsonl"
SETTINGS_NAME = "toyworld.json"


def toy_clip_tokenizer(world: ToyWorld, max_length: int) -> CLIPTokenizer:
    """Byte-level BPE in CLIP's format (as the tiny CLIP's), its merges learnt from toy-world captions.

    The attribute words become single tokens; names split into syllable pieces, so unseen names
    still encode (every byte is in the vocabulary, so nothing maps to the unknown token).
    """
    return clip_tokenizer(max_length, world.tokenizer_corpus())


def recorded_world(model_dir: str | os.PathLike) -> ToyWorld:
    """The world a toy model was trained in, as its ``toyworld.json`` records it (else ``ToyWorld()``)."""
    settings = pathlib.Path(model_dir) / SETTINGS_NAME
    return ToyWorld(**json.loads(settings.read_text())["world"]) if settings.is_file() else ToyWorld()


def multi_positive_loss(text_features: torch.Tensor, image_features: torch.Tensor, positives: torch.Tensor,
                        logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where ``positives[i, j]`` marks every image ``j`` that caption ``i`` describes.

    Features are unnormalised ``(b, d)``; ``positives`` is ``(b, b)`` bool with a true diagonal.
    """
    t = text_features / text_features.norm(dim=-1, keepdim=True)
    v = image_features / image_features.norm(dim=-1, keepdim=True)
    logits = logit_scale.exp() * t @ v.T  # (b_text, b_image)
    masked = logits.masked_fill(~positives, float("-inf"))
    t2i = torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)
    i2t = torch.logsumexp(logits, dim=0) - torch.logsumexp(masked, dim=0)
    return (t2i.mean() + i2t.mean()) / 2


def train_toy_clip(
    out_dir: str | os.PathLike,
    *,
    seconds: float | None = None,
    steps: int = 3000,
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    world: ToyWorld | None = None,
    evaluate: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train toy:clip into ``out_dir`` (new or empty) and return the final metrics (or ``{}``).

    Args:
        seconds: a wall-clock budget; training stops at it or at ``steps``, whichever comes first, and
            the learning-rate schedule follows whichever is further along. ``None``: exactly
            ``steps`` steps, and then the same ``seed`` and ``threads`` give the same weight bytes.
        steps: the number of optimiser steps (the schedule's length).
        seed: seeds the model's initialisation and every drawn view and caption.
        threads: torch intra-op threads for the run (restored afterwards); ``None`` leaves them.
        world: the toy world to train on; ``None`` is ``ToyWorld(seed=0)``, the shipped model's.
        evaluate: run :func:`evaluate_toy_clip` on the held-out split at the end and log it.
        log: called with one progress line now and then (``print`` works).
    """
    if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0):
        raise ConfigError(f"`seconds` must be a positive number or None, got {seconds!r}.")
    for argument, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"`{argument}` must be a positive integer, got {value!r}.")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0):
        raise ConfigError(f"`threads` must be a positive integer or None, got {threads!r}.")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"`out_dir` {str(out_dir)!r} is not empty; pass a new or empty directory.")
    out_dir.mkdir(parents=True, exist_ok=True)
    world = ToyWorld() if world is None else world
    entities = world.entities("train")
    batch_size = min(batch_size, len(entities))
    say = log if log is not None else (lambda line: None)

    with seeded_run(seed, threads):
        model, processor = _new_model(world)
        trained = _train(model, processor, world, entities, out_dir, seconds=seconds, steps=steps,
                         seed=seed, batch_size=batch_size, lr=lr, say=say)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    settings = {"world": world.params(), "seed": seed, "threads": threads, "batch_size": batch_size, "lr": lr,
                "steps_planned": steps, "seconds_budget": seconds, **trained, "shape": TOY_CLIP_SHAPE}
    (out_dir / SETTINGS_NAME).write_text(json.dumps(settings, indent=1), encoding="utf-8")
    metrics = evaluate_toy_clip(out_dir, "heldout", world=world) if evaluate else {}
    with (out_dir / LOG_NAME).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "final", **trained, "metrics": metrics}) + "\n")
    say(f"toy:clip trained: {trained['steps']} steps in {trained['seconds']:.0f} s; held-out {metrics}")
    return metrics


def _new_model(world: ToyWorld) -> tuple[CLIPModel, CLIPProcessor]:
    shape = TOY_CLIP_SHAPE
    if world.image_size != shape["vision"]["image_size"]:
        raise ConfigError(f"`world.image_size` must be {shape['vision']['image_size']} for toy:clip, "
                          f"got {world.image_size}; build the world with image_size=32.")
    tokenizer = toy_clip_tokenizer(world, shape["text"]["max_position_embeddings"])
    text_config = dict(shape["text"], vocab_size=len(tokenizer), **_special_ids(tokenizer))
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=shape["vision"],
                                 projection_dim=shape["projection_dim"]))
    processor = CLIPProcessor(image_processor=_clip_image_processor(world.image_size), tokenizer=tokenizer)
    return model, processor


def _train(model, processor, world, entities, out_dir, *, seconds, steps, seed, batch_size, lr, say) -> dict:
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = min(100, steps // 10)
    model.train()
    start = time.perf_counter()
    step, loss_value = 0, float("nan")
    with (out_dir / LOG_NAME).open("w", encoding="utf-8") as log_file:
        while step < steps:
            elapsed = time.perf_counter() - start
            if seconds is not None and elapsed >= seconds:
                break
            progress = max(step / steps, 0.0 if seconds is None else elapsed / seconds)
            # linear warm-up, then cosine decay to 0 over the run
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in optimiser.param_groups:
                group["lr"] = lr * scale
            batch = rng.sample(entities, batch_size)
            captions = [random_caption(e, rng) for e in batch]
            images = [world.draw(e, rng) for e in batch]
            positives = torch.tensor([[c.matches(e) for e in batch] for c in captions])  # (b, b)
            text = processor.tokenizer([c.text for c in captions], padding=True, truncation=True,
                                       return_tensors="pt")
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
            loss = multi_positive_loss(out.text_embeds, out.image_embeds, positives, model.logit_scale)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 makes training unstable
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            loss_value = loss.item()
            if step % 25 == 0 or step == steps:
                line = {"step": step, "loss": round(loss_value, 5), "seconds": round(time.perf_counter() - start, 2),
                        "lr": lr * scale}
                log_file.write(json.dumps(line) + "\n")
                log_file.flush()
                if step % 250 == 0:
                    say(f"step {step}: loss {loss_value:.4f} ({line['seconds']:.0f} s)")
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2), "final_loss": loss_value}


def evaluate_toy_clip(path: str | os.PathLike, split: str = "heldout", *, world: ToyWorld | None = None,
                      batch_size: int = 64) -> dict:
    """Measure a toy CLIP through :class:`DualEncoder` (the library's loading and embedding path).

    On the entities of ``split`` (view 0 as the gallery, one image per entity):

    - ``t2i_r1`` / ``t2i_r5``: the caption naming all four attributes (no name) finds its entity's
      image at rank 1 / within 5 (each combination belongs to one entity, so there is one answer);
    - ``i2i_shape_top1`` (and ``_colour``, ``_pattern``): view 1 of each entity as the query, the
      nearest image of another entity has the same shape (colour, pattern);
    - ``i2i_same_entity_r1``: view 1 finds its own entity's view 0 first;
    - ``cross_entity_cosine``: the mean cosine between different entities' images (random weights
      sit near 0.8: everything looks alike);
    - ``composed_hit5`` / ``image_only_hit5``: a reference image plus "but blue" (the normalised sum
      of the two embeddings) against the reference image alone, the target within 5 (the reference
      itself excluded).

    ``world`` defaults to the one recorded in ``toyworld.json`` next to the weights, else ``ToyWorld()``.
    """
    from mmrag.retrievers import DualEncoder

    path = pathlib.Path(path)
    world = recorded_world(path) if world is None else world
    entities = world.entities(split)
    index = {e.name: i for i, e in enumerate(entities)}
    encoder = DualEncoder(path, device="cpu", dtype="float32", batch_size=batch_size)
    gallery = encoder.embed_images([world.render(e, 0) for e in entities])  # (n, d) unit rows
    queries = encoder.embed_images([world.render(e, 1) for e in entities])
    texts = encoder.embed_texts([full_caption(e, with_name=False).text for e in entities])
    n = len(entities)

    ranks = _rank_of(texts @ gallery.T, np.arange(n))
    i2i = queries @ gallery.T  # (n, n)
    own_first = float(np.mean(i2i.argmax(axis=1) == np.arange(n)))
    i2i_other = np.where(np.eye(n, dtype=bool), -np.inf, i2i)
    nearest = i2i_other.argmax(axis=1)
    agree = {slot: float(np.mean([getattr(entities[j], slot) == getattr(e, slot) for e, j in zip(entities, nearest)]))
             for slot in ("shape", "colour", "pattern")}
    cos = gallery @ gallery.T
    cross = float(cos[~np.eye(n, dtype=bool)].mean())

    triples = world.composed_queries(split)
    metrics = {"split": split, "n_entities": n, "t2i_r1": float(np.mean(ranks == 0)), "t2i_r5": float(np.mean(ranks < 5)),
               "i2i_shape_top1": agree["shape"], "i2i_colour_top1": agree["colour"],
               "i2i_pattern_top1": agree["pattern"], "i2i_same_entity_r1": own_first, "cross_entity_cosine": cross}
    if triples:
        refs = np.array([index[t.reference.name] for t in triples])
        targets = np.array([index[t.target.name] for t in triples])
        modifiers = encoder.embed_texts([t.modifier for t in triples])
        fused = gallery[refs] + modifiers
        fused /= np.linalg.norm(fused, axis=1, keepdims=True)
        for key, q in (("composed_hit5", fused), ("image_only_hit5", gallery[refs])):
            scores = q @ gallery.T
            scores[np.arange(len(refs)), refs] = -np.inf  # the reference itself is not an answer
            metrics[key] = float(np.mean(_rank_of(scores, targets) < 5))
        metrics["n_composed"] = len(triples)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def _rank_of(scores: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """0-based rank of ``answers[i]`` in row ``i`` of ``scores`` (ties count against it)."""
    own = scores[np.arange(len(answers)), answers][:, None]
    return np.sum(scores >= own, axis=1) - 1
