"""Rerankers: one contract suite run against every implementation, then each one against an
independent reference computed here from the raw transformers model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, BlipForImageTextRetrieval

from mmrag.pipelines.dev.tiny_models import build_tiny_model
from mmrag.prompts import render
from mmrag.retrievers import ConfigError, KnowledgeBase, ModelLoadError, Record
from mmrag.retrievers.query import Hit, Query
from mmrag.retrievers.rerank import (
    QUERY_IMAGE_AND_TEXT,
    QUERY_IMAGE_ONLY,
    RERANKERS,
    CrossEncoderReranker,
    DualEncoderReranker,
    VLMReranker,
    reranker_from_config,
)

TEXTS = [
    "A photo of a cat sitting on a red sofa.",
    "A black dog running across the green park.",
    "The Eiffel Tower in Paris at night, with lights.",
    "A red double-decker bus driving down a busy street in London.",
    "Snow-covered mountains under a clear blue sky.",
]


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rerank-models")  # our own folder: other modules build into theirs


@pytest.fixture(scope="module")
def blip_itm(models_dir):
    return build_tiny_model("blip-itm", models_dir)


@pytest.fixture(scope="module")
def raw_clip(tiny_clip):
    return AutoModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)


@pytest.fixture(scope="module")
def raw_blip(blip_itm):
    return BlipForImageTextRetrieval.from_pretrained(blip_itm).eval(), AutoProcessor.from_pretrained(blip_itm)


@pytest.fixture(scope="module")
def llava_path(models_dir):
    return build_tiny_model("llava", models_dir)


@pytest.fixture(scope="module")
def llava(llava_path):
    return (AutoModelForImageTextToText.from_pretrained(llava_path, use_safetensors=True).eval(),
            AutoProcessor.from_pretrained(llava_path))


@pytest.fixture(scope="module")
def hits(tmp_path_factory, clip_encoder) -> list[Hit]:
    """Hits over records read back from a real knowledge base (image paths in its image store)."""
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("rerank") / "kb", clip_encoder)
    kb.add([Record(text=t, image=_image(i), id=f"r{i}", metadata={"n": i}) for i, t in enumerate(TEXTS)])
    records = kb.get([f"r{i}" for i in range(len(TEXTS))])
    assert len(records) == len(TEXTS) and all(isinstance(r.image, str) for r in records)
    # Retrieval order r0..r4 with made-up fused and channel scores the reranker must keep.
    return [Hit(r.id, r, score=1.0 - 0.1 * i, scores={"text_to_image": 0.5 - 0.05 * i}, rank=i + 1)
            for i, r in enumerate(records)]


QUERIES = {
    "text": Query(text="a red bus in the street"),
    "image": Query(image=_image(100)),
    "image+text": Query(text="the same place at night", image=_image(101)),
}


@pytest.fixture(params=["dual_encoder", "cross_encoder", "vlm"])
def make_reranker(request, clip_encoder, blip_itm, llava):
    """A factory of each implementation, so a test can vary the batch size."""
    name = request.param
    if name == "dual_encoder":
        return lambda batch_size=32: DualEncoderReranker(clip_encoder, 0.7, 0.3, batch_size=batch_size)
    if name == "cross_encoder":
        return lambda batch_size=16: CrossEncoderReranker(blip_itm, device="cpu", batch_size=batch_size)
    return lambda batch_size=4: VLMReranker(llava, batch_size=batch_size)


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("kind", list(QUERIES))
def test_rank_sorts_renumbers_and_keeps_channel_scores(make_reranker, hits, kind):
    before = copy.deepcopy(hits)
    ranked = make_reranker().rank(QUERIES[kind], hits)

    assert sorted(h.id for h in ranked) == sorted(h.id for h in hits)
    scores = [h.score for h in ranked]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1  # the model tells the candidates apart, so the order means something
    assert [h.rank for h in ranked] == list(range(1, len(hits) + 1))
    original = {h.id: h for h in hits}
    for h in ranked:
        assert h.scores["rerank"] == h.score
        assert h.scores["text_to_image"] == original[h.id].scores["text_to_image"]
        assert h.record is original[h.id].record
    assert hits == before  # new Hit objects; the input is untouched


def test_batched_equals_unbatched_and_top_k_is_a_prefix(make_reranker, hits):
    query = QUERIES["text"]
    full = make_reranker(batch_size=2).rank(query, hits)  # 5 hits in batches of 2, 2, 1
    single = make_reranker(batch_size=len(hits)).rank(query, hits)
    assert [h.id for h in full] == [h.id for h in single]
    np.testing.assert_allclose([h.score for h in full], [h.score for h in single], atol=1e-5)

    top = make_reranker().rank(query, hits, top_k=2)
    assert [h.id for h in top] == [h.id for h in single[:2]] and [h.rank for h in top] == [1, 2]
    assert len(make_reranker().rank(query, hits, top_k=50)) == len(hits)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True, "3"])
def test_bad_top_k_is_a_typed_error_naming_it(make_reranker, hits, top_k):
    with pytest.raises(ConfigError, match=rf"`top_k`.*{top_k!r}"):
        make_reranker().rank("a cat", hits, top_k=top_k)


def test_empty_hits_give_an_empty_list_without_loading(make_reranker):
    reranker = make_reranker()
    assert reranker.rank("a cat", []) == []
    assert getattr(reranker, "_model", None) is None  # (the dual encoder's model is shared, preloaded)


def test_a_hit_without_image_is_named(make_reranker, hits):
    bad = Hit("no-image", Record(text="just text", image=None, id="no-image"), score=0.0)
    with pytest.raises(ConfigError, match="no-image"):
        make_reranker().rank("a cat", [hits[0], bad])


# ----------------------------------------------------------------------------------- dual encoder
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("kind", list(QUERIES))
def test_dual_encoder_scores_equal_the_fusion_formula(tiny_clip, raw_clip, hits, kind):
    query = QUERIES[kind]
    model, proc = raw_clip

    def embed_texts(texts):
        with torch.no_grad():
            return _unit(model.get_text_features(**proc.tokenizer(texts, padding=True, return_tensors="pt")).pooler_output.numpy())

    def embed_images(images):
        with torch.no_grad():
            return _unit(model.get_image_features(**proc.image_processor(images, return_tensors="pt")).pooler_output.numpy())

    img = embed_images([Image.open(h.record.image).convert("RGB") for h in hits])
    txt = embed_texts([h.record.text for h in hits])
    us = ([embed_texts([query.text])[0]] if query.has_text else []) + ([embed_images([query.image])[0]] if query.has_image else [])
    expected = np.mean([0.7 * img @ u + 0.3 * txt @ u for u in us], axis=0)

    # Built from the model directory here (the other tests pass a DualEncoder instance).
    ranked = DualEncoderReranker(str(tiny_clip), image_weight=0.7, text_weight=0.3, device="cpu", batch_size=2).rank(query, hits)
    got = {h.id: h.score for h in ranked}
    np.testing.assert_allclose([got[h.id] for h in hits], expected, atol=1e-5)


def test_dual_encoder_ties_keep_the_input_order(clip_encoder, hits):
    # The same record under 20 ids scores exactly the same; the stable sort keeps their order (an
    # unstable one, e.g. numpy's default quicksort beyond 16 items, shuffles them).
    twins = [Hit(f"twin-{i:02d}", hits[2].record, 0.0) for i in range(20)]
    # One candidate per batch, so that identical inputs give bitwise-identical vectors (within one
    # batch, BLAS blocking can make rows differ in the last bit); texts alone keep it quick.
    reranker = DualEncoderReranker(clip_encoder, image_weight=0, text_weight=1, batch_size=1)
    for candidates in ([hits[0], *twins, hits[1]], [*reversed(twins), hits[0]]):
        ranked = reranker.rank("a cat", candidates)
        assert len({h.score for h in ranked if h.id.startswith("twin")}) == 1
        assert [h.id for h in ranked if h.id.startswith("twin")] == [h.id for h in candidates if h.id.startswith("twin")]


def test_dual_encoder_weights_select_the_candidate_side(clip_encoder, hits):
    query = "a red bus"
    text_only = DualEncoderReranker(clip_encoder, image_weight=0, text_weight=1).rank(query, hits)
    expected = clip_encoder.embed_texts([h.record.text for h in hits]) @ clip_encoder.embed_texts([query])[0]
    got = {h.id: h.score for h in text_only}
    np.testing.assert_allclose([got[h.id] for h in hits], expected, atol=1e-5)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(image_weight=-0.1), "image_weight"),
    (dict(text_weight=float("nan")), "text_weight"),
    (dict(image_weight=0, text_weight=0), "image_weight"),
    (dict(batch_size=0), "batch_size"),
    (dict(device="cpu"), "device"),  # device belongs on the DualEncoder that was passed in
])
def test_dual_encoder_bad_options(clip_encoder, kwargs, argument):
    with pytest.raises(ConfigError, match=f"`{argument}`"):
        DualEncoderReranker(clip_encoder, **kwargs)


# ---------------------------------------------------------------------------------- cross encoder
@pytest.mark.parametrize("kind", list(QUERIES))
def test_cross_encoder_scores_equal_raw_itm_probabilities(blip_itm, raw_blip, hits, kind):
    query = QUERIES[kind]
    model, proc = raw_blip
    if query.has_text:  # the query text against each candidate image
        pairs = [(Image.open(h.record.image).convert("RGB"), query.text) for h in hits]
    else:  # the query image against each candidate text
        pairs = [(query.image, h.record.text) for h in hits]
    expected = []
    for image, text in pairs:  # one pair at a time: no padding involved
        inputs = proc(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"], use_itm_head=True).itm_score
        expected.append(torch.softmax(logits, dim=-1)[0, 1].item())

    ranked = CrossEncoderReranker(blip_itm, device="cpu", batch_size=3).rank(query, hits)
    got = {h.id: h.score for h in ranked}
    np.testing.assert_allclose([got[h.id] for h in hits], expected, atol=1e-6)


def test_cross_encoder_truncates_long_texts_to_the_model_limit(blip_itm, raw_blip, hits):
    long_text = " ".join(["a small red boat on a quiet lake"] * 20)  # far beyond 32 positions
    hit = Hit("long", Record(text=long_text, image=hits[0].record.image, id="long"), 0.0)
    model, proc = raw_blip
    inputs = proc(images=QUERIES["image"].image, text=long_text, truncation=True,
                  max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, use_itm_head=True).itm_score
    [ranked] = CrossEncoderReranker(blip_itm, device="cpu").rank(QUERIES["image"], [hit])
    assert ranked.score == pytest.approx(torch.softmax(logits, dim=-1)[0, 1].item(), abs=1e-6)


def test_cross_encoder_loads_lazily_once_and_refuses_other_models(blip_itm, tiny_clip, hits):
    reranker = CrossEncoderReranker(blip_itm, device="cpu")
    assert reranker._model is None  # the constructor only stores parameters
    model = reranker.warm_up()._model
    assert model is not None and reranker.warm_up()._model is model
    with pytest.raises(ModelLoadError, match="clip"):
        CrossEncoderReranker(tiny_clip, device="cpu").rank("a cat", hits)


# -------------------------------------------------------------------------------------------- VLM
def _raw_p_yes(model, processor, query: Query, hit: Hit) -> float:
    """P(yes) over {yes, Yes} vs {no, No} from one unbatched forward pass of the raw model.

    The tiny Llama vocabulary splits every answer into "▁" + letters ("▁", "y", "es"), so the shared
    "▁" goes after the prompt and the answer classes are the letters y/Y and n/N.
    """
    images = ([query.image] if query.has_image else []) + [Image.open(hit.record.image).convert("RGB")]
    if not query.has_image:
        described = query.text
    else:
        described = QUERY_IMAGE_AND_TEXT.format(text=query.text) if query.has_text else QUERY_IMAGE_ONLY
    text = render("rerank_yes_no", query=described, reference_text=hit.record.text)
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("ASSISTANT:") and "Answer yes or no." in prompt
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    tok = processor.tokenizer
    space, yes, no = tok.convert_tokens_to_ids("▁"), tok.convert_tokens_to_ids(["y", "Y"]), tok.convert_tokens_to_ids(["n", "N"])
    input_ids = torch.cat([inputs["input_ids"], torch.tensor([[space]])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       pixel_values=inputs["pixel_values"]).logits[0, -1].double()
    p = torch.exp(logits)
    return (p[yes].sum() / (p[yes].sum() + p[no].sum())).item()


@pytest.mark.parametrize("kind", list(QUERIES))
def test_vlm_score_is_p_yes_of_the_raw_model(llava, hits, kind):
    model, processor = llava
    query = QUERIES[kind]
    expected = [_raw_p_yes(model, processor, query, h) for h in hits]
    ranked = VLMReranker(llava, batch_size=3).rank(query, hits)  # batches of 3 and 2, left-padded
    got = {h.id: h.score for h in ranked}
    np.testing.assert_allclose([got[h.id] for h in hits], expected, atol=1e-5)


def test_vlm_without_a_pad_token_scores_one_by_one(llava, llava_path, hits):
    processor = AutoProcessor.from_pretrained(llava_path)  # a fresh copy: the fixture's is shared
    processor.tokenizer.pad_token = None  # rows of different lengths can no longer be batched
    expected = VLMReranker(llava, batch_size=4).rank("a cat", hits)
    got = VLMReranker((llava[0], processor), batch_size=4).rank("a cat", hits)
    assert [h.id for h in got] == [h.id for h in expected]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)


def test_vlm_accepts_an_object_with_model_and_processor(llava, hits):
    class Wrapper:
        def __init__(self, model, processor):
            self.model, self.processor = model, processor

    by_tuple = VLMReranker(llava).rank("a cat", hits)
    by_object = VLMReranker(Wrapper(*llava)).rank("a cat", hits)
    assert [(h.id, h.score) for h in by_tuple] == [(h.id, h.score) for h in by_object]


@pytest.mark.parametrize("yes_tokens, no_tokens, message", [
    (["yes"], ["yes"], "no token tells"),  # identical answers
    (["yes", "no"], ["nope", "No"], "share"),  # "▁" then "n" in both classes
    ("yes", ["no"], "`yes_tokens`"),  # a bare string, not a list
])
def test_vlm_answer_tokens_that_cannot_be_told_apart_are_refused(llava, hits, yes_tokens, no_tokens, message):
    with pytest.raises(ConfigError, match=message):
        VLMReranker(llava, yes_tokens=yes_tokens, no_tokens=no_tokens).rank("a cat", hits)


def test_vlm_template_must_exist_and_take_the_fields(llava):
    with pytest.raises(ConfigError, match="no_such_template"):
        VLMReranker(llava, template="no_such_template")


# ---------------------------------------------------------------------------------------- factory
def test_factory_builds_each_reranker_and_names_the_choices(clip_encoder, blip_itm, llava):
    assert isinstance(reranker_from_config("dual_encoder", encoder=clip_encoder, image_weight=1.0), DualEncoderReranker)
    assert isinstance(reranker_from_config("cross_encoder", model_id=blip_itm), CrossEncoderReranker)
    assert isinstance(reranker_from_config("vlm", vlm=llava, batch_size=2), VLMReranker)

    with pytest.raises(ConfigError) as error:
        reranker_from_config("colbert")
    assert "'colbert'" in str(error.value) and all(repr(name) in str(error.value) for name in RERANKERS)
    with pytest.raises(ConfigError, match="vlm="):
        reranker_from_config("vlm")
    with pytest.raises(ConfigError, match="model_id"):
        reranker_from_config("cross_encoder", model=blip_itm)  # misspelt option: the valid ones are listed
