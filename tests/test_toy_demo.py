"""`mmrag demo` on the toy preset (its default): the shipped toy models on unseen entities, each result
checked here against the toy world's ground truth, not against the demo's own summary."""

from __future__ import annotations

import re

import pytest
from mmrag.pipelines.config import load_config
from mmrag.pipelines.dev.demo import run_demo
from mmrag.pipelines.toyworld import ToyWorld
from mmrag.pipelines.toyworld.demo import TOY_NOTE, _pick_composed
from mmrag.pipelines.toyworld.models import shipped_model_dir

pytestmark = pytest.mark.skipif(any(shipped_model_dir(n) is None for n in ("clip", "llava", "sd", "ip-adapter")),
                                reason="this installation lacks the toy models' weights")


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory, tiny_models_dir):
    out = tmp_path_factory.mktemp("toy-demo")
    lines: list[str] = []
    cfg = load_config("toy", {"tiny_models.cache_dir": str(tiny_models_dir)})
    path = run_demo(cfg, out, log=lines.append)
    return path, lines


def test_the_toy_demo_says_what_it_runs_on(toy_demo):
    path, lines = toy_demo
    page = path.read_text()
    assert "toy:clip" in lines[0] and "toy:llava" in lines[0] and "toy:sd" in lines[0]
    assert "trained in mmrag" in TOY_NOTE and TOY_NOTE.split(":")[0] in page
    assert "tiny, randomly initialised" not in page


def test_the_toy_demo_shows_retrieval_an_answer_and_a_grounded_drawing(toy_demo):
    path, _ = toy_demo
    page = path.read_text()
    world = ToyWorld()
    names = {e.name for split in ("heldout", "validation") for e in world.entities(split)}
    # every search hit card carries its record's text: count the hits that truly match, from the page
    sections = page.split("<section>")
    attribute = next(s for s in sections if "text search" in s)
    query = re.search(r"text search &#x27;a (\w+) (\w+)&#x27;", attribute)
    pattern, shape = query.groups()
    hit_texts = re.findall(r'<div class="hit" data-id="[^"]+"><img[^>]*><div><b>#\d+</b>[^<]*</div><div>([^<]*)</div>', attribute)
    assert len(hit_texts) == 6
    matching = sum(f" {pattern} " in f" {t} " and f" {shape} " in f" {t} " for t in hit_texts)
    # measured 4 of 6 with the preset's fused channels (shape is toy:clip's weakest attribute); the gallery
    # holds 12 striped stars of 180 records, so chance is 0.4 of 6
    assert matching >= 3
    # the answer names the entity whose unseen view was asked about, and cites its record
    answer = re.search(r'<p class="answer">([^<]*)</p>', page).group(1).strip()
    asked = _pick_composed(world).reference  # the entity whose view the demo asks about
    assert answer == asked.name and asked.name in names
    # the comparison shows reference, cfg and the grounded drawing
    comparison = next(s for s in sections if "unseen entity" in s)
    assert comparison.count("<img") == 3 and "cfg: text only" in comparison
