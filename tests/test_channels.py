"""One contract, every retrieval channel: ``Channel.search(query, n, where)``.

Each channel registered in ``CHANNEL_TYPES`` is run through the same checks (what it returns, its
order, ``where``, ``n``, repeatability, an empty KB) and against an independent reference of its
scores: numpy over the vectors stored in Chroma for the dense and composed channels, the words of
the stored texts for BM25. A channel added to the registry without a reference here fails
``test_every_registered_channel_has_a_reference``.
"""

from __future__ import annotations

import json

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from PIL import Image, ImageDraw

from mmrag.retrievers import CHANNELS, DualEncoder, KnowledgeBase, MultimodalRetriever, Query, Record
from mmrag.retrievers.channels import CHANNEL_TYPES, Channel

N = 80
COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["star", "circle", "square"]
# Chroma's float32 cosines against numpy's float64 over the stored vectors differ by at most 3.1e-7
# here (see test_retriever.py); a wrong formula moves scores by > 1e-2.
TOL = 1e-5


def _image(rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    x0, y0 = rng.integers(0, 20, 2)
    d.ellipse([int(x0), int(y0), int(x0) + 12, int(y0) + 12], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


@pytest.fixture(scope="module")
def kb(tmp_path_factory, tiny_clip, tiny_colpali) -> KnowledgeBase:
    rng = np.random.default_rng(3)
    # with a late-interaction index, so that every channel can run
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("channels") / "kb", DualEncoder(tiny_clip),
                            late_interaction=tiny_colpali)
    records = [Record(id=f"c{i:03d}", image=_image(rng),
                      text=f"a {COLOURS[i % 4]} {SHAPES[i % 3]} number {i}" + (" named Quillfeather" if i == 41 else ""),
                      metadata={"group": i % 2})
               for i in range(N)]
    assert kb.add(records).added == N
    return kb


@pytest.fixture(scope="module")
def stored(kb):
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    out = {}
    for which in ("images", "texts"):
        got = raw.get_collection(names[which], embedding_function=None).get(include=["embeddings", "metadatas",
                                                                                      "documents"])
        order = np.argsort(got["ids"])
        out[which] = np.asarray(got["embeddings"], np.float64)[order]
        out["ids"] = [got["ids"][i] for i in order]
        out["metas"] = [got["metadatas"][i] for i in order]
        out["docs"] = [got["documents"][i] for i in order]
    return out


@pytest.fixture(scope="module")
def query_image():
    return _image(np.random.default_rng(99))


def _query(query_image) -> Query:
    # text + image + a reference description: every channel can run on it
    return Query(text="blue star Quillfeather", image=query_image, reference_text="a red circle")


def _unit(v):
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------- references
def _dense_reference(collection: str, side: str):
    def ref(kb, stored, q: Query, s) -> dict[str, float]:
        emb = kb.embedder
        vec = emb.embed_texts([q.text])[0] if side == "text" else emb.embed_images([q.image])[0]
        return dict(zip(stored["ids"], (stored[collection] @ vec.astype(np.float64)).tolist()))
    return ref


def _composed_reference(kb, stored, q: Query, s) -> dict[str, float]:
    emb = kb.embedder
    t = emb.embed_texts([q.text])[0].astype(np.float64)
    v = emb.embed_images([q.image])[0].astype(np.float64)
    fused = _unit((1 - s.weimocir_alpha) * v + s.weimocir_alpha * t)  # WeiMoCIR, over the whole gallery
    score = (1 - s.weimocir_beta) * stored["images"] @ fused + s.weimocir_beta * stored["texts"] @ fused
    return dict(zip(stored["ids"], score.tolist()))


def _late_interaction_reference(kb, stored, q: Query, s) -> dict[str, float]:
    """Brute-force Chamfer (MaxSim) over every record, with token vectors from a fresh encoder
    (not the sidecar): sum over query tokens of the best dot product with any image position."""
    from mmrag.retrievers.multivector import MultiVectorEncoder

    enc = MultiVectorEncoder(kb.manifest["late_interaction"]["model_id"], device="cpu")
    query = enc.embed_queries([q.text])[0].astype(np.float64)
    docs = enc.embed_images([Image.open(kb.get(i)[0].image).convert("RGB") for i in stored["ids"]])
    return {i: float((query @ d.astype(np.float64).T).max(axis=1).sum()) for i, d in zip(stored["ids"], docs)}


def _lexical_reference(kb, stored, q: Query, s) -> set[str]:
    """BM25 scores only records sharing a word with the query: the set of ids that may appear."""
    words = set(q.text.lower().split())
    return {i for i, d in zip(stored["ids"], stored["docs"]) if words & set(d.lower().split())}


REFERENCES = {
    "text_to_image": _dense_reference("images", "text"),
    "text_to_text": _dense_reference("texts", "text"),
    "image_to_image": _dense_reference("images", "image"),
    "image_to_text": _dense_reference("texts", "image"),
    "composed": _composed_reference,
    "lexical": _lexical_reference,
    "late_interaction": _late_interaction_reference,
}


def test_every_registered_channel_has_a_reference_and_matches_the_settings_table():
    assert set(CHANNEL_TYPES) == set(CHANNELS) == set(REFERENCES)
    for name, cls in CHANNEL_TYPES.items():
        assert issubclass(cls, Channel) and cls.name == name
        assert (cls.needs_text, cls.needs_image) == CHANNELS[name], name


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", sorted(CHANNEL_TYPES))
@pytest.mark.parametrize("where", [None, {"group": 1}])
@pytest.mark.parametrize("n", [7, 2 * N])
def test_channel_contract(kb, stored, query_image, name, where, n):
    retriever = MultimodalRetriever(kb, scoring_scope="gallery")
    q = retriever.encode(_query(query_image))
    channel = retriever.channel(name)
    got = channel.search(q, n, where)
    # shape: at most n (id, float) pairs of distinct, existing records
    assert len(got) <= n and all(isinstance(i, str) and isinstance(sc, float) for i, sc in got)
    ids = [i for i, _ in got]
    assert len(set(ids)) == len(ids) and set(ids) <= set(stored["ids"])
    # best first
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:])), got
    # where: only matching records
    meta = dict(zip(stored["ids"], stored["metas"]))
    if where is not None:
        assert all(meta[i]["group"] == 1 for i in ids)
    # the same inputs give the same list
    assert channel.search(retriever.encode(_query(query_image)), n, where) == got
    # against the independent reference
    allowed = [i for i in stored["ids"] if where is None or meta[i]["group"] == 1]
    ref = REFERENCES[name](kb, stored, _query(query_image), q.settings)
    if isinstance(ref, set):  # lexical: exactly the records that share a word, best first
        want = ref & set(allowed)
        assert set(ids) == set(sorted(want)[:n]) if len(want) <= n else set(ids) <= want
        assert all(sc > 0 for _, sc in got)
        return
    exact = {i: ref[i] for i in allowed}
    best = sorted(exact.values(), reverse=True)[:n]
    assert len(got) == len(best)
    wrong = [(rank, rid, sc, exact[rid], want) for rank, ((rid, sc), want) in enumerate(zip(got, best), 1)
             if abs(exact[rid] - want) > TOL or abs(sc - exact[rid]) > TOL]
    assert not wrong, f"{name}: (rank, id, channel score, exact score, rank's exact score): {wrong}"


def test_lexical_puts_the_rare_name_first(kb, query_image):
    retriever = MultimodalRetriever(kb)
    got = retriever.channel("lexical").search(retriever.encode(_query(query_image)), 5, None)
    assert got[0][0] == "c041"


@pytest.mark.parametrize("name", sorted(CHANNEL_TYPES))
def test_channel_on_an_empty_kb_returns_nothing(tmp_path, tiny_clip, tiny_colpali, query_image, name):
    kb = KnowledgeBase.open(tmp_path / "empty", DualEncoder(tiny_clip), late_interaction=tiny_colpali)
    retriever = MultimodalRetriever(kb, scoring_scope="gallery")
    assert retriever.channel(name).search(retriever.encode(_query(query_image)), 5, None) == []


@pytest.mark.parametrize("name", sorted(CHANNEL_TYPES))
def test_retrieve_with_one_channel_reports_that_channel_s_scores(kb, query_image, name):
    """The retriever's per-channel scores are the channel's own: nothing between them rescales."""
    retriever = MultimodalRetriever(kb, channels=[name], near_duplicate_threshold=None, scoring_scope="gallery")
    hits = retriever.retrieve(_query(query_image), k=5)
    direct = dict(retriever.channel(name).search(retriever.encode(_query(query_image)), 50, None))
    assert hits and all(abs(h.scores[name] - direct[h.id]) <= TOL for h in hits)
