"""``mmrag eval vqa|generation --ray``: the evaluations of :mod:`mmrag.pipelines.evaluation` run as
batch jobs (:mod:`.batch`) on an actor pool, resumable, and scored by the evaluation module's own code."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mmrag.retrievers.errors import ConfigError

from .batch import ASK_OUTPUT, DRAW_OUTPUT, AskWorker, BatchReport, DrawWorker, run_job
from .items import AskItem, DrawItem

def evaluate_vqa_batch(config: Any, items: Sequence[Any], out_dir: str | os.PathLike, *, k: int | None = None,
                       predictions_path: str | os.PathLike | None = None, ray_address: str | None = None,
                       use_ray: bool = True, batch_size: int = 8, concurrency: int = 1, num_gpus: float | None = None,
                       num_cpus: float | None = None, progress: bool = False) -> dict[str, Any]:
    """``evaluate_vqa``'s three settings as one batch job (``mmrag eval vqa --ray``): each
    (item, setting) run is an ask item (``references`` ``[]`` for no retrieval, the gold ids for
    gold), answered by the actor pool into ``out_dir`` (resumable), then scored as
    :func:`~mmrag.pipelines.evaluation.evaluate_vqa` scores it; the summary is the same. ``items``
    are :class:`~mmrag.pipelines.evaluation.VQAItem`; a run that fails raises, as it does in process."""
    from ..builders import open_knowledge_base
    from ..config import load_config
    from ..evaluation import check_gold_ids, vqa_row, vqa_runs, vqa_summary

    cfg = load_config(config)
    check_gold_ids(open_knowledge_base(cfg, create=False), items)
    runs = vqa_runs(items)
    asks = [AskItem(id=f"line-{item.line}:{setting}", question=item.question,
                    image=None if item.image is None else str(Path(item.image).resolve()), choices=item.choices,
                    k=k, references=references, line=item.line) for item, setting, references in runs]
    report = run_job("ask", asks, cfg, out_dir, ASK_OUTPUT, AskWorker, ray_address=ray_address, use_ray=use_ray,
                  batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus,
                  progress=progress)
    answered = {row["id"]: row for row in _read_rows(report.output)}
    rows = []
    for ask, (item, setting, _) in zip(asks, runs):
        row = answered[ask.id]
        if "error" in row:
            raise ConfigError(f"line {item.line} ({setting}): {row['error']} (delete its row from {report.output} "
                              "to run it again)")
        rows.append(vqa_row(item, setting, row["answer"], row["choice"], row["references"], row["cited"]))
    return vqa_summary(items, rows, predictions_path)


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def evaluate_generation_batch(config: Any, items: Sequence[Any], out_dir: str | os.PathLike, encoder: Any = None, *,
                              guidances: Sequence[Any] | None = None, k: int | None = None, steps: int | None = None,
                              seed: int = 0, judge: Any = None, ray_address: str | None = None, use_ray: bool = True,
                              batch_size: int = 8, concurrency: int = 1, num_gpus: float | None = None,
                              num_cpus: float | None = None, progress: bool = False) -> dict[str, Any]:
    """``evaluate_generation`` as two batch jobs (``mmrag eval generation --ray``): the first
    guidance that uses references draws every prompt with retrieval (``out_dir/first``), the others
    draw with the references it found (``out_dir/rest``; ``text_only`` with none), so that only the
    guidance differs; the drawings are then scored here with ``encoder`` (default: the KB's
    embedder) and, given one, the attribute ``judge``. Both jobs resume."""
    from ..builders import open_knowledge_base
    from ..config import load_config
    from ..evaluation import GUIDANCE_NAMES, TEXT_ONLY, check_judge_items, draw_arguments, generation_summary, guidance_name

    cfg = load_config(config)
    if judge is not None:
        check_judge_items(items, judge)  # before any drawing, as in process
    kb = open_knowledge_base(cfg, create=False)
    guidances = list(GUIDANCE_NAMES if guidances is None else guidances)
    names = [guidance_name(g) for g in guidances]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"`guidances` must name distinct guidances, got {names!r}.")
    # the first job retrieves: the first setting that draws with references (text_only draws without)
    lead = next((j for j, g in enumerate(guidances) if g != TEXT_ONLY), 0)
    out = Path(out_dir)
    options = dict(ray_address=ray_address, use_ray=use_ray, batch_size=batch_size, concurrency=concurrency,
                   num_gpus=num_gpus, num_cpus=num_cpus, progress=progress)
    ident = lambda item, g: f"line-{item.line}:{guidance_name(g)}"  # noqa: E731

    def draw_item(item, g, references):
        guidance, references = draw_arguments(g, references)
        return DrawItem(id=ident(item, g), prompt=item.prompt, k=k, guidance=guidance, steps=steps, seed=seed,
                        references=references, line=item.line)

    first = [draw_item(item, guidances[lead], None) for item in items]
    first_rows = _drawn(run_job("draw", first, cfg, out / "first", DRAW_OUTPUT, DrawWorker, **options))
    rest = [draw_item(item, g, first_rows[ident(item, guidances[lead])]["references"])
            for item in items for j, g in enumerate(guidances) if j != lead]
    rows = {**first_rows, **(_drawn(run_job("draw", rest, cfg, out / "rest", DRAW_OUTPUT, DrawWorker, **options))
                             if rest else {})}
    from PIL import Image

    drawings = []
    for item in items:
        for j, g in enumerate(guidances):
            row = rows[ident(item, g)]
            folder = out / ("first" if j == lead else "rest")
            drawings.append((item, guidance_name(g), [Image.open(folder / name).convert("RGB") for name in row["images"]]))
    return generation_summary(items, drawings, encoder if encoder is not None else kb.embedder, judge=judge)


def _drawn(report: BatchReport) -> dict[str, dict[str, Any]]:
    """The rows of a finished draw job by id; an item that failed raises, as it does in process."""
    rows = {row["id"]: row for row in _read_rows(report.output)}
    for row in rows.values():
        if "error" in row:
            raise ConfigError(f"{row['id']}: {row['error']} (delete its row from {report.output} to run it again)")
    return rows
