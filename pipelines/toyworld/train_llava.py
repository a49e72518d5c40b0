"""Train ``toy:llava``: a small LLaVA that answers questions about a toy-world image from its references.

The core question is :data:`NAME_QUESTION` ("What is the name of this entity?"): a name is invented, so
only a reference whose image matches the query image can supply it. Attribute questions
(:data:`ATTRIBUTE_QUESTIONS`, "What colour is the background?") the image alone answers.

The model: the frozen ``toy:clip`` vision tower (its shipped weights; every patch token plus CLS, the
token its contrastive training made discriminative), a two-layer projector and a small Llama text model
with tied embeddings. The tokenizer is Llama's byte-fallback BPE (the tiny LLaVA's) with merges learnt
from the prompt templates, the questions, the attribute words and the name syllables one at a time, so
a held-out name splits into the same syllable pieces as a training name and copying it is one skill.

Each step draws a fresh batch from ``(seed, step)`` alone (so a resumed run sees exactly the batches an
uninterrupted one would): a query view of a training entity, k references (other views of entities
with their knowledge-base caption, :func:`~.world.full_caption`; for a name question the gold one at a
random position among k - 1 distractors), the question and its answer. The prompt is rendered by
:meth:`mmrag.generators.VLMAnswerer.build_prompt` and the reply by the processor's chat template, and
the pair is tokenized by the processor as the answerer does, so training and inference read the same
tokens. The loss is the answer tokens' cross-entropy plus ``AUX_WEIGHT`` times that of the attribute
words in the prompt (the references' captions): it grounds image tokens in attribute words, which
matching a query to its reference can build on.

Checkpoints (``checkpoints/step-NNNNNN/``: trainable weights and AdamW moments as safetensors, step and
torch RNG state as JSON) are written into a staging directory renamed into place, so a run killed at any
moment resumes from its last complete checkpoint with the same weights bytes as an uninterrupted run at
the same thread count. The output directory is in ``save_pretrained`` layout (weights refreshed at every
checkpoint) with the processor, ``train_log.jsonl`` and ``toyworld.json``; :class:`VLMAnswerer` loads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import random
import time
from collections.abc import Callable

import torch
from mmrag.generators import Reference, VLMAnswerer
from mmrag.prompts import load_template
from mmrag.retrievers.errors import ConfigError
from transformers import (
    CLIPModel,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..dev.sample_data import _SYLLABLES
from ..dev.tiny_models import _LLAVA_CHAT_TEMPLATE, _clip_image_processor, _special_ids, llama_tokenizer
from .checkpoints import (
    check_run_arguments, check_same_run, load_checkpoint, run_directory, save_checkpoint, seeded_run, truncate_log)
from .models import toy_clip_dir
from .train_clip import SETTINGS_NAME, recorded_world
from .world import ATTRIBUTE_QUESTIONS, COLOURS, NAME_QUESTION, PATTERNS, SHAPES, SLOTS, Entity, ToyWorld, full_caption  # noqa: F401

# hidden 128, 4 layers, tied embeddings: the feasibility run's shape (about 1M trainable parameters with the projector).
TOY_LLAVA_TEXT = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True}
AUX_WEIGHT = 0.3
P_NAME = 0.7  # the rest are attribute questions
NAME_K = (1, 2, 2, 3, 3)  # name questions: picking among distractors is the hard part, so it gets most steps
LOG_NAME = "train_log.jsonl"


@dataclasses.dataclass
class Example:
    """One training (or evaluation) item, in the answerer's own terms."""

    question: str
    image: object  # PIL image: the query
    references: list[Reference]
    answer: str


# ------------------------------------------------------------------------------------------- model
def toy_llava_tokenizer() -> LlamaTokenizer:
    """The tiny LLaVA's tokenizer layout (Llama BPE with byte fallback, ``<image>``), its merges learnt
    from the VQA templates, the questions, the attribute words and each name syllable on its own."""
    texts = [load_template(f"vqa_{part}").template for part in ("intro", "reference", "question", "plain")]
    texts += [NAME_QUESTION, *ATTRIBUTE_QUESTIONS.values(), "USER: ASSISTANT: The a on background."]
    texts += [" ".join(SHAPES + COLOURS + PATTERNS)] * 4  # frequent enough to become whole-word tokens
    words = [list("▁" + word) for text in texts for word in text.split()]
    # A syllable starts a name ("▁Zor") or continues it ("bla"), never more: names stay syllable pieces.
    words += [list("▁" + s.capitalize()) for s in _SYLLABLES] * 8 + [list(s) for s in _SYLLABLES] * 8
    return llama_tokenizer(words, num_merges=400)


def build_toy_llava(clip_dir: str | os.PathLike) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A fresh LLaVA on the frozen toy:clip vision tower (from ``clip_dir``), seeded by the caller."""
    clip = CLIPModel.from_pretrained(clip_dir)
    vision = clip.config.vision_config
    tokenizer = toy_llava_tokenizer()
    text_config = LlamaConfig(**TOY_LLAVA_TEXT, vocab_size=len(tokenizer), **_special_ids(tokenizer))
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_seq_length=patches + 1,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    model.generation_config = GenerationConfig(do_sample=False, **_special_ids(tokenizer))
    processor = LlavaProcessor(image_processor=_clip_image_processor(vision.image_size), tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy="full",
                               num_additional_image_tokens=1, chat_template=_LLAVA_CHAT_TEMPLATE)
    return model, processor


# -------------------------------------------------------------------------------------------- data
def draw_example(world: ToyWorld, entities: list[Entity], rng: random.Random) -> Example:
    """A fresh training item over ``entities`` (fresh views, so no image repeats)."""
    entity = rng.choice(entities)
    others = [e for e in entities if e is not entity]
    if rng.random() < P_NAME:
        k = rng.choice(NAME_K)
        chosen = rng.sample(others, k - 1)
        chosen.insert(rng.randrange(k), entity)
        question, answer = NAME_QUESTION, entity.name
    else:
        k = rng.randrange(4)
        chosen = rng.sample(others, k)
        if k and rng.random() < 0.5:
            chosen[rng.randrange(k)] = entity
        slot = rng.choice(SLOTS)
        question, answer = ATTRIBUTE_QUESTIONS[slot], getattr(entity, slot)
    references = [Reference(text=full_caption(e).text, image=world.draw(e, rng)) for e in chosen]
    return Example(question, world.draw(entity, rng), references, answer)


def step_examples(world: ToyWorld, entities: list[Entity], seed: int, step: int, batch_size: int) -> list[Example]:
    """Step ``step``'s batch: a function of (seed, step) only, which is what makes resuming exact."""
    rng = random.Random(f"toy-llava:{seed}:{step}")
    return [draw_example(world, entities, rng) for _ in range(batch_size)]


def reply_text(processor, answer: str) -> str:
    """``answer`` as the chat template writes the assistant turn after the generation prompt (with the
    turn's end, so the model learns to stop): " Zorbla </s>" after LLaVA's "ASSISTANT:"."""
    user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    asked = processor.apply_chat_template(user, add_generation_prompt=True)
    reply = [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    answered = processor.apply_chat_template(user + reply)
    if not answered.startswith(asked):
        raise ConfigError(f"The chat template does not write a reply after its generation prompt: {answered!r}.")
    return answered[len(asked):]


def encode_examples(answerer: VLMAnswerer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Token ids, pixels and loss targets for ``examples``: prompts as ``answerer`` builds them, then the
    reply; ``labels`` hold the reply tokens (-100 elsewhere), ``aux_labels`` the prompt's attribute words."""
    processor = answerer.processor
    prompts, images = zip(*(answerer.build_prompt(e.question, e.image, e.references) for e in examples))
    texts = [p + reply_text(processor, e.answer) for p, e in zip(prompts, examples)]
    bos = processor.tokenizer.bos_token
    kwargs = {"padding": True, "padding_side": "right", "add_special_tokens": not prompts[0].startswith(bos),
              "return_tensors": "pt"}
    full = processor(text=texts, images=list(images), **kwargs)
    # The prompt's own token count, as VLMAnswerer.choose finds a reply's tokens (images expanded).
    starts = processor(text=list(prompts), images=list(images), **kwargs)["attention_mask"].sum(dim=1)  # (b,)
    input_ids, mask = full["input_ids"], full["attention_mask"]  # (b, L)
    positions = torch.arange(input_ids.shape[1])[None]  # (1, L)
    is_reply = (positions >= starts[:, None]) & mask.bool()
    labels = input_ids.masked_fill(~is_reply, -100)
    attribute_ids = torch.tensor(sorted(_attribute_token_ids(processor.tokenizer)))
    is_attribute = torch.isin(input_ids, attribute_ids) & ~is_reply
    aux_labels = input_ids.masked_fill(~is_attribute, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": full["pixel_values"],
            "labels": labels, "aux_labels": aux_labels, "prompt_lengths": starts}


def _attribute_token_ids(tokenizer) -> set[int]:
    """The first token of each attribute word as it appears mid-sentence (all single tokens here)."""
    return {tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in SHAPES + COLOURS + PATTERNS}


def training_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer cross-entropy + AUX_WEIGHT x attribute-word cross-entropy (next-token, shifted)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits[:, :-1]  # (b, L - 1, vocab)
    flat = logits.reshape(-1, logits.shape[-1])
    answer = torch.nn.functional.cross_entropy(flat, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    aux_targets = batch["aux_labels"][:, 1:].reshape(-1)
    aux = (torch.nn.functional.cross_entropy(flat, aux_targets, ignore_index=-100)
           if bool((aux_targets != -100).any()) else answer.new_zeros(()))
    return answer + AUX_WEIGHT * aux, {"answer_loss": answer.item(), "aux_loss": aux.item()}


# ---------------------------------------------------------------------------------------- training
def train_toy_llava(
    out_dir: str | os.PathLike,
    *,
    steps: int,
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 16,
    lr: float = 1.5e-3,
    checkpoint_every: int = 250,
    resume: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    world: ToyWorld | None = None,
    clip_dir: str | os.PathLike | None = None,
) -> dict:
    """Train toy:llava into ``out_dir`` for ``steps`` optimiser steps; returns ``{"steps", "seconds", "loss"}``.

    Args:
        steps: the schedule's length (linear warm-up, then cosine decay to 0 at ``steps``).
        seed: seeds the initialisation and every drawn batch.
        threads: torch intra-op threads for the run (restored afterwards); ``None`` leaves them. Bytes
            repeat only at the same thread count.
        checkpoint_every: steps between checkpoints (one is also written at the end).
        resume: continue from the latest checkpoint in ``out_dir``; ``False`` needs an empty ``out_dir``.
        stop_after: stop (with a checkpoint) once this many steps are done, as a cut-off run would; the
            schedule is still ``steps`` long, so a later call resumes it exactly.
        log: called with progress lines (``print`` works).
        world: the toy world (``None``: ``ToyWorld()``); clip_dir: the toy:clip to take the vision tower
            from (``None``: the shipped weights).
    """
    check_run_arguments(dict(steps=steps, batch_size=batch_size, checkpoint_every=checkpoint_every),
                        dict(threads=threads, stop_after=stop_after))
    out_dir, latest = run_directory(out_dir, resume)
    world = ToyWorld() if world is None else world
    clip_dir = toy_clip_dir(clip_dir)
    say = log if log is not None else (lambda line: None)
    settings = {"world": world.params(), "seed": seed, "batch_size": batch_size, "lr": lr, "steps": steps,
                "clip_dir": str(clip_dir), "text": TOY_LLAVA_TEXT, "aux_weight": AUX_WEIGHT, "threads": threads}

    with seeded_run(seed, threads):
        model, processor = build_toy_llava(clip_dir)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        if latest is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            processor.save_pretrained(out_dir)
            model.save_pretrained(out_dir)
            (out_dir / SETTINGS_NAME).write_text(json.dumps(settings, indent=1), encoding="utf-8")
            start_step, spent = 0, 0.0
        else:
            check_same_run(out_dir / SETTINGS_NAME, settings, say)
            start_step, spent = load_checkpoint(latest, trainable, optimiser)
            truncate_log(out_dir / LOG_NAME, start_step)
            say(f"resuming from {latest.name} (step {start_step})")
        # The prompts come from the library's own answerer over the saved processor.
        answerer = VLMAnswerer(out_dir, device="cpu", dtype="float32")
        result = _train(model, optimiser, trainable, answerer, world, out_dir, start_step=start_step,
                        spent=spent, steps=steps, stop=steps if stop_after is None else min(steps, stop_after),
                        seed=seed, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, say=say)
    return result


def _train(model, optimiser, trainable, answerer, world, out_dir, *, start_step, spent, steps, stop, seed,
           batch_size, lr, checkpoint_every, say) -> dict:
    entities = world.entities("train")
    warmup = min(200, max(1, steps // 10))
    model.train()
    begun = time.perf_counter() - spent
    step, loss_value = start_step, float("nan")
    with (out_dir / LOG_NAME).open("a", encoding="utf-8") as log_file:
        while step < stop:
            # linear warm-up, then cosine decay to 0 at `steps`
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimiser.param_groups:
                group["lr"] = lr * scale
            batch = encode_examples(answerer, step_examples(world, entities, seed, step, batch_size))
            loss, parts = training_loss(model, batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            optimiser.step()
            step += 1
            loss_value = loss.item()
            seconds = time.perf_counter() - begun
            if step % 10 == 0 or step == stop:
                line = {"step": step, "loss": round(loss_value, 5), **{k: round(v, 5) for k, v in parts.items()},
                        "seconds": round(seconds, 2), "lr": lr * scale}
                log_file.write(json.dumps(line) + "\n")
                log_file.flush()
            if step % checkpoint_every == 0 or step == stop:
                save_checkpoint(out_dir, step, seconds, trainable, optimiser, model.save_pretrained)
                say(f"step {step}: loss {loss_value:.4f} ({seconds:.0f} s), checkpoint written")
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - begun, 2), "loss": loss_value}


# -------------------------------------------------------------------------------------- evaluation
def evaluate_toy_llava(path: str | os.PathLike, *, split: str = "heldout", n: int | None = None, seed: int = 0,
                       world: ToyWorld | None = None) -> dict:
    """Exact-match accuracy of the model at ``path`` through :class:`VLMAnswerer.answer` (the inference path).

    On ``n`` entities of ``split`` (``None``: all), with view 1 as the query image and view 0 plus
    :func:`full_caption` as a reference (what a toy-world knowledge base holds):

    - ``name_no_refs``: "What is the name of this entity?" without references (a name cannot be seen);
    - ``name_gold``: with the gold reference alone;
    - ``name_gold_2_distractors``: the gold among 2 other entities' references, at a random position;
    - ``attribute_no_refs``: an attribute question (the slots in turn) without references.

    ``world`` defaults to the one recorded in ``toyworld.json`` next to the weights, else ``ToyWorld()``.
    """
    path = pathlib.Path(path)
    world = recorded_world(path) if world is None else world
    entities = world.entities(split)
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"`n` must be a positive integer or None, got {n!r}.")
        entities = entities[:n]
    if len(world.entities(split)) < 3:
        raise ConfigError(f"`split` {split!r} has fewer than 3 entities; 2 distractors need more.")
    rng = random.Random(f"toy-llava-eval:{seed}")
    answerer = VLMAnswerer(path, device="cpu", dtype="float32", max_new_tokens=8)
    pool = world.entities(split)

    def reference(e: Entity) -> Reference:
        return Reference(text=full_caption(e).text, image=world.render(e, 0))

    hits = {"name_no_refs": 0, "name_gold": 0, "name_gold_2_distractors": 0, "attribute_no_refs": 0}
    samples = []
    for i, entity in enumerate(entities):
        query = world.render(entity, 1)
        distractors = rng.sample([e for e in pool if e is not entity], 2)
        mixed = [reference(e) for e in distractors]
        mixed.insert(rng.randrange(3), reference(entity))
        slot = SLOTS[i % len(SLOTS)]
        cases = {"name_no_refs": (NAME_QUESTION, [], entity.name),
                 "name_gold": (NAME_QUESTION, [reference(entity)], entity.name),
                 "name_gold_2_distractors": (NAME_QUESTION, mixed, entity.name),
                 "attribute_no_refs": (ATTRIBUTE_QUESTIONS[slot], [], getattr(entity, slot))}
        for key, (question, refs, expected) in cases.items():
            text = answerer.answer(question, query, refs).text
            hits[key] += text == expected
            if i < 3:
                samples.append({"case": key, "expected": expected, "answer": text})
    metrics = {key: round(value / len(entities), 4) for key, value in hits.items()}
    return {"split": split, "n": len(entities), **metrics, "samples": samples}
