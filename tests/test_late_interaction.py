"""The late-interaction index and channel on a tiny ColPali, against exact references.

- what the KB stores (token vectors in the sidecar, FDEs in Chroma) equals a fresh encoding and
  ``FDEEncoder`` in numpy;
- the channel (Chroma's ANN over the stored FDEs, then exact Chamfer) equals the same two stages
  in numpy, and brute-force Chamfer when every record is a candidate (the FDE's recall against
  brute force, >= 0.95 at the defaults, is measured on clustered point clouds in test_muvera.py;
  on the random tiny ColPali's vectors it is not reached: benchmarks/late_interaction.py --tiny-colpali);
- updates and deletes keep the index equal to the records; a KB without the index says how to make one.

Kill-during-ingest consistency of the sidecar is in test_crash_points.py.
"""

from __future__ import annotations

import json
import random

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from PIL import Image

from mmrag.pipelines.toyworld.world import ToyWorld, full_caption
from mmrag.retrievers import ConfigError, DualEncoder, EmbedderMismatchError, KnowledgeBase, MultimodalRetriever, Record
from mmrag.retrievers.multivector import MultiVectorEncoder
from mmrag.retrievers.muvera import DEFAULT_RERANK_CANDIDATES, FDEConfig, FDEEncoder
from mmrag.retrievers.settings import RetrieverSettings


def chamfer_all(query: np.ndarray, docs: list[np.ndarray]) -> np.ndarray:
    """Brute force in float64: sum over query tokens of the best dot product in each document."""
    q = query.astype(np.float64)
    return np.array([(q @ d.astype(np.float64).T).max(axis=1).sum() for d in docs])


def recall_at_10(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f[:10]) & set(e[:10])) / 10 for f, e in zip(found, exact)]))


@pytest.fixture(scope="module")
def encoder(tiny_colpali) -> MultiVectorEncoder:
    return MultiVectorEncoder(tiny_colpali, device="cpu", batch_size=128).warm_up()


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(seed=5, n_train=600)


def _records(world: ToyWorld, n: int) -> list[Record]:
    return [Record(id=f"e{i:05d}", text=full_caption(e).text, image=world.render(e), metadata={"shape": e.shape})
            for i, e in enumerate(world.entities("train")[:n])]


def test_defaults_agree():
    assert RetrieverSettings().late_interaction_candidates == DEFAULT_RERANK_CANDIDATES


@pytest.fixture(scope="module")
def kb(tmp_path_factory, tiny_clip, encoder, world) -> KnowledgeBase:
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("li") / "kb", DualEncoder(tiny_clip), late_interaction=encoder)
    assert kb.add(_records(world, 600), batch_size=128).added == 600
    return kb


def _raw_fdes(kb: KnowledgeBase) -> dict[str, np.ndarray]:
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    name = json.loads((kb.path / "mmrag-kb.json").read_text())["late_interaction"]["collection"]
    got = raw.get_collection(name, embedding_function=None).get(include=["embeddings"])
    return dict(zip(got["ids"], np.asarray(got["embeddings"], np.float32)))


def test_the_index_holds_the_encoder_s_tokens_and_their_fdes(kb, encoder):
    ids = sorted(r.id for r in kb.get([f"e{i:05d}" for i in range(600)]))
    stored = kb.multivector.tokens(ids)
    fresh = dict(zip(ids, encoder.embed_images([Image.open(r.image).convert("RGB") for r in kb.get(ids)])))
    # the same model on the same pixels: equal up to float32 noise (measured <= 2.1e-7)
    assert all(np.allclose(stored[i], fresh[i], atol=1e-5) for i in ids)
    fde = FDEEncoder(FDEConfig.from_dict(json.loads((kb.path / "mmrag-kb.json").read_text())["late_interaction"]["fde"]))
    raw = _raw_fdes(kb)
    want = fde.encode_documents([fresh[i] for i in ids])
    assert sorted(raw) == ids
    assert np.abs(np.stack([raw[i] for i in ids]) - want).max() < 1e-4
    assert {k: v for k, v in kb.verify().items() if v} == {}


def test_channel_equals_fde_search_then_chamfer_in_numpy(kb, encoder, world):
    """The channel as users run it (Chroma's HNSW over the stored FDEs, then Chamfer over the
    sidecar's tokens) against the same two stages in numpy: FDE dot products over every record,
    the top ``late_interaction_candidates``, exact Chamfer. With every record a candidate it is
    brute-force Chamfer."""
    ids = [f"e{i:05d}" for i in range(600)]
    stored = kb.multivector.tokens(ids)
    docs = [stored[i] for i in ids]
    fde = kb.multivector.fde
    doc_fdes = fde.encode_documents(docs)
    rng = random.Random(1)
    texts = [full_caption(e, with_name=False).text for e in rng.sample(world.entities("train")[:600], 20)]
    for n_cand in (DEFAULT_RERANK_CANDIDATES, 600):
        retriever = MultimodalRetriever(kb, channels=["late_interaction"], near_duplicate_threshold=None,
                                        late_interaction_candidates=n_cand)
        for text in texts:
            q = encoder.embed_queries([text])[0]
            brute = chamfer_all(q, docs)
            cand = np.argsort(-(doc_fdes @ fde.encode_queries([q])[0]), kind="stable")[:n_cand]
            want = cand[np.argsort(-brute[cand], kind="stable")][:10]
            hits = retriever.retrieve(text, k=10)
            # the same ids, with their exact Chamfer scores (ties within float32 noise may swap)
            assert [h.id for h in hits] == [ids[j] for j in want] or all(
                abs(h.scores["late_interaction"] - brute[j]) < 1e-4 for h, j in zip(hits, want)), (n_cand, text)
            assert all(abs(h.scores["late_interaction"] - brute[ids.index(h.id)]) < 1e-4 for h in hits)


def test_update_and_delete_keep_the_index_equal_to_the_records(tmp_path, tiny_clip, encoder, world):
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip), late_interaction=encoder)
    records = _records(world, 6)
    kb.add(records)
    before = kb.multivector.tokens(["e00002"])["e00002"]
    other = world.render(world.entities("train")[10])
    kb.add(Record(id="e00002", text=records[2].text, image=other))  # same id, another image: an update
    after = kb.multivector.tokens(["e00002"])["e00002"]
    assert not np.allclose(before, after) and np.allclose(after, encoder.embed_images([other])[0], atol=1e-5)
    assert kb.delete(["e00001", "e00004"]) == 2
    assert sorted(kb.multivector.ids()) == sorted(kb.multivector.file_ids()) == ["e00000", "e00002", "e00003",
                                                                                 "e00005"]
    assert not any(KnowledgeBase.open(kb.path).verify().values())


def test_a_kb_without_the_index_says_how_to_build_one(tmp_path, tiny_clip, tiny_colpali, world):
    kb = KnowledgeBase.open(tmp_path / "plain", DualEncoder(tiny_clip))
    kb.add(_records(world, 3))
    retriever = MultimodalRetriever(kb)
    assert "late_interaction" not in [c for c in retriever.retrieve("a star", k=1)[0].scores]  # not a default there
    with pytest.raises(ConfigError, match="no late-interaction index.*--late-interaction"):
        MultimodalRetriever(kb, channels=["late_interaction"]).retrieve("a star", k=1)
    with pytest.raises(EmbedderMismatchError, match="no late-interaction index"):
        KnowledgeBase.open(kb.path, late_interaction=tiny_colpali)
    with pytest.raises(ConfigError, match="`fde` has dim=64"):
        KnowledgeBase.open(tmp_path / "bad", DualEncoder(tiny_clip), late_interaction=tiny_colpali,
                           fde=FDEConfig(dim=64))


def test_cli_ingest_with_an_index_then_search_the_late_interaction_channel(tmp_path, tiny_config, tiny_colpali,
                                                                           world, capsys):
    from mmrag.pipelines.cli import main

    cfg = tiny_config
    src = tmp_path / "src"
    src.mkdir()
    for r in _records(world, 12):
        r.image.save(src / f"{r.id}.png")
        (src / f"{r.id}.txt").write_text(r.text)
    kb = tmp_path / "kb"
    assert main(["ingest", str(src), "--kb", str(kb), "--config", str(cfg), "--late-interaction", "tiny:colpali",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 12
    assert main(["kb", "info", "--kb", str(kb), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fde_vectors"] == 12 and info["late_interaction"] == str(tiny_colpali.resolve())
    query = full_caption(world.entities("train")[3], with_name=False).text
    assert main(["search", query, "--kb", str(kb), "--channels", "late_interaction", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    # the CLI's ranking is the brute-force Chamfer ranking (12 records: every one is a candidate)
    loaded = KnowledgeBase.open(kb)
    tokens = loaded.multivector.tokens(loaded.multivector.ids())
    q = MultiVectorEncoder(tiny_colpali).embed_queries([query])[0]
    brute = {i: chamfer_all(q, [t])[0] for i, t in tokens.items()}
    assert [h["id"] for h in hits] == sorted(brute, key=lambda i: -brute[i])[:3]
    # a KB without the index: one line, non-zero
    plain = tmp_path / "plain"
    assert main(["ingest", str(src), "--kb", str(plain), "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["search", query, "--kb", str(plain), "--channels", "late_interaction"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no late-interaction index" in err
