"""The KB's cache of rerank-model image vectors (``retrievers/kb/vector_cache.py``), with the real
tiny encoders and a real KB on disk: the dual-encoder reranker's scores with the cache are exactly
its scores without, a repeated candidate costs no embedding (counted on the real encoder's
``embed_images``), and the cache follows the KB's writes, corruption and kills."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.pipelines.builders import build_reranker, build_retriever
from mmrag.pipelines.config import load_config
from mmrag.pipelines.search import SearchPipeline
from mmrag.retrievers import ConfigError, DualEncoder, DualEncoderReranker, KnowledgeBase, Record
from mmrag.retrievers.kb import journal, vector_cache
from mmrag.retrievers.query import Hit, Query

TEXTS = ["a cat on a red sofa", "a black dog in the park", "a tower at night", "a red bus in London"]
QUERIES = {
    "text": Query(text="a red bus in the street"),
    "image": Query(image=Image.fromarray(np.full((36, 36, 3), 90, np.uint8))),
    "image+text": Query(text="the same place at night", image=Image.fromarray(np.full((36, 36, 3), 200, np.uint8))),
}


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8))


def _hits(kb: KnowledgeBase, ids=None) -> list[Hit]:
    records = kb.get(ids if ids is not None else [f"r{i}" for i in range(len(TEXTS))])
    return [Hit(r.id, r, score=1.0 - 0.1 * i, rank=i + 1) for i, r in enumerate(records)]


def _ranked(reranker, query, hits) -> list[tuple[str, float]]:
    return [(h.id, h.score) for h in reranker.rank(query, hits)]


def _close(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    """The same order and scores up to float32 rounding: where the cached reranker embeds only some of
    the images, each is embedded in another batch than the uncached one's (a batch's GEMM blocking
    moves the last bits, as the reranker's own batch_size does; see test_rerank.py)."""
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-6)


@pytest.fixture
def filled(kb) -> KnowledgeBase:
    kb.add([Record(text=t, image=_image(i), id=f"r{i}") for i, t in enumerate(TEXTS)])
    return kb


@pytest.fixture(scope="module")
def siglip_encoder(tiny_siglip) -> DualEncoder:
    return DualEncoder(tiny_siglip, device="cpu").warm_up()


@pytest.fixture
def counted(monkeypatch):
    """Counts the images each encoder's real ``embed_images`` is given (the call still runs)."""

    def count(encoder: DualEncoder) -> list[int]:
        calls: list[int] = []
        real = encoder.embed_images
        monkeypatch.setattr(encoder, "embed_images", lambda images: calls.append(len(images)) or real(images))
        return calls

    return count


def _cached_files(kb: KnowledgeBase) -> dict[str, set[str]]:
    return vector_cache.entries(kb.path / vector_cache.VECTOR_CACHE_DIR)


# ------------------------------------------------------------------------------ exactness and reuse
@pytest.mark.parametrize("kind", list(QUERIES))
def test_cached_scores_equal_uncached_and_the_cache_holds_the_encoders_vectors(filled, clip_encoder, kind):
    hits = _hits(filled)
    uncached = _ranked(DualEncoderReranker(clip_encoder, 0.7, 0.3), QUERIES[kind], hits)
    reranker = DualEncoderReranker(clip_encoder, 0.7, 0.3, kb=filled)
    assert _ranked(reranker, QUERIES[kind], hits) == uncached  # cold: embedded and written
    assert _ranked(reranker, QUERIES[kind], hits) == uncached  # warm: read back
    # the reference: the encoder's own vectors of the stored images, bit for bit
    expected = clip_encoder.embed_images([h.record.open_image() for h in hits])
    cache = filled.vector_cache(clip_encoder)
    shas = [cache.sha_of(h.record.image) for h in hits]
    assert shas == [hashlib.sha256(Path(h.record.image).read_bytes()).hexdigest() for h in hits]
    got = cache.get(shas)
    assert all(got[s].dtype == np.float32 for s in shas)
    np.testing.assert_array_equal(np.stack([got[s] for s in shas]).view(np.uint32), expected.view(np.uint32))


def test_a_second_rerank_of_the_same_candidates_embeds_no_image(filled, clip_encoder, counted):
    hits = _hits(filled)
    reranker = DualEncoderReranker(clip_encoder, kb=filled).warm_up()
    calls = counted(clip_encoder)
    reranker.rank(QUERIES["text"], hits)
    assert calls == [len(hits)]
    reranker.rank(QUERIES["text"], hits[::-1])
    DualEncoderReranker(clip_encoder, kb=KnowledgeBase.open(filled.path)).rank(QUERIES["text"], hits)  # a new reader
    assert calls == [len(hits)]
    reranker.rank(QUERIES["image"], hits)
    assert calls == [len(hits), 1]  # the query image only


def test_candidates_sharing_an_image_embed_it_once(filled, clip_encoder, counted):
    filled.add(Record(text="another text, the same photo", image=_image(0), id="twin"))
    hits = _hits(filled, ["r0", "twin", "r1"])
    assert hits[0].record.image == hits[1].record.image
    uncached = _ranked(DualEncoderReranker(clip_encoder), QUERIES["text"], hits)
    reranker = DualEncoderReranker(clip_encoder, kb=filled).warm_up()
    calls = counted(clip_encoder)
    assert _ranked(reranker, QUERIES["text"], hits) == uncached
    assert calls == [2]


def test_images_outside_the_kb_are_embedded_uncached(filled, clip_encoder, counted, tmp_path):
    outside = tmp_path / "elsewhere.png"
    _image(7).save(outside)
    hits = [Hit("a", Record(text="in memory", image=_image(6), id="a"), 1.0, rank=1),
            Hit("b", Record(text="a file elsewhere", image=str(outside), id="b"), 0.9, rank=2)] + _hits(filled, ["r2"])
    uncached = _ranked(DualEncoderReranker(clip_encoder), QUERIES["text"], hits)
    reranker = DualEncoderReranker(clip_encoder, kb=filled).warm_up()
    calls = counted(clip_encoder)
    assert _ranked(reranker, QUERIES["text"], hits) == uncached
    _close(_ranked(reranker, QUERIES["text"], hits), uncached)
    assert calls == [3, 2]  # the KB's image once; the other two every time
    assert [len(v) for v in _cached_files(filled).values()] == [1]


def test_a_reranker_without_a_kb_writes_nothing(filled, clip_encoder):
    DualEncoderReranker(clip_encoder).rank(QUERIES["text"], _hits(filled))
    assert not (filled.path / vector_cache.VECTOR_CACHE_DIR).exists()
    assert "orphan_cached_vectors" not in filled.verify()  # the key appears with a cache only
    with pytest.raises(ConfigError, match=r"`kb` must be a KnowledgeBase.*str"):
        DualEncoderReranker(clip_encoder, kb=str(filled.path))


# ------------------------------------------------------------------------------ following the KB's writes
def test_an_updated_image_is_embedded_afresh_and_the_old_vector_dropped(filled, clip_encoder, counted):
    reranker = DualEncoderReranker(clip_encoder, kb=filled).warm_up()
    reranker.rank(QUERIES["text"], _hits(filled))
    cache = filled.vector_cache(clip_encoder)
    old_sha = cache.sha_of(filled.get("r1")[0].image)
    assert filled.add(Record(text=TEXTS[1], image=_image(99), id="r1")).updated == 1  # same id, new image
    hits = _hits(filled)
    new_sha = cache.sha_of(hits[1].record.image)
    assert new_sha != old_sha
    assert not cache.path(old_sha).exists()  # released with its image
    calls = counted(clip_encoder)
    _close(_ranked(reranker, QUERIES["text"], hits), _ranked(DualEncoderReranker(clip_encoder), QUERIES["text"], hits))
    assert calls == [1, len(hits)]  # the cached reranker embedded the new image only (then the uncached one, all)
    expected = clip_encoder.embed_images([hits[1].record.open_image()])[0]
    np.testing.assert_array_equal(cache.get([new_sha])[new_sha], expected)
    assert filled.verify()["orphan_cached_vectors"] == []


def test_delete_releases_the_cached_vectors_of_every_model_with_the_image(filled, clip_encoder, siglip_encoder):
    filled.add(Record(text="the same photo again", image=_image(0), id="twin"))
    hits = _hits(filled)
    for encoder in (clip_encoder, siglip_encoder):
        DualEncoderReranker(encoder, kb=filled).rank(QUERIES["text"], hits)
    sha = filled.vector_cache(clip_encoder).sha_of(hits[0].record.image)
    paths = [filled.vector_cache(e).path(sha) for e in (clip_encoder, siglip_encoder)]
    assert all(p.exists() for p in paths)
    filled.delete("r0")
    assert all(p.exists() for p in paths)  # "twin" still uses the image
    filled.delete("twin")
    assert not any(p.exists() for p in paths)
    assert not Path(hits[0].record.image).exists()
    assert [len(v) for v in _cached_files(filled).values()] == [3, 3]
    assert filled.verify()["orphan_cached_vectors"] == []


def test_two_rerank_models_keep_separate_entries(filled, clip_encoder, siglip_encoder):
    hits = _hits(filled)
    for encoder in (clip_encoder, siglip_encoder):
        reranker = DualEncoderReranker(encoder, kb=filled)
        assert _ranked(reranker, QUERIES["image+text"], hits) == _ranked(DualEncoderReranker(encoder),
                                                                          QUERIES["image+text"], hits)
    clip_cache, siglip_cache = filled.vector_cache(clip_encoder), filled.vector_cache(siglip_encoder)
    assert clip_cache.key != siglip_cache.key and len(_cached_files(filled)) == 2
    shas = [clip_cache.sha_of(h.record.image) for h in hits]
    images = [h.record.open_image() for h in hits]
    for encoder, cache in ((clip_encoder, clip_cache), (siglip_encoder, siglip_cache)):
        got = cache.get(shas)
        np.testing.assert_array_equal(np.stack([got[s] for s in shas]), encoder.embed_images(images))


def test_the_model_key_changes_with_dtype_and_with_a_model_saved_again(filled, tiny_clip, clip_encoder, tmp_path):
    key = filled.vector_cache(clip_encoder).key
    assert filled.vector_cache(DualEncoder(tiny_clip, device="cpu")).key == key  # the same model, loaded again
    assert filled.vector_cache(DualEncoder(tiny_clip, device="cpu", dtype="bfloat16")).key != key
    copy = shutil.copytree(tiny_clip, tmp_path / "clip-copy")
    copied = filled.vector_cache(DualEncoder(copy, device="cpu")).key
    assert copied != key  # another model id
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # re-saved in place
    assert filled.vector_cache(DualEncoder(copy, device="cpu")).key != copied


# ------------------------------------------------------------------------------ damage and kills
def _truncate(p):
    p.write_bytes(p.read_bytes()[:40])


def _flip_a_vector_byte(p):
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))


def _another_images_vector(p):
    other = min(q for q in p.parent.parent.glob("*/*.safetensors") if q != p)
    shutil.copyfile(other, p)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_vector_byte, _another_images_vector])
def test_a_damaged_cache_file_is_ignored_with_a_warning_and_rewritten(filled, clip_encoder, damage, caplog):
    hits = _hits(filled)
    expected = _ranked(DualEncoderReranker(clip_encoder), QUERIES["text"], hits)
    reranker = DualEncoderReranker(clip_encoder, kb=filled)
    reranker.rank(QUERIES["text"], hits)
    cache = filled.vector_cache(clip_encoder)
    sha = cache.sha_of(hits[2].record.image)
    damage(cache.path(sha))
    with caplog.at_level(logging.WARNING, logger="mmrag.retrievers.kb.vector_cache"):
        _close(_ranked(reranker, QUERIES["text"], hits), expected)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and str(cache.path(sha)) in caplog.text
    caplog.clear()
    alone = clip_encoder.embed_images([hits[2].record.open_image()])[0]  # as the rerank embedded it
    with caplog.at_level(logging.WARNING, logger="mmrag.retrievers.kb.vector_cache"):
        np.testing.assert_array_equal(cache.get([sha])[sha], alone)
    assert caplog.records == []  # rewritten whole


def test_a_killed_writers_temp_file_is_cleaned_once_stale_never_a_live_one(filled, clip_encoder):
    hits = _hits(filled)
    cache = filled.vector_cache(clip_encoder)
    sha = cache.sha_of(hits[0].record.image)
    vector = clip_encoder.embed_images([h.record.open_image() for h in hits])[0]  # as the rerank below embeds it
    pid = os.fork()
    if pid == 0:  # the child: SIGKILLed just before the vector's rename, as a power cut or the OOM killer would
        try:
            real = os.replace
            os.replace = lambda src, dst: (real(src, dst) if str(dst).endswith("model.json")
                                           else os.kill(os.getpid(), signal.SIGKILL))
            cache.put({sha: vector})
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    tmp_dir = filled.path / vector_cache.VECTOR_CACHE_DIR / ".tmp"
    left = sorted(tmp_dir.iterdir())
    assert [p.name.split(".")[0] for p in left] == [sha] and not cache.path(sha).exists()
    assert journal.temp_files(filled.path) == []  # fresh: could be a live writer's
    KnowledgeBase.open(filled.path)
    assert sorted(tmp_dir.iterdir()) == left
    old = os.stat(left[0]).st_mtime - vector_cache.STALE_TMP_S - 1
    for p in left:
        os.utime(p, (old, old))
    assert sorted(journal.temp_files(filled.path)) == left
    KnowledgeBase.open(filled.path)  # repairs under the writer lock
    assert list(tmp_dir.iterdir()) == []
    reranker = DualEncoderReranker(clip_encoder, kb=filled)
    assert _ranked(reranker, QUERIES["text"], hits) == _ranked(DualEncoderReranker(clip_encoder), QUERIES["text"], hits)
    np.testing.assert_array_equal(cache.get([sha])[sha], vector)


def test_a_write_whose_temp_file_was_removed_is_skipped(filled, clip_encoder, monkeypatch, caplog):
    hits = _hits(filled)
    real = os.replace

    def cleaned_meanwhile(src, dst):  # another process's repair removed the file first
        os.unlink(src)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", cleaned_meanwhile)
    with caplog.at_level(logging.WARNING, logger="mmrag.retrievers.kb.vector_cache"):
        ranked = _ranked(DualEncoderReranker(clip_encoder, kb=filled), QUERIES["text"], hits)
    monkeypatch.undo()
    assert ranked == _ranked(DualEncoderReranker(clip_encoder), QUERIES["text"], hits)
    assert "FileNotFoundError" in caplog.text and not any(_cached_files(filled).values())
    assert list((filled.path / vector_cache.VECTOR_CACHE_DIR / ".tmp").iterdir()) == []


def test_a_cache_folder_removed_under_a_live_reranker_is_made_again(filled, clip_encoder, counted, caplog):
    hits = _hits(filled)
    reranker = DualEncoderReranker(clip_encoder, kb=filled).warm_up()
    reranker.rank(QUERIES["text"], hits)
    shutil.rmtree(filled.path / vector_cache.VECTOR_CACHE_DIR)
    calls = counted(clip_encoder)
    with caplog.at_level(logging.WARNING, logger="mmrag.retrievers.kb.vector_cache"):
        reranker.rank(QUERIES["text"], hits)
        reranker.rank(QUERIES["text"], hits)
    assert calls == [len(hits)] and caplog.records == []
    assert (filled.vector_cache(clip_encoder).folder / "model.json").is_file()


def test_verify_lists_orphan_entries_and_prune_drops_them(filled, clip_encoder):
    DualEncoderReranker(clip_encoder, kb=filled).rank(QUERIES["text"], _hits(filled))
    assert filled.verify()["orphan_cached_vectors"] == []
    cache = filled.vector_cache(clip_encoder)
    # what a query caching an image while a writer deletes it leaves
    gone = hashlib.sha256(b"an image deleted meanwhile").hexdigest()
    cache.put({gone: np.ones(cache.dim, np.float32) / np.sqrt(cache.dim)})
    assert filled.verify()["orphan_cached_vectors"] == [f"{cache.key}/{gone}"]
    assert filled.prune_vector_cache() == 1
    assert filled.verify()["orphan_cached_vectors"] == [] and len(_cached_files(filled)[cache.key]) == len(TEXTS)


# ------------------------------------------------------------------------------ through the pipeline
def test_the_search_pipeline_caches_in_its_kb(filled, tiny_models_dir, counted):
    # (the tiny model's random image vectors are near-duplicates of each other: keep them all)
    cfg = load_config("tiny", {"tiny_models.cache_dir": str(tiny_models_dir), "kb.path": str(filled.path),
                               "reranker.name": "dual_encoder", "retriever.near_duplicate_threshold": None})
    reranker = build_reranker(cfg, kb=filled).warm_up()
    assert reranker.kb is filled
    search = SearchPipeline(build_retriever(cfg, filled), reranker)
    calls = counted(reranker.encoder)
    first = search(QUERIES["text"], k=2)
    second = search(QUERIES["text"], k=2)
    assert [(h.id, h.score) for h in first] == [(h.id, h.score) for h in second]
    assert calls == [len(TEXTS)]  # every candidate once, on the first query
