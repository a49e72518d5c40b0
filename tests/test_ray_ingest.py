"""`mmrag ingest --ray`: distributed ingestion on a local Ray (2 CPUs) equals the serial ingest.

The reference is the serial `KnowledgeBase.ingest` of the same source into a second KB: the same
ids, metadata, texts and stored images, vectors equal to float32 noise, the same report. Faults are
real: an embedding actor process that kills itself mid-run, a driver killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmrag.pipelines.cli import main
from mmrag.pipelines.scale.ingest import EmbedActor, _units, ray_ingest
from mmrag.retrievers import KnowledgeBase
from mmrag.retrievers.kb.sources import source_parts
from tests.corpus import (BAD_CORPUS_MAX_PIXELS, img2dataset_samples, make_bad_corpus, make_good_images,
                          make_jsonl_manifest, make_webdataset_tar)

ray = pytest.importorskip("ray")

# Serial and Ray embed the same items in differently composed batches; float32 matmuls then differ
# by ~1e-7 on these unit vectors (0.0 when the batches coincide). A wrong or shifted vector differs by
# > 0.1 (the tiny CLIP's images sit at cosine ~0.8 to each other).
VECTOR_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from mmrag.pipelines.scale.ray_runtime import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def snapshot(kb: KnowledgeBase) -> dict:
    """Everything a KB holds: both collections (ids, vectors, metadata, texts) and the image files."""
    out = {}
    for name in ("images", "texts"):
        collection = getattr(kb.vectors, name)
        got = collection.get(include=["embeddings", "metadatas", "documents"])
        order = np.argsort(got["ids"])
        out[name] = {"ids": [got["ids"][i] for i in order], "metadatas": [got["metadatas"][i] for i in order],
                     "documents": [got["documents"][i] for i in order],
                     "vectors": np.asarray(got["embeddings"], dtype=np.float32)[order]}
    out["files"] = sorted(str(p.relative_to(kb.images.root)) for p in kb.images.root.rglob("*") if p.is_file()
                          and ".tmp" not in p.parts)
    return out


def assert_same_kb(got: KnowledgeBase, expected: KnowledgeBase) -> None:
    a, b = snapshot(got), snapshot(expected)
    assert a["files"] == b["files"]
    for name in ("images", "texts"):
        assert a[name]["ids"] == b[name]["ids"]
        assert a[name]["metadatas"] == b[name]["metadatas"]
        assert a[name]["documents"] == b[name]["documents"]
        np.testing.assert_allclose(a[name]["vectors"], b[name]["vectors"], rtol=0, atol=VECTOR_ATOL)
    assert got.verify() == expected.verify() == {k: [] for k in expected.verify()}


def same_report(got, expected) -> None:
    drop = ("seconds", "timings")
    assert {k: v for k, v in got.to_dict().items() if k not in drop} == {
        k: v for k, v in expected.to_dict().items() if k not in drop}
    assert [(r.ref, r.reason, r.source) for r in got.rejected] == [(r.ref, r.reason, r.source) for r in expected.rejected]


def two_kbs(tmp_path, clip_encoder, **limits) -> tuple[KnowledgeBase, KnowledgeBase]:
    return (KnowledgeBase.open(tmp_path / "serial", clip_encoder, **limits),
            KnowledgeBase.open(tmp_path / "ray", clip_encoder, **limits))


# ---------------------------------------------------------------------------- equal to serial
def test_500_items_equal_the_serial_ingest_with_one_and_two_actors(tmp_path, clip_encoder):
    src = tmp_path / "src"
    make_good_images(src, 500, sidecar="json", size=(32, 28))
    serial = KnowledgeBase.open(tmp_path / "serial", clip_encoder)
    expected = serial.ingest(src)
    assert expected.added == 500
    for actors in (1, 2):
        kb = KnowledgeBase.open(tmp_path / f"ray-{actors}", clip_encoder)
        report = ray_ingest(kb, src, concurrency=actors, batch_size=64)
        same_report(report, expected)
        assert_same_kb(kb, serial)


def test_manifest_and_shards_with_bad_items_equal_serial(tmp_path, clip_encoder):
    rows = [{"image": str(p.name), "text": text, "id": f"m{i}", "metadata": {"i": i}}
            for i, (p, text) in enumerate(make_good_images(tmp_path / "m", 70, sidecar=None))]
    rows[5]["image"] = "missing.png"  # a report line, not a failed job
    rows[9]["id"] = rows[8]["id"]  # a repeated id with other content: rejected, the first one kept
    manifest = make_jsonl_manifest(tmp_path / "m" / "items.jsonl", rows)
    shards = []
    for s in range(3):
        samples = img2dataset_samples(25, seed=s)
        if s == 1:
            samples[3][1]["jpg"] = b"\xff\xd8 not a jpeg"  # a corrupt image in one shard
            del samples[7][1]["txt"], samples[7][1]["json"]  # an image without text
        shards.append(make_webdataset_tar(tmp_path / "shards" / f"{s:05d}.tar", samples))
    for source in (manifest, str(tmp_path / "shards" / "*.tar")):
        serial, kb = two_kbs(tmp_path / Path(str(source)).stem.replace("*", "all"), clip_encoder)
        expected = serial.ingest(source)
        assert expected.rejected and expected.added > 50
        same_report(ray_ingest(kb, source), expected)
        assert_same_kb(kb, serial)
    # each shard is read by its own task; listed items go 64 to a task
    parts = source_parts(str(tmp_path / "shards" / "*.tar"))
    assert [u["shard"] for u in _units(None, parts, False, None)] == [str(p) for p in shards]
    assert [len(u["items"]) for u in _units(None, source_parts(manifest), False, None)] == [64, 6]


def test_the_bad_corpus_gets_the_serial_report(tmp_path, clip_encoder):
    src = tmp_path / "bad"
    make_bad_corpus(src)
    make_good_images(src, 10, seed=3)
    serial, kb = two_kbs(tmp_path, clip_encoder, max_image_pixels=BAD_CORPUS_MAX_PIXELS)
    expected = serial.ingest(src)
    assert len(expected.rejected) >= 10 and expected.notes
    same_report(ray_ingest(kb, src, batch_size=8), expected)
    assert_same_kb(kb, serial)


# ---------------------------------------------------------------------------- idempotence
class CountingActor(EmbedActor):
    """Appends how many items each call embedded to a file (actors live in other processes)."""

    log = ""

    def __call__(self, batch):
        out = super().__call__(batch)
        with open(self.log, "a") as f:
            f.write(f"{int(out['embedded'].sum())}\n")
        return out


def embedded(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


def test_a_rerun_adds_nothing_and_embeds_only_what_changed(tmp_path, clip_encoder):
    pairs = make_good_images(tmp_path / "m", 40, sidecar=None)
    rows = [{"image": p.name, "text": text, "id": f"r{i}"} for i, (p, text) in enumerate(pairs)]
    manifest = make_jsonl_manifest(tmp_path / "m" / "items.jsonl", rows)
    serial, kb = two_kbs(tmp_path, clip_encoder)
    log = tmp_path / "embedded.log"
    actor = type("Counting", (CountingActor,), {"log": str(log)})
    assert ray_ingest(kb, manifest, embed_actor=actor).added == 40
    assert embedded(log) == 40

    log.unlink()
    again = ray_ingest(kb, manifest, embed_actor=actor)
    assert (again.added, again.updated, again.existing) == (0, 0, 40)
    assert embedded(log) == 0  # ids the KB held were not embedded again

    rows[7]["text"] = "a changed caption"  # same id, new text: an update, embedded by the writer
    rows.append({"image": pairs[0][0].name, "text": "a new record", "id": "new"})
    make_jsonl_manifest(manifest, rows)
    changed = ray_ingest(kb, manifest, embed_actor=actor)
    assert (changed.added, changed.updated, changed.existing) == (1, 1, 39)
    serial.ingest(manifest)
    assert_same_kb(kb, serial)


# ---------------------------------------------------------------------------- faults
class DyingActor(EmbedActor):
    """Kills its own process (SIGKILL) on its second batch, once: the marker file says it did."""

    marker = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_killed_embedding_actor_is_retried_without_duplicates(tmp_path, clip_encoder):
    src = tmp_path / "src"
    make_good_images(src, 120, sidecar="txt", size=(32, 28))
    serial, kb = two_kbs(tmp_path, clip_encoder)
    expected = serial.ingest(src, batch_size=16)
    marker = tmp_path / "killed"
    report = ray_ingest(kb, src, batch_size=16, embed_actor=type("Dying", (DyingActor,), {"marker": str(marker)}))
    assert marker.exists()  # the actor did die mid-run
    assert report.duplicates == 0
    same_report(report, expected)
    assert_same_kb(kb, serial)


def test_a_driver_killed_mid_run_then_rerun_ends_with_exactly_the_source(tmp_path, clip_encoder, tiny_models_dir):
    src = tmp_path / "src"
    make_good_images(src, 400, sidecar="txt", size=(32, 28))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    kb_path = tmp_path / "ray"
    argv = [sys.executable, "-m", "mmrag.pipelines.cli", "ingest", str(src), "--kb", str(kb_path), "--config",
            str(config), "--ray", "--batch-size", "16", "--no-progress"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    driver = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    images = kb_path / "images"
    stored = lambda: sum(1 for p in images.rglob("*") if p.is_file()) if images.exists() else 0  # noqa: E731
    deadline = time.monotonic() + 300
    try:  # kill it once some batches have landed (the outcome must not depend on when)
        while stored() < 48:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the driver wrote nothing in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    kb = KnowledgeBase.open(kb_path, clip_encoder)
    landed = kb.count()
    report = ray_ingest(kb, src, batch_size=16)
    assert (report.added, report.existing, report.duplicates) == (400 - landed, landed, 0)
    serial = KnowledgeBase.open(tmp_path / "serial", clip_encoder)
    serial.ingest(src, batch_size=16)
    assert_same_kb(kb, serial)


# ---------------------------------------------------------------------------- command line
def test_cli_ingest_ray_prints_the_report_and_refuses_ray_flags_without_ray(tmp_path, tiny_models_dir, capsys):
    src = tmp_path / "src"
    make_good_images(src, 30, seed=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    kb = tmp_path / "kb"
    assert main(["ingest", str(src), "--kb", str(kb), "--config", str(config), "--ray", "--concurrency", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == out["count"] == 30 and "distributed" in out["timings"]
    assert main(["ingest", str(src), "--kb", str(kb), "--config", str(config), "--concurrency", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`--concurrency` applies to Ray runs only" in err[0]
