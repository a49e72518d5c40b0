"""HNSW settings tuned by KB size (retrievers/kb/hnsw.py): the rule, the manifest record, explicit
settings kept, and the collections' stored configuration read back through a plain Chroma client."""

from __future__ import annotations

import json

import chromadb
import pytest
from chromadb.config import Settings
from PIL import Image

from mmrag.retrievers import KnowledgeBase, Record
from mmrag.retrievers.kb import hnsw
from mmrag.retrievers.kb.store import RECORD_HNSW


def stored_hnsw(kb) -> list[dict]:
    """Both record collections' HNSW configuration, as another client of the folder reads it."""
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    return [raw.get_collection(names[w], embedding_function=None).configuration_json["hnsw"]
            for w in ("images", "texts")]


def manifest_hnsw(kb) -> dict:
    return json.loads((kb.path / "mmrag-kb.json").read_text())["hnsw"]


def records(start: int, n: int) -> list[Record]:
    return [Record(id=f"r{i:04d}", text=f"record {i}", image=Image.new("RGB", (8, 8), (i % 256, i // 256, 7)))
            for i in range(start, start + n)]


@pytest.fixture
def small_rule(monkeypatch):
    """The shipped rule starts raising at tens of thousands of records; the same code on a scale a
    test can ingest."""
    rule = ((19, 400), (39, 800), (None, 1600))
    monkeypatch.setattr(hnsw, "EF_SEARCH_BY_SIZE", {16: rule, 32: rule})


def test_the_rule_by_size():
    assert RECORD_HNSW["max_neighbors"] in hnsw.EF_SEARCH_BY_SIZE  # a new KB's graph has a measured table
    for m, rule in hnsw.EF_SEARCH_BY_SIZE.items():
        assert rule[0][1] == RECORD_HNSW["ef_search"]  # a new KB starts where the rule starts
        ups, efs = [u for u, _ in rule[:-1]], [e for _, e in rule]
        assert rule[-1][0] is None and ups == sorted(set(ups)) and efs == sorted(set(efs))
        assert hnsw.ef_search_for(0, m) == efs[0] and hnsw.ef_search_for(10**9, m) == efs[-1]
        for (up_to, ef), (_, nxt) in zip(rule, rule[1:]):
            assert (hnsw.ef_search_for(up_to, m), hnsw.ef_search_for(up_to + 1, m)) == (ef, nxt)
    # a graph between two tables takes the sparser one's (more ef_search), below all the smallest's
    rules = {16: ((9, 400), (None, 1600)), 32: ((9, 400), (None, 800))}
    assert [hnsw.ef_search_for(25, m, rules) for m in (8, 16, 24, 32, 64)] == [1600, 1600, 1600, 800, 800]
    assert hnsw.ef_search_for(9, 24, rules) == 400
    with pytest.raises(ValueError, match="count"):
        hnsw.ef_search_for(-1)


def test_growth_raises_ef_search_records_it_and_explicit_keys_stay(tmp_path, clip_encoder, small_rule):
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    created = manifest_hnsw(kb)
    assert [(c["ef_search"], c["max_neighbors"]) for c in stored_hnsw(kb)] == [(400, RECORD_HNSW["max_neighbors"])] * 2
    assert created == {"explicit": [], "ef_search": 400, "ef_construction": stored_hnsw(kb)[0]["ef_construction"],
                       "max_neighbors": stored_hnsw(kb)[0]["max_neighbors"], "tuned": []}
    assert kb.add(records(0, 19)).notes == {}  # below the first step: nothing changes
    assert manifest_hnsw(kb) == created and [c["ef_search"] for c in stored_hnsw(kb)] == [400, 400]

    report = kb.add(records(19, 3))  # 22 records: past 20
    assert report.notes == {
        "HNSW ef_search raised from 400 to 800 at 22 records (applies when the index is next loaded)": 1}
    assert [c["ef_search"] for c in stored_hnsw(kb)] == [800, 800]
    rec = manifest_hnsw(kb)
    [entry] = rec["tuned"]
    assert rec["ef_search"] == 800 and rec["explicit"] == []
    assert {k: entry[k] for k in ("count", "ef_search", "previous", "max_neighbors", "ef_construction", "rule")} == {
        "count": 22, "ef_search": 800, "previous": 400, "max_neighbors": created["max_neighbors"],
        "ef_construction": created["ef_construction"], "rule": "max_neighbors 32: ef_search 800 for 20 to 39 records"}
    assert entry["measurement"] == hnsw.MEASUREMENT and entry["at"]
    assert kb.manifest["hnsw"] == rec  # the open KB sees what it wrote
    assert kb.tune_hnsw() is None and len(manifest_hnsw(kb)["tuned"]) == 1  # once per step
    kb.delete([f"r{i:04d}" for i in range(10)])
    kb.add(records(100, 2))  # fewer records than at the raise: ef_search is never lowered
    assert [c["ef_search"] for c in stored_hnsw(kb)] == [800, 800]
    kb.add(records(200, 30))
    assert [c["ef_search"] for c in stored_hnsw(kb)] == [1600, 1600]
    assert [e["previous"] for e in manifest_hnsw(kb)["tuned"]] == [400, 800]

    # an explicit ef_search is never changed; an explicit max_neighbors leaves ef_search to the rule
    fixed = KnowledgeBase.open(tmp_path / "fixed", clip_encoder, hnsw={"ef_search": 123})
    assert manifest_hnsw(fixed)["explicit"] == ["ef_search"]
    assert fixed.add(records(0, 45)).notes == {} and fixed.tune_hnsw() is None
    assert [c["ef_search"] for c in stored_hnsw(fixed)] == [123, 123] and manifest_hnsw(fixed)["tuned"] == []
    wide = KnowledgeBase.open(tmp_path / "wide", clip_encoder, hnsw={"max_neighbors": 24})
    wide.add(records(0, 25))
    assert [(c["ef_search"], c["max_neighbors"]) for c in stored_hnsw(wide)] == [(800, 24), (800, 24)]
    assert manifest_hnsw(wide)["explicit"] == ["max_neighbors"]


def test_kbs_from_before_the_record_and_a_tuning_killed_half_way(tmp_path, clip_encoder, small_rule):
    def drop_record(kb):
        path = kb.path / "mmrag-kb.json"
        manifest = json.loads(path.read_text())
        del manifest["hnsw"]
        path.write_text(json.dumps(manifest))
        return KnowledgeBase.open(kb.path, clip_encoder)

    # created before manifests recorded HNSW settings, with the default of the time: tuned
    old = drop_record(KnowledgeBase.open(tmp_path / "old", clip_encoder))
    old.add(records(0, 25))
    assert [c["ef_search"] for c in stored_hnsw(old)] == [800, 800] and manifest_hnsw(old)["legacy"] is True
    # ... with another value, which someone chose: left alone, nothing recorded
    chosen = drop_record(KnowledgeBase.open(tmp_path / "chosen", clip_encoder, hnsw={"ef_search": 300}))
    chosen.add(records(0, 25))
    assert [c["ef_search"] for c in stored_hnsw(chosen)] == [300, 300]
    assert "hnsw" not in json.loads((chosen.path / "mmrag-kb.json").read_text())

    # killed after raising one collection, before the manifest: the next tuning finishes and records it
    kb = KnowledgeBase.open(tmp_path / "half", clip_encoder)
    kb.add(records(0, 19))
    kb.vectors.images.modify(configuration={"hnsw": {"ef_search": 800}})
    kb.add(records(19, 3))
    assert [c["ef_search"] for c in stored_hnsw(kb)] == [800, 800]
    assert [(e["previous"], e["ef_search"]) for e in manifest_hnsw(kb)["tuned"]] == [(400, 800)]
