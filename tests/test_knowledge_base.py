"""KnowledgeBase: ingestion, ids, metadata, delete, manifest and lock, checked against raw Chroma,
the raw transformers model and the files on disk (not against the KB's own accessors)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import chromadb
import filelock
import numpy as np
import pytest
import torch
from chromadb.config import Settings
from PIL import Image
from transformers import AutoModel, AutoProcessor

from mmrag.retrievers import (
    ConfigError,
    EmbedderMismatchError,
    KnowledgeBase,
    KnowledgeBaseLockedError,
    NotAKnowledgeBaseError,
    Record,
    SchemaVersionError,
)
from tests.corpus import make_bad_corpus, make_good_images


# Vectors an ingestion stored (embedded in its batches of 5, kept as float32 by Chroma) vs the raw
# model on all 12 images at once: float32 noise, measured at most 1.5e-7 for the dual encoders
# (CLIP and SigLIP, batch sizes 1, 2, 3 and 5, threads 1 and 2, AVX-512 and AVX2 kernels); real bugs
# (pixels not normalised, another resampling filter) move them by 6.7e-2 or more. 1e-5 sits 65x
# above the noise and 6,700x below the smallest bug.
VECTOR_ATOL = 1e-5


def raw_collections(kb_path: Path):
    """The KB's two collections through a plain Chroma client (independent of mmrag's store code)."""
    manifest = json.loads((kb_path / "mmrag-kb.json").read_text())
    client = chromadb.PersistentClient(path=str(kb_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    names = manifest["collections"]
    return (client.get_collection(names["images"], embedding_function=None),
            client.get_collection(names["texts"], embedding_function=None))


def stored_files(kb_path: Path) -> set[str]:
    root = kb_path / "images"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}


def reference_vectors(model_dir: Path, images: list[Image.Image], texts: list[str]):
    """What the vectors must be: the raw HF model, normalised with numpy."""
    model = AutoModel.from_pretrained(model_dir).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        iv = model.get_image_features(**proc(images=images, return_tensors="pt")).pooler_output.numpy()
        tv = model.get_text_features(**proc(text=texts, return_tensors="pt", padding=True, truncation=True)).pooler_output.numpy()
    return iv / np.linalg.norm(iv, axis=1, keepdims=True), tv / np.linalg.norm(tv, axis=1, keepdims=True)


def test_ingest_folder_stores_exact_vectors_ids_and_images(kb, tmp_path, tiny_clip):
    good = make_good_images(tmp_path / "src", 12, seed=1)
    report = kb.ingest(tmp_path / "src", batch_size=5)
    assert (report.added, report.existing, len(report.rejected)) == (12, 0, 0)

    images_col, texts_col = raw_collections(kb.path)
    assert images_col.count() == texts_col.count() == 12
    got_i = images_col.get(include=["embeddings", "metadatas", "documents"])
    got_t = texts_col.get(ids=got_i["ids"], include=["embeddings"])
    by_text = {doc: i for i, doc in enumerate(got_i["documents"])}
    for path, text in good:
        i = by_text[text]
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()  # plain RGB files are stored byte for byte
        meta = got_i["metadatas"][i]
        assert meta["mmrag_sha256"] == sha
        assert (kb.path / "images" / meta["mmrag_image"]).read_bytes() == data
        assert got_i["ids"][i] == hashlib.sha256(f"{sha}\0{text}".encode()).hexdigest()[:32]

    ims = [Image.open(kb.path / "images" / m["mmrag_image"]).convert("RGB") for m in got_i["metadatas"]]
    ref_i, ref_t = reference_vectors(tiny_clip, ims, got_i["documents"])
    np.testing.assert_allclose(np.asarray(got_i["embeddings"]), ref_i, atol=VECTOR_ATOL)
    np.testing.assert_allclose(np.asarray(got_t["embeddings"]), ref_t, atol=VECTOR_ATOL)
    # cosine space, as the retrievers assume
    assert images_col.configuration["hnsw"]["space"] == texts_col.configuration["hnsw"]["space"] == "cosine"


def test_reingest_adds_nothing_and_reopen_keeps_everything(kb, tmp_path, clip_encoder):
    make_good_images(tmp_path / "src", 6, seed=2)
    assert kb.ingest(tmp_path / "src").added == 6
    again = kb.ingest(tmp_path / "src")
    assert (again.added, again.existing, again.updated) == (0, 6, 0)
    reopened = KnowledgeBase.open(kb.path)  # no embedder: the manifest's one
    assert reopened.count() == 6
    assert reopened.embedder.model_id == clip_encoder.model_id


def test_duplicates_within_one_source_are_counted_once(kb, tmp_path):
    im = Image.new("RGB", (20, 20), (10, 200, 30))
    recs = [Record(text="same", image=im), Record(text="same", image=im.copy()), Record(text="other", image=im)]
    report = kb.add(recs)
    assert (report.added, report.duplicates) == (2, 1)
    assert len(stored_files(kb.path)) == 1  # one image shared by two records


def test_user_ids_metadata_roundtrip_and_filters(kb):
    im = Image.new("RGB", (24, 24), (200, 10, 10))
    meta = {"breed": "chortai", "year": 1999, "score": 0.5, "ok": True, "tags": ["a", "b"], "nested": {"x": 1}, "none": None}
    kb.add([Record(id="dog-1", text="a red dog", image=im, metadata=meta),
            Record(id="dog-2", text="a blue dog", image=Image.new("RGB", (24, 24), (0, 0, 200)), metadata={"breed": "other"})])
    [rec] = kb.get(["dog-1"])
    assert rec.id == "dog-1" and rec.text == "a red dog" and rec.metadata == meta
    assert Path(rec.image).is_file()
    assert [r.id for r in kb.get(["missing", "dog-2", "dog-1"])] == ["dog-2", "dog-1"]
    _, texts_col = raw_collections(kb.path)
    assert texts_col.get(where={"breed": "chortai"})["ids"] == ["dog-1"]
    assert texts_col.get(where={"year": {"$gt": 1990}})["ids"] == ["dog-1"]


def test_update_by_user_id_replaces_record_and_releases_old_image(kb):
    kb.add([Record(id="x", text="v1", image=Image.new("RGB", (16, 16), (1, 2, 3)))])
    old = stored_files(kb.path)
    report = kb.add([Record(id="x", text="v2", image=Image.new("RGB", (16, 16), (9, 9, 9)))])
    assert report.updated == 1 and kb.count() == 1
    assert kb.get("x")[0].text == "v2"
    new = stored_files(kb.path)
    assert len(new) == 1 and not (old & new)


def test_delete_removes_both_vectors_and_only_unreferenced_images(kb):
    shared = Image.new("RGB", (16, 16), (50, 60, 70))
    kb.add([Record(id="a", text="one", image=shared), Record(id="b", text="two", image=shared),
            Record(id="c", text="three", image=Image.new("RGB", (16, 16), (0, 255, 0)))])
    assert len(stored_files(kb.path)) == 2
    assert kb.delete(["a", "c", "not-there"]) == 2
    images_col, texts_col = raw_collections(kb.path)
    assert images_col.get()["ids"] == texts_col.get()["ids"] == ["b"]
    files = stored_files(kb.path)
    assert files == {texts_col.get()["metadatas"][0]["mmrag_image"]}  # the shared image stays for "b"
    assert kb.delete("b") == 1 and stored_files(kb.path) == set() and kb.count() == 0


def test_200_good_and_bad_files_every_bad_item_explained(kb, tmp_path):
    src = tmp_path / "src"
    make_good_images(src, 200, seed=3)
    expected = make_bad_corpus(src / "bad")
    kb.max_image_pixels = 100_000  # the corpus's decompression bomb is sized against this limit
    report = kb.ingest(src, batch_size=32)
    rejects = {k for k, v in expected.items() if v.startswith("reject:")}
    accepts = {k for k, v in expected.items() if v.startswith("accept:")}
    assert report.added == 200 + len(accepts)
    reasons = {r.ref: r.reason for r in report.rejected}
    assert set(reasons) == {f"bad/{rel}" for rel in rejects}  # exactly the bad items, each once
    for rel in rejects:
        assert expected[rel][len("reject:"):] in reasons[f"bad/{rel}"], (rel, reasons[f"bad/{rel}"])
    for rel in accepts:
        assert expected[rel][len("accept:"):] in " ".join(report.notes)
    again = kb.ingest(src, batch_size=32)
    assert again.added == 0 and again.existing == report.added
    assert kb.verify() == {"only_in_texts": [], "only_in_images": [], "missing_images": [], "orphan_images": [],
                           "unsafe_paths": []}


def test_long_text_is_truncated_and_counted(kb, clip_encoder):
    long = " ".join(["word"] * (clip_encoder.max_text_tokens * 3))
    report = kb.add([Record(text=long, image=Image.new("RGB", (16, 16))), Record(text="short", image=Image.new("RGB", (16, 16)))])
    assert report.added == 2 and report.texts_truncated == 1
    assert len(kb.get(kb.vectors.all_ids())) == 2


def test_embedder_mismatch_names_both(kb, tiny_siglip, clip_encoder):
    kb.add([Record(text="t", image=Image.new("RGB", (16, 16)))])
    with pytest.raises(EmbedderMismatchError) as e:
        KnowledgeBase.open(kb.path, str(tiny_siglip))
    assert clip_encoder.model_id in str(e.value) and str(Path(tiny_siglip).resolve()) in str(e.value)


def test_not_a_kb_and_missing_kb_and_schema(tmp_path, clip_encoder):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    with pytest.raises(NotAKnowledgeBaseError, match="not an mmrag knowledge base"):
        KnowledgeBase.open(junk, clip_encoder)
    with pytest.raises(NotAKnowledgeBaseError, match="mmrag ingest"):
        KnowledgeBase.open(tmp_path / "nothing", create=False)
    with pytest.raises(ConfigError, match="embedder"):
        KnowledgeBase.open(tmp_path / "new")
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    manifest = json.loads((kb.path / "mmrag-kb.json").read_text())
    assert manifest["embedder"] == {"model_id": clip_encoder.model_id, "dim": clip_encoder.dim}
    assert manifest["schema_version"] == 1 and manifest["library_version"]
    manifest["schema_version"] = 99
    (kb.path / "mmrag-kb.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="99"):
        KnowledgeBase.open(kb.path)


def test_ingest_rejects_bad_arguments(kb, tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        kb.ingest(tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="source"):
        kb.ingest(tmp_path / "does-not-exist")


# Holds the writer lock until the test writes a line, then reports what the KB held at that moment.
HOLD_LOCK = textwrap.dedent("""
    import sys
    from mmrag.retrievers import KnowledgeBase
    kb = KnowledgeBase.open(sys.argv[1])
    with kb.journal.write_lock():
        print("locked", flush=True)
        sys.stdin.readline()
        print("releasing with", kb.count(), "records", flush=True)
    print("released", flush=True)
""")


def test_second_writer_gets_a_clear_error_or_waits(kb, monkeypatch):
    """Ordering evidence, no clock: the waiting writer found the lock taken (a failed non-blocking
    try, then the library's own waiting acquire), the holder saw no second record when it let go,
    and only then did the writer finish."""
    kb.add([Record(text="t", image=Image.new("RGB", (16, 16)))])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(kb.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KnowledgeBaseLockedError) as e:
            kb.add([Record(text="u", image=Image.new("RGB", (16, 16)))])
        assert f"pid {holder.pid}" in str(e.value) and "lock_timeout" in str(e.value)

        lock, found_taken = kb.journal._lock, threading.Event()
        real_acquire = lock.acquire

        def acquire(*args, **kwargs):
            try:
                real_acquire(timeout=0)
            except filelock.Timeout:
                found_taken.set()  # the holder has it: what follows is the writer waiting
            else:
                lock.release()
            return real_acquire(*args, **kwargs)

        monkeypatch.setattr(lock, "acquire", acquire)
        kb.lock_timeout = 600  # far longer than any machine needs to get here; only the order matters
        outcome = {}

        def second_writer():
            try:
                outcome["report"] = kb.add([Record(text="u", image=Image.new("RGB", (16, 16)))])
            except BaseException as error:  # handed to the test below
                outcome["error"] = error

        writer = threading.Thread(target=second_writer)
        writer.start()
        assert found_taken.wait(timeout=600), "the second writer never reached the lock"
        assert writer.is_alive() and "report" not in outcome  # the lock is still held: it cannot be done
        holder.stdin.write("release\n")
        holder.stdin.flush()
        writer.join(timeout=600)
        assert not writer.is_alive() and "error" not in outcome, outcome.get("error")
        assert outcome["report"].added == 1
        assert holder.stdout.read().split("\n")[:2] == ["releasing with 1 records", "released"]
    finally:
        holder.kill()
        holder.wait()
    assert kb.count() == 2


def test_hnsw_settings_are_fixed_at_creation(tmp_path, clip_encoder):
    kb = KnowledgeBase.open(tmp_path / "a", clip_encoder)
    images_col, texts_col = raw_collections(kb.path)
    assert images_col.configuration["hnsw"]["ef_search"] == texts_col.configuration["hnsw"]["ef_search"] == 400
    kb = KnowledgeBase.open(tmp_path / "b", clip_encoder, hnsw={"ef_search": 123, "max_neighbors": 24})
    images_col, _ = raw_collections(kb.path)
    assert (images_col.configuration["hnsw"]["ef_search"], images_col.configuration["hnsw"]["max_neighbors"]) == (123, 24)
    with pytest.raises(ConfigError, match="hnsw"):
        KnowledgeBase.open(tmp_path / "c", clip_encoder, hnsw={"ef": 10})


def test_duplicate_ids_in_get_and_delete_count_once(kb):
    kb.add([Record(id="a", text="one", image=Image.new("RGB", (8, 8), (1, 1, 1)))])
    assert [r.id for r in kb.get(["a", "a"])] == ["a"]
    assert kb.delete(["a", "a"]) == 1 and kb.count() == 0


def test_a_creation_killed_before_its_manifest_can_be_redone(tmp_path, clip_encoder):
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    (kb.path / "mmrag-kb.json").unlink()  # as if killed between the collections and the manifest
    with pytest.raises(NotAKnowledgeBaseError, match="No knowledge base"):
        KnowledgeBase.open(kb.path, create=False)
    again = KnowledgeBase.open(kb.path, clip_encoder)
    assert again.add([Record(text="t", image=Image.new("RGB", (8, 8)))]).added == 1
