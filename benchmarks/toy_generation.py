"""Toy-world generation benchmark (a script, not a test): what ``mmrag toy-bench make`` + ``mmrag ingest``
+ ``mmrag eval generation --config toy --judge`` measure with toy:sd + toy:ip-adapter, as markdown, plus
the README's contact sheet of unseen entities (reference | text only | grounded).

The prompt is an entity's name alone ("the Zorbla"). For the held-out buckets (``rare``: one view of
the entity in the KB; ``frequent``: three) the name was never seen in training, so only the retrieved
reference can tell the model what to draw; ``seen`` are training entities, whose names toy:sd learnt.
Settings, same seed and the same retrieved reference for each (``evaluate_generation``):

- ``text_only``: no references (plain CFG on the prompt), the baseline;
- ``cfg``: CFG over the joint condition (text + reference together);
- ``joint``: the two-direction guidance (text and reference scales);
- ``interleaved`` at several eta (the share of text-enhanced steps; Re-Imagen).

Scores: the attribute judge's accuracy on shape, colour (the shape's), background and pattern (its own
held-out accuracy is in ``pipelines/toyworld/weights/judge/toyworld.json``), and CLIP-I / CLIP-T with
toy:clip. Mean and spread (min-max) over the seeds, which pick the prompted entities and seed the
drawings. These are toy models in a toy world: they show that reference grounding works where the
truth is known, not real-image quality.

    python benchmarks/toy_generation.py [--seeds 0 1 2] [--per-bucket 10] [--sheet docs/toy-contact-sheet.png]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from common import machine
from mmrag.pipelines.builders import open_knowledge_base
from mmrag.pipelines.config import load_config
from mmrag.pipelines.draw import EntityImagePipeline
from mmrag.pipelines.evaluation import TEXT_ONLY, evaluate_generation, guidance_grid, load_generation_prompts
from mmrag.pipelines.toyworld.bench_generation import make_generation_bench
from mmrag.pipelines.toyworld.judge import load_judge

SETTINGS = (TEXT_ONLY, "cfg", "joint", "interleaved")
ETAS = (0.25, 0.5, 0.75)
SLOTS = ("shape", "colour", "background", "pattern")


def run_seed(seed: int, root: Path, per_bucket: int, steps: int | None) -> dict:
    folder = root / f"seed-{seed}"
    paths = make_generation_bench(folder, seed=seed, per_bucket=per_bucket)
    config = load_config("toy", {"kb.path": str(folder / "kb-store")})
    open_knowledge_base(config).ingest(paths["manifest"])
    pipe = EntityImagePipeline.from_config(config)
    items = load_generation_prompts(paths["prompts"])
    start = time.perf_counter()
    summary = evaluate_generation(pipe, items, pipe.retriever.kb.embedder, seed=seed, judge=load_judge(),
                                  guidances=guidance_grid(config.draw.guidance, SETTINGS, ETAS),
                                  num_inference_steps=steps)
    summary["seconds"] = time.perf_counter() - start
    return summary


def cell(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def table(runs: list[dict]) -> str:
    settings = list(runs[0]["per_guidance"])
    buckets = list(runs[0]["per_guidance"][settings[0]]["per_bucket"])
    lines = ["| bucket | setting | shape | colour | background | pattern | CLIP-I | n |", "|---" * 8 + "|"]
    for bucket in buckets:
        for name in settings:
            rows = [r["per_guidance"][name]["per_bucket"][bucket] for r in runs]
            accuracy = [[row["attribute_accuracy"][s] for row in rows] for s in SLOTS]
            lines.append(f"| {bucket} | {name} | " + " | ".join(cell(a) for a in accuracy)
                         + f" | {cell([row['clip_i'] for row in rows])} | {sum(row['n'] for row in rows)} |")
    return "\n".join(lines)


def contact_sheet(path: Path, per_row: int = 8, seed: int = 0) -> None:
    """Unseen entities, one per column: the KB's reference, the text-only drawing, the interleaved one."""
    from PIL import Image, ImageDraw

    with tempfile.TemporaryDirectory(prefix="mmrag-toy-sheet-") as tmp:
        paths = make_generation_bench(tmp, seed=seed, per_bucket=per_row, buckets=("rare",))
        config = load_config("toy", {"kb.path": str(Path(tmp) / "kb-store")})
        open_knowledge_base(config).ingest(paths["manifest"])
        pipe = EntityImagePipeline.from_config(config)
        items = load_generation_prompts(paths["prompts"])
        cell_px, label = 96, 18
        sheet = Image.new("RGB", (cell_px * len(items) + 110, 3 * cell_px + label), "white")
        pen = ImageDraw.Draw(sheet)
        for row, text in enumerate(("reference", "text only", "interleaved")):
            pen.text((4, label + row * cell_px + cell_px // 2 - 6), text, fill="black")
        for col, item in enumerate(items):
            grounded = pipe(item.prompt, seed=seed)
            plain = pipe(item.prompt, seed=seed, references=[], guidance="cfg")
            reference = grounded.references[0].record.open_image()
            x = 110 + col * cell_px
            pen.text((x + 4, 2), item.entity, fill="black")
            for row, image in enumerate((reference, plain.images[0], grounded.images[0])):
                sheet.paste(image.convert("RGB").resize((cell_px - 4, cell_px - 4), Image.NEAREST),
                            (x + 2, label + row * cell_px + 2))
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-bucket", type=int, default=10, help="prompted entities per bucket and seed (default 10)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the toy preset's draw.num_inference_steps)")
    ap.add_argument("--sheet", type=Path, help="also write the contact sheet of unseen entities here (PNG)")
    ap.add_argument("--json", type=Path, help="write the raw summaries here")
    args = ap.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmrag-toy-generation-") as tmp:
        runs = [run_seed(seed, Path(tmp), args.per_bucket, args.steps) for seed in args.seeds]
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print(f"toy generation benchmark, seeds {args.seeds}, {args.per_bucket} prompts per bucket and seed, "
          f"{machine()}, {time.perf_counter() - start:.0f} s")
    print(f"judge: {runs[0].get('judge', {}).get('measured')}")
    print(table(runs))
    if args.sheet:
        contact_sheet(args.sheet)
        print(f"contact sheet: {args.sheet}")


if __name__ == "__main__":
    main()
