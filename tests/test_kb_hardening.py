"""Hardening of the knowledge base against what Chroma refuses, against paths read back from Chroma,
against leftovers of killed writers and against two processes creating one KB.

State is checked with a plain Chroma client and the file system, not with the KB's own accessors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from PIL import Image

from mmrag.retrievers import KnowledgeBase, KnowledgeBaseLockedError, MultimodalRetriever, NotAKnowledgeBaseError, Record
from mmrag.retrievers import errors
from mmrag.retrievers.kb import store
from tests.test_server_mode import chroma_url  # noqa: F401  (the `chroma run` server fixture)

HEALTHY = {"only_in_texts": [], "only_in_images": [], "missing_images": [], "orphan_images": [], "unsafe_paths": []}


def raw_collections(kb_path: Path):
    manifest = json.loads((kb_path / "mmrag-kb.json").read_text())
    client = chromadb.PersistentClient(path=str(kb_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    names = manifest["collections"]
    return (client.get_collection(names["images"], embedding_function=None),
            client.get_collection(names["texts"], embedding_function=None))


def stored_files(kb_path: Path) -> set[str]:
    root = kb_path / "images"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def leftover_temp_files(kb_path: Path) -> list[str]:
    return sorted(str(p.relative_to(kb_path)) for p in kb_path.rglob("*")
                  if p.is_file() and (p.name.endswith(".tmp") or ".tmp" in p.relative_to(kb_path).parts))


def image(i: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (i * 7 % 256, i * 13 % 256, i * 29 % 256))


# ------------------------------------------------------------------------- 1. what Chroma refuses
# Each of these makes Chroma 1.5 refuse the whole batch it is in (measured: InvalidArgumentError
# for "$"/"#"-keys and "", ValueError for "chroma:document", UnicodeEncodeError for lone
# surrogates) or store something else than was given (ints outside int64 come back as floats).
REFUSED = {
    "dollar-key": ({"$and": 1}, "'$and'"),
    "hash-key": ({"#x": 1}, "'#x'"),
    "chroma-key": ({"chroma:document": "x"}, "'chroma:document'"),
    "int-over": ({"n": 2**63}, "int64"),
    "int-under": ({"n": -(2**63) - 1}, "int64"),
    "surrogate-key": ({"k\udcff": 1}, "UTF-8"),
    "surrogate-value": ({"k": "caf\udce9"}, "UTF-8"),
    "surrogate-in-list": ({"k": ["caf\udce9"]}, "UTF-8"),
}


def test_metadata_chroma_refuses_is_rejected_and_the_good_records_land(kb):
    # accepted as they are: "$" and "#" inside a key, the int64 bounds
    edge = {"a$b": 1, "x#": "y", "max": 2**63 - 1, "min": -(2**63)}
    records = [Record(id="good-1", text="good one", image=image(1), metadata=edge)]
    records += [Record(id=name, text=f"bad {name}", image=image(10 + i), metadata=meta)
                for i, (name, (meta, _)) in enumerate(REFUSED.items())]
    records.append(Record(id="good-2", text="good two", image=image(2)))
    report = kb.add(records, batch_size=64)  # one batch: the bad records must not cost the good ones

    assert (report.added, len(report.rejected)) == (2, len(REFUSED))
    reasons = {r.ref: r.reason for r in report.rejected}
    for i, (name, (_, says)) in enumerate(REFUSED.items()):
        assert says in reasons[f"records[{i + 1}]"], (name, reasons[f"records[{i + 1}]"])
    assert not (kb.path / "journal.json").exists()
    images_col, texts_col = raw_collections(kb.path)
    got = texts_col.get(include=["metadatas"])
    assert sorted(got["ids"]) == sorted(images_col.get(include=[])["ids"]) == ["good-1", "good-2"]
    meta = got["metadatas"][got["ids"].index("good-1")]
    assert {k: (meta[k], type(meta[k])) for k in edge} == {k: (v, type(v)) for k, v in edge.items()}
    assert stored_files(kb.path) == {m["mmrag_image"] for m in got["metadatas"]}
    reopened = KnowledgeBase.open(kb.path)
    assert reopened.count() == 2 and reopened.verify() == HEALTHY


def test_a_write_chroma_refuses_for_a_rule_we_do_not_check_costs_only_its_record(kb, monkeypatch):
    """Chroma may refuse what our checks let through (a rule added in a later Chroma): the write is
    rolled back, the refused record is rejected with Chroma's reason, the others land, and the
    journal is clear (nothing replays it on the next open)."""
    monkeypatch.setattr(store, "_check_key", lambda key: None, raising=False)  # as if "$" were allowed
    records = [Record(id=f"r{i}", text=f"record {i}", image=image(i)) for i in range(5)]
    records[3] = Record(id="r3", text="record 3", image=image(3), metadata={"$and": 1})
    report = kb.add(records)
    assert report.added == 4 and [r.ref for r in report.rejected] == ["records[3]"]
    assert "Chroma refused" in report.rejected[0].reason
    assert not (kb.path / "journal.json").exists() and not (kb.path / "journal.npz").exists()
    images_col, texts_col = raw_collections(kb.path)
    assert sorted(texts_col.get(include=[])["ids"]) == sorted(images_col.get(include=[])["ids"]) == ["r0", "r1", "r2", "r4"]
    assert KnowledgeBase.open(kb.path).verify() == HEALTHY  # the refused record's image was released


def test_a_replay_chroma_refuses_is_rolled_back_and_kept_in_reports(kb, caplog):
    """A journal an older mmrag left (or one a new Chroma refuses): the open rolls it back, keeps
    a copy under reports/, and the KB stays usable."""
    kb.add([Record(id="keep", text="a kept record", image=image(1)),
            Record(id="upd", text="before the update", image=image(2))])
    images_col, texts_col = raw_collections(kb.path)
    old_upd = texts_col.get(ids=["upd"], include=["metadatas"])["metadatas"][0]
    # the state a killed writer left: images stored, "half" in the image collection only
    metas, vectors = [], np.ones((3, kb.dim), np.float32) / np.sqrt(kb.dim)
    for rid, extra in (("half", {}), ("upd", {}), ("bad", {"$and": 1})):
        data = f"image of {rid}".encode()
        sha = hashlib.sha256(data).hexdigest()
        rel = kb.images.put(data, sha, ".jpg")
        metas.append({"mmrag_image": rel, "mmrag_sha256": sha, "mmrag_source": "records", **extra})
    images_col.add(ids=["half"], embeddings=vectors[:1], metadatas=metas[:1], documents=["half"])
    entry = {"op": "upsert", "ids": ["half", "upd", "bad"], "metadatas": metas, "documents": ["half", "upd", "bad"],
             "new": [True, False, True], "release": [old_upd["mmrag_image"]]}
    kb.journal.record(entry, vectors={"images": vectors, "texts": vectors})

    with caplog.at_level(logging.WARNING):
        again = KnowledgeBase.open(kb.path)
    assert not (kb.path / "journal.json").exists() and not (kb.path / "journal.npz").exists()
    [kept] = list((kb.path / "reports").glob("failed-journal-*.json"))
    assert json.loads(kept.read_text()) == entry
    with np.load(kept.with_suffix(".npz")) as v:
        np.testing.assert_array_equal(v["images"], vectors)
    assert str(kept) in caplog.text
    # rolled back: no record of the batch half written, "upd" as it was, its batch's images released
    got = texts_col.get(include=["metadatas", "documents"])
    assert sorted(images_col.get(include=[])["ids"]) == sorted(got["ids"]) == ["keep", "upd"]
    assert got["documents"][got["ids"].index("upd")] == "before the update"
    assert stored_files(kb.path) == {m["mmrag_image"] for m in got["metadatas"]}
    assert again.count() == 2 and again.verify() == HEALTHY
    assert MultimodalRetriever(again, channels=["text_to_text"]).retrieve("a kept record", k=1)[0].id == "keep"
    assert again.add([Record(text="after", image=image(3))]).added == 1


# ------------------------------------------------------------------------- 2. paths read from Chroma
def test_an_image_path_outside_the_store_is_never_read_or_deleted(kb, tmp_path):
    """Anyone who can write to a (shared) Chroma can set ``mmrag_image``; the KB must not follow it."""
    kb.add([Record(id=rid, text=f"text of {rid}", image=image(i)) for i, rid in enumerate(("x", "y", "z"))])
    outside, absolute = tmp_path / "outside.txt", tmp_path / "absolute.txt"
    outside.write_text("not the KB's")
    absolute.write_text("not the KB's either")
    planted = {"x": "../../outside.txt", "y": "../../outside.txt", "z": str(absolute)}
    originals = stored_files(kb.path)  # orphaned by the planting: nothing points at them any more
    for col in raw_collections(kb.path):
        got = col.get(ids=list(planted), include=["metadatas"])
        col.update(ids=got["ids"], metadatas=[{**m, "mmrag_image": planted[i]} for i, m in zip(got["ids"], got["metadatas"])])

    report = kb.add([Record(id="x", text="x, updated", image=image(9))])  # an update releases x's old image
    assert outside.read_text() == "not the KB's"
    assert report.updated == 1 and any("outside the image store" in n for n in report.notes)
    assert kb.verify()["unsafe_paths"] == ["y", "z"]
    with pytest.raises(errors.UnsafePathError, match="'y'.*outside.txt"):
        kb.get("y")
    with pytest.raises(errors.UnsafePathError):
        MultimodalRetriever(kb, channels=["text_to_text"]).retrieve("text of z", k=3)
    assert kb.delete(["y", "z"]) == 2  # deleting the records is the fix, and leaves the files alone
    assert outside.exists() and absolute.exists()
    assert kb.get("x")[0].text == "x, updated" and kb.verify() == {**HEALTHY, "orphan_images": sorted(originals)}


@pytest.mark.server
def test_a_path_planted_on_a_shared_server_is_left_alone(tmp_path, chroma_url, clip_encoder):
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder, url=chroma_url)
    kb.add([Record(id="x", text="on the server", image=image(1))])
    original = stored_files(kb.path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    # another client of the server, not mmrag
    client = chromadb.HttpClient(host="127.0.0.1", port=int(chroma_url.rsplit(":", 1)[1]),
                                 settings=Settings(anonymized_telemetry=False))
    for name in kb.manifest["collections"].values():
        col = client.get_collection(name, embedding_function=None)
        [meta] = col.get(ids=["x"], include=["metadatas"])["metadatas"]
        col.update(ids=["x"], metadatas=[{**meta, "mmrag_image": str(victim)}])
    assert kb.verify()["unsafe_paths"] == ["x"]
    assert kb.add([Record(id="x", text="updated", image=image(2))]).updated == 1
    assert victim.read_text() == "keep me"
    assert kb.verify() == {**HEALTHY, "orphan_images": sorted(original)}


# ------------------------------------------------------------------------- 3. leftovers of killed writers
def test_a_creation_killed_before_the_manifest_rename_is_redone(tmp_path, clip_encoder):
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    # the leftovers of a creation killed between writing the manifest's temp file and its rename
    (kb.path / "mmrag-kb.json").rename(kb.path / ".mmrag-kb.json.4242.tmp")
    (kb.path / ".writer.json.4242.tmp").write_text("{")
    again = KnowledgeBase.open(kb.path, clip_encoder)
    assert again.add([Record(text="t", image=image(1))]).added == 1
    assert leftover_temp_files(kb.path) == []
    # a folder with anything else in it is still refused
    (kb.path / "mmrag-kb.json").unlink()
    with pytest.raises(NotAKnowledgeBaseError, match="not an mmrag knowledge base"):
        KnowledgeBase.open(kb.path, clip_encoder)


def test_temp_files_of_killed_writes_are_cleaned_on_open(kb):
    kb.add([Record(text="t", image=image(1))])
    left = [".journal.json.4242.tmp", ".revision.4242.tmp", ".writer.json.4242.tmp", ".journal.npz.tmp"]
    for name in left:
        (kb.path / name).write_text("partial")
    (kb.path / "images" / ".tmp").mkdir(exist_ok=True)
    (kb.path / "images" / ".tmp" / "0123.jpg").write_bytes(b"partial")
    not_ours = kb.path / ".hubness.npz.4242.tmp"  # a derived index's temp file: its writer owns it
    not_ours.write_text("partial")
    (kb.path / "journal.npz").write_bytes(b"vectors of a completed journal")  # killed between its unlinks
    KnowledgeBase.open(kb.path)
    assert leftover_temp_files(kb.path) == [not_ours.name]
    assert not (kb.path / "journal.npz").exists()


HOLD_LOCK = textwrap.dedent("""
    import sys
    from mmrag.retrievers import KnowledgeBase
    kb = KnowledgeBase.open(sys.argv[1])
    with kb.journal.write_lock():
        (kb.path / sys.argv[2]).write_text("being written")
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_a_live_writers_temp_file_is_left_alone(kb):
    kb.add([Record(text="t", image=image(1))])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(kb.path), ".journal.json.777.tmp"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        KnowledgeBase.open(kb.path)
        assert (kb.path / ".journal.json.777.tmp").read_text() == "being written"
    finally:
        holder.kill()
        holder.wait()
    KnowledgeBase.open(kb.path)  # the holder is gone: now it is a killed writer's leftover
    assert leftover_temp_files(kb.path) == []


# ------------------------------------------------------------------------- 4. creation takes the lock
# Creates a KB and stops inside the creation (collections made, manifest not yet written) until the
# test writes a line.
PAUSED_CREATION = textwrap.dedent("""
    import sys
    from mmrag.retrievers import KnowledgeBase
    from mmrag.retrievers.kb import knowledge_base
    connect = knowledge_base._connect
    def paused(*args, **kwargs):
        vectors = connect(*args, **kwargs)
        print("creating", flush=True)
        sys.stdin.readline()
        return vectors
    knowledge_base._connect = paused
    kb = KnowledgeBase.open(sys.argv[1], sys.argv[2])
    print("created", kb.manifest["kb_id"], flush=True)
""")


def test_a_second_creator_gets_the_lock_error_or_waits_for_the_first(tmp_path, tiny_clip, clip_encoder):
    path = tmp_path / "kb"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_CREATION, str(path), str(tiny_clip)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "creating"
        with pytest.raises(KnowledgeBaseLockedError) as e:
            KnowledgeBase.open(path, clip_encoder)
        assert f"pid {first.pid}" in str(e.value) and "lock_timeout" in str(e.value)
        # a creator that waits opens the KB the first one made, whenever it reaches the lock
        waited: dict = {}
        waiter = threading.Thread(target=lambda: waited.update(kb=KnowledgeBase.open(path, clip_encoder, lock_timeout=600)))
        waiter.start()
        first.stdin.write("go\n")
        first.stdin.flush()
        out, _ = first.communicate(timeout=600)
        waiter.join(timeout=600)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0 and out.startswith("created ")
    kb_id = out.split()[1]
    assert waited["kb"].manifest["kb_id"] == kb_id == json.loads((path / "mmrag-kb.json").read_text())["kb_id"]
    assert waited["kb"].add([Record(text="t", image=image(1))]).added == 1


# Both creators start together: each says "ready" and waits for the test's "go".
RACING_CREATOR = textwrap.dedent("""
    import json, sys
    from mmrag.retrievers import KnowledgeBase, DualEncoder
    embedder = DualEncoder(sys.argv[2], device="cpu").warm_up()
    print("ready", flush=True)
    sys.stdin.readline()
    kb = KnowledgeBase.open(sys.argv[1], embedder, lock_timeout=600)
    print(json.dumps({"kb_id": kb.manifest["kb_id"], "count": kb.count()}), flush=True)
""")


def test_two_processes_creating_one_kb_at_once_share_it(tmp_path, tiny_clip):
    path = tmp_path / "kb"
    procs = [subprocess.Popen([sys.executable, "-c", RACING_CREATOR, str(path), str(tiny_clip)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    kb_ids = {json.loads(out)["kb_id"] for out, _ in results}
    assert kb_ids == {json.loads((path / "mmrag-kb.json").read_text())["kb_id"]}
    images_col, texts_col = raw_collections(path)
    assert images_col.metadata["mmrag_kb"] == texts_col.metadata["mmrag_kb"] == kb_ids.pop()
