"""Retrieval benchmark (a script, not a test): prints a markdown table.

A KB of N records (synthetic unit 512-d vectors on a random 64-d subspace, written straight into
its collections, and short texts) is queried through ``MultimodalRetriever.retrieve()`` and through raw
``collection.query`` on the same collection, alternating, same process:

- one channel (text_to_image), top-10: retrieve() vs raw query. Target <= 1.25x. Also the same
  channel without over-fetching (n_candidates=10) and without the near-duplicate pass, which is
  what the retrieval layer costs on its own.
- three channels (text_to_image, text_to_text, lexical) + RRF vs ONE raw query. Target <= 3.5x.
- lexical channel alone; recall@10 of the HNSW channel vs exact numpy; resident memory.

The query text is encoded by a dual encoder with a 512-d projection (random weights); that
encoding is timed separately and subtracted, since the raw baseline gets the vector for free.

    python benchmarks/retrieval.py [--n 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import psutil

from common import machine
from mmrag.pipelines.dev.tiny_models import build_tiny_model
from mmrag.retrievers import DualEncoder, KnowledgeBase, MultimodalRetriever

INTRINSIC_DIM = 64
WORDS = ("red blue green amber violet star circle square ring dotted striped old new tiny huge cathedral dog cat "
         "bridge tower river boat car lamp chair garden statue mask kite drum").split()


def tiny_clip_512(directory: Path) -> Path:
    """The tiny CLIP with a 512-d projection: the real loading and encoding path, at a cost that
    does not drown the retrieval being measured."""
    from transformers import CLIPConfig, CLIPModel

    src = build_tiny_model("clip", directory)
    config = CLIPConfig.from_pretrained(src)
    config.projection_dim = 512
    out = directory / "clip-512"
    CLIPModel(config).save_pretrained(out)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def build_kb(path: Path, enc: DualEncoder, n: int, seed: int = 0) -> tuple[KnowledgeBase, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    kb = KnowledgeBase.open(path, enc)
    d = kb.dim
    ids = [f"r{i:07d}" for i in range(n)]
    # Real embeddings have a low intrinsic dimension; isotropic 512-d noise has none, and no ANN
    # index (nor any real retrieval task) looks like it. Points on a random 64-d subspace do.
    basis = rng.normal(size=(INTRINSIC_DIM, d))
    all_vecs = np.empty((n, d), np.float32)
    step = 5000
    for s in range(0, n, step):
        e = min(n, s + step)
        v = (rng.normal(size=(e - s, INTRINSIC_DIM)) @ basis).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        all_vecs[s:e] = v
        texts = [" ".join(rng.choice(WORDS, 6)) + f" {i}" for i in range(s, e)]
        metas = [{"mmrag_image": "00/" + "0" * 64 + ".png", "mmrag_sha256": "0" * 64, "mmrag_source": "synthetic",
                  "group": int(i % 10)} for i in range(s, e)]
        kb.vectors.write(ids[s:e], v, v, metas, texts, upsert=False)
    return kb, all_vecs, ids


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.array(xs) * 1e3, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-retr-"))
    proc = psutil.Process()
    rss0 = proc.memory_info().rss

    enc = DualEncoder(tiny_clip_512(tmp / "models"), device="cpu").warm_up()
    t = time.perf_counter()
    kb, vecs, ids = build_kb(tmp / "kb", enc, args.n)
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(args.queries)]
    one = MultimodalRetriever(kb, channels=["text_to_image"])
    # what the retrieval layer itself costs: no over-fetch, no near-duplicate pass
    lean = MultimodalRetriever(kb, channels=["text_to_image"], n_candidates=10, near_duplicate_threshold=None)
    three = MultimodalRetriever(kb, channels=["text_to_image", "text_to_text", "lexical"])
    lexical = MultimodalRetriever(kb, channels=["lexical"])
    col = kb.vectors.images
    for q in queries[:5]:  # warm up: HNSW loaded, lexical index built
        one.retrieve(q), three.retrieve(q), lexical.retrieve(q), lean.retrieve(q)

    t_embed, t_raw, t_one, t_lean, t_three, t_lex, recall = [], [], [], [], [], [], []
    for q in queries:
        t = time.perf_counter()
        v = enc.embed_texts([q])[0]
        t_embed.append(time.perf_counter() - t)
        t = time.perf_counter()
        col.query(query_embeddings=[v], n_results=10)
        t_raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        hits = one.retrieve(q, k=10)
        t_one.append(time.perf_counter() - t - t_embed[-1])
        t = time.perf_counter()
        lean.retrieve(q, k=10)
        t_lean.append(time.perf_counter() - t - t_embed[-1])
        t = time.perf_counter()
        three.retrieve(q, k=10)
        t_three.append(time.perf_counter() - t - t_embed[-1])
        t = time.perf_counter()
        lexical.retrieve(q, k=10)
        t_lex.append(time.perf_counter() - t)
        exact = set(np.array(ids)[np.argpartition(-(vecs @ v), 10)[:10]])
        recall.append(len(exact & {h.id for h in hits}) / 10)

    rss = (proc.memory_info().rss - rss0) / 2**20
    raw50, raw95 = pct(t_raw, 50), pct(t_raw, 95)
    print(f"\nmachine: {machine()}")
    print(f"{args.n:,} records (512-d synthetic unit vectors of intrinsic dim {INTRINSIC_DIM}, 7-word texts), {args.queries} queries; "
          f"KB written in {build_s:.0f}s; query encoding ({pct(t_embed, 50):.1f} ms p50) subtracted\n")
    print("| measure | p50 ms | p95 ms | vs raw collection.query p50 | target |")
    print("|---|---|---|---|---|")
    print(f"| raw `collection.query` top-10 | {raw50:.2f} | {raw95:.2f} | 1.00x | |")
    print(f"| retrieve(), text_to_image | {pct(t_one, 50):.2f} | {pct(t_one, 95):.2f} | {pct(t_one, 50) / raw50:.2f}x | <= 1.25x |")
    print(f"| retrieve(), text_to_image, n_candidates=10, no near-duplicate pass | {pct(t_lean, 50):.2f} | "
          f"{pct(t_lean, 95):.2f} | {pct(t_lean, 50) / raw50:.2f}x | |")
    print(f"| retrieve(), 3 channels + RRF | {pct(t_three, 50):.2f} | {pct(t_three, 95):.2f} | {pct(t_three, 50) / raw50:.2f}x | <= 3.5x |")
    print(f"| retrieve(), lexical (BM25) | {pct(t_lex, 50):.2f} | {pct(t_lex, 95):.2f} | {pct(t_lex, 50) / raw50:.2f}x | |")
    print(f"\nrecall@10 of text_to_image vs exact numpy: {np.mean(recall):.4f}; "
          f"resident memory added by the KB + indexes: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
