"""Toy-world VQA benchmark (a script, not a test): what ``mmrag toy-bench make`` + ``mmrag ingest`` +
``mmrag eval vqa --config toy`` measure with toy:llava, over several world seeds, as markdown.

Each gallery entity (validation and held-out: names toy:llava never saw) gets a name question, which
only a matching reference can answer, and an attribute question, which the image alone answers; the
query image is a view the gallery does not hold (``pipelines/toyworld/bench_vqa.py``). Reported: mean
and spread (min-max) over the seeds of the accuracy in MRAG-Bench's three settings (no retrieval, gold
reference, retrieved references), for

- ``-k`` 1 and 3 references;
- the VQA retrieval channels: the default (``vqa.channels: null``: image_to_image + text_to_text +
  lexical) and the image alone (``vqa.channels: [image_to_image]``);
- RoRA-VLM's two-stage retrieval (``vqa.two_stage``) off and on. With the image channel alone it
  changes nothing (the expanded question is text, and no text channel runs), so it is not run there.

Also how often the gold entity is among the retrieved references (hit@k, name questions), which
tells retrieval's misses from the answerer's, and the attribute accuracy per slot (shape, colour,
background, pattern). No-retrieval and gold do not depend on k, the channels or two-stage (they are
run again with each, as ``mmrag eval vqa`` does, and agree); they are reported once.

toy:llava was trained on world seed 0's training split. Seed 0's gallery is disjoint from it in
names and attribute combinations; the galleries of other seeds are drawn apart from their own
worlds' training splits only, so some of their names, and some of their combinations, were training
names or combinations in world 0 (the last lines count them), though never together as one entity.

Each configuration is ``RAGVQAPipeline.from_config`` + ``evaluate_vqa``, what ``mmrag eval vqa`` runs.
The VLM is ``--vlm`` (default toy:llava) over the toy preset. These are toy models in a toy world: they
show the mechanisms work where the truth is known, not real-world quality.

    python benchmarks/toy_vqa.py [--seeds 0 1 2] [--vlm toy:llava]
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
from mmrag.pipelines.evaluation import VQA_SETTINGS, evaluate_vqa, load_vqa_dataset
from mmrag.pipelines.toyworld.bench import make_toy_bench
from mmrag.pipelines.toyworld.world import SLOTS, ToyWorld
from mmrag.pipelines.vqa import RAGVQAPipeline

CHANNELS = {"default": None, "image": ["image_to_image"]}
# (channels, two-stage): two-stage only expands the text, which the image channel alone never reads
VARIANTS = (("default", False), ("default", True), ("image", False))
KS = (1, 3)
CATEGORIES = ("name", "attribute")


def run_seed(seed: int, root: Path, vlm: str) -> dict:
    folder = root / f"seed-{seed}"
    paths = make_toy_bench(folder, seed=seed)
    base = {"kb.path": str(folder / "toy-kb"), "vlm.model": vlm}
    open_knowledge_base(load_config("toy", base)).ingest(paths["manifest"])
    items = load_vqa_dataset(paths["vqa"])
    lines = {n: json.loads(line) for n, line in enumerate(paths["vqa"].read_text(encoding="utf-8").splitlines(),
                                                           start=1) if line.strip()}
    out = {}
    for channels, two_stage in VARIANTS:
        for k in KS:
            config = load_config("toy", {**base, "vqa.k": k, "vqa.channels": CHANNELS[channels],
                                         "vqa.two_stage": two_stage})
            predictions = folder / f"predictions-{channels}-{two_stage}-k{k}.jsonl"
            start = time.perf_counter()
            summary = evaluate_vqa(RAGVQAPipeline.from_config(config), items, predictions_path=predictions)
            summary["seconds"] = time.perf_counter() - start
            rows = [json.loads(x) for x in predictions.read_text(encoding="utf-8").splitlines()]
            found = [any(r.rsplit("-", 1)[0] == lines[row["line"]]["entity"].lower() for r in row["references"])
                     for row in rows if row["setting"] == "retrieved" and row["category"] == "name"]
            summary["gold_retrieved"] = float(np.mean(found))
            summary["per_slot"] = {
                setting: {slot: float(np.mean([row["score"] for row in rows if row["setting"] == setting
                                               and lines[row["line"]].get("slot") == slot])) for slot in SLOTS}
                for setting in VQA_SETTINGS}
            out[(channels, two_stage, k)] = summary
    return out


def cell(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def seen_in_training(seeds: list[int]) -> dict[int, dict[str, float]]:
    """Per seed, the share of gallery entities whose name, combination, or both were those of one of
    toy:llava's training entities (world 0's training split)."""
    trained = ToyWorld(0).entities("train")
    names, combos, both = {e.name for e in trained}, {e.combo for e in trained}, {(e.name, e.combo) for e in trained}
    share = {}
    for seed in seeds:
        world = ToyWorld(seed)
        gallery = [e for split in ("validation", "heldout") for e in world.entities(split)]
        share[seed] = {"name": float(np.mean([e.name in names for e in gallery])),
                       "combination": float(np.mean([e.combo in combos for e in gallery])),
                       "both": float(np.mean([(e.name, e.combo) in both for e in gallery]))}
    return share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--vlm", default="toy:llava", help="vlm.model over the toy preset (default toy:llava)")
    args = ap.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmrag-toy-vqa-") as tmp:
        runs = [run_seed(seed, Path(tmp), args.vlm) for seed in args.seeds]
    wall = time.perf_counter() - start

    first = runs[0][VARIANTS[0] + (KS[0],)]
    n = {cat: first["per_category"][cat]["retrieved"]["n"] for cat in CATEGORIES}
    print(f"\nmachine: {machine()}; toy preset, vlm {args.vlm}, seeds {args.seeds}: mean (min-max); "
          f"n per seed: {n['name']} name, {n['attribute']} attribute questions; wall {wall:.0f} s\n")
    print("| setting | k | channels | two-stage | name | attribute | gold entity retrieved (name, hit@k) | s / run |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in ("no_retrieval", "gold"):
        acc = {cat: [r[VARIANTS[0] + (KS[0],)]["per_category"][cat][setting]["accuracy"] for r in runs]
               for cat in CATEGORIES}
        print(f"| {setting} | - | - | - | {cell(acc['name'])} | {cell(acc['attribute'])} | - | - |")
    for channels, two_stage in VARIANTS:
        for k in KS:
            key = (channels, two_stage, k)
            acc = {cat: [r[key]["per_category"][cat]["retrieved"]["accuracy"] for r in runs] for cat in CATEGORIES}
            label = "image_to_image" if channels == "image" else "default (image_to_image, text_to_text, lexical)"
            print(f"| retrieved | {k} | {label} | {'on' if two_stage else 'off'} | {cell(acc['name'])} | "
                  f"{cell(acc['attribute'])} | {cell([r[key]['gold_retrieved'] for r in runs])} | "
                  f"{np.mean([r[key]['seconds'] for r in runs]):.0f} |")
    best = ("image", False, 1)
    print("\nAttribute questions by slot (retrieved: k 1, image_to_image):\n")
    print("| slot | " + " | ".join(VQA_SETTINGS) + " |")
    print("|---|" + "---|" * len(VQA_SETTINGS))
    for slot in SLOTS:
        print(f"| {slot} | " + " | ".join(cell([r[best]["per_slot"][s][slot] for r in runs]) for s in VQA_SETTINGS) + " |")
    # no-retrieval and gold repeat in every run: they must agree (greedy decoding, same prompts)
    for seed, r in zip(args.seeds, runs):
        for setting in ("no_retrieval", "gold"):
            values = {round(summary["overall"][setting]["accuracy"], 6) for summary in r.values()}
            if len(values) > 1:
                print(f"\nnote: seed {seed}: {setting} differs between the runs: {sorted(values)}")
    print("\nGallery entities sharing a name / an attribute combination / both with one of toy:llava's "
          "training entities (world 0):")
    for seed, share in seen_in_training(args.seeds).items():
        print(f"- seed {seed}: {share['name']:.3f} / {share['combination']:.3f} / {share['both']:.3f}")


if __name__ == "__main__":
    main()
