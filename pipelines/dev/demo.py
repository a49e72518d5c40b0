"""``mmrag demo``: the newcomer's first run, on embedded Chroma and offline models.

With the toy preset (``mmrag demo``'s default) it runs :func:`mmrag.pipelines.toyworld.demo.run_toy_demo`:
trained toy models on the toy world's held-out entities, each result beside its ground truth. With
any other config (``--config tiny`` for the random tiny models) it draws a sample knowledge base, ingests it, runs a text, an image and a composed search, asks a
question about an image, draws a prompt with the configured guidance, and writes everything to one
self-contained HTML report. Every stage runs through the pipelines' ``from_config``, as a user's
call would, with the config's own defaults.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmrag.retrievers import Query

from ..builders import open_knowledge_base, uses_tiny_models
from ..config import Config, load_config
from ..draw import EntityImagePipeline
from ..search import SearchPipeline
from ..vqa import RAGVQAPipeline
from .report import (
    TINY_NOTE,
    render_answer,
    render_drawing,
    render_search,
    write_report,
)
from .sample_data import make_sample_set


def run_demo(config: Config, out: Path, *, log=None) -> Path:
    """Build the sample KB in ``out/kb`` and write ``out/index.html``; returns the report's path.

    Running it again reuses the KB (re-ingesting adds nothing).
    """
    from ..toyworld.demo import run_toy_demo, uses_toy_models

    if uses_toy_models(load_config(config)):  # the toy world's gallery, with its ground truth shown
        return run_toy_demo(config, out, log=log)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    out = Path(out)
    config = load_config(config, {"kb.path": str(out / "kb")})
    log(f"[1/6] models: embedder {config.embedder.model}, VLM {config.vlm.model}, diffusion {config.diffusion.model} "
        "(tiny models are built on first use)")
    kb = open_knowledge_base(config)
    log("[2/6] drawing the sample set (seeded, procedural entities) and ingesting it")
    sample = make_sample_set(out / "sample")
    report = kb.ingest(sample, batch_size=config.ingest.batch_size)
    log("      " + report.summary().splitlines()[0])
    search = SearchPipeline.from_config(config)  # every stage as the config says, as a user's call
    first = kb.get(sorted(kb.vectors.all_ids())[:1])[0]
    entity = first.metadata.get("entity", "")
    sections = []

    log("[3/6] searching: text, image, image + modifier (composed)")
    for title, query in (
        (f"text search: the rare name '{entity}'", Query(text=f"the {entity}")),
        ("image search", Query(image=first.image)),
        ("composed search: this image, but blue", Query(text="but blue", image=first.image)),
    ):
        q = Query.coerce(query)
        sections.append(render_search(title, q, search(q, k=6)))

    log("[4/6] asking a question about an image (retrieval-augmented VQA)")
    vqa = RAGVQAPipeline.from_config(config)
    question = "What is the name of this entity?"
    answer = vqa(question, image=first.image)
    sections.append(render_answer(question, first.image, answer))

    log(f"[5/6] drawing with references retrieved for the prompt ({config.draw.guidance['name']} guidance)")
    draw = EntityImagePipeline.from_config(config)
    prompt = f"the {entity} on a beach"
    drawing = draw(prompt, seed=0)
    sections.append(render_drawing(prompt, drawing))

    note = (TINY_NOTE + " Run `mmrag demo --config configs/default.yaml` for real models."
            if uses_tiny_models(config, kb) else None)
    path = write_report(out / "index.html", "mmrag demo", sections, note=note)
    log(f"[6/6] report written in {time.perf_counter() - start:.0f}s")
    info = kb.info()
    print(f"knowledge base: {info['count']} records in {info['path']} ({info['bytes_on_disk'] / 2**20:.1f} MiB, "
          f"embedder {info['embedder']})")
    print(f"answer: {answer.answer!r} (cited {[h.id[:8] for h in answer.cited]})")
    print(f"drawing: {len(drawing.images)} image(s) grounded on {len(drawing.references)} reference(s), "
          f"guidance {drawing.guidance['name']}")
    print(f"open the report: {path.resolve()}")
    return path
