"""The near-duplicate pass (``MultimodalRetriever._walk``) against a greedy walk written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mmrag.retrievers import KnowledgeBase, MultimodalRetriever
from mmrag.retrievers.channels import CandidatePool


def reference_walk(ranked, image_of, threshold, limit):
    """Best first, one candidate at a time: skip what is gone, drop what is within ``threshold``
    (cosine) of an already kept image, stop at ``limit``. A dropped candidate drops nothing."""
    kept, collapsed = [], 0
    for rid, score in ranked:
        if rid not in image_of:
            continue
        v = image_of[rid].astype(np.float64)
        if threshold is not None and any(float(v @ image_of[o].astype(np.float64)) >= threshold for o, _ in kept):
            collapsed += 1
            continue
        kept.append((rid, score))
        if len(kept) == limit:
            break
    return [rid for rid, _ in kept], [sc for _, sc in kept], collapsed


def chained_vectors(rng, n, d, step):
    """Unit vectors in ``n // 4`` chains of four: each one ``step`` radians from the one before, so
    neighbours are near-duplicates at cos(step) and the two ends of a chain are not."""
    out = []
    for _ in range(n // 4):
        a, b = rng.normal(size=(2, d))
        b -= (a @ b) / (a @ a) * a
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        out += [np.cos(i * step) * a + np.sin(i * step) * b for i in range(4)]
    return np.array(out, np.float32)


@pytest.fixture(scope="module")
def empty_kb(tmp_path_factory, clip_encoder) -> KnowledgeBase:
    return KnowledgeBase.open(tmp_path_factory.mktemp("walk") / "kb", clip_encoder)


def pool_of(kb, image_of) -> CandidatePool:
    """A pool holding these records, as a channel's ANN query leaves it (nothing to fetch again)."""
    pool = CandidatePool(kb)
    for rid, v in image_of.items():
        pool.meta[rid] = ({}, "")
        pool.vecs["images"][rid] = v
    return pool


def has_chain(ranked, image_of, kept, threshold) -> bool:
    """Whether something kept is a near-duplicate of a dropped candidate ranked above it: what a
    walk that compared with every earlier candidate, dropped or not, would have lost."""
    pos = {rid: i for i, (rid, _) in enumerate(ranked)}
    dropped = [rid for rid, _ in ranked[:pos[kept[-1]]] if rid in image_of and rid not in kept]
    return any(pos[x] < pos[k] and float(image_of[k] @ image_of[x]) >= threshold for k in kept for x in dropped)


@pytest.mark.parametrize("seed", range(6))
def test_walk_equals_the_greedy_reference_on_random_chains(empty_kb, seed):
    rng = np.random.default_rng(seed)
    vecs = chained_vectors(rng, 240, 8, step=0.25)  # cos 0.969 to the next one, 0.878 two along
    vecs = np.concatenate([vecs, rng.normal(size=(40, 8)).astype(np.float32)])  # and some loners
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"r{i:03d}" for i in range(len(vecs))]
    ranked = [(ids[i], 1.0 - r / len(ids)) for r, i in enumerate(rng.permutation(len(ids)))]
    # records deleted since the ANN query: in the ranking, not in the pool (nor in the KB)
    gone = {ids[i] for i in rng.choice(len(ids), 15, replace=False)}
    image_of = {rid: v for rid, v in zip(ids, vecs) if rid not in gone}
    chains = 0
    for threshold in (0.95, 0.85, None):
        for limit in (1, 3, 10, 25, len(ranked)):
            got_ids, got_scores, got_collapsed = MultimodalRetriever._walk(
                ranked, threshold, pool_of(empty_kb, image_of), limit)
            want = reference_walk(ranked, image_of, threshold, limit)
            assert (got_ids, got_scores.tolist(), got_collapsed) == want, (threshold, limit)
            # the doubling fetch walks a longer list: a shorter one keeps what the longer one keeps first
            for m in (limit, 2 * limit, 50):
                short = MultimodalRetriever._walk(ranked[:m], threshold, pool_of(empty_kb, image_of), limit)[0]
                assert short == reference_walk(ranked[:m], image_of, threshold, limit)[0]
            chains += threshold is not None and has_chain(ranked, image_of, want[0], threshold)
    assert chains >= 2


def test_retrieve_collapses_chains_like_the_reference_while_fetching_more(tmp_path, clip_encoder):
    """End to end: synthetic image vectors in chains of near-duplicates, queried through
    retrieve() with few candidates, so the near-duplicate pass eats the first fetches and the
    retriever fetches again (2k, then n_candidates, then doubling)."""
    n = 160
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder, hnsw={"ef_search": 2 * n})  # exact by construction
    rng = np.random.default_rng(7)
    q = "a red star"
    qv = clip_encoder.embed_texts([q])[0]
    vecs = chained_vectors(rng, n, clip_encoder.dim, step=0.2) + 0.5 * qv  # leaning towards the query
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"v{i:03d}" for i in range(n)]
    metas = [{"mmrag_image": "00/" + "0" * 64 + ".png", "mmrag_sha256": "0" * 64, "mmrag_source": "synthetic"}] * n
    kb.vectors.write(ids, vecs, vecs, metas, [f"synthetic {i}" for i in range(n)], upsert=False)
    scores = vecs @ qv
    order = np.argsort(-scores)
    assert np.min(-np.diff(scores[order])) > 1e-6  # no near-ties: Chroma's ranking is this one
    ranked = [(ids[i], float(scores[i])) for i in order]
    image_of = dict(zip(ids, vecs))
    r = MultimodalRetriever(kb, channels=["text_to_image"], n_candidates=8, near_duplicate_threshold=0.97)
    for k in (1, 5, 12, 30):
        want, _, collapsed = reference_walk(ranked, image_of, 0.97, k)
        hits = r.retrieve(q, k=k)
        assert ([h.id for h in hits], hits.collapsed) == (want, collapsed)
        assert [h.id for h in r.retrieve(r.encode(q), k=k)] == want  # encoded once, not again
    assert collapsed > 0 and has_chain(ranked, image_of, want, 0.97)
