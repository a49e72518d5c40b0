"""llama-index adapters, run through llama-index-core itself (no OpenAI, no network, no global Settings)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle, TextNode
from PIL import Image

from mmrag.retrievers import ConfigError, KnowledgeBase, Record
from mmrag.retrievers.query import Query
from mmrag.retrievers.llamaindex import (
    INSTALL_COMMAND,
    MMRAGRerankPostprocessor,
    MMRAGRetriever,
    node_to_hit,
)
from mmrag.retrievers.rerank import DualEncoderReranker
from mmrag.retrievers.retriever import MultimodalRetriever

TEXTS = [
    ("A photo of a cat sitting on a red sofa.", "animal"),
    ("A black dog running across the green park.", "animal"),
    ("The Eiffel Tower in Paris at night, with lights.", "place"),
    ("A red double-decker bus driving down a busy street in London.", "vehicle"),
    ("Snow-covered mountains under a clear blue sky.", "place"),
    ("Two people riding bicycles along the beach at sunset.", "vehicle"),
]
QUESTION = "a red bus in London"


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def retriever(tmp_path_factory, clip_encoder) -> MultimodalRetriever:
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("llamaindex") / "kb", clip_encoder)
    kb.add([Record(text=t, image=_image(i), id=f"r{i}", metadata={"kind": kind, "n": i})
            for i, (t, kind) in enumerate(TEXTS)])
    # Random tiny-CLIP images all look alike; keep them all instead of collapsing near-duplicates.
    return MultimodalRetriever(kb, near_duplicate_threshold=None)


@pytest.fixture(scope="module")
def reranker(clip_encoder) -> DualEncoderReranker:
    # Text-to-text similarity only: an order visibly different from the fused retrieval order.
    return DualEncoderReranker(clip_encoder, image_weight=0.0, text_weight=1.0)


def test_retriever_returns_image_nodes_for_our_hits(retriever):
    nodes = MMRAGRetriever(retriever, similarity_top_k=4).retrieve(QUESTION)
    hits = retriever.retrieve(QUESTION, k=4)
    assert [n.node.node_id for n in nodes] == [h.id for h in hits] and len(nodes) == 4
    for n, h in zip(nodes, hits):
        assert isinstance(n.node, ImageNode) and n.score == h.score
        assert n.node.text == h.record.text and n.node.image_path == h.record.image
        assert Path(n.node.image_path).is_file()
        assert n.node.metadata == {**h.record.metadata, "mmrag_id": h.id, "mmrag_scores": h.scores}
        assert set(h.scores) >= {"text_to_image", "text_to_text"}  # per-channel scores came through
        # Our bookkeeping stays out of what the LLM reads.
        assert "mmrag" not in n.node.get_content(metadata_mode="llm") and "kind: " in n.node.get_content(metadata_mode="llm")


def test_retriever_honours_the_bundle_and_the_filter(retriever):
    li = MMRAGRetriever(retriever, similarity_top_k=3, where={"kind": "place"})
    ids = lambda nodes: [n.node.node_id for n in nodes]
    assert ids(li.retrieve(QUESTION)) == [h.id for h in retriever.retrieve(QUESTION, k=3, where={"kind": "place"})]
    assert all(n.node.metadata["kind"] == "place" for n in li.retrieve(QUESTION))

    li = MMRAGRetriever(retriever, similarity_top_k=3)
    # custom_embedding_strs replace the question as the text to search with
    bundle = QueryBundle(query_str="which vehicle is this, and where?", custom_embedding_strs=["snowy mountains"])
    assert ids(li.retrieve(bundle)) == [h.id for h in retriever.retrieve("snowy mountains", k=3)]
    # image_path makes it an image query, alone or with text (composed)
    query_image = retriever.kb.get("r2")[0].image
    assert ids(li.retrieve(QueryBundle(query_str="", image_path=query_image))) == \
        [h.id for h in retriever.retrieve(Path(query_image), k=3)]
    assert ids(li.image_to_image_retrieve(query_image)) == [h.id for h in retriever.retrieve(Path(query_image), k=3)]
    assert ids(li.retrieve(QueryBundle(query_str="at night", image_path=query_image))) == \
        [h.id for h in retriever.retrieve(Query(text="at night", image=Path(query_image)), k=3)]

    with pytest.raises(ConfigError, match="one text per query"):
        li.retrieve(QueryBundle(query_str="q", custom_embedding_strs=["a cat", "a dog"]))
    with pytest.raises(ConfigError, match="similarity_top_k"):
        MMRAGRetriever(retriever, similarity_top_k=0)


def test_query_engine_returns_our_nodes_in_the_reranked_order(retriever, reranker):
    engine = RetrieverQueryEngine.from_args(
        MMRAGRetriever(retriever, similarity_top_k=6),
        llm=MockLLM(),  # echoes the prompt: no model, no network
        node_postprocessors=[MMRAGRerankPostprocessor(reranker, top_n=3)],
    )
    response = engine.query(QUESTION)

    retrieved = retriever.retrieve(QUESTION, k=6)
    expected = reranker.rank(QUESTION, retrieved, top_k=3)
    assert [h.id for h in expected] != [h.id for h in retrieved[:3]]  # else this test could not see a rerank
    assert [n.node.node_id for n in response.source_nodes] == [h.id for h in expected]
    np.testing.assert_allclose([n.score for n in response.source_nodes], [h.score for h in expected], atol=1e-6)
    for n, h in zip(response.source_nodes, expected):
        assert isinstance(n.node, ImageNode) and n.node.metadata["mmrag_scores"]["rerank"] == pytest.approx(h.score)
        assert n.node.metadata["mmrag_scores"]["text_to_image"] == h.scores["text_to_image"]
    assert expected[0].record.text in str(response)  # the synthesizer saw the reranked context


def test_postprocessor_rebuilds_records_from_foreign_nodes(reranker, retriever):
    # Nodes from elsewhere: no mmrag keys, one without a score. The record comes from text + image_path.
    image = retriever.kb.get("r3")[0].image
    nodes = [
        NodeWithScore(node=ImageNode(id_="bus", text=TEXTS[3][0], image_path=image, metadata={"src": "x"}), score=0.2),
        NodeWithScore(node=TextNode(id_="cat", text=TEXTS[0][0]), score=None),
    ]
    hit = node_to_hit(nodes[0], rank=1)
    assert (hit.id, hit.record.text, hit.record.image, hit.record.metadata, hit.score) == \
        ("bus", TEXTS[3][0], image, {"src": "x"}, 0.2)
    assert node_to_hit(nodes[1]).record.image is None and node_to_hit(nodes[1]).score == 0.0

    out = MMRAGRerankPostprocessor(reranker).postprocess_nodes(nodes, query_str=QUESTION)
    expected = reranker.rank(QUESTION, [node_to_hit(n) for n in nodes])
    assert [n.node.node_id for n in out] == [h.id for h in expected]
    assert [n.score for n in out] == [h.score for h in expected]
    assert nodes[0].score == 0.2 and "mmrag_scores" not in nodes[0].node.metadata  # inputs untouched

    with pytest.raises(ConfigError, match="query"):
        MMRAGRerankPostprocessor(reranker).postprocess_nodes(nodes)
    with pytest.raises(ConfigError, match="top_n"):
        MMRAGRerankPostprocessor(reranker, top_n=0)


def test_missing_extra_names_the_install_command(monkeypatch):
    # Hide every llama_index module: importing one now fails as if the package were not installed.
    for name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "llama_index", None)
    monkeypatch.delitem(sys.modules, "mmrag.retrievers.llamaindex")
    with pytest.raises(ImportError) as error:
        importlib.import_module("mmrag.retrievers.llamaindex")
    assert INSTALL_COMMAND == 'pip install "mmrag[llamaindex]"' and INSTALL_COMMAND in str(error.value)
    assert type(error.value).__name__ == "MissingExtraError"
