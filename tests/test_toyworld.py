"""The toy world (splits, determinism, captions, composed triples) and the trained toy:clip.

The quality bars are measured, not hoped for: the shipped toy:clip (seed 0, 900 steps on 2 threads)
reaches held-out text->image R@5 1.0 here, so the 0.95 bar leaves room for numeric drift between
machines without letting a broken model through (untrained weights score 0.09).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from mmrag.pipelines.toyworld import (
    COLOURS,
    PATTERNS,
    SHAPES,
    SLOTS,
    SPLITS,
    ToyWorld,
    describe,
    full_caption,
    random_caption,
)
from mmrag.pipelines.toyworld.models import (
    TOY_MODEL_NAMES,
    ensure_toy_model,
    shipped_model_dir,
)
from mmrag.pipelines.toyworld.train_clip import (
    LOG_NAME,
    evaluate_toy_clip,
    multi_positive_loss,
    toy_clip_tokenizer,
    train_toy_clip,
)
from mmrag.retrievers import DualEncoder, KnowledgeBase, MultimodalRetriever, Query
from mmrag.retrievers.errors import ConfigError

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective if torch has not started yet


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(seed=0)


@pytest.fixture(scope="module")
def toy_clip(tmp_path_factory):
    return ensure_toy_model("clip", tmp_path_factory.mktemp("toy-cache"))


# ------------------------------------------------------------------------------------------ splits
def test_splits_have_the_sizes_asked_for(world):
    assert [len(world.entities(s)) for s in SPLITS] == [1000, 60, 120]


def test_names_are_unique_across_all_splits(world):
    names = [e.name for s in SPLITS for e in world.entities(s)]
    assert len(names) == len(set(names))


def test_held_out_combinations_never_occur_in_training(world):
    train = {e.combo for e in world.entities("train")}
    validation = {e.combo for e in world.entities("validation")}
    heldout = {e.combo for e in world.entities("heldout")}
    assert not train & heldout and not train & validation and not validation & heldout
    assert len(heldout) == 120 and len(train) == 1000  # and no two entities share one


def test_every_attribute_value_is_seen_in_training(world):
    train = world.entities("train")
    assert {e.shape for e in train} == set(SHAPES) and {e.pattern for e in train} == set(PATTERNS)
    assert {e.colour for e in train} == set(COLOURS) == {e.background for e in train}
    for e in (e for s in SPLITS for e in world.entities(s)):
        assert e.colour != e.background


def test_held_out_groups_are_a_base_and_two_one_colour_variants(world):
    heldout = world.entities("heldout")
    for i in range(0, len(heldout), 3):
        base, recoloured, rebacked = heldout[i : i + 3]
        assert [s for s in SLOTS if getattr(base, s) != getattr(recoloured, s)] == ["colour"]
        assert [s for s in SLOTS if getattr(base, s) != getattr(rebacked, s)] == ["background"]


def test_bad_arguments_are_refused_with_the_argument_named(world):
    with pytest.raises(ConfigError, match="`split`"):
        world.entities("test")
    with pytest.raises(ConfigError, match="`n_train`"):
        ToyWorld(n_train=0)
    with pytest.raises(ConfigError, match="at most"):
        ToyWorld(n_train=2990, n_heldout_groups=40)
    with pytest.raises(ConfigError, match="`views`"):
        world.write_split("unused", "heldout", views=0)


# ------------------------------------------------------------------------------------- determinism
def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_world_and_bytes(tmp_path):
    a, b = ToyWorld(seed=3), ToyWorld(seed=3)
    assert all(a.entities(s) == b.entities(s) for s in SPLITS)
    a.write_split(tmp_path / "a", "heldout", views=2)
    b.write_split(tmp_path / "b", "heldout", views=2)
    digests = _digest(tmp_path / "a")
    assert len(digests) == 120 * 2 * 2 and digests == _digest(tmp_path / "b")


def test_other_seed_other_world_and_views_differ(world):
    assert ToyWorld(seed=1).entities("heldout") != world.entities("heldout")
    e = world.entities("train")[0]
    assert world.render(e, 0).tobytes() != world.render(e, 1).tobytes()
    assert world.render(e, 0).size == (32, 32)


# ----------------------------------------------------------------------------------------- captions
def test_full_caption_with_name_is_sample_data_wording(world):
    for e in world.entities("heldout")[:10]:
        expected = f"The {e.name}: a {e.pattern} {e.colour} {e.shape} on a {e.background} background."
        assert full_caption(e).text == expected
        assert full_caption(e, with_name=False).name is None and e.name not in full_caption(e, with_name=False).text


def test_random_captions_name_exactly_what_they_claim(world):
    rng = random.Random(0)
    train = world.entities("train")
    seen = set()
    for _ in range(2000):
        e = rng.choice(train)
        c = random_caption(e, rng)
        words = set(re.findall(r"[a-z]+", c.text.lower()))
        assert c.matches(e)
        for slot, value in c.attributes:
            assert value == getattr(e, slot)
            noun = {"striped": "stripes", "dotted": "dots", "checked": "checks", "plain": "pattern"}[value] \
                if slot == "pattern" else value
            assert value in words or noun in words, (c, slot)
        named = dict(c.attributes)
        # words of attributes the caption does not claim must not appear (else "matches" would lie)
        for shape in SHAPES:
            assert (shape in words) == (named.get("shape") == shape)
        assert (c.name is not None) == (e.name.lower() in words)
        seen.add((len(c.attributes), c.name is not None))
    assert {(4, False), (4, True), (0, True), (1, False), (2, True)} <= seen


def test_a_partial_caption_matches_every_entity_with_its_attributes(world):
    train = world.entities("train")
    caption = describe({"shape": "circle", "colour": "red"})
    matching = [e for e in train if caption.matches(e)]
    assert matching == [e for e in train if e.shape == "circle" and e.colour == "red"] and len(matching) > 1
    with pytest.raises(ConfigError, match="`attributes`"):
        describe({"size": "big"})


def test_sidecars_carry_the_caption_and_the_metadata(world, tmp_path):
    folder = world.write_split(tmp_path / "kb-src", "validation")
    for e in world.entities("validation"):
        sidecar = json.loads((folder / f"{e.name.lower()}_0.json").read_text())
        assert sidecar["text"] == full_caption(e).text
        assert sidecar["metadata"] == {"entity": e.name, "shape": e.shape, "colour": e.colour,
                                       "background": e.background, "pattern": e.pattern,
                                       "split": "validation", "view": 0}


def test_composed_triples_change_exactly_the_named_colour(world):
    heldout = world.entities("heldout")
    triples = world.composed_queries("heldout")
    assert len(triples) >= 4 * len(heldout) // 3  # each group gives four
    for t in triples:
        assert t.reference in heldout and t.target in heldout
        assert [s for s in SLOTS if getattr(t.reference, s) != getattr(t.target, s)] == [t.changed]
        new = getattr(t.target, t.changed)
        assert t.modifier == (f"but {new}" if t.changed == "colour" else f"but on a {new} background")


def test_tokenizer_encodes_attribute_words_whole_and_unseen_names(world):
    tokenizer = toy_clip_tokenizer(world, 32)
    for word in (*SHAPES, *COLOURS, *PATTERNS, "background"):
        assert len(tokenizer.tokenize(word)) == 1, word
    name = world.entities("heldout")[0].name
    ids = tokenizer(f"the {name}")["input_ids"]
    assert tokenizer.unk_token_id not in ids[1:-1] and tokenizer.decode(ids, skip_special_tokens=True) == f"the {name}".lower()


# ------------------------------------------------------------------------------------------- loss
def test_multi_positive_loss_matches_a_numpy_reference():
    torch.manual_seed(0)
    t, v = torch.randn(5, 8), torch.randn(5, 8)
    positives = torch.eye(5, dtype=torch.bool)
    positives[0, 3] = positives[2, 4] = positives[1, 0] = True
    scale = torch.tensor(1.5)
    got = multi_positive_loss(t, v, positives, scale).item()

    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    vn = v.numpy() / np.linalg.norm(v.numpy(), axis=1, keepdims=True)
    logits = np.exp(1.5) * tn @ vn.T
    p = positives.numpy()
    t2i = [-np.log(np.exp(logits[i])[p[i]].sum() / np.exp(logits[i]).sum()) for i in range(5)]
    i2t = [-np.log(np.exp(logits[:, j])[p[:, j]].sum() / np.exp(logits[:, j]).sum()) for j in range(5)]
    assert got == pytest.approx((np.mean(t2i) + np.mean(i2t)) / 2, rel=1e-5)
    # with one positive each it is CLIP's own loss
    logits_t = np.exp(1.5) * torch.tensor(tn) @ torch.tensor(vn).T
    clip = (torch.nn.functional.cross_entropy(logits_t, torch.arange(5))
            + torch.nn.functional.cross_entropy(logits_t.T, torch.arange(5))) / 2
    assert multi_positive_loss(t, v, torch.eye(5, dtype=torch.bool), scale).item() == pytest.approx(clip.item(), rel=1e-5)


# -------------------------------------------------------------------------------------- training
def test_training_is_deterministic_given_seed_and_threads(tmp_path):
    small = ToyWorld(n_train=64, n_validation_groups=0, n_heldout_groups=2)
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_toy_clip(tmp_path / label, steps=3, seed=seed, threads=1, batch_size=16, world=small, evaluate=False)
        runs[label] = (tmp_path / label / "model.safetensors").read_bytes()
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    lines = [json.loads(line) for line in (tmp_path / "a" / LOG_NAME).read_text().splitlines()]
    assert lines[0]["step"] == 3 and set(lines[0]) >= {"step", "loss", "seconds"}
    assert lines[-1]["event"] == "final" and lines[-1]["steps"] == 3
    with pytest.raises(ConfigError, match="`out_dir`"):
        train_toy_clip(tmp_path / "a", steps=1, world=small, evaluate=False)
    with pytest.raises(ConfigError, match="`seconds`"):
        train_toy_clip(tmp_path / "d", seconds=0, world=small)


# ------------------------------------------------------------------------------------ shipped model
def test_toy_clip_is_shipped_as_safetensors_only(toy_clip):
    assert toy_clip == shipped_model_dir("clip")
    names = {p.name for p in toy_clip.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert (toy_clip / "model.safetensors").stat().st_size < 8_000_000
    with pytest.raises(ConfigError, match="`name`"):
        ensure_toy_model("bogus", "unused")
    assert TOY_MODEL_NAMES == ("clip", "llava", "sd", "ip-adapter")


def test_without_shipped_weights_toy_clip_is_trained_once_into_the_cache(tmp_path, monkeypatch):
    from mmrag.pipelines.toyworld import models

    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "no-weights")
    monkeypatch.setattr(models, "TOY_CLIP_RECIPE", dict(steps=2, seed=0, threads=1))  # the path, not the quality
    assert models.shipped_model_dir("clip") is None
    built = models.ensure_toy_model("clip", tmp_path / "cache")
    assert built == tmp_path / "cache" / "toy-clip" and (built / ".complete").is_file()
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_toy_model("clip", tmp_path / "cache") == built  # reused, not retrained
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    assert DualEncoder(built, device="cpu").embed_texts(["a red circle"]).shape == (1, 128)


def test_shipped_toy_clip_finds_held_out_entities_from_their_captions(toy_clip, world):
    """Brute force with numpy over DualEncoder's vectors: the right image for each unseen combination."""
    heldout = world.entities("heldout")
    encoder = DualEncoder(toy_clip, device="cpu", dtype="float32")
    images = encoder.embed_images([world.render(e, 0) for e in heldout])
    texts = encoder.embed_texts([f"a {e.pattern} {e.colour} {e.shape} on a {e.background} background" for e in heldout])
    order = np.argsort(-(texts @ images.T), axis=1, kind="stable")  # (n, n) gallery indices, best first
    rank = np.array([int(np.nonzero(order[i] == i)[0][0]) for i in range(len(heldout))])
    r5 = float(np.mean(rank < 5))
    assert r5 >= 0.95
    off_diagonal = (images @ images.T)[~np.eye(len(heldout), dtype=bool)]
    assert off_diagonal.mean() < 0.5  # measured 0.997 for untrained weights: every image alike

    metrics = evaluate_toy_clip(toy_clip, "heldout", world=world)
    assert metrics["t2i_r5"] == pytest.approx(r5, abs=1e-4)
    assert metrics["t2i_r1"] == pytest.approx(float(np.mean(rank == 0)), abs=1e-4)
    assert metrics["cross_entity_cosine"] == pytest.approx(float(off_diagonal.mean()), abs=1e-4)
    assert metrics["composed_hit5"] > metrics["image_only_hit5"]


def test_a_held_out_split_ingests_and_is_found_through_the_knowledge_base(toy_clip, world, tmp_path):
    """The library end to end: the written folder ingests, and text->image search finds unseen entities."""
    folder = world.write_split(tmp_path / "src", "heldout")
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(toy_clip, device="cpu", dtype="float32"))
    kb.ingest(folder)
    retriever = MultimodalRetriever(kb, channels=["text_to_image"], near_duplicate_threshold=None, n_candidates=120)
    heldout = world.entities("heldout")
    found = []
    for e in heldout:
        hits = retriever.retrieve(Query(text=full_caption(e, with_name=False).text), k=5)
        assert all(h.record.metadata["split"] == "heldout" for h in hits)
        found.append(e.name in [h.record.metadata["entity"] for h in hits])
    assert np.mean(found) >= 0.95


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 88 s on an idle 2-core machine; a shared one can be many times slower
def test_retraining_toy_clip_for_a_short_budget_reaches_its_bar(tmp_path):
    """300 steps on 2 threads (88 s here) measured held-out R@5 0.99, R@1 0.82, cross-entity cosine
    0.22, composed hit@5 0.80 against 0.26 for the image alone; the bars leave room for other machines."""
    metrics = train_toy_clip(tmp_path / "clip", steps=300, seed=0, threads=2)
    assert metrics["t2i_r5"] >= 0.9 and metrics["t2i_r1"] >= 0.6
    assert metrics["cross_entity_cosine"] < 0.4
    assert metrics["composed_hit5"] > metrics["image_only_hit5"] + 0.2
