"""RAG-VQA pipeline benchmark (a script, not a test): per-stage latency, printed as a markdown table.

RAGVQAPipeline answers an image question from k=3 references generating exactly 32 new tokens with
a mid-size random-weight LLaVA (CLIP ViT-B/16 vision tower, 12-layer 768-wide LM) over a KB of
N records embedded by a ViT-B/32-shaped CLIP (random weights). Reported: median seconds per stage
(retrieve = query encoding + channels + fusion; rerank = a dual-encoder reranker over the top
``--rerank-candidates``; answer = prompt + generation) and the share of retrieval + rerank in the
end-to-end time. Target: <= 10%.

    python benchmarks/vqa.py [--n 2000] [--rounds 5] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from common import machine
from mmrag.generators.vlm import VLMAnswerer
from mmrag.pipelines.dev.tiny_models import build_dual_encoder, ensure_tiny_model
from mmrag.pipelines.vqa import RAGVQAPipeline
from mmrag.retrievers import DualEncoder, DualEncoderReranker, KnowledgeBase, MultimodalRetriever
from vqa_model import build_small_llava


def build_kb(path: Path, encoder: DualEncoder, n: int, n_images: int = 50) -> KnowledgeBase:
    """``n`` records sharing ``n_images`` real stored images, vectors from the encoder's own
    embedding of those images and of distinct texts (so every vector is a real one)."""
    rng = np.random.default_rng(0)
    kb = KnowledgeBase.open(path, encoder)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n_images)]
    from mmrag.retrievers import Record

    kb.add([Record(id=f"img{i}", text=f"reference photo {i} of a rare landmark", image=im) for i, im in enumerate(images)])
    stored = kb.vectors.images.get(include=["embeddings", "metadatas"])
    texts = [f"record {i}: the landmark number {i % 977} built in {1800 + i % 200}" for i in range(n)]
    text_vecs = encoder.embed_texts(texts)
    image_vecs = np.asarray(stored["embeddings"], dtype=np.float32)
    pick = rng.integers(0, len(stored["ids"]), n)
    kb.vectors.write([f"r{i:06d}" for i in range(n)], image_vecs[pick], text_vecs,
                     [stored["metadatas"][j] for j in pick], texts, upsert=False)
    return kb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rerank-candidates", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-vqa-"))
    device = torch.device("cpu")
    encoder = DualEncoder(build_dual_encoder(tmp / "models", family="clip", size="base"), device="cpu").warm_up()
    kb = build_kb(tmp / "kb", encoder, args.n)
    llava = build_small_llava(ensure_tiny_model("llava", tmp / "models"), tmp / "llava-mid", device, shape="mid",
                              dtype=torch.float32)
    answerer = VLMAnswerer(llava, max_new_tokens=args.new_tokens, device="cpu").warm_up()
    answerer.model.generation_config.eos_token_id = None  # random weights: always generate new_tokens
    # random weights put all noise images within cosine 0.95 of each other: keep near-duplicates
    retriever = MultimodalRetriever(kb, rerank_candidates=args.rerank_candidates, near_duplicate_threshold=None)
    reranker = DualEncoderReranker(encoder)
    query = Image.fromarray(np.random.default_rng(9).integers(0, 256, (320, 320, 3), dtype=np.uint8))

    rows = []
    for name, pipe in (("no rerank", RAGVQAPipeline(answerer, retriever)),
                       (f"dual-encoder rerank of {args.rerank_candidates}", RAGVQAPipeline(answerer, retriever, reranker=reranker))):
        pipe("When was this landmark built?", image=query, k=3)  # warm-up
        stages: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            t = time.perf_counter()
            out = pipe("When was this landmark built?", image=query, k=3)
            total = time.perf_counter() - t
            assert len(out.references) == 3
            for k, v in {**out.timings, "total": total}.items():
                stages.setdefault(k, []).append(v)
        med = {k: statistics.median(v) for k, v in stages.items()}
        share = (med.get("retrieve", 0) + med.get("rerank", 0)) / med["total"]
        rows.append((name, med, share))

    print(f"\nmachine: {machine()}")
    print(f"KB {args.n:,} records (ViT-B/32-shaped CLIP), VLM: LLaVA with ViT-B/16 + 12x768 LM (random, fp32 CPU), "
          f"k=3, {args.new_tokens} new tokens, median of {args.rounds}\n")
    print("| setting | retrieve s | rerank s | answer s | end-to-end s | retrieval + rerank share | target |")
    print("|---|---|---|---|---|---|---|")
    for name, med, share in rows:
        print(f"| {name} | {med.get('retrieve', 0):.3f} | {med.get('rerank', 0):.3f} | {med['answer']:.3f} | "
              f"{med['total']:.3f} | {share:.1%} | <= 10% |")


if __name__ == "__main__":
    main()
