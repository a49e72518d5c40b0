"""``mmrag demo`` on the toy preset: the library's claims, visible on models trained in the toy world.

The knowledge base holds one view of every held-out and validation entity (names and attribute
combinations no toy model saw in training). The report shows, each with its ground truth beside it:

1. an attribute search ("a striped star"): how many hits are striped stars;
2. a composed search (an unseen view of an entity + "but blue"): how many hits have the new colour
   and the reference's shape;
3. "What is the name of this entity?" about an unseen view: the answer, and whether the reference it
   was given is the entity's own record (toy:llava writes no ``[n]`` citation markers);
4. a drawing of an unseen entity from its name alone: the retrieved reference, the text-only (cfg,
   no references) drawing, and the reference-grounded one (the configured guidance), with what the
   attribute judge reads in each when its weights are installed.

Everything runs through the pipelines' ``from_config``, as a user's call would.
"""

from __future__ import annotations

import collections
import html
import sys
import time
from pathlib import Path

from mmrag.retrievers import Query
from mmrag.retrievers.errors import ConfigError

from ..builders import open_knowledge_base
from ..config import Config, load_config
from ..dev.report import image_data_uri, render_answer, render_drawing, render_search, write_report
from ..draw import EntityImagePipeline
from ..search import SearchPipeline
from ..vqa import RAGVQAPipeline
from .train_clip import recorded_world
from .world import NAME_QUESTION, SLOTS, describe

TOY_NOTE = ("Toy preset: every model here (toy:clip, toy:llava, toy:sd with toy:ip-adapter) was trained in mmrag's toy "
            "world of procedural entities, and the knowledge base holds entities whose names and attribute combinations "
            "they never saw. This shows that retrieval, grounded answering and reference-grounded drawing work where the "
            "ground truth is known; it says nothing about real images. Real quality needs real models "
            "(`mmrag demo --config default`) and the same eval commands.")


def uses_toy_models(config: Config) -> bool:
    return config.embedder.model.startswith("toy:")


def run_toy_demo(config: Config, out: Path, *, log=None) -> Path:
    """Ingest the toy gallery into ``out/kb`` and write ``out/index.html``; returns the report's path."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    out = Path(out)
    config = load_config(config, {"kb.path": str(out / "kb")})
    log(f"[1/6] toy models: embedder {config.embedder.model}, VLM {config.vlm.model}, diffusion {config.diffusion.model}")
    world = recorded_world(config.resolve_model(config.embedder.model))
    kb = open_knowledge_base(config)
    log("[2/6] rendering the toy gallery (held-out entities, one view each) and ingesting it")
    gallery = world.entities("heldout") + world.entities("validation")
    folder = out / "toy-gallery"
    for split in ("heldout", "validation"):
        kb.ingest(world.write_split(folder / split, split, views=1), batch_size=config.ingest.batch_size)
    log(f"      {kb.info()['count']} records")
    search = SearchPipeline.from_config(config)
    sections, summary = [], []

    log("[3/6] searching: attributes, and an unseen view + a modifier (composed)")
    pattern, shape = _attribute_query(gallery)
    text = describe({"pattern": pattern, "shape": shape}).text
    hits = search(Query(text=text), k=6)
    good = sum(h.record.metadata.get("pattern") == pattern and h.record.metadata.get("shape") == shape for h in hits)
    held = sum(e.pattern == pattern and e.shape == shape for e in gallery)
    line = f"text search {text!r}: {good} of {len(hits)} hits are {pattern} {shape}s (the gallery holds {held})"
    sections.append(render_search(line, Query(text=text), hits))
    summary.append(line)

    triple = _pick_composed(world)
    image = world.render(triple.reference, 1)  # a view the gallery does not hold
    hits = search(Query(text=triple.modifier, image=image), k=6)
    target = triple.target
    good = sum(h.record.metadata.get(triple.changed) == getattr(target, triple.changed)
               and h.record.metadata.get("shape") == target.shape for h in hits)
    wanted = f"{getattr(target, triple.changed)} {target.shape}s" if triple.changed == "colour" else \
        f"{target.shape}s on {target.background}"
    held = sum(getattr(e, triple.changed) == getattr(target, triple.changed) and e.shape == target.shape for e in gallery)
    line = (f"composed search (a {triple.reference.colour} {triple.reference.shape} on {triple.reference.background}, "
            f"{triple.modifier!r}): {good} of {len(hits)} hits are {wanted} (the gallery holds {held})")
    sections.append(render_search(line, Query(text=triple.modifier, image=image), hits))
    summary.append(line)

    log("[4/6] asking for the name of an unseen entity from a view the knowledge base does not hold")
    entity = triple.reference
    vqa = RAGVQAPipeline.from_config(config)
    answer = vqa(NAME_QUESTION, image=world.render(entity, 1))
    # toy:llava writes no [n] markers, so what grounds the answer is its reference: is it the entity's own?
    own = [i for i, h in enumerate(answer.references, 1) if h.record.metadata.get("entity") == entity.name]
    source = f"reference [{own[0]}] is the entity's own record" if own else "no reference is the entity's own record"
    line = (f"answer {answer.answer!r} (truth {entity.name!r}: "
            f"{'right' if answer.answer.strip() == entity.name else 'wrong'}; {source})")
    sections.append(f"<section><h2>{html.escape(line)}</h2></section>" + render_answer(NAME_QUESTION, world.render(entity, 1), answer))
    summary.append(line)

    log(f"[5/6] drawing an unseen entity from its name: no references (cfg) and grounded ({config.draw.guidance['name']})")
    draw = EntityImagePipeline.from_config(config)
    prompt = f"a photo of the {entity.name}"
    grounded = draw(prompt, seed=0)
    plain = draw(prompt, seed=0, references=[], guidance="cfg")  # text only: no reference in any branch
    sections.append(_render_comparison(entity, prompt, grounded, plain))
    sections.append(render_drawing(prompt, grounded))
    summary.append(f"drawing {prompt!r}: grounded on {len(grounded.references)} reference(s) "
                   f"({', '.join(h.record.metadata.get('entity', '?') for h in grounded.references)})")

    path = write_report(out / "index.html", "mmrag demo (toy preset)", sections, note=TOY_NOTE)
    log(f"[6/6] report written in {time.perf_counter() - start:.0f}s")
    print("toy preset: models trained in the toy world, on entities they never saw (see the report's note)")
    for line in summary:
        print(line)
    print(f"open the report: {path.resolve()}")
    return path


def _attribute_query(entities) -> tuple[str, str]:
    """(pattern, shape) to search for: "striped star" when the gallery holds two or more, else its
    commonest patterned (not plain) pair, ties broken in sorted order."""
    counts = collections.Counter((e.pattern, e.shape) for e in entities if e.pattern != "plain")
    if counts[("striped", "star")] >= 2:
        return "striped", "star"
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def _pick_composed(world):
    """A held-out "but COLOUR" triple, "but blue" when there is one."""
    triples = [t for t in world.composed_queries("heldout") if t.changed == "colour"]
    blue = [t for t in triples if t.target.colour == "blue"]
    return (blue or triples)[0]


def _render_comparison(entity, prompt: str, grounded, plain) -> str:
    """Reference, text-only drawing and grounded drawing side by side, with the truth and the judge's reading."""
    truth = ", ".join(f"{s} {getattr(entity, s)}" for s in SLOTS)
    reference = grounded.references[0].record.open_image() if grounded.references else None
    panels = [("retrieved reference", reference), ("cfg: text only, no references", plain.images[0]),
              (f"{grounded.guidance.get('name', '')}: grounded on the reference", grounded.images[0])]
    cells = []
    for (title, image), read in zip(panels, _judge_readings([image for _, image in panels])):
        img = f'<img alt="{html.escape(title)}" src="{image_data_uri(image, 256)}">' if image is not None else "<p>none</p>"
        cells.append(f'<div class="hit">{img}<div><b>{html.escape(title)}</b></div>'
                     f'<div class="scores">{html.escape(read)}</div></div>')
    return (f"<section><h2>unseen entity {html.escape(entity.name)}: {html.escape(prompt)}</h2>"
            f"<p>truth: {html.escape(truth)}</p><div class=\"hits\">{''.join(cells)}</div></section>")


def _judge_readings(images) -> list[str]:
    """What the attribute judge reads in each image ("" when its weights are not installed)."""
    from .judge import load_judge

    try:
        judge = load_judge()
    except ConfigError:  # its weights are not installed: the drawing stands without a reading
        return ["" for _ in images]
    present = [im for im in images if im is not None]
    read = iter(judge.predict(present))
    out = []
    for im in images:
        if im is None:
            out.append("")
        else:
            values = next(read)
            out.append("judge reads: " + ", ".join(f"{s} {values[s]}" for s in SLOTS if s in values))
    return out
