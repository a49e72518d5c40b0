"""Distributed-ingest benchmark (a script, not a test): prints markdown tables.

1. Items/s of the serial ``kb.ingest`` against ``ray_ingest`` with 1 and 2 embedding actors on
   this machine, one run each in the same process, into fresh KBs, with the ratio to serial. A Ray
   run's time counts its actors' start (each loads the model) but not starting Ray itself.
2. The write ceiling: records/s into a ``chroma run`` server (127.0.0.1) with batched adds of
   unit vectors, metadata and documents into two collections (what the KB writes per record),
   against the same adds into embedded Chroma. Past the embedding, this is where a bigger cluster
   stops helping (see README, Scale).

The dual encoder has the ViT-B/32 shape with random weights (no download).

    python benchmarks/ray_ingest.py [--n 512] [--px 256] [--writes 20000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin on 2 shared cores

import numpy as np

from common import machine
from ingest import make_images
from mmrag.pipelines.dev.tiny_models import build_dual_encoder
from mmrag.pipelines.scale.ingest import ray_ingest
from mmrag.pipelines.scale.ray_runtime import init_ray
from mmrag.retrievers import DualEncoder, KnowledgeBase
from mmrag.retrievers.kb.store import make_client


def timed_ingest(tmp: Path, name: str, model: Path, src: Path, batch_size: int, actors: int | None) -> float:
    kb = KnowledgeBase.open(tmp / name, DualEncoder(model, device="cpu"))
    start = time.perf_counter()
    if actors is None:
        report = kb.ingest(src, batch_size=batch_size)
    else:
        report = ray_ingest(kb, src, concurrency=actors, batch_size=batch_size)
    seconds = time.perf_counter() - start
    assert report.added == kb.count() and not report.rejected, report.summary()
    return report.added / seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rate(client, n: int, dim: int, rng: np.random.Generator) -> float:
    """Records/s of batched adds into two fresh collections (images, texts), as the KB writes them."""
    suffix = f"{time.monotonic_ns()}"
    cols = [client.create_collection(f"bench-{which}-{suffix}", embedding_function=None,
                                     configuration={"hnsw": {"space": "cosine"}}) for which in ("img", "txt")]
    step = min(client.get_max_batch_size(), 1000)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"r{i:08d}" for i in range(n)]
    metas = [{"image": f"ab/{i:064x}.jpg", "sha256": f"{i:064x}", "source": "bench"} for i in range(n)]
    docs = [f"record {i}: a caption of about ten words for the benchmark" for i in range(n)]
    start = time.perf_counter()
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        for col in cols:
            col.add(ids=ids[lo:hi], embeddings=vectors[lo:hi], metadatas=metas[lo:hi], documents=docs[lo:hi])
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="images to ingest per run (default 512)")
    ap.add_argument("--px", type=int, default=256, help="source image size (default 256)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--writes", type=int, default=20_000, help="records written for the ceiling (default 20000)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-ray-"))
    try:
        model = build_dual_encoder(tmp / "models", family="clip", size="base")
        src = tmp / "src"
        make_images(src, args.n, args.px)
        init_ray(None)  # started once, outside the timed runs

        rates = {"serial `kb.ingest`": timed_ingest(tmp, "serial", model, src, args.batch_size, None)}
        for actors in (1, 2):
            rates[f"`ray_ingest`, {actors} embedding actor{'s' if actors > 1 else ''}"] = timed_ingest(
                tmp, f"ray-{actors}", model, src, args.batch_size, actors)

        print(f"\nmachine: {machine()}")
        print(f"{args.n} JPEGs of {args.px}x{args.px} px, ViT-B/32-shape CLIP (random weights), batch "
              f"{args.batch_size}, local Ray on this machine\n")
        print("| run | items/s | vs serial |")
        print("|---|---|---|")
        base = rates["serial `kb.ingest`"]
        for name, rate in rates.items():
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")

        rng = np.random.default_rng(0)
        port = free_port()
        server = subprocess.Popen([shutil.which("chroma") or "chroma", "run", "--host", "127.0.0.1", "--port",
                                   str(port), "--path", str(tmp / "chroma-server")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    remote = make_client(url=f"http://127.0.0.1:{port}")
                    remote.heartbeat()
                    break
                except Exception:
                    if time.monotonic() > deadline or server.poll() is not None:
                        sys.exit("chroma run did not start")
                    time.sleep(0.5)
            server_rate = write_rate(remote, args.writes, 512, rng)
        finally:
            server.terminate()
            server.wait(timeout=30)
        embedded_rate = write_rate(make_client(tmp / "chroma-embedded"), args.writes, 512, rng)
        print(f"\nWrite ceiling: {args.writes:,} records of 512-d vectors + metadata + text into two collections\n")
        print("| Chroma | records/s |")
        print("|---|---|")
        print(f"| server (`chroma run`, 127.0.0.1, batched `add`) | {server_rate:,.0f} |")
        print(f"| embedded (`PersistentClient`, batched `add`) | {embedded_rate:,.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
