"""Late-interaction search benchmark (a script, not a test): prints a markdown table.

MUVERA-style search (retrievers/muvera.py: one FDE dot product per document, then exact Chamfer
on the top-N candidates) against brute-force Chamfer over the whole multivector store, same
process, the two alternating per query. Synthetic clustered unit point clouds
(``synthetic_late_interaction``, the data the defaults were measured on): every document has
``--patches`` vectors, every query ``--query-tokens``.

Per corpus size: p50 / p95 latency per query (query encoding included), the ratio of p50s against
brute force, recall@10 against the brute-force Chamfer top-10, and the bytes each method scans:
the float32 FDE matrix against the float32 multivector store. Both scan with numpy on the CPU;
the FDE matrix is what would go into a single-vector (ANN) index instead.

    python benchmarks/late_interaction.py [--n 10000 100000] [--queries 30] [--dim 64] [--candidates 300 1000 3000]
    python benchmarks/late_interaction.py --tiny-colpali [--candidates 100 300 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from common import machine
from mmrag.retrievers.muvera import (
    DEFAULT_FDE,
    DEFAULT_RERANK_CANDIDATES,
    FDEEncoder,
    chamfer_many,
    fde_search,
    synthetic_late_interaction,
)

K = 10


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.array(xs) * 1e3, p))


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def bench(n: int, args: argparse.Namespace, encoder: FDEEncoder) -> tuple[list[str], str]:
    docs, queries = synthetic_late_interaction(n, args.queries + 2, dim=args.dim, patches=(args.patches,) * 2,
                                               query_tokens=(args.query_tokens,) * 2, seed=args.seed)
    store = np.stack(docs)  # (n, patches, dim) float32
    del docs
    t = time.perf_counter()
    fdes = encoder.encode_documents(store)  # (n, D) float32
    encode_s = time.perf_counter() - t

    t_brute, t_scan, rec_scan = [], [], []
    t_fde = {c: [] for c in args.candidates}
    rec_fde = {c: [] for c in args.candidates}
    for i, q in enumerate(queries):
        t = time.perf_counter()
        truth = set(np.argpartition(-chamfer_many(q, store), K)[:K])
        t_q = [time.perf_counter() - t]
        tops = []
        for c in args.candidates:
            t = time.perf_counter()
            tops.append(fde_search(encoder, q, fdes, store, k=K, n_candidates=c)[0])
            t_q.append(time.perf_counter() - t)
        t = time.perf_counter()
        scan = np.argpartition(-(fdes @ encoder.encode_queries([q])[0]), K)[:K]  # FDE alone, no rerank
        t_q.append(time.perf_counter() - t)
        if i < 2:  # warm-up
            continue
        t_brute.append(t_q[0]), t_scan.append(t_q[-1])
        rec_scan.append(len(truth & set(scan)) / K)
        for c, top, dt in zip(args.candidates, tops, t_q[1:]):
            t_fde[c].append(dt)
            rec_fde[c].append(len(truth & set(top)) / K)

    base = pct(t_brute, 50)
    fde_bytes = f"{mib(fdes.nbytes)} FDE ({fdes.nbytes / store.nbytes:.2f}x)"
    rows = [(f"| {n:,} | brute-force Chamfer | {base:.1f} | {pct(t_brute, 95):.1f} | 1.00x | 1.000 | "
             f"{mib(store.nbytes)} multivector store |")]
    rows += [f"| {n:,} | FDE top-{c} + Chamfer rerank | {pct(t_fde[c], 50):.1f} | {pct(t_fde[c], 95):.1f} | "
             f"{pct(t_fde[c], 50) / base:.2f}x | {np.mean(rec_fde[c]):.3f} | {fde_bytes} + {c} docs of the store |"
             for c in args.candidates]
    rows.append(f"| {n:,} | FDE alone, top-{K} | {pct(t_scan, 50):.1f} | {pct(t_scan, 95):.1f} | "
                f"{pct(t_scan, 50) / base:.2f}x | {np.mean(rec_scan):.3f} | {fde_bytes} |")
    return rows, f"{n:,} documents encoded in {encode_s:.1f}s ({n / encode_s:,.0f} documents/s)"


def tiny_colpali_recall(candidates: list[int], n_entities: int = 2500, n_queries: int = 60) -> None:
    """Recall@10 of FDE + rerank (and of mean pooling + the same rerank) against brute-force Chamfer
    on the random tiny ColPali's vectors of 5,000 toy-world images (two views of 2,500 entities),
    with unnamed full captions as queries: plumbing-model vectors, not a quality claim."""
    import random
    import tempfile
    from pathlib import Path

    from mmrag.pipelines.dev.tiny_models import ensure_tiny_model
    from mmrag.pipelines.toyworld.world import ToyWorld, full_caption
    from mmrag.retrievers.multivector import MultiVectorEncoder

    world = ToyWorld(seed=5, n_train=n_entities)
    entities = world.entities("train")
    enc = MultiVectorEncoder(ensure_tiny_model("colpali", Path(tempfile.mkdtemp())), device="cpu", batch_size=128)
    docs = enc.embed_images([world.render(e, v) for e in entities for v in (0, 1)])
    queries = enc.embed_queries([full_caption(e, with_name=False).text
                                 for e in random.Random(0).sample(entities, n_queries)])
    fde = FDEEncoder(dataclasses.replace(DEFAULT_FDE, dim=enc.dim))
    doc_fdes, means = fde.encode_documents(docs), np.stack([d.mean(axis=0) for d in docs])
    print(f"\nmachine: {machine()}\ntiny ColPali ({enc.dim}-d, {len(docs[0])} vectors per image), {len(docs)} records, "
          f"{n_queries} queries; {fde.config}\n")
    print("| candidates | FDE + rerank recall@10 | mean pooling + rerank recall@10 |")
    print("|---|---|---|")
    brute = [chamfer_many(q, docs) for q in queries]
    for n in candidates:
        got = {"fde": [], "mean": []}
        for q, b in zip(queries, brute):
            exact = set(np.argsort(-b, kind="stable")[:K])
            for name, first in (("fde", doc_fdes @ fde.encode_queries([q])[0]), ("mean", means @ q.sum(axis=0))):
                cand = np.argsort(-first, kind="stable")[:n]
                got[name].append(len(exact & set(cand[np.argsort(-b[cand], kind="stable")][:K])) / K)
        print(f"| {n} | {np.mean(got['fde']):.3f} | {np.mean(got['mean']):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="corpus sizes")
    ap.add_argument("--queries", type=int, default=30, help="timed queries per corpus (after 2 warm-up)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--patches", type=int, default=32, help="vectors per document")
    ap.add_argument("--query-tokens", type=int, default=8, help="vectors per query")
    ap.add_argument("--candidates", type=int, nargs="+", default=[DEFAULT_RERANK_CANDIDATES, 1000, 3000],
                    help="FDE candidates reranked (one row each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny-colpali", action="store_true",
                    help="instead: recall on the random tiny ColPali's vectors of 5,000 toy-world images")
    args = ap.parse_args()
    if args.tiny_colpali:
        tiny_colpali_recall(args.candidates)
        return
    config = dataclasses.replace(DEFAULT_FDE, dim=args.dim)
    encoder = FDEEncoder(config)

    rows, notes = [], []
    for n in args.n:
        r, note = bench(n, args, encoder)
        rows += r
        notes.append(note)
    print(f"\nmachine: {machine()}")
    print(f"{config}, output dim {config.output_dim}; documents of {args.patches} x {args.dim}-d vectors, "
          f"queries of {args.query_tokens}; {args.queries} timed queries per size; recall@{K} against "
          f"brute-force Chamfer top-{K}\n")
    print("| documents | method | p50 ms/query | p95 ms | vs brute force p50 | recall@10 | scanned |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n" + "; ".join(notes))


if __name__ == "__main__":
    main()
