"""MultimodalRetriever against exact numpy computations over the vectors stored in Chroma."""

from __future__ import annotations

import json
import math

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from PIL import Image, ImageDraw

from mmrag.retrievers import ConfigError, DualEncoder, KnowledgeBase, MultimodalRetriever, Query, Record

WORDS = ["red", "blue", "green", "star", "circle", "square", "striped", "dotted", "tiny", "huge", "old", "new"]
N = 240


def _image(rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.integers(0, 24, 2)
        d.rectangle([int(x0), int(y0), int(x0) + 8, int(y0) + 8], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


@pytest.fixture(scope="module")
def kb(tmp_path_factory, tiny_clip) -> KnowledgeBase:
    rng = np.random.default_rng(0)
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("retr") / "kb", DualEncoder(tiny_clip))
    records = []
    for i in range(N):
        words = " ".join(rng.choice(WORDS, 4))
        text = f"item {i}: a {words} thing" + (" called Picarones" if i == 17 else "")
        records.append(Record(id=f"r{i:03d}", text=text, image=_image(rng),
                              metadata={"group": int(i % 4), "kind": ["dog", "cat", "car"][i % 3]}))
    assert kb.add(records).added == N
    # HNSW is exact by construction here: with ef_search >= the number of records, hnswlib's search
    # never prunes its candidate list and expands every record reachable from the entry point
    # (chroma-core/hnswlib searchBaseLayerST), so brute force is the reference, not a recall bound.
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    assert all(raw.get_collection(n, embedding_function=None).configuration["hnsw"]["ef_search"] >= N
               for n in names.values())
    return kb


@pytest.fixture(scope="module")
def stored(kb):
    """ids, image vectors, text vectors, metadatas, documents: straight from Chroma."""
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    im = raw.get_collection(names["images"], embedding_function=None).get(include=["embeddings", "metadatas", "documents"])
    order = np.argsort(im["ids"])
    ids = [im["ids"][i] for i in order]
    tx = raw.get_collection(names["texts"], embedding_function=None).get(ids=ids, include=["embeddings"])
    tx_by_id = dict(zip(tx["ids"], tx["embeddings"]))
    return {
        "ids": np.array(ids),
        "images": np.asarray(im["embeddings"], dtype=np.float64)[order],
        "texts": np.asarray([tx_by_id[i] for i in ids], dtype=np.float64),
        "metas": [im["metadatas"][i] for i in order],
        "docs": [im["documents"][i] for i in order],
    }


def topk(ids, scores, k):
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
    return [ids[i] for i in order], [scores[i] for i in order]


# Chroma's float32 cosine scores vs numpy's float64 ones from the stored vectors: at most 3.1e-7
# apart (every dense channel here, the embedder on AVX-512 and AVX2 kernels). Some records' exact
# scores are within a few times that of each other (7.9e-7 on the 2k KB, 4.5e-7 in the RRF test's
# image ranking), so float32 may order them either way on another CPU. Scores within TIE_TOL (30x
# the noise) count as tied.
TIE_TOL = 1e-5


def assert_top_k(got: list[str], exact: dict[str, float], k: int, tol: float = TIE_TOL) -> None:
    """``got`` is a best-first top-``k`` of ``exact`` (id -> exact score), ties handled: its i-th id
    has the i-th best exact score, within ``tol``. Where no two scores are that close, this is
    ``got == the exact top-k``; a record that does not belong, a missing one or a wrong order fails."""
    best = sorted(exact.values(), reverse=True)[:k]
    assert len(got) == len(best) and len(set(got)) == len(got), got
    wrong = [(rank, rid, exact.get(rid), want) for rank, (rid, want) in enumerate(zip(got, best), start=1)
             if rid not in exact or abs(exact[rid] - want) > tol]
    assert not wrong, f"not the exact top-{k}; (rank, id, its exact score, the rank's exact score): {wrong}"


def exact_scores(stored, gallery: str, vec, mask=None) -> dict[str, float]:
    """Brute force: every stored record's cosine with ``vec`` (the vectors are unit length)."""
    ids, vectors = stored["ids"], stored[gallery]
    if mask is not None:
        ids, vectors = ids[mask], vectors[mask]
    return dict(zip(ids.tolist(), (vectors @ vec).tolist()))


def chroma_ranking(kb, gallery: str, vec, n: int) -> list[str]:
    """The ids Chroma itself returns for ``vec``, best first, through a plain client."""
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    col = raw.get_collection(names[gallery], embedding_function=None)
    return col.query(query_embeddings=[vec], n_results=n, include=["distances"])["ids"][0]


def unit(v):
    return v / np.linalg.norm(v)


EXACT = dict(near_duplicate_threshold=None, n_candidates=N)  # no post-processing, every record a candidate


@pytest.mark.parametrize("channel, modality, gallery", [
    ("text_to_image", "text", "images"), ("text_to_text", "text", "texts"),
    ("image_to_image", "image", "images"), ("image_to_text", "image", "texts"),
])
def test_each_dense_channel_equals_brute_force(kb, stored, channel, modality, gallery):
    r = MultimodalRetriever(kb, channels=[channel], **EXACT)
    query_image = Record(text="", image=str(kb.get("r005")[0].image)).open_image()
    q = "a striped red star" if modality == "text" else query_image
    qv = kb.embedder.embed_texts([q])[0] if modality == "text" else kb.embedder.embed_images([q])[0]
    exact = exact_scores(stored, gallery, qv)
    hits = r.retrieve(q, k=10, fusion="weighted")
    assert_top_k([h.id for h in hits], exact, 10)
    np.testing.assert_allclose([h.scores[channel] for h in hits], [exact[h.id] for h in hits], atol=1e-4)
    assert [h.rank for h in hits] == list(range(1, 11))
    assert hits[0].record.text == stored["docs"][list(stored["ids"]).index(hits[0].id)]


def test_rrf_equals_formula_over_channel_rankings(kb, stored):
    q = "a dotted green circle"
    tv = kb.embedder.embed_texts([q])[0]
    n = 30
    # The channel rankings are Chroma's own, each checked to be the exact one up to ties: where two
    # scores are closer than float32 noise, a brute-force ranking may order them otherwise (their
    # RRF scores then differ by 2.6e-4, enough to reorder the fused list).
    rankings = {}
    for c, g in (("text_to_image", "images"), ("text_to_text", "texts")):
        rankings[c] = chroma_ranking(kb, g, tv, n)
        assert_top_k(rankings[c], exact_scores(stored, g, tv), n)
    fused: dict[str, float] = {}
    for c, ranked in rankings.items():
        w = 2.0 if c == "text_to_text" else 1.0
        for rank, rid in enumerate(ranked, start=1):
            fused[rid] = fused.get(rid, 0.0) + w / (60 + rank)
    hits = MultimodalRetriever(kb, channels=["text_to_image", "text_to_text"], near_duplicate_threshold=None,
                               n_candidates=n, weights={"text_to_text": 2.0}).retrieve(q, k=10)
    assert_top_k([h.id for h in hits], fused, 10, tol=1e-12)  # equal RRF sums are real ties
    np.testing.assert_allclose([h.score for h in hits], [fused[h.id] for h in hits], rtol=1e-9)


def test_weighted_fusion_equals_minmax_formula(kb, stored):
    q = "huge old square"
    tv = kb.embedder.embed_texts([q])[0]
    fused: dict[str, float] = {}
    for g in ("images", "texts"):
        exact = exact_scores(stored, g, tv)
        ids = chroma_ranking(kb, g, tv, 25)  # Chroma's candidates: the exact top-25 up to ties
        assert_top_k(ids, exact, 25)
        s = np.array([exact[i] for i in ids])
        for rid, v in zip(ids, (s - s.min()) / (s.max() - s.min())):
            fused[rid] = fused.get(rid, 0.0) + v
    hits = MultimodalRetriever(kb, channels=["text_to_image", "text_to_text"], fusion="weighted",
                               near_duplicate_threshold=None, n_candidates=25).retrieve(q, k=10)
    # min-max scaling divides the float32 noise by the score range: fused scores measured 5.6e-6 apart
    assert_top_k([h.id for h in hits], fused, 10, tol=1e-4)
    np.testing.assert_allclose([h.score for h in hits], [fused[h.id] for h in hits], atol=1e-4)


def _query_image(kb):
    return Record(text="", image=kb.get("r010")[0].image).open_image()


def test_weimocir_equals_formula(kb, stored):
    image, text = _query_image(kb), "make it blue"
    v, t = kb.embedder.embed_images([image])[0], kb.embedder.embed_texts([text])[0]
    a, b = 0.8, 0.1
    q = unit((1 - a) * v + a * t)
    ref = dict(zip(stored["ids"].tolist(), ((1 - b) * (stored["images"] @ q) + b * (stored["texts"] @ q)).tolist()))
    hits = MultimodalRetriever(kb, channels=["composed"], **EXACT).retrieve(Query(text=text, image=image), k=10)
    assert_top_k([h.id for h in hits], ref, 10)
    np.testing.assert_allclose([h.scores["composed"] for h in hits], [ref[h.id] for h in hits], atol=1e-4)


def test_pdv_equals_formula_with_reference_text(kb, stored):
    image, text, ref_text = _query_image(kb), "but blue", "a red square"
    emb = kb.embedder
    v = emb.embed_images([image])[0]
    t_ref, t_comp = emb.embed_texts([ref_text, f"{ref_text}, {text}"])
    d = t_comp - t_ref
    aI, aT, b = 1.0, 1.0, 0.7
    q = unit((1 - b) * (v + aI * d) + b * (t_ref + aT * d))
    ref = exact_scores(stored, "images", q)
    hits = MultimodalRetriever(kb, channels=["composed"], composed_method="pdv", **EXACT).retrieve(
        Query(text=text, image=image, reference_text=ref_text), k=10)
    assert_top_k([h.id for h in hits], ref, 10)
    np.testing.assert_allclose([h.scores["composed"] for h in hits], [ref[h.id] for h in hits], atol=1e-4)
    # without a description and without a captioner, PDV says what it needs
    with pytest.raises(ConfigError, match="reference_text"):
        MultimodalRetriever(kb, channels=["composed"], composed_method="pdv").retrieve(Query(text=text, image=image))


def test_cirevl_uses_injected_captioner_and_rewriter(kb, stored):
    calls = []
    captioner = lambda im: calls.append(im.size) or "a red square"
    rewriter = lambda caption, mod: f"{caption} {mod}".replace("red", "blue")
    r = MultimodalRetriever(kb, channels=["composed"], composed_method="cirevl", captioner=captioner,
                            rewriter=rewriter, **EXACT)
    hits = r.retrieve(Query(text="in blue", image=_query_image(kb)), k=5)
    q = kb.embedder.embed_texts(["a blue square in blue"])[0]
    assert_top_k([h.id for h in hits], exact_scores(stored, "images", q), 5)
    assert calls == [(32, 32)]


def test_lexical_finds_rare_name_equals_bm25_and_follows_deletes(tmp_path, tiny_clip):
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    texts = ["the Picarones cathedral at dusk", "a cathedral", "a small dog", "the dog called Picarones", "a cat"]
    kb.add([Record(id=f"d{i}", text=t, image=Image.new("RGB", (8, 8), (i * 40, 0, 0))) for i, t in enumerate(texts)])
    r = MultimodalRetriever(kb, channels=["lexical"], near_duplicate_threshold=None)
    hits = r.retrieve("Picarones cathedral", k=5)
    # Lucene BM25 (k1=1.5, b=0.75; no (k1+1) factor since Lucene 8), by hand over the tokenised corpus
    docs = [[w for w in t.lower().split() if w not in ("the", "a", "at")] for t in texts]
    avgdl = sum(map(len, docs)) / len(docs)
    ref = []
    for d in docs:
        s = 0.0
        for term in ("picarones", "cathedral"):
            df = sum(term in x for x in docs)
            tf = d.count(term)
            s += math.log(1 + (len(docs) - df + 0.5) / (df + 0.5)) * tf / (tf + 1.5 * (0.25 + 0.75 * len(d) / avgdl))
        ref.append(s)
    ref_ids = [f"d{i}" for i in np.argsort(-np.array(ref), kind="stable") if ref[i] > 0]
    assert [h.id for h in hits] == ref_ids
    np.testing.assert_allclose([h.scores["lexical"] for h in hits], sorted([x for x in ref if x > 0], reverse=True), rtol=1e-5)
    # kept in sync: a deleted record disappears, an added one appears, also from a fresh retriever
    kb.delete("d0")
    assert "d0" not in [h.id for h in r.retrieve("Picarones cathedral", k=5)]
    kb.add([Record(id="d9", text="Picarones again", image=Image.new("RGB", (8, 8), (0, 9, 9)))])
    assert "d9" in [h.id for h in MultimodalRetriever(kb, channels=["lexical"]).retrieve("Picarones", k=5)]
    assert (kb.path / "lexical" / "meta.json").exists()  # persisted beside the KB


def test_where_filters_match_numpy_on_the_subset(kb, stored):
    q = "a tiny new star"
    tv = kb.embedder.embed_texts([q])[0]
    where = {"$and": [{"group": {"$in": [1, 3]}}, {"kind": "cat"}]}
    mask = [m["group"] in (1, 3) and m["kind"] == "cat" for m in stored["metas"]]
    hits = MultimodalRetriever(kb, channels=["text_to_image"], **EXACT).retrieve(q, k=8, where=where)
    assert_top_k([h.id for h in hits], exact_scores(stored, "images", tv, np.array(mask)), 8)
    lex = MultimodalRetriever(kb, channels=["lexical"]).retrieve("star", k=50, where=where)
    assert lex and all(h.record.metadata["kind"] == "cat" and h.record.metadata["group"] in (1, 3) for h in lex)
    with pytest.raises(ConfigError, match=r"`where`.*\$regexx"):
        MultimodalRetriever(kb).retrieve(q, where={"kind": {"$regexx": "c"}})


def test_near_duplicates_collapse_to_the_better_copy(tmp_path, tiny_clip):
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    rng = np.random.default_rng(3)
    same = _image(rng)
    kb.add([Record(id="a", text="first copy", image=same), Record(id="b", text="second copy", image=same),
            Record(id="c", text="different", image=_image(rng))])
    r = MultimodalRetriever(kb, channels=["text_to_text"])
    full = [h.id for h in r.retrieve("first copy", k=3, near_duplicate_threshold=None)]
    collapsed = [h.id for h in r.retrieve("first copy", k=3)]
    # a and b share an image (cosine 1): the one ranked higher stays, the other goes
    better = min(("a", "b"), key=full.index)
    assert collapsed == [x for x in full if x in (better, "c")]


def test_mmr_equals_greedy_formula(kb, stored):
    q = "red star"
    tv = kb.embedder.embed_texts([q])[0]
    ids, rel = topk(list(stored["ids"]), list(stored["images"] @ tv), 21)
    # No near-ties for float32 to break otherwise: the 20 candidates stand 1.9e-4 clear of the 21st,
    # and each greedy choice wins by at least 4.4e-3 (measured), both far above TIE_TOL.
    assert rel[19] - rel[20] > TIE_TOL
    ids, rel = ids[:20], rel[:20]
    vecs = stored["images"][[list(stored["ids"]).index(i) for i in ids]]
    rel = (np.array(rel) - min(rel)) / (max(rel) - min(rel))
    chosen: list[int] = []
    for _ in range(5):
        gain = {i: 0.5 * rel[i] - 0.5 * (max(vecs[i] @ vecs[j] for j in chosen) if chosen else 0.0)
                for i in range(20) if i not in chosen}
        best, runner_up = sorted(gain.values(), reverse=True)[:2]
        assert best - runner_up > TIE_TOL
        chosen.append(max(gain, key=gain.get))
    hits = MultimodalRetriever(kb, channels=["text_to_image"], fusion="weighted", near_duplicate_threshold=None,
                               n_candidates=20, mmr_lambda=0.5).retrieve(q, k=5)
    assert [h.id for h in hits] == [ids[i] for i in chosen]


@pytest.mark.parametrize("method", ["qbnorm", "dbnorm"])
def test_hubness_normalisation_equals_formula(kb, stored, method):
    # the static (ungated) forms at beta = 20 for both banks; the method defaults (dynamic QB-Norm,
    # DBNorm's 1/1.99 and 3) are checked in test_retrieval_exact.py
    static = dict(hubness_beta=20.0, hubness_gallery_beta=20.0, hubness_dynamic=False)
    r = MultimodalRetriever(kb, channels=["text_to_image"], hubness=method, hubness_bank_size=64, **static, **EXACT)
    banks = r.refresh_hubness_banks()
    assert (kb.path / "hubness-banks.npz").exists() and len(banks.ids["text"]) == 64
    q = "dotted blue circle"
    tv = kb.embedder.embed_texts([q])[0]
    beta = 20.0
    s = stored["images"] @ tv
    scores = []
    for i, rid in enumerate(stored["ids"]):
        g = stored["images"][i]
        qb = [beta * (b @ g) for b, bid in zip(banks.vectors["text"], banks.ids["text"]) if bid != rid]
        val = beta * s[i] - np.logaddexp.reduce(qb)
        if method == "dbnorm":
            gb = [beta * (h @ g) for h, hid in zip(banks.vectors["image"], banks.ids["image"]) if hid != rid]
            val += beta * s[i] - np.logaddexp.reduce(gb)
        scores.append(val)
    ref = dict(zip(stored["ids"].tolist(), scores))
    hits = r.retrieve(q, k=10, fusion="weighted")
    assert_top_k([h.id for h in hits], ref, 10, tol=1e-4)  # normalised scores: measured 1.1e-6 apart
    np.testing.assert_allclose([h.scores["text_to_image"] for h in hits], [ref[h.id] for h in hits], rtol=1e-4)
    # reloaded from disk by a new retriever: same banks; another bank size resamples them
    again = MultimodalRetriever(kb, channels=["text_to_image"], hubness=method, hubness_bank_size=64, **static,
                                **EXACT)
    assert_top_k([h.id for h in again.retrieve(q, k=10, fusion="weighted")], ref, 10, tol=1e-4)
    MultimodalRetriever(kb, channels=["text_to_image"], hubness=method, hubness_bank_size=32).retrieve(q, k=1)
    from mmrag.retrievers.hubness import HubnessBanks

    assert len(HubnessBanks.load_or_build(kb, size=32).ids["text"]) == 32


@pytest.mark.parametrize("query, expected", [
    ("red star", {"text_to_image", "text_to_text", "lexical"}),
    ("image and text", {"text_to_image", "text_to_text", "image_to_image", "image_to_text", "composed", "lexical"}),
    ("image", {"image_to_image", "image_to_text"}),
])
def test_default_channels_follow_the_query(kb, query, expected):
    """Without `channels`, exactly the channels the query allows run, each contributes every
    candidate it finds when run alone, and every hit's score is the RRF sum (k=60) over the
    channels that found it."""
    if query == "image and text":
        query = Query(text="red", image=_query_image(kb))
    elif query == "image":
        query = kb.get("r001")[0].image
    # every record a candidate and k past them all: the fused list comes back whole
    r = MultimodalRetriever(kb, near_duplicate_threshold=None, n_candidates=N)
    hits = r.retrieve(query, k=N)
    assert set().union(*(h.scores for h in hits)) == expected
    for c in expected:
        alone = {h.id: h.scores[c] for h in r.retrieve(query, k=N, channels=[c])}
        fused = {h.id: h.scores[c] for h in hits if c in h.scores}
        assert fused.keys() == alone.keys(), c
        np.testing.assert_allclose([fused[i] for i in alone], list(alone.values()), rtol=0, atol=1e-6)
    per_channel = {c: [h.scores[c] for h in hits if c in h.scores] for c in expected}
    for h in hits:  # ranks from each channel's own scores; a tied score may take any rank of its tie
        low = high = 0.0
        for c, score in h.scores.items():
            better, tied = sum(x > score for x in per_channel[c]), sum(x == score for x in per_channel[c])
            low, high = low + 1 / (60 + better + tied), high + 1 / (60 + better + 1)
        assert low - 1e-12 <= h.score <= high + 1e-12, (h.id, h.scores, h.score)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query=""), "empty"),
    (dict(query="   "), "empty"),
    (dict(query="a", k=0), "`k`"),
    (dict(query="a", k=2.5), "`k`"),
    (dict(query="a", channels=["telepathy"]), "telepathy"),
    (dict(query="a", channels=["image_to_image"]), "needs an image"),
    (dict(query=Query(image="/no/such/file.png")), "does not exist"),
    (dict(query=12), "must be a str"),
    (dict(query="a", fusion="max"), "fusion"),
    (dict(query="a", mmr_lambda=2), "mmr_lambda"),
    (dict(query="a", bogus=1), "Unknown retriever option"),
])
def test_bad_queries_get_typed_errors(kb, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MultimodalRetriever(kb).retrieve(**kwargs)


def test_unreadable_image_and_reranker_contract(kb, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="not a readable image"):
        MultimodalRetriever(kb).retrieve(Query(image=bad))
    from mmrag.pipelines.search import SearchPipeline

    with pytest.raises(ConfigError, match="rank"):
        SearchPipeline(MultimodalRetriever(kb), reranker=object())


@pytest.mark.slow
def test_hnsw_recall_at_10_on_20k_records(tmp_path, tiny_clip):
    """20k records written straight into the KB's collections (synthetic unit vectors), queried
    through retrieve(): HNSW top-10 vs exact numpy top-10."""
    enc = DualEncoder(tiny_clip)
    kb = KnowledgeBase.open(tmp_path / "kb", enc)
    rng = np.random.default_rng(1)
    n, d = 20_000, enc.dim
    vecs = rng.normal(size=(n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"s{i:05d}" for i in range(n)]
    metas = [{"mmrag_image": "00/" + "0" * 64 + ".png", "mmrag_sha256": "0" * 64, "mmrag_source": "synthetic"}] * n
    kb.vectors.write(ids, vecs, vecs, metas, [f"synthetic {i}" for i in range(n)], upsert=False)
    r = MultimodalRetriever(kb, channels=["text_to_image"], near_duplicate_threshold=None)
    queries = [f"query number {i} {w}" for i, w in enumerate(rng.choice(WORDS, 50))]
    qv = enc.embed_texts(queries)
    recalls = []
    for q, v in zip(queries, qv):
        exact = set(np.array(ids)[np.argsort(-(vecs @ v))[:10]])
        recalls.append(len(exact & {h.id for h in r.retrieve(q, k=10)}) / 10)
    assert np.mean(recalls) >= 0.99, np.mean(recalls)


def test_done_when_text_to_image_top10_equals_exact_search_on_2k_records(tmp_path, tiny_clip):
    """Issue #3's acceptance: a 2k-record tiny KB, channels=["text_to_image"], top-10 == exact numpy.

    ef_search >= 2000 makes HNSW exact by construction (see the `kb` fixture); at the default 400 it
    is approximate, and its graph depends on the insertion threads. The default's recall is the 20k
    test's subject (slow)."""
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip), hnsw={"ef_search": 2048})
    rng = np.random.default_rng(5)
    assert kb.add([Record(text=f"record {i} " + " ".join(rng.choice(WORDS, 3)), image=_image(rng))
                   for i in range(2000)], batch_size=256).added == 2000
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    got = raw.get_collection(names["images"], embedding_function=None).get(include=["embeddings"])
    ids, vecs = got["ids"], np.asarray(got["embeddings"])
    r = MultimodalRetriever(kb, channels=["text_to_image"], near_duplicate_threshold=None)
    for q in ("a red star", "huge old dotted square", "record 7"):
        exact = dict(zip(ids, (vecs @ kb.embedder.embed_texts([q])[0]).tolist()))
        assert_top_k([h.id for h in r.retrieve(q, k=10)], exact, 10)  # two of these scores are 7.9e-7 apart


def test_single_channel_short_fetch_equals_full_walk_when_duplicates_spill_over(tmp_path, tiny_clip):
    """The 2k-candidate first fetch must give exactly the full fetch's answer, also when the
    near-duplicate pass leaves fewer than k hits in it (then the retriever fetches n_candidates)."""
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    rng = np.random.default_rng(11)
    same = _image(rng)
    kb.add([Record(id=f"d{i:02d}", text=f"red star copy {i}", image=same) for i in range(12)]
           + [Record(id=f"u{i:02d}", text=f"blue ring number {i}", image=_image(rng)) for i in range(12)])
    names = json.loads((kb.path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    t = raw.get_collection(names["texts"], embedding_function=None).get(include=["embeddings"])
    i = raw.get_collection(names["images"], embedding_function=None).get(ids=t["ids"], include=["embeddings"])
    image_of = dict(zip(i["ids"], np.asarray(i["embeddings"])))
    q = "red star copy"
    order, _ = topk(t["ids"], list(np.asarray(t["embeddings"]) @ kb.embedder.embed_texts([q])[0]), len(t["ids"]))
    kept: list[str] = []
    for rid in order:  # the greedy walk over the whole ranking, by hand
        if all(image_of[rid] @ image_of[o] < 0.99999 for o in kept):
            kept.append(rid)
    r = MultimodalRetriever(kb, channels=["text_to_text"], near_duplicate_threshold=0.99999, n_candidates=24)
    for k in (2, 4, 6):
        assert [h.id for h in r.retrieve(q, k=k)] == kept[:k]
    assert sum(x.startswith("d") for x in kept[:6]) == 1  # the twelve copies count once


def test_lexical_index_built_during_a_write_is_not_kept(tmp_path, tiny_clip):
    """A search racing a write (between the revision bump and the Chroma write) must not leave a
    stale index that misses added records or serves deleted ones."""
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    kb.add([Record(id=f"g{i}", text=f"grape number {i}", image=Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(5)])
    racer = MultimodalRetriever(kb, channels=["lexical"], near_duplicate_threshold=None)
    real_write, real_delete = kb.vectors.write, kb.vectors.delete

    def write_after_a_search(*args, **kwargs):
        racer.retrieve("grape", k=9)  # indexes the old texts while the revision already changed
        real_write(*args, **kwargs)

    def delete_after_a_search(ids):
        racer.retrieve("grape", k=9)
        real_delete(ids)

    def fresh_ids():
        fresh = MultimodalRetriever(KnowledgeBase.open(kb.path), channels=["lexical"], near_duplicate_threshold=None)
        return sorted(h.id for h in fresh.retrieve("grape", k=9))

    kb.vectors.write = write_after_a_search
    kb.add([Record(id="g9", text="grape the new one", image=Image.new("RGB", (8, 8), (0, 9, 0)))])
    kb.vectors.write = real_write
    assert fresh_ids() == ["g0", "g1", "g2", "g3", "g4", "g9"]
    kb.vectors.delete = delete_after_a_search
    kb.delete(["g0", "g1"])
    kb.vectors.delete = real_delete
    assert fresh_ids() == ["g2", "g3", "g4", "g9"]
    assert sorted(h.id for h in racer.retrieve("grape", k=9)) == ["g2", "g3", "g4", "g9"]


def test_short_first_fetch_asks_for_2k_and_lexical_filters_still_fill_k(tmp_path, tiny_clip):
    kb = KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    kb.add([Record(id=f"a{i:03d}", text="apple", image=Image.new("RGB", (8, 8), (i % 250, 0, 0)), metadata={"kind": "a"})
            for i in range(250)]
           + [Record(id=f"b{i:02d}", text=f"apple pie recipe number {i} with cream", metadata={"kind": "b"},
                     image=Image.new("RGB", (8, 8), (0, i, 0))) for i in range(20)])
    r = MultimodalRetriever(kb, near_duplicate_threshold=None)
    # lexical + where filters after scoring: it must still fill k from the matching records
    hits = r.retrieve("apple", k=10, channels=["lexical"], where={"kind": "b"})
    assert len(hits) == 10 and all(h.id.startswith("b") for h in hits)
    # a single dense channel first asks Chroma for 2k candidates, not n_candidates
    asked = []
    real_query = kb.vectors.images.query
    kb.vectors.images.query = lambda **kw: asked.append(kw["n_results"]) or real_query(**kw)
    try:
        r.retrieve("apple", k=4, channels=["text_to_image"])
    finally:
        kb.vectors.images.query = real_query
    assert asked == [8]
