"""HNSW recall/latency curve (a script, not a test): prints a markdown table.

Chroma's HNSW has three settings: ``max_neighbors`` (M) and ``ef_construction`` shape the graph and
are fixed when a collection is created; ``ef_search`` (the candidate list a query keeps) can be
changed later. For each size and graph, one raw cosine collection is built from the synthetic
vectors of ``benchmarks/retrieval.py`` (unit 512-d, on a random 64-d subspace); each ``ef_search``
is then measured in a fresh process, because Chroma 1.5.9 applies a changed ``ef_search`` only when a
process loads the index (measured; see ``retrievers/kb/hnsw.py``). The reference is the exact numpy
top-10.

Two query sets: ``text``, the query texts of ``benchmarks/retrieval.py`` through the same tiny CLIP
(512-d projection, random weights), which is what its recall@10 row measures; and ``record``, new
points drawn like the stored ones (an image-to-image query looks like that).

    python benchmarks/hnsw_curve.py [--sizes 10000 100000] [--ef 100 200 400 800 1600]
                                    [--graphs 16:100 32:100 16:200 32:200] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

NAME = "curve"
K = 10


def client(path: Path):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def vectors(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` stored vectors and 200-odd "record" queries, drawn as ``benchmarks/retrieval.py`` draws them."""
    from retrieval import INTRINSIC_DIM

    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(INTRINSIC_DIM, d))
    v = (rng.normal(size=(n + 1000, INTRINSIC_DIM)) @ basis).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v[:n], v[n:]


def build(folder: Path, n: int, m: int, ef_construction: int) -> float:
    """Build the collection in this process (run as a child: it exits, so the index is on disk)."""
    vecs = np.load(folder / "vecs.npy")
    col = client(folder / "chroma").create_collection(
        NAME, embedding_function=None,
        configuration={"hnsw": {"space": "cosine", "max_neighbors": m, "ef_construction": ef_construction,
                                "ef_search": 100}})
    step = 5000
    t = time.perf_counter()
    for s in range(0, n, step):
        col.add(ids=[f"r{i:07d}" for i in range(s, min(n, s + step))], embeddings=vecs[s:s + step])
    return time.perf_counter() - t


def measure(folder: Path, ef: int) -> dict:
    """Set ``ef_search`` before this process loads the index, then query both sets."""
    col = client(folder / "chroma").get_collection(NAME, embedding_function=None)
    col.modify(configuration={"hnsw": {"ef_search": ef}})
    col = client(folder / "chroma").get_collection(NAME, embedding_function=None)
    assert col.configuration["hnsw"]["ef_search"] == ef
    out = {}
    for which in ("text", "record"):
        queries, exact = np.load(folder / f"q_{which}.npy"), np.load(folder / f"exact_{which}.npy")
        col.query(query_embeddings=queries[:5], n_results=K)  # load the index
        times, recall = [], []
        for q, ex in zip(queries, exact):
            t = time.perf_counter()
            got = col.query(query_embeddings=[q], n_results=K, include=[])["ids"][0]
            times.append(time.perf_counter() - t)
            recall.append(len({int(g[1:]) for g in got} & set(ex.tolist())) / K)
        out[which] = {"recall": float(np.mean(recall)), "min_recall": float(np.min(recall)),
                      "p50_ms": float(np.median(times) * 1e3)}
    return out


def child(*args: str) -> str:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


def text_queries(tmp: Path, count: int) -> np.ndarray:
    from retrieval import WORDS, tiny_clip_512

    from mmrag.retrievers import DualEncoder

    enc = DualEncoder(tiny_clip_512(tmp / "models"), device="cpu").warm_up()
    rng = np.random.default_rng(1)  # the queries of benchmarks/retrieval.py
    return enc.embed_texts([" ".join(rng.choice(WORDS, 3)) for _ in range(count)]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--ef", type=int, nargs="+", default=[100, 200, 400, 800, 1600])
    ap.add_argument("--graphs", nargs="+", default=["16:100", "32:100", "16:200", "32:200"],
                    help="max_neighbors:ef_construction pairs")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--build", nargs=4, metavar=("FOLDER", "N", "M", "EFC"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", nargs=2, metavar=("FOLDER", "EF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        print(build(Path(args.build[0]), *map(int, args.build[1:])))
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]))))
        return

    from common import machine  # imports torch: not in the children

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-hnsw-"))
    q_text = text_queries(tmp, args.queries)
    rows = []
    for n in args.sizes:
        vecs, q_record = vectors(n, q_text.shape[1])
        q_record = q_record[:args.queries]
        for m, efc in (map(int, g.split(":")) for g in args.graphs):
            folder = tmp / f"n{n}-m{m}-efc{efc}"
            folder.mkdir()
            np.save(folder / "vecs.npy", vecs)
            for which, q in (("text", q_text), ("record", q_record)):
                np.save(folder / f"q_{which}.npy", q)
                np.save(folder / f"exact_{which}.npy", np.argsort(-(q @ vecs.T), axis=1)[:, :K])
            build_s = float(child("--build", str(folder), str(n), str(m), str(efc)))
            (folder / "vecs.npy").unlink()
            index_mib = sum(f.stat().st_size for f in (folder / "chroma").rglob("*") if f.is_file()) / 2**20
            for ef in args.ef:
                r = json.loads(child("--measure", str(folder), str(ef)))
                rows.append((n, m, efc, build_s, index_mib, ef, r))
                print(f"n={n} M={m} efc={efc} ef={ef}: {r}", file=sys.stderr, flush=True)

    print(f"\nmachine: {machine()}")
    print(f"{args.queries} queries per set; recall@10 vs exact numpy top-10 (mean, and the worst query); "
          "p50 of one raw `collection.query` top-10 (ids only), text queries\n")
    print("| records | max_neighbors | ef_construction | build s | on disk MiB | ef_search | recall@10 text "
          "(worst) | recall@10 record (worst) | p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, m, efc, build_s, mib, ef, r in rows:
        print(f"| {n:,} | {m} | {efc} | {build_s:.0f} | {mib:.0f} | {ef} | {r['text']['recall']:.4f} "
              f"({r['text']['min_recall']:.1f}) | {r['record']['recall']:.4f} ({r['record']['min_recall']:.1f}) | "
              f"{r['text']['p50_ms']:.2f} |")


if __name__ == "__main__":
    main()
