"""HTTP service benchmark (a script, not a test): prints a markdown table.

One run builds a tiny-preset KB of N synthetic records (written into its collections as
benchmarks/retrieval.py does), starts a real uvicorn server on 127.0.0.1 in this process, and
measures, for the same queries:

1. ``POST /v1/search`` (threads, one ``httpx.Client`` each) against the in-process
   ``SearchPipeline(...)(...)`` at concurrency 1, 4 and 16: p50/p95 latency and requests/s. The
   in-process threads take one lock around the call, as the server's ``Service.model_lock`` does
   (the tokenizers and torch modules are not thread-safe), so both sides do the same work
   serially. Target at concurrency 1: HTTP p50 <= 1.3 x in-process p50 + 3 ms. A row for
   ``mmrag.client.Client.retrieve`` (HTTP plus building the library's Hits) at concurrency 1.
2. ``mmrag search --server URL`` (a subprocess) against a cold ``mmrag search --kb`` (a
   subprocess that loads the models): median wall time of a few runs. Target: >= 10x faster.
   A last row is the floor any CLI has: a bare ``python -c "import httpx; httpx.post(...)"``.

    python benchmarks/serve.py [--n 2000] [--queries 200] [--cli-runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import uvicorn
import yaml

from common import machine
from mmrag.client import Client
from mmrag.pipelines.builders import build_embedder
from mmrag.pipelines.config import CONFIG_DIR, load_config
from mmrag.pipelines.search import SearchPipeline
from mmrag.pipelines.serve.app import create_app
from retrieval import WORDS, build_kb, pct

ROOT = Path(__file__).resolve().parent.parent
# `mmrag` with `--server` on `search`: pipelines/cli.py as it is, plus the flags and the dispatch
# that the wiring adds (a no-op once cli.py has them), then the CLI's own main().
CLI = """
import argparse, sys
from mmrag.pipelines import cli
from mmrag.pipelines.client_cli import add_server_arguments, search_via_server

build = cli.build_parser

def wired():
    parser = build()
    search = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["search"]
    if not any("--server" in a.option_strings for a in search._actions):
        add_server_arguments(search)
        for action in search._actions:
            if "--kb" in action.option_strings:
                action.required = False
        local = cli._COMMANDS["search"]
        cli._COMMANDS["search"] = lambda args: search_via_server(args) if args.server else local(args)
    return parser

cli.build_parser = wired
sys.exit(cli.main(sys.argv[1:]))
"""
FLOOR = "import httpx, sys; r = httpx.post(sys.argv[1] + '/v1/search', json={'text': sys.argv[2], 'k': 10}); " \
        "r.raise_for_status(); print(len(r.json()['hits']))"


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread of this process, on a port bound here."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def run_threads(concurrency: int, queries: list[str], call) -> tuple[list[float], float]:
    """``call(worker_state, query)`` for every query, spread over ``concurrency`` threads that
    start together; returns each call's seconds and the wall time of the whole batch."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def work(mine: list[str]) -> None:
        state: dict = {}
        barrier.wait()
        own = []
        for q in mine:
            t = time.perf_counter()
            call(state, q)
            own.append(time.perf_counter() - t)
        if "client" in state:
            state["client"].close()
        with lock:
            latencies.extend(own)

    threads = [threading.Thread(target=work, args=(queries[i::concurrency],)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def wall(argv: list[str], runs: int) -> tuple[float, str]:
    """Median wall seconds of ``argv`` as a subprocess, and its last stdout (checked for exit 0)."""
    times, out = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:4]}... failed: {proc.stderr[-2000:]}")
        out = proc.stdout
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="records in the KB (default 2000)")
    ap.add_argument("--queries", type=int, default=200, help="queries per measurement (default 200)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--cli-runs", type=int, default=3, help="subprocess runs per CLI measurement (median)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmrag-bench-serve-"))
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["kb"] = {"path": str(tmp / "kb")}
    config_file = tmp / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(data))
    cfg = load_config(config_file)

    t = time.perf_counter()
    build_kb(tmp / "kb", build_embedder(cfg), args.n)
    build_s = time.perf_counter() - t
    rng = random.Random(1)
    queries = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(args.queries)]
    pipe = SearchPipeline.from_config(cfg)
    model_lock = threading.Lock()

    def in_process(state: dict, q: str) -> None:
        with model_lock:
            pipe(q, k=10)

    rows, cli_rows = [], []
    with LiveServer(create_app(cfg, kb_path=tmp / "kb")) as live:
        def over_http(state: dict, q: str) -> None:
            c = state.get("client") or state.setdefault("client", httpx.Client(base_url=live.url, timeout=600))
            c.post("/v1/search", json={"text": q, "k": 10}).raise_for_status()

        def through_client(state: dict, q: str) -> None:
            c = state.get("client") or state.setdefault("client", Client(live.url, timeout=600))
            c.retrieve(q, k=10)

        for q in queries[:10]:  # warm up: models loaded, HNSW and BM25 indexes built, connections open
            in_process({}, q)
            over_http({}, q)
        for c in args.concurrency:
            measured = {"in-process `SearchPipeline(...)(...)`": in_process, "`POST /v1/search` (httpx)": over_http}
            if c == 1:
                measured["`mmrag.client.Client.retrieve`"] = through_client
            for name, call in measured.items():
                latencies, seconds = run_threads(c, queries, call)
                rows.append((c, name, pct(latencies, 50), pct(latencies, 95), len(queries) / seconds))

        query = "a striped star"
        cold_s, cold_out = wall([sys.executable, "-m", "mmrag.pipelines.cli", "search", query, "--kb", str(tmp / "kb"),
                                 "--config", str(config_file)], args.cli_runs)
        warm_s, warm_out = wall([sys.executable, "-c", CLI, "search", query, "--server", live.url], args.cli_runs)
        floor_s, _ = wall([sys.executable, "-c", FLOOR, live.url, query], args.cli_runs)
        same = "same table" if cold_out == warm_out else "TABLES DIFFER"
        cli_rows = [("cold `mmrag search --kb` (loads the models)", cold_s, 1.0, ""),
                    (f"`mmrag search --server` ({same})", warm_s, cold_s / warm_s, ">= 10x"),
                    ("floor: bare `python -c 'import httpx; httpx.post(...)'`", floor_s, cold_s / floor_s, "")]

    print(f"\nmachine: {machine()}")
    print(f"{args.n:,} records (synthetic {cfg.embedder.model} vectors, 6-word texts), {args.queries} text queries, "
          f"k=10, reranker {cfg.reranker.name or 'none'}; KB written in {build_s:.1f}s; server: uvicorn in this "
          "process on 127.0.0.1\n")
    print("| concurrency | measure | p50 ms | p95 ms | requests/s | target |")
    print("|---|---|---|---|---|---|")
    base = {c: p50 for c, name, p50, _, _ in rows if name.startswith("in-process")}
    for c, name, p50, p95, rps in rows:
        target = ""
        if c == 1 and "POST" in name:
            limit = 1.3 * base[1] + 3.0
            target = f"<= 1.3x + 3 ms = {limit:.2f} ms: {'met' if p50 <= limit else 'MISSED'} ({p50 / base[1]:.2f}x)"
        print(f"| {c} | {name} | {p50:.2f} | {p95:.2f} | {rps:.0f} | {target} |")
    print("\n| command | median wall s | speed-up vs cold | target |")
    print("|---|---|---|---|")
    for name, seconds, speedup, target in cli_rows:
        met = f": {'met' if speedup >= 10 else 'MISSED'}" if target else ""
        print(f"| {name} | {seconds:.2f} | {speedup:.1f}x | {target}{met} |")


if __name__ == "__main__":
    main()
