"""toy:llava's trainer: prompts equal the answerer's, the loss learns, a cut-off run resumes exactly,
and the saved model loads and answers through VLMAnswerer. A tiny world and batch keep it fast; quality
is measured by evaluate_toy_llava on a real run, not here."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from mmrag.generators import VLMAnswerer
from mmrag.pipelines.toyworld import ToyWorld
from mmrag.pipelines.toyworld.checkpoints import CHECKPOINTS
from mmrag.pipelines.toyworld.models import shipped_model_dir
from mmrag.pipelines.toyworld.train_llava import (
    LOG_NAME,
    NAME_QUESTION,
    build_toy_llava,
    encode_examples,
    evaluate_toy_llava,
    step_examples,
    toy_llava_tokenizer,
    train_toy_llava,
    training_loss,
)
from mmrag.retrievers.errors import ConfigError

STEPS = 4
RUN = {"steps": STEPS, "seed": 0, "threads": 1, "batch_size": 3, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(n_train=24, n_validation_groups=0, n_heldout_groups=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world):
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("toy-llava") / "straight"
    train_toy_llava(out, world=world, **RUN)
    return out


@pytest.fixture(scope="module")
def answerer(trained) -> VLMAnswerer:
    return VLMAnswerer(trained, device="cpu", dtype="float32", max_new_tokens=6)


def test_training_prompt_is_the_answerers(answerer, world):
    examples = step_examples(world, world.entities("train"), 0, 0, 6)
    batch = encode_examples(answerer, examples)
    tokenizer = answerer.processor.tokenizer
    for row, example in enumerate(examples):
        fitted = answerer._fit(example.question, [example.image], example.references, reserve=8)
        prompt_ids = fitted.inputs["input_ids"][0]  # what answer() hands to generate
        start = int(batch["prompt_lengths"][row])
        assert start == len(prompt_ids)
        assert torch.equal(batch["input_ids"][row, :start], prompt_ids)
        reply = batch["input_ids"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(reply, skip_special_tokens=True).strip() == example.answer
        assert int(reply[-1]) == tokenizer.eos_token_id  # it learns to stop
        assert torch.equal(batch["labels"][row, start:start + len(reply)], reply)
    # the auxiliary targets are attribute words of the references, never the reply
    aux = batch["aux_labels"] != -100
    assert not (aux & (batch["labels"] != -100)).any()
    words = {tokenizer.decode([int(t)]).strip() for t in batch["input_ids"][aux]}
    assert words and words <= {w for e in world.entities("train") for w in e.combo}


def test_tokenizer_splits_unseen_names_into_syllables(world):
    tokenizer = toy_llava_tokenizer()
    for entity in world.entities("heldout"):
        pieces = tokenizer.tokenize(" " + entity.name)
        assert 2 <= len(pieces) <= 3, pieces  # 2-3 syllables, no bytes or unknowns
        assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(pieces)


def test_loss_falls_on_one_batch(answerer, world):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_toy_llava(shipped_model_dir("clip"))
    batch = encode_examples(answerer, step_examples(world, world.entities("train"), 0, 0, 4))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss, _ = training_loss(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_cut_off_run_resumes_to_the_same_bytes(tmp_path, trained, world):
    out = tmp_path / "cut"
    first = train_toy_llava(out, world=world, stop_after=2, **RUN)
    assert first["steps"] == 2
    # A run killed mid-checkpoint leaves a staging folder and maybe a folder without state.json.
    (out / CHECKPOINTS / ".staging-000003").mkdir()
    (out / CHECKPOINTS / "step-000003").mkdir()
    lines = []
    second = train_toy_llava(out, world=world, log=lines.append, **RUN)
    assert second["steps"] == STEPS and "step 2" in lines[0]
    assert (out / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    logged = [json.loads(line)["step"] for line in (out / LOG_NAME).read_text().splitlines()]
    assert logged == [2, 4]  # one line per logged step, none repeated by the resume


def test_vision_tower_stays_toy_clip(trained):
    weights = safetensors.torch.load_file(trained / "model.safetensors")
    clip = safetensors.torch.load_file(shipped_model_dir("clip") / "model.safetensors")
    tower = {k.split("vision_tower.", 1)[1]: v for k, v in weights.items() if "vision_tower." in k}
    assert tower and all(torch.equal(v, clip[f"vision_model.{k}"]) for k, v in tower.items())


def test_saved_model_answers_through_vlm_answerer(answerer, trained, world):
    entity = world.entities("heldout")[0]
    out = answerer.answer(NAME_QUESTION, world.render(entity, 1))
    assert isinstance(out.text, str) and out.num_image_tokens == 17
    metrics = evaluate_toy_llava(trained, n=2, world=world)
    assert metrics["n"] == 2
    for key in ("name_no_refs", "name_gold", "name_gold_2_distractors", "attribute_no_refs"):
        assert 0.0 <= metrics[key] <= 1.0


def test_refuses_a_used_directory_without_checkpoint(tmp_path, world):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="out_dir"):
        train_toy_llava(tmp_path, world=world, **RUN)


def test_refuses_to_resume_with_other_settings(tmp_path, world):
    train_toy_llava(tmp_path, world=world, stop_after=1, **RUN)
    with pytest.raises(ConfigError, match="batch_size: 3 -> 2"):
        train_toy_llava(tmp_path, world=world, **(RUN | {"batch_size": 2}))
