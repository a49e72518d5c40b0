"""The VLM answerer on two architectures (LLaVA, Idefics3): exact prompts, the images the model really
receives, citations, the context budget, answers and multiple choice (both formats, every length
normalisation) against references computed here from the raw model (its own generate, teacher forcing),
streaming, batching and seeded sampling."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig, LlamaForCausalLM

from mmrag.generators.errors import ContextLengthError, GenerationError, UnsupportedModelError
from mmrag.generators.vlm import Reference, VLMAnswerer, parse_citations
from mmrag.pipelines.dev.tiny_models import ensure_tiny_model

ARCHITECTURES = ("llava", "idefics3")
QUESTION = "Where was this taken?"
INTRO = "References retrieved for this question follow, each labelled [n] just after its image (if it has one)."
ASK = ("Question: Where was this taken?\nAnswer using the references, and cite each reference you use as [n]. "
       "If the references do not help, say so.")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))  # not square, not 30 px


QUERY = _image(0)
REFERENCES = [
    Reference("A cat sitting on a red sofa.", score=0.9, id="cat"),  # text only
    Reference("The Eiffel Tower in Paris at night.", _image(1), score=0.2, id="tower"),
    Reference("A bowl of fresh fruit.", _image(2), score=0.5, id="fruit"),
    Reference("An old stone bridge.", _image(3), score=0.2, id="bridge"),
]


# Every answerer that runs a model is on the CPU (float32), as the references computed here from the raw
# model are, whatever accelerator the machine has: the tolerances below were measured there.
@pytest.fixture(scope="module", params=ARCHITECTURES)
def answerer(request, tiny_models_dir) -> VLMAnswerer:
    return VLMAnswerer(ensure_tiny_model(request.param, tiny_models_dir), device="cpu", max_new_tokens=6).warm_up()


@pytest.fixture(scope="module")
def llava(tiny_models_dir) -> VLMAnswerer:
    return VLMAnswerer(ensure_tiny_model("llava", tiny_models_dir), device="cpu", max_new_tokens=6).warm_up()


def _tokens_per_image(config) -> int:
    vision = config.vision_config
    # LLaVA's "default" strategy drops the CLS token; Idefics3's pixel shuffle merges scale² patches.
    return (vision.image_size // vision.patch_size) ** 2 // getattr(config, "scale_factor", 1) ** 2


def _capture_inputs(module) -> tuple[list[dict], torch.utils.hooks.RemovableHandle]:
    """Record the keyword arguments (positional ones under their index) of every call to ``module``."""
    calls = []
    handle = module.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(dict(enumerate(args)) | kwargs), with_kwargs=True)
    return calls, handle


def _vision_encoder(model) -> torch.nn.Module:
    # LLaVA's `vision_tower`, Idefics3's `vision_model`. generate() encodes the images before the
    # language model's first forward pass, so the pixels are seen here, not in that pass.
    return next(module for name, module in model.model.named_children() if name.startswith("vision"))


def _force_cycle(monkeypatch, answerer: VLMAnswerer, cycle: str) -> None:
    """Make greedy generation write the distinct characters of ``cycle`` over and over, from its first:
    every other token is suppressed, the first step may only take the first character, and each
    character's token biases the next one's by +100 (the generation config's own logits processors)."""
    tokenizer = answerer.processor.tokenizer
    _force_id_cycle(monkeypatch, answerer, [next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == c)
                                            for c in cycle])


def _force_id_cycle(monkeypatch, answerer: VLMAnswerer, ids: list[int]) -> None:
    """:func:`_force_cycle` by token id: greedy generation writes ``ids`` (distinct) over and over."""
    tokenizer = answerer.processor.tokenizer
    config = answerer.model.generation_config
    monkeypatch.setattr(config, "suppress_tokens", [i for i in range(len(tokenizer)) if i not in ids])
    monkeypatch.setattr(config, "begin_suppress_tokens", ids[1:])
    monkeypatch.setattr(config, "sequence_bias", {(a, b): 100.0 for a, b in zip(ids, ids[1:] + ids[:1])})


# ------------------------------------------------------------------------------------------ prompts
EXPECTED_PROMPTS = {
    "llava": (
        f"USER: <image>\n{INTRO}\n[1] A cat sitting on a red sofa. <image>\n[2] The Eiffel Tower in Paris at night.\n"
        f"{ASK} ASSISTANT:",
        "USER: <image>\nQuestion: Where was this taken? ASSISTANT:",
    ),
    "idefics3": (
        f"<s>User:<image>{INTRO}\n[1] A cat sitting on a red sofa.<image>[2] The Eiffel Tower in Paris at night.\n"
        f"{ASK}<end_of_utterance>\nAssistant:",
        "<s>User:<image>Question: Where was this taken?<end_of_utterance>\nAssistant:",
    ),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prompt_is_rendered_by_the_models_chat_template(tiny_models_dir, architecture):
    answerer = VLMAnswerer(ensure_tiny_model(architecture, tiny_models_dir))
    with_references, plain = EXPECTED_PROMPTS[architecture]
    prompt, images = answerer.build_prompt(QUESTION, QUERY, REFERENCES[:2])
    assert prompt == with_references
    assert images == [QUERY, REFERENCES[1].image]  # query first, then the reference images in order
    assert answerer.build_prompt(QUESTION, QUERY) == (plain, [QUERY])  # no retrieval
    image_only, _ = answerer.build_prompt(QUESTION, QUERY, [Reference("", _image(1))])
    assert f"[1]\n{ASK}" in image_only  # the label alone, no dangling space


def test_vlm_receives_exactly_the_prompt_images(answerer):
    """Two query images, three reference images and a text-only reference reach the model, in order."""
    queries = [QUERY, _image(4)]
    language_calls, language_hook = _capture_inputs(answerer.model)
    vision_calls, vision_hook = _capture_inputs(_vision_encoder(answerer.model))
    try:
        output = answerer.answer(QUESTION, queries, REFERENCES)
    finally:
        language_hook.remove()
        vision_hook.remove()
    expected_images = queries + [r.image for r in REFERENCES if r.image is not None]
    prompt_ids = language_calls[0]["input_ids"]  # the first pass reads the whole prompt
    image_tokens = int((prompt_ids == answerer.model.config.image_token_id).sum())
    assert image_tokens == output.num_image_tokens == 5 * _tokens_per_image(answerer.model.config)
    [pixels] = [call.get("pixel_values", call.get(0)) for call in vision_calls]  # one encoder call, all images
    reference = answerer.processor.image_processor(images=expected_images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, reference.reshape(-1, *reference.shape[-3:]))  # these images, in this order
    assert output.references == REFERENCES and output.dropped == []
    assert set(output.timings) == {"prompt", "generate"}


# ---------------------------------------------------------------------------------------- citations
@pytest.mark.parametrize("text, n, cited", [
    ("[1] and [3]", 3, [1, 3]),
    ("[2][2]", 3, [2]),
    ("[7]", 3, []),  # out of range: ignored
    ("[0] [4] [3]", 3, [3]),
    ("first [3], then [1, 2] and [2 ,1]", 3, [3, 1, 2]),  # lists cite each number, first citation order
    ("[1-3] 1 (2) [x]", 3, []),  # ranges and bare numbers are not citations
    ("[1]", 0, []),
])
def test_parse_citations(text, n, cited):
    assert parse_citations(text, n) == cited


def test_answer_cites_only_labels_of_references_in_the_prompt(llava, monkeypatch):
    _force_cycle(monkeypatch, llava, "[2]")
    output = llava.answer(QUESTION, QUERY, REFERENCES[:2])
    assert output.text == "[2][2]" and output.cited == [2]
    assert llava.answer(QUESTION, QUERY, REFERENCES[:1]).cited == []  # there is no reference [2]


# ----------------------------------------------------------------------------------- context budget
def test_context_budget_drops_the_lowest_scored_references_first(llava):
    kept = [REFERENCES[0], REFERENCES[2]]  # scores 0.9 and 0.5; 0.2 twice dropped, the later one first
    prompt, images = llava.build_prompt(QUESTION, QUERY, kept)
    length = llava.processor(text=prompt, images=images, return_tensors="pt")["input_ids"].shape[1]
    fitted = VLMAnswerer(llava.model_id, device="cpu", max_new_tokens=4, max_context_tokens=length + 4)
    output = fitted.answer(QUESTION, QUERY, REFERENCES)
    assert [r.id for r in output.dropped] == ["bridge", "tower"]
    assert output.references == kept and output.prompt == prompt
    assert output.num_image_tokens == 2 * _tokens_per_image(llava.model.config)
    # One token less and the 0.5 reference goes too.
    assert VLMAnswerer(llava.model_id, device="cpu", max_new_tokens=5, max_context_tokens=length + 4).answer(
        QUESTION, QUERY, REFERENCES).references == [REFERENCES[0]]


def test_context_defaults_to_the_models_position_table(llava):
    many = [Reference(f"Reference {i}.", _image(10 + i), score=float(i)) for i in range(25)]  # 25 x 25 image tokens
    output = llava.answer(QUESTION, QUERY, many, max_new_tokens=1)
    assert output.dropped == many[: len(output.dropped)]  # the lowest scores went first
    assert 0 < len(output.references) < len(many)
    total = output.num_image_tokens + len(llava.processor.tokenizer(output.prompt).input_ids)
    assert total <= llava.model.config.text_config.max_position_embeddings  # 512


def test_a_prompt_that_never_fits_names_the_numbers(llava):
    tight = VLMAnswerer(llava.model_id, device="cpu", max_new_tokens=8, max_context_tokens=40)
    message = r"needs \d+ tokens \(25 for 1 query image\(s\)\) \+ 8 to generate, over the model's context of 40"
    with pytest.raises(ContextLengthError, match=message):
        tight.answer(QUESTION, QUERY, REFERENCES)


# ---------------------------------------------------------------------------------- multiple choice
# The options' lengths in characters differ from their token counts, and the three normalisations pick
# different options on the tiny models (checked in the test), so a wrong divisor fails on the choice too.
CHOICES = ["A cat.", "Paris, at night", "A black dog running across the green park"]
# float32 noise: the answerer's summed log-likelihoods (one right-padded float32 batch) differ from the
# unbatched float64 log-softmax reference below by at most 8.2e-6 (measured on both tiny models, both
# formats, with and without references); 1e-4 leaves >10x margin and is far below the gaps the
# normalisations make (>0.05).
LOG_LIKELIHOOD_TOLERANCE = 1e-4
# The lettered prompts of EXPECTED_PROMPTS, written out: MRAG-Bench's "A: option" lines and instruction.
LETTERED = ("Question: Where was this taken?\nChoices:\nA: A cat.\nB: Paris, at night\n"
            "C: A black dog running across the green park\n")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
EXPECTED_LETTER_PROMPTS = {
    "llava": (
        (f"USER: <image>\n{INTRO}\n[1] A cat sitting on a red sofa. <image>\n[2] The Eiffel Tower in Paris at night.\n"
         f"{LETTERED}Use the references if they help. {INSTRUCTION} ASSISTANT:"),
        f"USER: <image>\n{LETTERED}{INSTRUCTION} ASSISTANT:",
    ),
    "idefics3": (
        (f"<s>User:<image>{INTRO}\n[1] A cat sitting on a red sofa.<image>[2] The Eiffel Tower in Paris at night.\n"
         f"{LETTERED}Use the references if they help. {INSTRUCTION}<end_of_utterance>\nAssistant:"),
        f"<s>User:<image>{LETTERED}{INSTRUCTION}<end_of_utterance>\nAssistant:",
    ),
}


@pytest.fixture(scope="module")
def raw(answerer) -> tuple[torch.nn.Module, object]:
    """The answerer's checkpoint loaded again, straight through transformers: the reference model."""
    model = AutoModelForImageTextToText.from_pretrained(answerer.model_id, use_safetensors=True).eval()
    return model, AutoProcessor.from_pretrained(answerer.model_id)


def _raw_inputs(processor, prompt: str, images):
    # A chat template that writes the BOS itself (Idefics3's) must not get a second one.
    add_bos = not prompt.startswith(processor.tokenizer.bos_token)
    return processor(text=prompt, images=images, add_special_tokens=add_bos, return_tensors="pt")


def _teacher_forced_log_likelihood(model, processor, prompt: str, images, reply: str) -> tuple[float, int]:
    """log p(reply | prompt) from one unbatched forward pass of the raw model, and the reply's token count."""
    context = _raw_inputs(processor, prompt, images)
    whole = _raw_inputs(processor, prompt + reply, images)
    n_context = context["input_ids"].shape[1]
    assert torch.equal(whole["input_ids"][0, :n_context], context["input_ids"][0])
    with torch.no_grad():
        logits = model(**whole).logits[0].double()  # (L, vocab)
    total = 0.0
    for position in range(n_context, whole["input_ids"].shape[1]):
        token = whole["input_ids"][0, position]
        total += torch.log_softmax(logits[position - 1], dim=-1)[token].item()
    return total, whole["input_ids"].shape[1] - n_context


def _reference_scores(raw, prompt: str, images, scored: list[str]) -> dict[str, np.ndarray]:
    """Per normalisation, the scores of the replies " <text>" (both chat templates write an assistant
    turn as "<role>: <reply>" after the "<role>:" prompt): summed log-probs as they are, / token count,
    / len(text) in characters (lm-evaluation-harness's acc_norm)."""
    model, processor = raw
    totals, counts = map(np.array, zip(*(_teacher_forced_log_likelihood(model, processor, prompt, images, " " + text)
                                         for text in scored)))
    return {"none": totals, "tokens": totals / counts, "chars": totals / np.array([len(t) for t in scored])}


@pytest.mark.parametrize("length_normalization", ["none", "tokens", "chars"])
@pytest.mark.parametrize("choice_format", ["options", "letters"])
def test_choose_scores_equal_teacher_forcing_of_the_raw_model(answerer, raw, choice_format, length_normalization):
    architecture = answerer.model.config.model_type
    lettered = choice_format == "letters"
    # The literal prompt: the options listed lettered for "letters", not at all for "options".
    prompt = (EXPECTED_LETTER_PROMPTS if lettered else EXPECTED_PROMPTS)[architecture][0]
    chooser = VLMAnswerer(answerer.model_id, device="cpu", choice_format=choice_format,
                          length_normalization=length_normalization)
    output = chooser.choose(QUESTION, CHOICES, QUERY, REFERENCES[:2])
    assert output.prompt == prompt
    scored = ["A", "B", "C"] if lettered else CHOICES  # "letters" scores the letter, "options" the option
    expected = _reference_scores(raw, prompt, [QUERY, REFERENCES[1].image], scored)
    # The normalisations choose differently here, so the choice below checks the divisor too.
    assert len({int(np.argmax(scores)) for scores in expected.values()}) > 1
    assert output.log_likelihoods == pytest.approx(expected["none"].tolist(), abs=LOG_LIKELIHOOD_TOLERANCE)
    assert output.scores == pytest.approx(expected[length_normalization].tolist(), abs=LOG_LIKELIHOOD_TOLERANCE)
    best, runner_up = np.sort(expected[length_normalization])[::-1][:2]
    assert best - runner_up > 10 * LOG_LIKELIHOOD_TOLERANCE  # the reference's choice is not a near tie
    index = int(np.argmax(expected[length_normalization]))
    assert (output.index, output.choice) == (index, CHOICES[index])  # the option, also when a letter was scored
    assert (output.choice_format, output.length_normalization) == (choice_format, length_normalization)
    assert output.references == REFERENCES[:2] and output.dropped == []
    # Per-call arguments override the answerer's defaults ("options", "chars").
    again = answerer.choose(QUESTION, CHOICES, QUERY, REFERENCES[:2], choice_format=choice_format,
                            length_normalization=length_normalization)
    assert (again.prompt, again.index) == (output.prompt, output.index)
    assert again.scores == pytest.approx(output.scores, abs=LOG_LIKELIHOOD_TOLERANCE)


def test_lettered_prompt_lists_the_options_as_mrag_bench(answerer):
    architecture = answerer.model.config.model_type
    with_references, plain = EXPECTED_LETTER_PROMPTS[architecture]
    assert answerer.build_prompt(QUESTION, QUERY, REFERENCES[:2], choices=CHOICES) == (
        with_references, [QUERY, REFERENCES[1].image])
    assert answerer.build_prompt(QUESTION, QUERY, choices=CHOICES) == (plain, [QUERY])  # no retrieval
    assert answerer.choose(QUESTION, CHOICES, QUERY, choice_format="letters").prompt == plain
    assert answerer.choose(QUESTION, CHOICES, QUERY).prompt == EXPECTED_PROMPTS[architecture][1]  # "options"
    many = [f"option {i}" for i in range(26)]
    assert "\nY: option 24\nZ: option 25\n" in answerer.build_prompt(QUESTION, QUERY, choices=many)[0]


def test_the_default_normalisation_is_the_harness_acc_norm(llava):
    """Defaults: continuation scoring, divided by characters; the config's defaults are the answerer's."""
    from mmrag.pipelines.config import VLMConfig

    output = llava.choose(QUESTION, CHOICES, QUERY)
    assert (output.choice_format, output.length_normalization) == ("options", "chars")
    assert output.scores == pytest.approx([ll / len(c) for ll, c in zip(output.log_likelihoods, CHOICES)], rel=1e-6)
    assert (VLMConfig().choice_format, VLMConfig().length_normalization) == ("options", "chars")


def test_config_choice_settings_reach_the_answerer(tiny_models_dir, tmp_path):
    import typing

    from mmrag.generators.vlm import CHOICE_FORMATS, LENGTH_NORMALIZATIONS
    from mmrag.pipelines.builders import build_answerer
    from mmrag.pipelines.config import VLMConfig, load_config
    from mmrag.retrievers import ConfigError

    fields = VLMConfig.model_fields
    assert typing.get_args(fields["choice_format"].annotation) == CHOICE_FORMATS
    assert typing.get_args(fields["length_normalization"].annotation) == LENGTH_NORMALIZATIONS
    ensure_tiny_model("llava", tiny_models_dir)
    f = tmp_path / "c.yaml"
    f.write_text(f"vlm:\n  model: tiny:llava\n  choice_format: letters\n  length_normalization: tokens\n"
                 f"tiny_models:\n  cache_dir: {tiny_models_dir}\n")
    answerer = build_answerer(load_config(f))
    assert (answerer.choice_format, answerer.length_normalization) == ("letters", "tokens")
    for bad, message in (("length_normalization: bytes", r"`vlm.length_normalization` .* 'chars', got 'bytes'"),
                         ("choice_format: A.", r"`vlm.choice_format` .* 'letters', got 'A.'"),
                         ("length_normalize: true", "unknown key `vlm.length_normalize`")):  # the old key is gone
        f.write_text(f"vlm:\n  {bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(f)


@pytest.mark.parametrize("choices, message", [
    (["Paris"], "at least 2"),
    ("AB", "at least 2"),
    (["Paris", " "], r"choices\[1\]"),
    (["Paris", "London", "Paris"], "distinct"),
])
@pytest.mark.parametrize("choice_format", ["options", "letters"])
def test_choose_refuses_bad_choices(llava, choices, message, choice_format):
    with pytest.raises(GenerationError, match=message):
        llava.choose(QUESTION, choices, QUERY, choice_format=choice_format)


def test_more_options_than_letters_is_a_typed_error(llava):
    many = [f"option {i}" for i in range(27)]
    message = r"`choices` has 27 options, more than the 26 letters A-Z .* pass at most 26 options, or use"
    with pytest.raises(GenerationError, match=message):
        llava.choose(QUESTION, many, QUERY, choice_format="letters")
    with pytest.raises(GenerationError, match=message):
        llava.build_prompt(QUESTION, QUERY, choices=many)
    assert llava.choose(QUESTION, many, QUERY, choice_format="options").prompt == EXPECTED_PROMPTS["llava"][1]


# ------------------------------------------------------------------------------------- answering
def test_answers_equal_the_raw_models_generate(answerer, raw):
    """Greedy and seeded sampled answers are the raw model's own generate() on the literal prompt."""
    model, processor = raw
    prompt = EXPECTED_PROMPTS[answerer.model.config.model_type][0]
    inputs = _raw_inputs(processor, prompt, [QUERY, REFERENCES[1].image])
    n_prompt = inputs["input_ids"].shape[1]

    def reference(**options) -> str:
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, **options)[0, n_prompt:]  # (new,)
        return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    greedy = answerer.answer(QUESTION, QUERY, REFERENCES[:2], max_new_tokens=8)
    assert greedy.prompt == prompt
    assert greedy.text and greedy.text == reference(do_sample=False)
    torch.manual_seed(7)
    sampled = reference(do_sample=True, temperature=1.0, top_p=1.0)
    assert sampled != greedy.text
    assert answerer.answer(QUESTION, QUERY, REFERENCES[:2], max_new_tokens=8, do_sample=True, seed=7).text == sampled


# -------------------------------------------------------------------------- streaming and batching
def test_stream_yields_the_answer_text(answerer):
    expected = answerer.answer(QUESTION, QUERY, REFERENCES, max_new_tokens=12)
    stream = answerer.answer(QUESTION, QUERY, REFERENCES, max_new_tokens=12, stream=True)
    with pytest.raises(GenerationError, match="iterate"):
        stream.result  # noqa: B018 - not finished yet
    chunks = list(stream)
    assert len(chunks) > 1 and "".join(chunks) == expected.text
    assert stream.result.text == expected.text and stream.result.num_image_tokens == expected.num_image_tokens
    with pytest.raises(GenerationError, match="only once"):
        list(stream)
    seen = []
    assert answerer.answer(QUESTION, QUERY, REFERENCES, max_new_tokens=12, on_token=seen.append).text == expected.text
    assert seen == chunks


def test_stream_chunks_join_to_the_stripped_answer(llava, monkeypatch):
    _force_cycle(monkeypatch, llava, "\n[2]")
    expected = llava.answer(QUESTION, QUERY, REFERENCES[:2], max_new_tokens=9)
    assert expected.text == "[2]\n[2]"  # generated "\n[2]\n[2]\n"
    assert "".join(llava.answer(QUESTION, QUERY, REFERENCES[:2], max_new_tokens=9, stream=True)) == expected.text


def test_stream_joins_to_the_answer_when_byte_tokens_split_or_break_characters(llava, monkeypatch):
    # Byte-fallback tokens: "É" arrives as <0xC3> <0x89>; <0x18> then a stray <0xA9> is a run that is not
    # UTF-8, which the tokenizer's ByteFallback decodes to U+FFFD per byte, rewriting the "\x18" that a
    # decoder of the text so far would already have streamed.
    tokenizer = llava.processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["\u2581a", "<0xC3>", "<0x89>", "<0x18>", "<0xA9>", "\u2581c"])
    _force_id_cycle(monkeypatch, llava, ids)
    answer = llava.answer(QUESTION, QUERY, REFERENCES[:2], max_new_tokens=15)
    assert answer.text == tokenizer.decode(ids * 2 + ids[:3], skip_special_tokens=True).strip()
    assert "É" in answer.text and "\ufffd\ufffd" in answer.text  # the forced tokens came out
    chunks = list(stream := llava.answer(QUESTION, QUERY, REFERENCES[:2], max_new_tokens=15, stream=True))
    assert len(chunks) > 1 and "".join(chunks) == stream.result.text == answer.text
    assert not any(c == "\x18" for text in chunks for c in text)  # never streamed, then rewritten


def test_stream_reraises_the_generation_error(llava, monkeypatch):
    # Biasing a token the vocabulary does not have fails inside generate(), in the generation thread.
    monkeypatch.setattr(llava.model.generation_config, "sequence_bias", {(10**9,): 1.0})
    stream = llava.answer(QUESTION, QUERY, stream=True)
    with pytest.raises(ValueError, match="vocabulary size"):
        list(stream)


def test_batch_equals_one_by_one_in_one_generate_call(answerer):
    questions = [QUESTION, "Describe the building in the picture in one sentence.", "Which animal is shown?"]
    images = [QUERY, None, [_image(5), _image(6)]]
    references = [REFERENCES, REFERENCES[:1], None]  # images and text; text only; no retrieval
    calls, handle = _capture_inputs(answerer.model)
    try:
        batch = answerer.answer_batch(questions, images, references, max_new_tokens=8)
    finally:
        handle.remove()
    assert calls[0]["input_ids"].shape[0] == 3  # one padded prefill for the whole batch
    assert (calls[0]["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with its prompt
    for output, question, image, refs in zip(batch, questions, images, references):
        alone = answerer.answer(question, image, refs, max_new_tokens=8)
        assert (output.text, output.prompt, output.num_image_tokens, output.references) == (
            alone.text, alone.prompt, alone.num_image_tokens, alone.references)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(llava):
    state = torch.random.get_rng_state()
    sample = lambda seed: llava.answer(QUESTION, QUERY, do_sample=True, seed=seed, max_new_tokens=12).text
    first = sample(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sample(1) == first
    assert sample(2) != first
    assert llava.answer(QUESTION, QUERY, max_new_tokens=12).text != first  # greedy by default
    # Near-zero temperature, or a nucleus holding only the top token, samples the greedy answer.
    for option in ({"temperature": 1e-4}, {"top_p": 1e-6}):
        sampler = VLMAnswerer(llava.model_id, device="cpu", do_sample=True, seed=1, max_new_tokens=12, **option)
        assert sampler.answer(QUESTION, QUERY).text == llava.answer(QUESTION, QUERY, max_new_tokens=12).text
    batch = lambda: [o.text for o in llava.answer_batch([QUESTION] * 2, [QUERY] * 2, do_sample=True, seed=3)]
    assert batch() == batch()


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda a: a.answer("  ", QUERY), "`question` must be a non-empty string"),
    (lambda a: a.answer(QUESTION, "photo.jpg"), "`image` must be a PIL image"),
    (lambda a: a.answer(QUESTION, [QUERY, "photo.jpg"]), r"`image\[1\]` must be a PIL image"),
    (lambda a: a.answer(QUESTION, QUERY, max_new_tokens=0), "`max_new_tokens` must be a positive integer, got 0"),
    (lambda a: a.answer(QUESTION, QUERY, [Reference("x", image="a.jpg")]), r"`references\[0\].image`"),
    (lambda a: a.answer(QUESTION, QUERY, [Reference("")]), "neither text nor image"),
    (lambda a: a.answer_batch([QUESTION, QUESTION], [QUERY]), "one entry per question"),
    (lambda a: VLMAnswerer(a.model_id, max_new_tokens=-1), "`max_new_tokens` must be a positive integer, got -1"),
    (lambda a: VLMAnswerer(a.model_id, template="nope"), "`template` 'nope' lacks its 'intro' part"),
    (lambda a: VLMAnswerer(a.model_id, dtype="int8"), "`dtype` must be one of"),
    (lambda a: VLMAnswerer(a.model_id, choice_format="mcq"),
     "`choice_format` must be one of 'options', 'letters', got 'mcq'"),
    (lambda a: VLMAnswerer(a.model_id, length_normalization="bytes"),
     "`length_normalization` must be one of 'none', 'tokens', 'chars', got 'bytes'"),
    (lambda a: a.choose(QUESTION, ["x", "y"], QUERY, choice_format="A."), "`choice_format` must be one of"),
    (lambda a: a.choose(QUESTION, ["x", "y"], QUERY, length_normalization=True), "`length_normalization` must be"),
])
def test_bad_inputs_are_typed_errors_naming_the_argument(llava, call, message):
    with pytest.raises(GenerationError, match=message):
        call(llava)


def test_a_text_only_model_is_refused(llava, tmp_path):
    text_only = tmp_path / "llama"
    config = LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(llava.processor.tokenizer))
    LlamaForCausalLM(config).save_pretrained(text_only)
    llava.processor.tokenizer.save_pretrained(text_only)
    answerer = VLMAnswerer(text_only)  # light: nothing loads yet
    with pytest.raises(UnsupportedModelError, match="'llama' model without image support"):
        answerer.answer(QUESTION, QUERY)

