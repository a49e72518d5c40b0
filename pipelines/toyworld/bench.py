"""Toy benchmarks: the files ``mmrag eval retrieval`` measures in the toy world, where the answer to
every query is known.

``make_toy_bench(DIR)`` (``mmrag toy-bench make DIR``) writes

- ``DIR/kb/records.jsonl`` (+ PNGs): the gallery, every view of the validation and held-out
  entities, ids ``<name>-<view>``, each text its full caption with the name (as a KB would hold a
  catalogue entry), metadata the attributes;
- ``DIR/queries.jsonl``: four kinds of query, the ``category`` of each line:

  - ``attribute``: a caption naming two or three attributes, no name ("a striped star"); relevant:
    every view of every gallery entity that matches it (``claims`` holds the attributes named);
  - ``full``: all four attributes, no name; relevant: that entity's views;
  - ``name``: the entity's name alone ("the Zorbla"); names of held-out entities were never seen in
    training, so only the lexical channel (BM25 over the texts) can know them;
  - ``composed``: one view of an entity plus "but blue" / "but on a blue background"; relevant:
    the views of the entity that differs in just that colour (``reference_text`` is the reference's
    caption without its name, for PDV);

- ``DIR/vqa.jsonl`` (+ ``DIR/query-images/``): the VQA dataset for ``mmrag eval vqa`` (see
  :mod:`.bench_vqa`): per gallery entity a name question, which only a matching reference can answer,
  and an attribute question, which the image alone answers;
- ``DIR/generation/``: the generation benchmark for ``mmrag eval generation`` (see
  :mod:`.bench_generation`: its own KB, name-only prompts in frequency buckets, the entities'
  attributes for the judge), always in the world the toy models were trained in;
- ``DIR/README.txt``: the commands that ingest the gallery and run the evaluations.

The gallery and the queries are held-out entities only (validation and held-out splits): names and
attribute combinations no toy model saw in training. Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

from mmrag.retrievers.errors import ConfigError

from .bench_vqa import write_toy_vqa
from .world import SLOTS, ToyWorld, describe, full_caption

CATEGORIES = ("attribute", "full", "name", "composed")
EVAL_SPLITS = ("validation", "heldout")


def record_id(name: str, view: int) -> str:
    return f"{name.lower()}-{view}"


def make_toy_bench(folder: str | os.PathLike, *, seed: int = 0, views: int = 2, attribute_queries: int = 200,
                   world: ToyWorld | None = None) -> dict[str, Path]:
    """Write the toy retrieval and VQA benchmarks into ``folder`` (see the module doc); returns their paths.

    ``seed`` seeds the world (when ``world`` is not given) and the choice of queries; ``views``
    renders each gallery entity that many times; ``attribute_queries`` bounds the attribute queries.
    """
    for argument, value in (("views", views), ("attribute_queries", attribute_queries)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"`{argument}` must be a positive integer, got {value!r}.")
    world = ToyWorld(seed) if world is None else world
    folder = Path(folder)
    kb_dir, query_dir = folder / "kb", folder / "query-images"
    kb_dir.mkdir(parents=True, exist_ok=True)
    query_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"toy-bench:{seed}")
    gallery = [e for split in EVAL_SPLITS for e in world.entities(split)]

    with open(kb_dir / "records.jsonl", "w", encoding="utf-8") as f:
        for entity in gallery:
            text = full_caption(entity, with_name=True).text
            for view in range(views):
                rid = record_id(entity.name, view)
                world.render(entity, view).save(kb_dir / f"{rid}.png", optimize=False)
                f.write(json.dumps({"id": rid, "image": f"{rid}.png", "text": text,
                                    "metadata": {**entity.metadata(), "view": view}}) + "\n")

    views_of = lambda entity: [record_id(entity.name, v) for v in range(views)]  # noqa: E731
    queries: list[dict] = []
    # attribute: 2 or 3 of the 4 slots, every subset over the gallery's entities, sampled
    seen: set[str] = set()
    candidates = []
    for entity in gallery:
        for size in (2, 3):
            for slots in itertools.combinations(SLOTS, size):
                caption = describe({s: getattr(entity, s) for s in slots})
                if caption.text not in seen:
                    seen.add(caption.text)
                    candidates.append(caption)
    rng.shuffle(candidates)
    for caption in candidates[:attribute_queries]:
        relevant = [rid for e in gallery if caption.matches(e) for rid in views_of(e)]
        queries.append({"text": caption.text, "relevant": relevant, "category": "attribute",
                        "claims": dict(caption.attributes)})
    for entity in gallery:
        queries.append({"text": full_caption(entity, with_name=False).text, "relevant": views_of(entity),
                        "category": "full"})
        queries.append({"text": describe({}, entity.name).text, "relevant": views_of(entity), "category": "name"})
    # composed: a query view the gallery does not hold (view number `views`), so image-only cannot
    # win by finding the very same picture
    for triple in (t for split in EVAL_SPLITS for t in world.composed_queries(split)):
        image = query_dir / f"{record_id(triple.reference.name, views)}.png"
        if not image.exists():
            world.render(triple.reference, views).save(image, optimize=False)
        queries.append({"text": triple.modifier, "image": str(image.relative_to(folder)),
                        "reference_text": full_caption(triple.reference, with_name=False).text,
                        "relevant": views_of(triple.target), "category": "composed"})
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")
    vqa = write_toy_vqa(folder, gallery, world=world, seed=seed, views=views)
    (folder / "README.txt").write_text(
        "Toy benchmarks (mmrag toy-bench make). Run:\n\n"
        f"  mmrag ingest {kb_dir / 'records.jsonl'} --kb {folder / 'toy-kb'} --config toy\n"
        f"  mmrag eval retrieval --kb {folder / 'toy-kb'} --config toy --queries {folder / 'queries.jsonl'}\n"
        f"  mmrag eval vqa --kb {folder / 'toy-kb'} --config toy --dataset {vqa}\n\n"
        "Add --composed pdv, --hubness qbnorm or --rerank dual_encoder to compare retrieval methods;\n"
        "-k N to give the VLM N retrieved references (vqa.k), and vqa.two_stage: true in a config for\n"
        "RoRA-VLM's two-stage retrieval.\n\n"
        "The generation benchmark has its own knowledge base (frequency buckets); see generation/README.txt.\n",
        encoding="utf-8")
    from .bench_generation import make_generation_bench  # it imports this module's record_id

    # Always in the world the toy models were trained in: its held-out entities are the unseen ones.
    generation = make_generation_bench(folder / "generation", seed=seed)
    return {"manifest": kb_dir / "records.jsonl", "queries": folder / "queries.jsonl", "vqa": vqa,
            "generation_manifest": generation["manifest"], "generation_prompts": generation["prompts"],
            "readme": folder / "README.txt"}
