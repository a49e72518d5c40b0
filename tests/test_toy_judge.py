"""The toy world's attribute judge, the generation benchmark's prompt file, and attribute accuracy in
`mmrag eval generation --judge`: the shipped judge measured on renders training never drew, the
prompts checked against the world's ground truth, the summary against a hand-computed expectation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmrag.pipelines.cli import main
from mmrag.pipelines.evaluation import (TEXT_ONLY, GenerationItem, evaluate_generation, generation_summary,
                                        generation_table, guidance_grid, load_generation_prompts)
from mmrag.pipelines.toyworld import SLOTS, ToyWorld
from mmrag.pipelines.toyworld.bench_generation import BUCKETS, DISTRACTOR_VIEWS, HELD_OUT_VIEWS, make_generation_bench
from mmrag.pipelines.toyworld.judge import JUDGE_DIR, AttributeJudge, eval_renders, load_judge
from mmrag.retrievers import ConfigError

# Views no file of the judge's training or its shipped measurement (views 100-109) ever rendered.
TEST_VIEWS = (300, 301, 302)
# Bars under the measurement (toyworld.json, 1,800 renders): every slot >= 0.99 blurred 0.5 px; at 1 px shape 0.957,
# colour 0.982, pattern 0.976 (a 1-px blur erases most of the one-pixel steps between a turned square and a diamond).
BLUR_BAR = {0.5: 0.97, 1.0: 0.93}


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld()


@pytest.fixture(scope="module")
def judge() -> AttributeJudge:
    import torch

    torch.set_num_threads(1)
    return load_judge()  # the shipped weights, through the real loading path


@pytest.fixture(scope="module")
def renders(world):
    return eval_renders(world, views=TEST_VIEWS)  # validation + held-out entities: 180 x 3 images


def test_shipped_judge_reads_held_out_entities(judge, renders):
    accuracy = judge.accuracy(*renders)
    assert accuracy["n"] == 540
    assert all(accuracy[slot] >= 0.98 for slot in SLOTS), accuracy  # the bar
    # the shipped files are safetensors + JSON only, and what toyworld.json claims was measured on held-out renders
    assert sorted(p.name for p in JUDGE_DIR.iterdir()) == ["config.json", "model.safetensors", "toyworld.json",
                                                          "train_log.jsonl"]
    assert all(judge.measured["clean"][slot] >= 0.98 for slot in SLOTS)


@pytest.mark.parametrize("radius", sorted(BLUR_BAR))
def test_shipped_judge_tolerates_blur(judge, world, radius):
    images, attributes = eval_renders(world, views=TEST_VIEWS, blur=radius)
    accuracy = judge.accuracy(images, attributes)
    assert all(accuracy[slot] >= BLUR_BAR[radius] for slot in SLOTS), accuracy


def test_judge_round_trips_and_refuses_bad_input(judge, renders, tmp_path):
    images = renders[0][:20]
    again = AttributeJudge.from_pretrained(judge.save_pretrained(tmp_path / "judge"))
    assert again.predict(images) == judge.predict(images)
    big = [im.resize((64, 64), Image.NEAREST) for im in images]  # other sizes are resized to 32 px
    assert sum(p == q for p, q in zip(judge.predict(big), judge.predict(images))) >= 18
    with pytest.raises(ConfigError, match=r"No attribute judge at .*nowhere.*config\.json.*python -m"):
        load_judge(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"`images\[1\]` must be a PIL image"):
        judge.predict([images[0], "x.png"])
    with pytest.raises(ConfigError, match="judge knows circle, square"):
        judge.accuracy(images[:1], [{"shape": "hexagon"}])
    with pytest.raises(ConfigError, match="names the slot 'size'"):
        judge.accuracy(images[:1], [{"size": "big"}])


def test_prompt_file_matches_the_world(world, tmp_path):
    paths = make_generation_bench(tmp_path / "bench", per_bucket=4)
    items = load_generation_prompts(paths["prompts"])
    entities = {e.name: e for split in ("train", "validation", "heldout") for e in world.entities(split)}
    records = [json.loads(line) for line in paths["manifest"].read_text().splitlines()]
    views_in_kb = {}
    for r in records:
        views_in_kb.setdefault(r["metadata"]["entity"], []).append(r["metadata"]["view"])
        assert r["metadata"]["entity"] in entities and r["id"] == f"{r['metadata']['entity'].lower()}-{r['metadata']['view']}"
    assert [i.bucket for i in items] == ["rare"] * 4 + ["frequent"] * 4 + ["seen"] * 4
    for item in items:
        entity = entities[item.entity]
        split, views = BUCKETS[item.bucket]
        assert entity.split == split and item.prompt == f"the {entity.name}" and item.attributes == entity.attributes()
        assert sorted(views_in_kb[entity.name]) == list(range(views))  # the bucket is how often it is in the KB
        # the held-out images are this entity's renders, of views the KB does not hold
        assert [Image.open(p).tobytes() for p in item.images] == [world.render(entity, v).tobytes() for v in HELD_OUT_VIEWS]
        assert not set(HELD_OUT_VIEWS) & set(views_in_kb[entity.name])
    # every other validation / held-out entity is a distractor with DISTRACTOR_VIEWS views; no other train entity
    prompted = {i.entity for i in items}
    gallery = {e.name for s in ("validation", "heldout") for e in world.entities(s)}
    assert set(views_in_kb) == gallery | prompted
    assert all(len(views_in_kb[n]) == DISTRACTOR_VIEWS for n in gallery - prompted)
    # seeded: the same files again; another seed, other entities
    again = make_generation_bench(tmp_path / "again", per_bucket=4)
    assert again["prompts"].read_text() == paths["prompts"].read_text()  # image paths are relative
    other = load_generation_prompts(make_generation_bench(tmp_path / "other", per_bucket=4, seed=1)["prompts"])
    assert [i.entity for i in other] != [i.entity for i in items]
    with pytest.raises(ConfigError, match="`buckets` must be distinct names among 'rare', 'frequent', 'seen'"):
        make_generation_bench(tmp_path / "bad", buckets=("rare", "often"))


class _FakeEncoder:
    """Not the point here: every vector is one, so CLIP-T and CLIP-I are 1 and the judge's numbers stand alone."""

    def embed_images(self, images):
        return np.ones((len(images), 1))

    embed_texts = embed_images


def test_summary_attribute_accuracy_is_the_hand_computed_share(judge, world, tmp_path):
    # one held-out group: a base entity, one with another main colour, one with another background
    base, recoloured, other_bg = world.entities("heldout")[:3]
    differ = lambda a, b: [s for s in SLOTS if getattr(a, s) != getattr(b, s)]  # noqa: E731
    assert differ(base, recoloured) == ["colour"] and differ(base, other_bg) == ["background"]
    items = []
    for n, (e, bucket) in enumerate([(base, "rare"), (recoloured, "rare"), (other_bg, "frequent")], start=1):
        world.render(e, 50).save(tmp_path / f"{e.name}.png")
        items.append(GenerationItem(f"the {e.name}", e.name, [tmp_path / f"{e.name}.png"], bucket, n, e.attributes()))
    drawn_as = {  # guidance -> per item, the entities whose renders stand in for its drawings
        "right": [[base, base], [recoloured], [other_bg, other_bg]],
        "wrong": [[base, recoloured], [other_bg], [recoloured, base]],
    }
    drawings = [(item, name, [world.render(e, 400 + j) for j, e in enumerate(entities)])
                for name, per_item in drawn_as.items() for item, entities in zip(items, per_item)]
    # the judge reads each of these renders right, so the expectation is the ground truth's agreement
    for (_, name, images), entities in zip(drawings, [es for per_item in drawn_as.values() for es in per_item]):
        assert judge.predict(images) == [e.attributes() for e in entities]
    summary = generation_summary(items, drawings, _FakeEncoder(), judge=judge)

    def expected(name, bucket_items):  # mean over drawings of the share of its images with the item's value
        shares = [[sum(e.attributes()[s] == item.attributes[s] for e in drawn_as[name][item.line - 1])
                   / len(drawn_as[name][item.line - 1]) for s in SLOTS] for item in bucket_items]
        return {s: sum(row[k] for row in shares) / len(shares) for k, s in enumerate(SLOTS)}

    right, wrong = summary["per_guidance"]["right"], summary["per_guidance"]["wrong"]
    assert right["attribute_accuracy"] == {s: 1.0 for s in SLOTS}
    assert wrong["attribute_accuracy"] == pytest.approx(expected("wrong", items))
    assert wrong["per_bucket"]["rare"]["attribute_accuracy"] == pytest.approx(expected("wrong", items[:2]))
    assert wrong["per_bucket"]["frequent"]["attribute_accuracy"] == pytest.approx(expected("wrong", items[2:]))
    # by hand: base drawn as (base, recoloured): colour 1/2; recoloured drawn as other_bg: colour 0 (other_bg has
    # base's colour), background 0; shape and pattern are the group's own everywhere
    assert wrong["per_bucket"]["rare"]["attribute_accuracy"]["colour"] == pytest.approx((0.5 + 0.0) / 2)
    assert wrong["attribute_accuracy"]["shape"] == wrong["attribute_accuracy"]["pattern"] == 1.0
    assert summary["judge"]["path"] == str(JUDGE_DIR)
    table = generation_table(summary)
    assert "attribute accuracy (judge" in table and "| wrong | rare | 2 | 1.000 | 0.250 |" in table
    with pytest.raises(ConfigError, match="line 7: no `attributes`"):
        generation_summary([GenerationItem("the X", "X", items[0].images, "rare", 7)], [], _FakeEncoder(), judge=judge)


def test_guidance_grid_keeps_the_configured_scales():
    configured = {"name": "interleaved", "text_scale": 5.0, "reference_scale": 2.0, "eta": 0.5}
    grid = guidance_grid(configured, [TEXT_ONLY, "cfg", "interleaved"], [0.25, 0.75])
    assert grid == [TEXT_ONLY, "cfg", {"name": "interleaved", "text_scale": 5.0, "reference_scale": 2.0, "eta": 0.25},
                    {"name": "interleaved", "text_scale": 5.0, "reference_scale": 2.0, "eta": 0.75}]
    assert guidance_grid(configured) == ["cfg", "joint", "interleaved"]
    with pytest.raises(ConfigError, match="add interleaved"):
        guidance_grid(configured, ["cfg"], [0.5])
    with pytest.raises(Exception, match="`eta`.*must be in \\[0, 1\\]"):
        guidance_grid(configured, ["interleaved"], [1.5])


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, tiny_models_dir, tiny_sd, tiny_clip):
    """The random tiny preset (configs/tiny.yaml) on 2 prompts of the generation bench, ingested."""
    from mmrag.configs import __file__ as configs_init

    root = tmp_path_factory.mktemp("tiny-generation")
    paths = make_generation_bench(root / "bench", per_bucket=1, buckets=("rare", "frequent"))
    config = yaml.safe_load((Path(configs_init).parent / "tiny.yaml").read_text())
    config["tiny_models"]["cache_dir"] = str(tiny_models_dir)  # the session's tiny models, not a rebuild
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    kb = root / "kb"
    assert main(["ingest", str(paths["manifest"]), "--kb", str(kb), "--config", str(config_file), "--no-progress"]) == 0
    return paths, kb, config_file


def test_cli_eval_generation_with_judge_on_the_tiny_preset(tiny_bench, capsys):
    paths, kb, config_file = tiny_bench
    capsys.readouterr()
    argv = ["eval", "generation", "--kb", str(kb), "--prompts", str(paths["prompts"]), "--config", str(config_file),
            "--steps", "2", "--no-progress"]
    assert main(argv + ["--judge", "--guidances", "text_only", "cfg", "interleaved", "--eta", "0.25", "0.75",
                        "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["per_guidance"]) == ["text_only", "cfg", "interleaved(eta=0.25)", "interleaved(eta=0.75)"]
    for g in out["per_guidance"].values():
        assert set(g["per_bucket"]) == {"rare", "frequent"} and list(g["attribute_accuracy"]) == list(SLOTS)
        assert all(0.0 <= v <= 1.0 for v in g["attribute_accuracy"].values())
    assert out["judge"]["path"] == str(JUDGE_DIR) and out["judge"]["measured"]["clean"]["shape"] >= 0.98
    # the table, and one-line errors for bad input
    assert main(argv + ["--judge", str(JUDGE_DIR), "--guidances", "cfg"]) == 0
    assert "| cfg | frequent | 1 |" in capsys.readouterr().out
    for extra, message in ((["--judge", "/no/such/judge"], "No attribute judge at '/no/such/judge'"),
                           (["--guidances", "cfg", "--eta", "0.5"], "add interleaved"),
                           (["--eta", "2"], "`eta`")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    bare = paths["prompts"].with_name("bare.jsonl")
    bare.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "attributes"}) + "\n"
                            for line in paths["prompts"].read_text().splitlines()))
    assert main(argv[:5] + [str(bare)] + argv[6:] + ["--judge"]) == 2
    assert "line 1: no `attributes`" in capsys.readouterr().err


def test_text_only_draws_without_references_and_the_batch_path_scores_the_same(tiny_bench, judge):
    from mmrag.pipelines.config import load_config
    from mmrag.pipelines.draw import EntityImagePipeline
    from mmrag.pipelines.scale.batch_eval import evaluate_generation_batch

    paths, kb, config_file = tiny_bench
    cfg = load_config(str(config_file), {"kb.path": str(kb), "draw.num_inference_steps": 2})
    items = load_generation_prompts(paths["prompts"])
    pipe = EntityImagePipeline.from_config(cfg)
    guidances = [TEXT_ONLY, "cfg"]
    summary = evaluate_generation(pipe, items, pipe.retriever.kb.embedder, guidances=guidances, judge=judge)
    alone = pipe(items[0].prompt, references=[], guidance="cfg", seed=0).images
    with_refs = pipe(items[0].prompt, guidance="cfg", seed=0).images
    assert np.asarray(alone[0]).tobytes() != np.asarray(with_refs[0]).tobytes()  # the references change the drawing
    expected = generation_summary(items[:1], [(items[0], TEXT_ONLY, alone), (items[0], "cfg", with_refs)],
                                  pipe.retriever.kb.embedder, judge=judge)
    assert summary["per_guidance"][TEXT_ONLY]["per_bucket"]["rare"] == expected["per_guidance"][TEXT_ONLY]["per_bucket"]["rare"]
    assert summary["per_guidance"]["cfg"]["per_bucket"]["rare"] == expected["per_guidance"]["cfg"]["per_bucket"]["rare"]
    # the batch path (in process here; --ray runs the same jobs on actors) draws and scores the same
    batch = evaluate_generation_batch(cfg, items, paths["prompts"].parent / "runs", guidances=guidances, judge=judge,
                                      use_ray=False)
    assert batch == summary
