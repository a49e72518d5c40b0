"""Ingestion benchmark (a script, not a test): prints a markdown table.

1. Full ingest throughput (read, decode, validate, store, embed, journal, Chroma) vs the embedder
   alone on the same, already decoded images and texts. Target: >= 0.85.
2. The KB's Chroma write path (existence lookup, image store, journal, upsert into both
   collections) vs raw ``collection.add`` of the same vectors, metadata and documents into two
   fresh collections. Target: >= 0.8.

Both are ratios against a baseline run in the same process, alternating rounds, best of each.
The dual encoder has the ViT-B/32 shape with random weights (no download).

    python benchmarks/ingest.py [--n 256] [--batch-size 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from common import machine
from mmrag.pipelines.dev.tiny_models import build_dual_encoder
from mmrag.retrievers import DualEncoder, KnowledgeBase
from mmrag.retrievers.kb.store import make_client


def make_images(folder: Path, n: int, px: int, seed: int = 0) -> list[tuple[Path, str]]:
    """JPEG photos-sized stand-ins (smooth colour fields plus noise) with text sidecars."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:px, 0:px] / px
    out = []
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        arr = np.stack([a * xx, b * yy, c * (1 - xx)], -1) + rng.normal(0, 12, (px, px, 3))
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        text = f"photo {i}: a {['red', 'green', 'blue', 'grey'][i % 4]} gradient with {i % 7} soft bands"
        path.with_suffix(".txt").write_text(text)
        out.append((path, text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--px", type=int, default=256, help="source image size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-"))
    model = build_dual_encoder(tmp / "models", family="clip", size="base")
    items = make_images(tmp / "src", args.n, args.px)
    enc = DualEncoder(model, device="cpu", batch_size=args.batch_size).warm_up()
    decoded = [Image.open(p).convert("RGB") for p, _ in items]
    texts = [t for _, t in items]
    enc.embed_images(decoded[:4]), enc.embed_texts(texts[:4])  # warm the kernels

    embed_only, ingest, write, raw = [], [], [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        enc.embed_images(decoded), enc.embed_texts(texts)
        embed_only.append(time.perf_counter() - t)

        kb = KnowledgeBase.open(tmp / f"kb{r}", enc)
        report = kb.ingest(tmp / "src", batch_size=args.batch_size)
        assert report.added == args.n, report.summary()
        ingest.append(report.seconds)
        write.append(report.timings["lookup"] + report.timings["write"])

        # raw Chroma: the same vectors, metadata and documents, two fresh collections
        got_i = kb.vectors.images.get(include=["embeddings", "metadatas", "documents"])
        got_t = kb.vectors.texts.get(ids=got_i["ids"], include=["embeddings"])
        client = make_client(tmp / f"raw{r}")
        cols = [client.create_collection(f"raw-{k}", embedding_function=None, configuration={"hnsw": {"space": "cosine"}})
                for k in ("images", "texts")]
        ids, metas, docs = got_i["ids"], got_i["metadatas"], got_i["documents"]
        vecs = [np.asarray(got_i["embeddings"], dtype=np.float32), np.asarray(got_t["embeddings"], dtype=np.float32)]
        t = time.perf_counter()
        for s in range(0, len(ids), args.batch_size):
            e = slice(s, s + args.batch_size)
            for col, v in zip(cols, vecs):
                col.add(ids=ids[e], embeddings=v[e], metadatas=metas[e], documents=docs[e])
        raw.append(time.perf_counter() - t)

    e, i, w, rw = min(embed_only), min(ingest), min(write), min(raw)
    print(f"\nmachine: {machine()}")
    print(f"dual encoder: ViT-B/32 shape, random weights, fp32 CPU; {args.n} JPEG {args.px}px images, batch {args.batch_size}, best of {args.rounds}\n")
    print("| measure | mmrag | baseline | ratio (baseline/mmrag) | target |")
    print("|---|---|---|---|---|")
    print(f"| full ingest vs embedder alone | {args.n / i:.1f} items/s | {args.n / e:.1f} items/s | {e / i:.2f} | >= 0.85 |")
    print(f"| KB write path vs raw collection.add | {w * 1e3:.0f} ms | {rw * 1e3:.0f} ms | {rw / w:.2f} | >= 0.8 |")


if __name__ == "__main__":
    main()
