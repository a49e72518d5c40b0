"""The toy VQA benchmark: the dataset ``mmrag eval vqa`` scores in MRAG-Bench's three settings (no
retrieval, gold references, retrieved references), written by ``mmrag toy-bench make DIR``.

``write_toy_vqa`` writes ``DIR/vqa.jsonl`` (the format :func:`mmrag.pipelines.evaluation.load_vqa_dataset`
reads), two questions per gallery entity (validation and held-out splits, the toy bench's gallery):

- ``name``: :data:`~.world.NAME_QUESTION`, worded exactly as toy:llava was trained. The name is
  invented and the query image cannot show it, so only a reference can supply it: without one the
  answer is a guess, with the matching one it can be copied. ``gold_ids``: the entity's gallery record
  of view 0.
- ``attribute``: one of :data:`~.world.ATTRIBUTE_QUESTIONS` ("What colour is the background?"),
  which the query image alone answers; the slots are dealt out evenly over the entities in a seeded
  order (``slot`` on each line says which). ``gold_ids`` as for the name question.

Each line's ``answers`` is its one gold answer (scored as exact match after the VQA normalisation);
``entity`` names the entity. Every query image is view number ``views`` of its entity, a render the gallery
(views ``0..views-1``) does not hold, so retrieval cannot win by finding the very same picture; it is
saved as ``DIR/query-images/<name>-<views>.png``, the same file the composed retrieval queries use.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from mmrag.retrievers.errors import ConfigError

from .world import ATTRIBUTE_QUESTIONS, NAME_QUESTION, SLOTS, Entity, ToyWorld

def write_toy_vqa(folder: str | os.PathLike, entities: list[Entity], *, world: ToyWorld, seed: int,
                  views: int) -> Path:
    """Write ``folder/vqa.jsonl`` over ``entities`` (the gallery, in its order); returns its path.

    ``seed`` deals out the attribute slots; ``views`` is the gallery's view count, so view ``views``
    is the unseen query view.
    """
    from .bench import record_id  # bench imports this module

    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ConfigError(f"`views` must be a positive integer, got {views!r}.")
    folder = Path(folder)
    query_dir = folder / "query-images"
    query_dir.mkdir(parents=True, exist_ok=True)
    # each slot equally often (the first len % 4 slots once more), in a seeded order
    slots = [SLOTS[i % len(SLOTS)] for i in range(len(entities))]
    random.Random(f"toy-vqa:{seed}").shuffle(slots)
    lines = []
    for entity, slot in zip(entities, slots):
        image = query_dir / f"{record_id(entity.name, views)}.png"
        world.render(entity, views).save(image, optimize=False)
        common = {"image": str(image.relative_to(folder)), "gold_ids": [record_id(entity.name, 0)],
                  "entity": entity.name}
        lines.append({"question": NAME_QUESTION, "answers": [entity.name], "category": "name",
                      **common})
        lines.append({"question": ATTRIBUTE_QUESTIONS[slot], "answers": [getattr(entity, slot)],
                      "category": "attribute", "slot": slot, **common})
    path = folder / "vqa.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path
