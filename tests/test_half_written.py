"""Half-written records are invisible, not fatal: a record a concurrent writer has put in one
collection but not yet the other (writes go images first, then texts) never breaks a query."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmrag.retrievers import MultimodalRetriever, Query, Record

SETTINGS = [
    dict(channels=["composed"], composed_method="weimocir", scoring_scope="candidates"),
    dict(channels=["composed"], composed_method="weimocir", scoring_scope="gallery"),
    dict(channels=["image_to_image", "image_to_text", "text_to_image"], mmr_lambda=0.5),
    dict(channels=["text_to_text", "text_to_image"]),
    dict(channels=["image_to_image"], near_duplicate_threshold=0.99),
    dict(channels=["text_to_text", "image_to_text"], near_duplicate_threshold=0.99),
    dict(channels=["text_to_text"], mmr_lambda=0.5),
    dict(channels=["text_to_image", "lexical"], hubness="qbnorm"),
]


@pytest.fixture
def half_written_kb(kb):
    kb.add([Record(id=f"r{i}", text=f"a thing number {i}", image=Image.new("RGB", (24, 24), (30 * i, 90, 200 - 20 * i)))
            for i in range(8)])
    # what a writer killed (or still running) between the two collection writes leaves: the record
    # in the image collection only, with the closest possible vector to the queries below
    stored = kb.vectors.images.get(ids=["r0"], include=["embeddings", "metadatas", "documents"])
    kb.vectors.images.add(ids=["half"], embeddings=[np.asarray(stored["embeddings"][0])],
                          metadatas=stored["metadatas"], documents=["a thing number 0, half written"])
    # and what a delete interrupted between the two collections leaves: the text half only
    text = kb.vectors.texts.get(ids=["r1"], include=["embeddings", "metadatas", "documents"])
    kb.vectors.texts.add(ids=["text-only"], embeddings=[np.asarray(text["embeddings"][0])],
                         metadatas=text["metadatas"], documents=["a thing number 0"])
    return kb


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_queries_skip_or_complete_a_half_written_record(half_written_kb, settings):
    image = half_written_kb.get("r0")[0].open_image()
    retriever = MultimodalRetriever(half_written_kb, **{"near_duplicate_threshold": None, **settings})
    query = Query(text="a thing number 0", image=image)
    needs = {"composed": (True, True), "image_to_image": (False, True), "image_to_text": (False, True)}
    q = query if any(needs.get(c, (True, False))[1] for c in settings["channels"]) else Query(text=query.text)
    hits = retriever.retrieve(q, k=5)  # no KeyError
    assert len(hits) == 5 and len({h.id for h in hits}) == 5
    for h in hits:  # whatever is returned is a whole record, with its text and image
        assert h.record.text and h.record.open_image().size == (24, 24)
    if settings["channels"] == ["composed"]:  # the composed score needs both halves: skipped
        assert "half" not in {h.id for h in hits}


class _Flaky:
    """A collection whose first ``failures`` reads fail as embedded Chroma does when another
    process writes it meanwhile (chromadb InternalError "Error finding id")."""

    def __init__(self, collection, failures: int):
        self.collection, self.failures, self.calls = collection, failures, 0
        self.name = collection.name

    def query(self, *args, **kwargs):
        from chromadb.errors import InternalError

        self.calls += 1
        if self.calls <= self.failures:
            raise InternalError("Error executing plan: Internal error: Error finding id")
        return self.collection.query(*args, **kwargs)


def test_embedded_read_race_is_retried_then_a_typed_error(kb, monkeypatch):
    from mmrag.retrievers import KnowledgeBaseError
    from mmrag.retrievers.kb import store

    monkeypatch.setattr(store, "READ_BACKOFF_S", 0.0)  # the retry count matters here, not the wait
    kb.add([Record(id=f"r{i}", text=f"thing {i}", image=Image.new("RGB", (24, 24), (40 * i, 9, 9))) for i in range(3)])
    expected = MultimodalRetriever(kb).retrieve("thing 1", k=2, channels=["text_to_text"])
    real = kb.vectors.texts._collection
    kb.vectors.texts._collection = flaky = _Flaky(real, failures=store.READ_RETRIES)
    assert [h.id for h in MultimodalRetriever(kb).retrieve("thing 1", k=2, channels=["text_to_text"])] == \
        [h.id for h in expected]  # retried through the race
    assert flaky.calls == store.READ_RETRIES + 1
    kb.vectors.texts._collection = _Flaky(real, failures=10 ** 6)
    with pytest.raises(KnowledgeBaseError, match="Chroma server"):
        MultimodalRetriever(kb).retrieve("thing 1", k=2, channels=["text_to_text"])
    kb.vectors.texts._collection = real


@pytest.mark.parametrize("settings", [dict(channels=["composed"], composed_method="weimocir"),
                                      dict(channels=["text_to_image"], hubness="qbnorm"),
                                      dict(channels=["text_to_image"], hubness="dbnorm")],
                         ids=["weimocir", "qbnorm", "dbnorm"])
def test_exact_scoring_with_a_write_landing_mid_query(kb, settings):
    """The server soak caught this: a write landing between two gallery fetches of one query made
    their sizes disagree (a numpy broadcast error). A write now lands in the middle of the first
    gallery fetch; every query before and after it still answers, over a consistent snapshot."""
    from mmrag.retrievers.hubness import GalleryCache

    kb.add([Record(id=f"r{i}", text=f"a thing number {i}", image=Image.new("RGB", (24, 24), (30 * i, 90, 9)))
            for i in range(6)])
    real_fetch, writes = GalleryCache._fetch, iter(range(100, 103))

    def fetch_then_write(self, collection):
        out = real_fetch(self, collection)
        i = next(writes, None)
        if i is not None:  # another writer, right between this fetch and the next one
            kb.add([Record(id=f"w{i}", text=f"written meanwhile {i}", image=Image.new("RGB", (24, 24), (i, 9, 90)))])
        return out

    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None, scoring_scope="gallery", **settings)
    image = kb.get("r1")[0].open_image()
    query = Query(text="a thing", image=image) if settings["channels"] == ["composed"] else Query(text="a thing")
    GalleryCache._fetch = fetch_then_write
    try:
        for _ in range(3):
            assert len(retriever.retrieve(query, k=4)) == 4
    finally:
        GalleryCache._fetch = real_fetch
    assert kb.count() == 9
