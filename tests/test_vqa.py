"""RAGVQAPipeline, `mmrag ask` and `mmrag eval vqa` on a tiny KB with the tiny LLaVA."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmrag.generators import UnsupportedModelError, VLMAnswerer
from mmrag.pipelines.cli import main
from mmrag.pipelines.vqa import RAGVQAPipeline
from mmrag.retrievers import (ConfigError, DualEncoder, DualEncoderReranker, KnowledgeBase, KnowledgeBaseError,
                        MultimodalRetriever, Query, Record)
from mmrag.pipelines.dev.tiny_models import ensure_tiny_model


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def kb(tmp_path_factory, tiny_clip):
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("vqa") / "kb", DualEncoder(tiny_clip))
    kb.add([Record(id=f"e{i}", text=t, image=_image(i)) for i, t in enumerate([
        "The Chortai is a Russian sighthound breed.", "The Picarones are Peruvian doughnuts.",
        "The Eiffel Tower was finished in 1889.", "A Chortai dog runs on snow.", "A plain grey stone."])])
    return kb


@pytest.fixture(scope="module")
def answerer(tiny_models_dir):
    return VLMAnswerer(ensure_tiny_model("llava", tiny_models_dir), max_new_tokens=6).warm_up()


@pytest.fixture
def pipe(kb, answerer):
    return RAGVQAPipeline(answerer, MultimodalRetriever(kb, near_duplicate_threshold=None))


def _tokens_per_image(answerer) -> int:
    cfg = answerer.model.config
    return (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2


def test_end_to_end_references_prompt_and_images(pipe, kb, answerer):
    image = _image(0)
    out = pipe("Which breed is this dog?", image=image, k=3)
    expected = pipe.retriever.retrieve(Query(text="Which breed is this dog?", image=image), k=3,
                                       channels=["image_to_image", "text_to_text", "lexical"])
    assert [h.id for h in out.references] == [h.id for h in expected]
    assert isinstance(out.answer, str) and not out.no_retrieval and out.message is None
    # the prompt holds the references' texts labelled [1]..[3], in order, after the query image
    positions = [out.prompt.index(f"[{i}] {h.record.text}") for i, h in enumerate(out.references, start=1)]
    assert positions == sorted(positions)
    # the VLM got exactly 1 query image + 3 reference images
    prompt_ids = answerer.processor(text=out.prompt, images=[image] * 4, return_tensors="pt")["input_ids"]
    assert (prompt_ids == answerer.model.config.image_token_id).sum() == 4 * _tokens_per_image(answerer)
    assert set(out.timings) >= {"retrieve", "answer"} and all(c in out.references for c in out.cited)


def test_gold_references_bypass_retrieval_and_empty_means_no_retrieval(pipe):
    gold = [(None, "The Chortai is a sighthound."), (_image(7), "A photo of a Chortai.")]
    out = pipe("Which breed?", image=_image(1), references=gold)
    assert [h.record.text for h in out.references] == [t for _, t in gold] and not out.no_retrieval
    assert "[1] The Chortai is a sighthound." in out.prompt and "[2] A photo of a Chortai." in out.prompt
    none = pipe("Which breed?", image=_image(1), references=[])
    assert none.no_retrieval and none.references == [] and "without retrieval" in none.message
    assert "[1]" not in none.prompt
    bare = RAGVQAPipeline(pipe.answerer)  # no KB at all
    assert bare("What is it?", references=gold).references
    with pytest.raises(ConfigError, match="no knowledge base"):
        bare("What is it?")


def test_min_score_filter_and_no_retrieval_path(kb, answerer):
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None)
    scores = [h.score for h in retriever.retrieve(Query(text="Chortai breed"), k=3)]
    assert scores[0] > scores[1]
    cut = (scores[0] + scores[1]) / 2  # keeps exactly the first
    out = RAGVQAPipeline(answerer, retriever, min_score=cut)("Chortai breed", k=3)
    assert len(out.references) == 1 and out.references[0].score >= cut
    none = RAGVQAPipeline(answerer, retriever, min_score=scores[0] + 1)("Chortai breed", k=3)
    assert none.no_retrieval and none.references == [] and "min_score" in none.message


def test_multiple_choice_matches_the_answerer(pipe, answerer):
    out = pipe("Which breed is this?", image=_image(2), k=2, choices=["Chortai", "Borzoi", "Beagle"])
    direct = answerer.choose("Which breed is this?", ["Chortai", "Borzoi", "Beagle"], image=_image(2),
                             references=[_ref(h) for h in out.references])
    assert out.choice == direct.choice == ["Chortai", "Borzoi", "Beagle"][int(np.argmax(direct.scores))]
    np.testing.assert_allclose(out.choice_scores, direct.scores, rtol=1e-5)


def _ref(hit):
    from mmrag.generators import Reference

    return Reference(text=hit.record.text, image=hit.record.open_image(), score=hit.score, id=hit.id)


def test_streaming_yields_the_same_answer(pipe):
    plain = pipe("When was it finished?", image=_image(3), k=2)
    stream = pipe("When was it finished?", image=_image(3), k=2, stream=True)
    text = "".join(stream)
    assert text == stream.result.answer == plain.answer
    assert [h.id for h in stream.result.references] == [h.id for h in plain.references]


def test_two_stage_expands_the_question_with_entity_texts(kb, answerer):
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None)
    image = _image(0)
    out = RAGVQAPipeline(answerer, retriever, two_stage=True, expansion_k=1)("Which breed?", image=image, k=2)
    entity = retriever.retrieve(Query(image=image), k=1, channels=["image_to_image"])[0]
    expected = retriever.retrieve(Query(text=f"Which breed? {entity.record.text}", image=image), k=2,
                                  channels=["image_to_image", "text_to_text", "lexical"])
    assert [h.id for h in out.references] == [h.id for h in expected]


def test_rerank_stage_orders_the_references(kb, answerer, tiny_clip):
    reranker = DualEncoderReranker(DualEncoder(tiny_clip), image_weight=0.0, text_weight=1.0)
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None)
    pipe = RAGVQAPipeline(answerer, retriever, reranker=reranker)
    out = pipe("doughnuts from Peru", k=2)
    candidates = retriever.retrieve(Query(text="doughnuts from Peru"), k=retriever.settings.rerank_candidates)
    expected = reranker.rank(Query(text="doughnuts from Peru"), candidates, top_k=2)
    assert [h.id for h in out.references] == [h.id for h in expected] and "rerank" in out.timings
    assert "rerank" not in pipe("doughnuts from Peru", k=2, rerank=False).timings


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(question=""), ConfigError, "question"),
    (dict(question="q", k=0), ConfigError, "`k`"),
    (dict(question="q", image="/no/such.png"), ConfigError, "does not exist"),
    (dict(question="q", choices=["only one"]), ConfigError, "at least 2"),
    (dict(question="q", choices=["a", "b"], stream=True), ConfigError, "stream"),
    (dict(question="q", references=[42]), ConfigError, r"references\[0\]"),
])
def test_bad_input_gets_typed_errors(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_corrupt_image_empty_kb_and_model_without_images(tmp_path, answerer, tiny_clip, pipe):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ConfigError, match="not a readable image"):
        pipe("q", image=bad)
    empty = KnowledgeBase.open(tmp_path / "empty", DualEncoder(tiny_clip))
    with pytest.raises(KnowledgeBaseError, match="empty"):
        RAGVQAPipeline(answerer, MultimodalRetriever(empty))("q")
    with pytest.raises(UnsupportedModelError, match="without image support"):  # a dual encoder is no VLM
        VLMAnswerer(tiny_clip).warm_up()


@pytest.fixture
def tiny_config(tmp_path, tiny_models_dir):
    cfg = tmp_path / "tiny.yaml"
    # the tiny encoder sees the noise images as near-duplicates of each other: keep them all
    cfg.write_text(f"embedder:\n  model: tiny:clip\nvlm:\n  model: tiny:llava\n  max_new_tokens: 5\n"
                   f"retriever:\n  near_duplicate_threshold: null\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    return cfg


def test_cli_ask_streams_then_lists_references_and_json(tmp_path, kb, tiny_config, capsys):
    img = tmp_path / "q.png"
    _image(0).save(img)
    code = main(["ask", "Which breed?", "--kb", str(kb.path), "--image", str(img), "-k", "2", "--config", str(tiny_config),
                 "--html", str(tmp_path / "ask.html")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[-2].startswith("[1]") and out[-1].startswith("[2]")  # answer first, then references
    assert (tmp_path / "ask.html").read_text().count('id="ref-') == 2
    code = main(["ask", "Which breed?", "--kb", str(kb.path), "--image", str(img), "--config", str(tiny_config), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and isinstance(res["answer"], str) and len(res["references"]) == 3
    assert set(res["references"][0]) >= {"id", "score", "text"}
    code = main(["ask", "Which?", "--kb", str(kb.path), "--choices", "A;B;C", "--config", str(tiny_config), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["choice"] in ("A", "B", "C")
    for argv, needle in ((["ask", "q", "--kb", str(kb.path), "--choices", "A", "--config", str(tiny_config)], "choices"),
                         (["ask", "", "--kb", str(kb.path), "--config", str(tiny_config)], "question"),
                         (["ask", "q", "--kb", str(tmp_path / "nope"), "--config", str(tiny_config)], "No knowledge base")):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_eval_vqa_three_settings(tmp_path, kb, tiny_config, capsys):
    _image(0).save(tmp_path / "q0.png")
    _image(2).save(tmp_path / "q1.png")
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [
        {"image": "q0.png", "question": "Which breed?", "answers": ["chortai"] * 3, "gold_ids": ["e0"], "category": "dogs"},
        {"image": "q1.png", "question": "When was it finished?", "choices": ["1889", "1920"], "answer": "1889",
         "gold_ids": ["e2"], "category": "buildings"},
    ]) + "\n")
    preds = tmp_path / "preds.jsonl"
    code = main(["eval", "vqa", "--kb", str(kb.path), "--dataset", str(data), "--config", str(tiny_config),
                 "--predictions", str(preds), "--json", "-k", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and set(summary["overall"]) == {"no_retrieval", "gold", "retrieved"}
    assert set(summary["per_category"]) == {"dogs", "buildings"}
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 6
    gold = [r for r in rows if r["setting"] == "gold"]
    assert [r["references"] for r in gold] == [["e0"], ["e2"]]
    assert all(r["references"] == [] for r in rows if r["setting"] == "no_retrieval")
    # the multiple-choice item is scored by exact choice, the free one by VQA soft accuracy
    mc = [r for r in rows if r["line"] == 2]
    assert all(r["score"] == float(r["prediction"] == "1889") for r in mc)


def test_cirevl_with_a_vlm_captioner_and_rewriter(kb, answerer, tmp_path, tiny_config, capsys):
    from mmrag.pipelines.builders import vlm_captioner, vlm_rewriter

    captioner, rewriter = vlm_captioner(answerer), vlm_rewriter(answerer)
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None, captioner=captioner, rewriter=rewriter)
    image = _image(4)
    hits = retriever.retrieve(Query(text="make it red", image=image), k=3, channels=["composed"],
                              composed_method="cirevl")
    edited = rewriter(captioner(image), "make it red").strip() or "make it red"  # greedy: the same text again
    expected = retriever.retrieve(Query(text=edited), k=3, channels=["text_to_image"])
    assert [h.id for h in hits] == [h.id for h in expected]
    # and from the command line, with the config's VLM
    img = tmp_path / "q.png"
    image.save(img)
    code = main(["search", "make it red", "--image", str(img), "--kb", str(kb.path), "--composed", "cirevl",
                 "--channels", "composed", "-k", "3", "--json", "--config", str(tiny_config)])
    assert code == 0 and [h["id"] for h in json.loads(capsys.readouterr().out)] == [h.id for h in expected]


def test_rewriter_keeps_the_edited_description_line():
    from mmrag.pipelines.builders import vlm_rewriter

    class Fixed:  # the parsing under test, fed a known answer
        def answer(self, question, image=None):
            from mmrag.generators import AnswerOutput

            return AnswerOutput(text="Sure.\nEdited Description: a red square on grey", cited=[], references=[],
                                dropped=[], prompt=question, num_image_tokens=0, timings={})

    assert vlm_rewriter(Fixed())("a blue square", "make it red") == "a red square on grey"


def test_given_references_with_bad_images_fail_early_and_are_not_mutated(pipe, tmp_path):
    with pytest.raises(ConfigError, match=r"references\[1\].*unusable image.*not found"):
        pipe("q", references=[(None, "fine"), Record(text="x", image=tmp_path / "missing.png")])
    record = Record(text="bytes image", image=_png_bytes())
    out = pipe("q", references=[record])
    assert record.image == _png_bytes() and out.references[0].record.text == "bytes image"


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    _image(5).save(buf, format="PNG")
    return buf.getvalue()
