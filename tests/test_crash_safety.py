"""An ingestion SIGKILLed at random moments and re-run ends with exactly the source's valid records.

Invariants are checked with a plain Chroma client and the file system, not with mmrag's code.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chromadb
import pytest
from chromadb.config import Settings

from mmrag.retrievers import KnowledgeBase
from tests.corpus import make_bad_corpus, make_good_images

# Opens the KB (which repairs what a killed writer left), reports the raw state, then ingests. With
# "step", after each batch (the public progress callback) it reports the ids stored so far, read
# with the plain client, and waits for the test's go-ahead: the test places its kill by progress,
# not by a clock.
INGEST = textwrap.dedent("""
    import json, sys
    import chromadb
    from chromadb.config import Settings
    from mmrag.retrievers import KnowledgeBase
    kb = KnowledgeBase.open(sys.argv[1], sys.argv[2], lock_timeout=60)
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    ids = {k: sorted(raw.get_collection(n, embedding_function=None).get(include=[])["ids"]) for k, n in names.items()}
    print("opened", json.dumps({"images": ids["images"], "texts": ids["texts"],
          "journal": (kb.path / "journal.json").exists()}), flush=True)
    images = raw.get_collection(names["images"], embedding_function=None)
    def step(items_done):
        print("stored", json.dumps(sorted(images.get(include=[])["ids"])), flush=True)
        sys.stdin.readline()
    report = kb.ingest(sys.argv[3], batch_size=4, **({"progress": step} if sys.argv[4] == "step" else {}))
    print("done", json.dumps(report.to_dict()), flush=True)
""")


def _run(kb: Path, model: Path, src: Path, mode: str = "free") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", INGEST, str(kb), str(model), str(src), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _opened_state(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line.startswith("opened "), line
    return json.loads(line[len("opened "):])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun(tmp_path, tiny_clip):
    src = tmp_path / "src"
    good = make_good_images(src, 200, seed=7)
    make_bad_corpus(src / "bad")  # bad items must not disturb recovery either
    kb = tmp_path / "kb"
    # Expected ids, computed independently: plain RGB files are stored byte for byte.
    expected = {hashlib.sha256(f"{hashlib.sha256(p.read_bytes()).hexdigest()}\0{t}".encode()).hexdigest()[:32] for p, t in good}

    # Each kill lands inside the ingestion whatever the machine's speed: after a random number of
    # batches that stored records, the child gets its last go-ahead and is killed somewhere in the
    # next batch (the random pause places the moment; a fast child is caught waiting after that
    # batch). Five runs of at most 7 storing batches of 4 store at most 140 of the 200 records, so
    # no run can finish.
    rng = random.Random(20261126)
    landed: set[str] = set()  # records stored before a kill (seen by a plain client): must survive it
    for _ in range(5):
        proc = _run(kb, tiny_clip, src, "step")
        state = _opened_state(proc)
        # after every kill, the opened KB has both collections in step (repair happened on open)
        assert state["images"] == state["texts"] and not state["journal"]
        assert landed <= set(state["images"]), "records stored before the kill were lost"
        landed, stored_batches, target = set(state["images"]), 0, rng.randint(1, 6)
        while stored_batches < target:
            line = proc.stdout.readline()
            assert line.startswith("stored "), line
            now = set(json.loads(line[len("stored "):]))
            assert landed <= now
            stored_batches += now != landed
            landed = now
            proc.stdin.write("go\n")
            proc.stdin.flush()
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        assert "done" not in proc.stdout.read()
        proc.stdin.close()

    proc = _run(kb, tiny_clip, src)
    state = _opened_state(proc)
    assert state["images"] == state["texts"] and landed <= set(state["images"])
    out, _ = proc.communicate(timeout=600)  # a bound on a hang only
    assert proc.returncode == 0, out
    done = json.loads(out.split("done ", 1)[1])
    assert done["added"] + done["existing"] >= 200
    assert done["added"] > 0 and done["existing"] >= len(landed)  # the kills left work; what landed stayed

    manifest = json.loads((kb / "mmrag-kb.json").read_text())
    raw = chromadb.PersistentClient(path=str(kb / "chroma"), settings=Settings(anonymized_telemetry=False))
    cols = {k: raw.get_collection(n, embedding_function=None) for k, n in manifest["collections"].items()}
    image_ids = set(cols["images"].get(include=[])["ids"])
    text_res = cols["texts"].get(include=["metadatas"])
    good_ids = {i for i in text_res["ids"] if i in expected}
    assert good_ids == expected  # nothing lost
    assert len(text_res["ids"]) == len(set(text_res["ids"])) and set(text_res["ids"]) == image_ids  # no duplicates, in step
    referenced = {m["mmrag_image"] for m in text_res["metadatas"]}
    on_disk = {str(p.relative_to(kb / "images")) for p in (kb / "images").rglob("*") if p.is_file()}
    assert on_disk == referenced  # no orphan images, no temporary files, none missing
    assert not (kb / "journal.json").exists() and not (kb / "journal.npz").exists()
    # and it answers queries
    probe = cols["images"].get(ids=[next(iter(expected))], include=["embeddings"])["embeddings"][0]
    hit = cols["images"].query(query_embeddings=[probe], n_results=1)["ids"][0][0]
    assert hit == next(iter(expected))


# Dies (SIGKILL, no cleanup) at one precise point of the write sequence, on the third batch.
DIE_AT = textwrap.dedent("""
    import os, signal, sys
    from mmrag.retrievers import KnowledgeBase
    from mmrag.retrievers.kb import journal, store
    point, calls = sys.argv[4], {"n": 0}

    def die_on_third(fn, when):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == when and point.endswith("before"):
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*a, **k)
            if calls["n"] == when and point.endswith("after"):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    if point.startswith("image_put"):          # among the image files of a batch
        store.ImageStore.put = die_on_third(store.ImageStore.put, 10)
    elif point.startswith("collection_write"): # between the image and the text collection
        orig = store.VectorStore.write
        def write(self, ids, iv, tv, metas, docs, upsert=True):
            self.images.add(ids=list(ids), embeddings=iv, metadatas=list(metas), documents=list(docs))
            os.kill(os.getpid(), signal.SIGKILL)
        store.VectorStore.write = write if point == "collection_write_between" else die_on_third(orig, 3)
    elif point.startswith("journal"):          # the upsert journal written, nothing applied
        journal.Journal.apply = die_on_third(journal.Journal.apply, 3)
    elif point.startswith("release"):          # records written, images of an update not yet released
        orig_release = journal.Journal.release
        def release(self, relpaths):
            if relpaths:  # the update's old image
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_release(self, relpaths)
        journal.Journal.release = release
    kb = KnowledgeBase.open(sys.argv[1], sys.argv[2])
    if point.startswith("release"):
        from PIL import Image
        from mmrag.retrievers import Record
        kb.add([Record(id="upd", text="v1", image=Image.new("RGB", (8, 8), (1, 1, 1)))])
        kb.add([Record(id="upd", text="v2", image=Image.new("RGB", (8, 8), (2, 2, 2)))])
    kb.ingest(sys.argv[3], batch_size=4)
    print("survived", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["image_put_before", "image_put_after", "journal_before", "collection_write_before",
                                   "collection_write_between", "collection_write_after", "release_before"])
def test_kill_at_each_write_step_then_rerun(tmp_path, tiny_clip, point):
    src = tmp_path / "src"
    good = make_good_images(src, 20, seed=8)
    kb_path = tmp_path / "kb"
    proc = subprocess.run([sys.executable, "-c", DIE_AT, str(kb_path), str(tiny_clip), str(src), point],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr[-2000:]
    assert (kb_path / "journal.json").exists()  # it really died inside a journaled write

    kb = KnowledgeBase.open(kb_path)  # repairs
    assert not (kb_path / "journal.json").exists()
    report = kb.ingest(src, batch_size=4)
    assert report.added + report.existing == 20
    manifest = json.loads((kb_path / "mmrag-kb.json").read_text())
    raw = chromadb.PersistentClient(path=str(kb_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    cols = {k: raw.get_collection(n, embedding_function=None) for k, n in manifest["collections"].items()}
    texts = cols["texts"].get(include=["metadatas", "documents"])
    assert sorted(texts["ids"]) == sorted(cols["images"].get(include=[])["ids"])
    assert {t for _, t in good} <= set(texts["documents"])
    assert len(texts["ids"]) == 20 + (point == "release_before")  # the 20 plus the updated record
    if point == "release_before":
        [upd] = kb.get("upd")
        assert upd.text == "v2"  # the interrupted update was completed, not lost
    on_disk = {str(p.relative_to(kb_path / "images")) for p in (kb_path / "images").rglob("*") if p.is_file()}
    assert on_disk == {m["mmrag_image"] for m in texts["metadatas"]}
