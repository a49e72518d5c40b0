"""`mmrag serve` under load: 8 clients mixing search, ask (plain and streamed) and draw for
MMRAG_SERVE_LOAD_SECONDS (default 60) while a writer uploads records through POST /v1/records.
Every request must succeed and no record may be lost: the final count is exactly the initial
count plus what the writer's reports say was added, every uploaded id reads back, and the KB
verifies clean. No timing is asserted."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from mmrag.client import Client
from mmrag.pipelines.serve.app import create_app
from mmrag.pipelines.serve.keys import KeyStore
from mmrag.retrievers import KnowledgeBase, Record
from tests.serve_fixtures import COLOURS, SHAPES, build_kb, live_server, shape_image, tiny_config

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("MMRAG_SERVE_LOAD_SECONDS", "60"))
CLIENTS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models_dir, tiny_clip, tiny_sd):
    path = build_kb(tmp_path_factory.mktemp("load") / "kb", tiny_clip)
    key = KeyStore.for_kb(path).create("write", name="load test")[1]
    with live_server(create_app(tiny_config(tiny_models_dir, path), kb_path=path)) as url:
        yield url, key, path


def reader(url: str, key: str, seed: int, deadline: float, errors: list, done: dict) -> None:
    """One client: a random mix of the query endpoints until the deadline."""
    rng = random.Random(seed)
    with Client(url, api_key=key, timeout=600) as c:  # a bound on a hang, not a timing assertion
        while time.monotonic() < deadline:
            op = rng.choice(["search", "search", "image_search", "ask", "ask_stream", "draw"])
            colour, shape = rng.choice(SHAPES)
            try:
                if op == "search":
                    hits = c.retrieve(f"a {colour} {shape}", k=rng.randint(1, 8))
                    assert len(hits) >= 1
                elif op == "image_search":
                    hits = c.retrieve(shape_image(colour, shape, shift=rng.randint(0, 5)), k=3)
                    assert len(hits) >= 1
                elif op == "ask":
                    out = c.ask("What is this?", image=shape_image(colour, shape), k=2)
                    assert out.references
                elif op == "ask_stream":
                    stream = c.ask("Which colour?", image=shape_image(colour, shape), k=1, stream=True)
                    joined = "".join(stream)
                    # The library's own stream can differ from its answer where byte-level tokens split a
                    # character (U+FFFD in the answer; see test_client's xfail): only there is it not compared.
                    assert joined == stream.result.answer or "\ufffd" in stream.result.answer
                else:
                    assert len(c.draw(f"a {colour} {shape}", seed=rng.randint(0, 99)).images) == 1
                done[op] = done.get(op, 0) + 1
            except Exception as e:  # every failure is counted and shown; none is expected
                errors.append(f"{op}: {type(e).__name__}: {e}")


def writer(url: str, key: str, deadline: float, errors: list, state: dict) -> None:
    """Upload batches of new records (and now and then a batch again, which must add nothing)."""
    rng = random.Random(1234)
    colours = list(COLOURS)
    with Client(url, api_key=key, timeout=600) as c:
        while time.monotonic() < deadline:
            try:
                if state["batches"] and rng.random() < 0.2:
                    again = c.add(rng.choice(state["batches"]))
                    assert again.added == 0 and not again.rejected, again.summary()
                    state["repeats"] += 1
                    continue
                start = len(state["ids"])
                batch = [Record(id=f"load/{n}", text=f"load record {n}, a {rng.choice(colours)} shape",
                                image=shape_image(rng.choice(colours), rng.choice(["circle", "square", "star"]),
                                                  size=32 + n % 16, shift=n % 7),
                                metadata={"n": n, "batch": len(state["batches"])})
                         for n in range(start, start + rng.randint(1, 6))]
                report = c.add(batch)
                assert not report.rejected, report.summary()
                state["added"] += report.added
                state["ids"].extend(r.id for r in batch)
                state["batches"].append(batch)
            except Exception as e:
                errors.append(f"writer: {type(e).__name__}: {e}")


def test_mixed_load_with_a_concurrent_writer_loses_nothing(served):
    url, key, path = served
    with Client(url, api_key=key) as c:
        initial = c.count()
        c.retrieve("warm up", k=1), c.ask("warm up", k=1), c.draw("warm up")  # models load before the clock starts
    deadline = time.monotonic() + SECONDS
    errors: list[str] = []
    done: dict[str, int] = {}
    state = {"ids": [], "batches": [], "added": 0, "repeats": 0}
    threads = [threading.Thread(target=reader, args=(url, key, i, deadline, errors, done)) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=writer, args=(url, key, deadline, errors, state)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 900)
        assert not t.is_alive(), "a load thread hung"

    print(f"\nload: {SECONDS:g} s, {CLIENTS} clients: {dict(sorted(done.items()))}; writer: {state['added']} records "
          f"added in {len(state['batches'])} batches, {state['repeats']} batches uploaded again")
    assert errors == [], f"{len(errors)} failed requests, e.g. {errors[:5]}"
    assert state["added"] == len(state["ids"]) > 0 and state["repeats"] >= 0
    assert {"search", "ask", "draw"} <= set(done), done  # every kind of request ran
    with Client(url, api_key=key) as c:
        assert c.count() == initial + state["added"]
        found = c.get(state["ids"])
        assert [r.id for r in found] == state["ids"]  # no uploaded record lost
        assert all(r.metadata["n"] == int(r.id.split("/")[1]) for r in found)
    kb = KnowledgeBase.open(path)
    assert kb.count() == initial + state["added"]
    assert not any(kb.verify().values()), kb.verify()  # both collections and the image store agree
