"""Toy-world retrieval benchmark (a script, not a test): what ``mmrag toy-bench make`` + ``mmrag
ingest`` + ``mmrag eval retrieval --config toy`` measure, over several world seeds, as markdown.

Queries and gallery are held-out entities (names and attribute combinations toy:clip never saw);
see ``pipelines/toyworld/bench.py``. Reported: mean and spread (min-max) over the seeds of

1. each query kind with all channels fused, and each channel alone on each kind;
2. composed queries by method (WeiMoCIR, PDV with the reference's caption) against image-only
   (the image_to_image channel), hit@5;
3. everything fused with hubness normalisation (QB-Norm, DBNorm) and with the dual-encoder
   reranker (toy:clip itself), on and off.

These are toy models in a toy world: they show the mechanisms work where the truth is known, not
real-world quality.

    python benchmarks/toy_retrieval.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from common import machine
from mmrag.pipelines.builders import open_knowledge_base
from mmrag.pipelines.config import load_config
from mmrag.pipelines.evaluation import evaluate_retrieval, load_queries
from mmrag.pipelines.search import SearchPipeline
from mmrag.pipelines.toyworld.bench import make_toy_bench

METRICS = ("hit@1", "hit@5", "recall@5", "mrr")


def run_seed(seed: int, root: Path) -> dict[str, dict]:
    folder = root / f"seed-{seed}"
    paths = make_toy_bench(folder, seed=seed)
    config = load_config("toy", {"kb.path": str(folder / "toy-kb")})
    kb = open_knowledge_base(config)
    kb.ingest(paths["manifest"])
    queries = load_queries(paths["queries"])
    composed = [q for q in queries if q.category == "composed"]
    out: dict[str, dict] = {}
    out["default"] = evaluate_retrieval(SearchPipeline.from_config(config), queries).to_dict()
    for name, overrides, subset in (
            ("pdv", {"retriever.composed_method": "pdv", "retriever.channels": ["composed"]}, composed),
            ("qbnorm", {"retriever.hubness": "qbnorm"}, queries),
            ("dbnorm", {"retriever.hubness": "dbnorm"}, queries),
            ("rerank", {"reranker.name": "dual_encoder"}, queries)):
        variant = load_config("toy", {"kb.path": str(folder / "toy-kb"), **overrides})
        out[name] = evaluate_retrieval(SearchPipeline.from_config(variant), subset, ablate_channels=False).to_dict()
    return out


def cell(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmrag-toy-bench-") as tmp:
        runs = [run_seed(seed, Path(tmp)) for seed in args.seeds]

    print(f"\nmachine: {machine()}; toy preset (toy:clip), seeds {args.seeds}: mean (min-max)\n")
    categories = ["attribute", "full", "name", "composed"]
    print("| query kind | channels | n | " + " | ".join(METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for cat in categories:
        fused = [r["default"]["per_category"][cat] for r in runs]
        print(f"| {cat} | all, fused | {fused[0]['n']} | " + " | ".join(cell([f[m] for f in fused]) for m in METRICS) + " |")
        for ch in runs[0]["default"]["per_channel_category"]:
            rows = [r["default"]["per_channel_category"][ch].get(cat) for r in runs]
            if rows[0] is None:
                continue
            print(f"| {cat} | {ch} | {rows[0]['n']} | " + " | ".join(cell([x[m] for x in rows]) for m in METRICS) + " |")

    print("\nComposed queries (\"this image, but blue\"), hit@5:\n")
    print("| method | hit@5 | vs image-only |")
    print("|---|---|---|")
    image_only = [r["default"]["per_channel_category"]["image_to_image"]["composed"]["hit@5"] for r in runs]
    weimocir = [r["default"]["per_channel_category"]["composed"]["composed"]["hit@5"] for r in runs]
    pdv = [r["pdv"]["overall"]["hit@5"] for r in runs]  # the composed channel alone
    for name, values in (("image only (image_to_image)", image_only), ("WeiMoCIR (composed channel)", weimocir),
                         ("PDV (composed channel, reference caption given)", pdv)):
        ratio = float(np.mean(values)) / max(float(np.mean(image_only)), 1e-9)
        print(f"| {name} | {cell(values)} | {ratio:.2f}x |")

    print("\nAll queries fused, with and without hubness normalisation and the dual-encoder reranker:\n")
    print("| setting | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, key in (("plain", "default"), ("QB-Norm", "qbnorm"), ("DBNorm", "dbnorm"),
                      ("rerank: dual encoder (toy:clip)", "rerank")):
        print(f"| {name} | " + " | ".join(cell([r[key]["overall"][m] for r in runs]) for m in METRICS) + " |")


if __name__ == "__main__":
    main()
