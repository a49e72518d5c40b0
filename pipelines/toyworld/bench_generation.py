"""The toy generation benchmark: the files ``mmrag eval generation`` measures in the toy world.

``make_generation_bench(DIR)`` (``python -m mmrag.pipelines.toyworld.bench_generation DIR``) writes

- ``DIR/kb/records.jsonl`` (+ PNGs): the knowledge base, in ``make_toy_bench``'s format (ids
  ``<name>-<view>``, each text the entity's full caption with its name, metadata its attributes);
- ``DIR/prompts.jsonl``: one line per prompted entity, in the format
  :func:`~mmrag.pipelines.evaluation.load_generation_prompts` reads: ``prompt`` is the name alone,
  ``"the Zorbla"`` (:func:`describe` with no attributes), so only a reference can tell the model
  what the entity looks like; ``images`` are views of it the KB does not hold (for CLIP-I);
  ``attributes`` its four (for the attribute judge); ``bucket`` how it appears in the KB;
- ``DIR/README.txt``: the commands that ingest the KB and run the evaluation.

The buckets (:data:`BUCKETS`) are frequency buckets, "how often an entity appears in the KB"
(issue #14, after EntityDrawBench's frequent / rare split):

- ``rare``: a held-out entity (a name and attribute combination no toy model saw) with one view in
  the KB, so with ``k`` > 1 the other references are other entities;
- ``frequent``: a held-out entity with three views in the KB;
- ``seen``: a training entity with one view, whose name toy:sd saw in training: how much of the
  drawing comes from the name rather than from the reference.

Every other validation and held-out entity is in the KB too (two views), as distractors: the groups
of three that differ in one colour make retrieving the wrong reference a real risk. Seeded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from mmrag.retrievers.errors import ConfigError

from .bench import record_id
from .world import ToyWorld, describe, full_caption

# bucket -> (split the entities come from, views of each in the KB)
BUCKETS: dict[str, tuple[str, int]] = {"rare": ("heldout", 1), "frequent": ("heldout", 3), "seen": ("train", 1)}
DISTRACTOR_VIEWS = 2
HELD_OUT_VIEWS = range(50, 52)  # the prompt's `images`: views the KB does not hold


def make_generation_bench(folder: str | os.PathLike, *, seed: int = 0, per_bucket: int = 20,
                          buckets: tuple[str, ...] = tuple(BUCKETS), world: ToyWorld | None = None) -> dict[str, Path]:
    """Write the toy generation benchmark into ``folder`` (see the module doc); returns its paths.

    ``seed`` picks which entities fall in which bucket; ``per_bucket`` entities are prompted per
    bucket; ``buckets`` picks among :data:`BUCKETS`. ``world`` defaults to ``ToyWorld()``, the world
    the toy models were trained in: another world seed would make "held-out" entities of names and
    combinations those models saw.
    """
    if not isinstance(per_bucket, int) or isinstance(per_bucket, bool) or per_bucket < 1:
        raise ConfigError(f"`per_bucket` must be a positive integer, got {per_bucket!r}.")
    unknown = [b for b in buckets if b not in BUCKETS]
    if unknown or not buckets or len(set(buckets)) != len(buckets):
        raise ConfigError(f"`buckets` must be distinct names among {', '.join(map(repr, BUCKETS))}, got {buckets!r}.")
    world = ToyWorld() if world is None else world
    rng = random.Random(f"toy-generation-bench:{seed}")
    pools = {split: world.entities(split) for split in {BUCKETS[b][0] for b in buckets}}
    for pool in pools.values():
        rng.shuffle(pool)
    prompted = {}  # bucket -> entities
    for bucket in buckets:
        pool = pools[BUCKETS[bucket][0]]
        if len(pool) < per_bucket:
            raise ConfigError(f"`per_bucket` {per_bucket} is more than the {BUCKETS[bucket][0]} entities left for "
                              f"bucket {bucket!r} ({len(pool)}); ask for fewer.")
        prompted[bucket], pools[BUCKETS[bucket][0]] = pool[:per_bucket], pool[per_bucket:]
    kb_views = {e.name: BUCKETS[b][1] for b, entities in prompted.items() for e in entities}
    distractors = [e for split in ("validation", "heldout") for e in world.entities(split) if e.name not in kb_views]

    folder = Path(folder)
    kb_dir, held_dir = folder / "kb", folder / "held-out-images"
    kb_dir.mkdir(parents=True, exist_ok=True)
    held_dir.mkdir(parents=True, exist_ok=True)
    with open(kb_dir / "records.jsonl", "w", encoding="utf-8") as f:
        for entity in [e for entities in prompted.values() for e in entities] + distractors:
            text = full_caption(entity, with_name=True).text
            for view in range(kb_views.get(entity.name, DISTRACTOR_VIEWS)):
                rid = record_id(entity.name, view)
                world.render(entity, view).save(kb_dir / f"{rid}.png", optimize=False)
                f.write(json.dumps({"id": rid, "image": f"{rid}.png", "text": text,
                                    "metadata": {**entity.metadata(), "view": view}}) + "\n")
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as f:
        for bucket, entities in prompted.items():
            for entity in entities:
                images = []
                for view in HELD_OUT_VIEWS:
                    path = held_dir / f"{record_id(entity.name, view)}.png"
                    world.render(entity, view).save(path, optimize=False)
                    images.append(str(path.relative_to(folder)))
                f.write(json.dumps({"prompt": describe({}, entity.name).text, "entity": entity.name, "images": images,
                                    "bucket": bucket, "attributes": entity.attributes()}) + "\n")
    kb = folder / "toy-kb"
    (folder / "README.txt").write_text(
        "Toy generation benchmark (mmrag.pipelines.toyworld.bench_generation). Run:\n\n"
        f"  mmrag ingest {kb_dir / 'records.jsonl'} --kb {kb} --config toy\n"
        f"  mmrag eval generation --kb {kb} --config toy --prompts {folder / 'prompts.jsonl'} --judge \\\n"
        "      --guidances text_only cfg joint interleaved --eta 0.25 0.5 0.75\n\n"
        "text_only draws from the name alone (no references); the others use the same retrieved references.\n",
        encoding="utf-8")
    return {"manifest": kb_dir / "records.jsonl", "prompts": folder / "prompts.jsonl", "readme": folder / "README.txt"}


if __name__ == "__main__":  # python -m mmrag.pipelines.toyworld.bench_generation DIR [--seed N] [--per-bucket N]
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmrag.pipelines.toyworld.bench_generation",
                                     description="write the toy generation benchmark")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-bucket", type=int, default=20)
    args = parser.parse_args()
    print(make_generation_bench(args.directory, seed=args.seed, per_bucket=args.per_bucket)["readme"].read_text(), end="")
