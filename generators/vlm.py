"""Retrieval-augmented visual question answering with a `transformers` vision-language model.

:class:`VLMAnswerer` puts a question, its query image(s) and the retrieved references into ONE
interleaved multi-image user turn, rendered by the model's own chat template (no model-specific code)::

    query image(s) | vqa_intro | per reference: [its image] "[n] text" | vqa_question

(an interleaved document's reference gives its chosen parts in document order instead: each image in
place, each passage as "[n] passage";
templates ``prompts/templates/<template>_{intro,reference,question,plain}.txt``; without references the
turn is the query image(s) and ``<template>_plain``: MRAG-Bench's "no retrieval" setting). Adjacent
texts are joined with a newline into one text item, since some chat templates (Idefics3's) put
nothing between items.

It then answers (greedy, or sampled with a seed; streamed; batched with left padding) or, for
multiple choice, picks the option the model finds most likely as its reply (:meth:`VLMAnswerer.choose`):
either each option's text is scored as the reply (lm-evaluation-harness's ``multiple_choice``), or, as
MRAG-Bench asks, the options are listed in the prompt lettered ``A: ...``, ``B: ...`` (the question part
becomes ``<template>_letters_{question,plain}`` with one ``<template>_letters_option`` line per option)
and the letter is scored.

References that would overflow the model's context are dropped, lowest score first; the output lists
them. The answer's citations ``[n]`` are parsed back into reference labels.
"""

from __future__ import annotations

import inspect
import math
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import PIL.Image
import torch
from transformers.generation.streamers import BaseStreamer

from mmrag._devices import device_problem
from mmrag.generators.dtypes import parse_dtype
from mmrag.generators.errors import ContextLengthError, GenerationError, GeneratorLoadError, UnsupportedModelError
from mmrag.prompts import TemplateError, load_template, render

logger = logging.getLogger(__name__)

# The parts of a template family and the fields each takes.
TEMPLATE_PARTS = {"intro": set(), "reference": {"label", "text"}, "question": {"question"}, "plain": {"question"}}
# The parts choice_format="letters" needs too: one line per option, and the question part that lists them.
LETTER_TEMPLATE_PARTS = {"letters_option": {"letter", "text"}, "letters_question": {"question", "options"},
                         "letters_plain": {"question", "options"}}
ChoiceFormat = Literal["options", "letters"]
LengthNormalization = Literal["none", "tokens", "chars"]
CHOICE_FORMATS: tuple[str, ...] = get_args(ChoiceFormat)
LENGTH_NORMALIZATIONS: tuple[str, ...] = get_args(LengthNormalization)
# MRAG-Bench letters its four options A-D; beyond Z there is no single letter to score.
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# "[3]" or "[1, 2]"; ranges such as "[1-3]" are not citations here.
_CITATION = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]")
_IMAGE = {"type": "image"}


@dataclass
class Reference:
    """One retrieved reference handed to the VLM: a text, optionally an image.

    ``parts`` (an interleaved document's chosen passages and images, in document order) replaces
    ``text`` and ``image`` in the prompt: each image in place, each passage labelled ``[n]``."""

    text: str
    image: PIL.Image.Image | None = None
    score: float | None = None  # relevance: the weakest is dropped first when the context is full
    id: str | None = None
    parts: list[str | PIL.Image.Image] | None = None


@dataclass
class AnswerOutput:
    text: str  # the generated answer, special tokens and surrounding whitespace stripped
    cited: list[int]  # valid 1-based labels cited as [n], in order of first citation
    references: list[Reference]  # the references in the prompt, in prompt order ([1]..[k])
    dropped: list[Reference]  # left out to fit the model's context, in the order dropped (lowest score first)
    prompt: str  # the rendered prompt (chat template applied, image placeholders not yet expanded)
    num_image_tokens: int  # image tokens in the processed input ids
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "prompt", "generate"


@dataclass
class ChoiceOutput:
    choice: str  # the option with the highest score
    index: int
    scores: list[float]  # per option: log_likelihoods[i] divided as `length_normalization` says
    prompt: str
    references: list[Reference]
    dropped: list[Reference]
    log_likelihoods: list[float]  # per option: log p(its reply | prompt), the reply being its text or its letter
    choice_format: str  # "options" or "letters": what was scored
    length_normalization: str  # "none", "tokens" or "chars"


def parse_citations(text: str, n_references: int) -> list[int]:
    """The labels cited in ``text`` as ``[n]`` or ``[n, m, ...]``, valid ones (1..n_references) only,
    each once, in order of first citation: ``parse_citations("[2] and [1, 2] [9]", 3) == [2, 1]``."""
    if not isinstance(n_references, int) or isinstance(n_references, bool) or n_references < 0:
        raise GenerationError(f"`n_references` must be an integer >= 0, got {n_references!r}.")
    cited: list[int] = []
    for match in _CITATION.finditer(text):
        for number in map(int, match.group(1).split(",")):
            if 1 <= number <= n_references and number not in cited:
                cited.append(number)
    return cited


@dataclass
class _FittedPrompt:
    """A prompt that fits the context, with its processed single-row inputs."""

    text: str
    images: list[PIL.Image.Image]
    references: list[Reference]
    dropped: list[Reference]
    length: int  # tokens, image tokens included
    inputs: Any  # the processor's BatchFeature, one row, on the model's device


class VLMAnswerer:
    """Answer questions about images from retrieved references with an ``AutoModelForImageTextToText``.

    Args:
        model_id: a Hub id or a local directory (weights as safetensors).
        device, dtype: ``None`` picks CUDA in bfloat16 (the precision VLMs are released in; float16
            where the GPU lacks bfloat16) when present, else the CPU in float32.
        max_new_tokens, do_sample, seed: defaults for each call; sampling uses ``temperature`` and
            ``top_p``, and a seed makes it reproducible (the global RNG is left as it was).
        template: the prompt template family, ``prompts/templates/<template>_<part>.txt`` for the parts
            of :data:`TEMPLATE_PARTS`.
        max_context_tokens: the context length to fit prompts into; ``None``: the text model's
            ``max_position_embeddings`` (no limit when the config has none).
        choice_format, length_normalization: :meth:`choose`'s defaults (see there): score each option's
            text (``"options"``) or its letter in a lettered prompt (``"letters"``, MRAG-Bench); divide
            the log-likelihood by nothing (``"none"``), the reply's token count (``"tokens"``) or the
            scored text's characters (``"chars"``, lm-evaluation-harness's ``acc_norm``).
    """

    def __init__(self, model_id: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, template: str = "vqa",
                 trust_remote_code: bool = False, max_context_tokens: int | None = None,
                 choice_format: ChoiceFormat = "options",
                 # "chars" by default: it is the harness's acc_norm, the number leaderboards report, and
                 # unlike a per-token mean it does not depend on how a model's tokenizer splits the option,
                 # so models with different vocabularies rank options on one scale. With "letters" it is
                 # a no-op (every letter is one character).
                 length_normalization: LengthNormalization = "chars"):
        _check_positive_int("max_new_tokens", max_new_tokens)
        _check_seed(seed)
        if max_context_tokens is not None:
            _check_positive_int("max_context_tokens", max_context_tokens)
        if not _is_number(temperature) or temperature <= 0:
            raise GenerationError(f"`temperature` must be a number > 0, got {temperature!r}.")
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise GenerationError(f"`top_p` must be a number in (0, 1], got {top_p!r}.")
        dtype = parse_dtype(dtype)
        _check_one_of("choice_format", choice_format, CHOICE_FORMATS)
        _check_one_of("length_normalization", length_normalization, LENGTH_NORMALIZATIONS)
        _check_template(template, TEMPLATE_PARTS)
        if choice_format == "letters":
            _check_template(template, LETTER_TEMPLATE_PARTS, "choice_format='letters'")
        self.model_id = str(model_id)
        problem = device_problem(device)
        if problem is not None:
            raise GenerationError(f"`device` {problem}.")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
        if dtype is None and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.dtype = torch.float32 if dtype is None else dtype
        self.max_new_tokens = max_new_tokens
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.template = template
        self.trust_remote_code = trust_remote_code
        self.max_context_tokens = max_context_tokens
        self.choice_format = choice_format
        self.length_normalization = length_normalization
        self._model = None
        self._processor = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VLMAnswerer({self.model_id!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # ------------------------------------------------------------------------------------- loading
    def warm_up(self) -> VLMAnswerer:
        """Load the model and its processor (once, thread-safe; later calls return at once)."""
        with self._lock:
            if self._model is not None:
                return self
            from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
            from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

            kwargs = dict(trust_remote_code=self.trust_remote_code)
            try:
                config = AutoConfig.from_pretrained(self.model_id, **kwargs)
                # Image support is what AutoModelForImageTextToText can load (or a remote model maps to it).
                if (config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                        and "AutoModelForImageTextToText" not in (getattr(config, "auto_map", None) or {})):
                    raise UnsupportedModelError(
                        f"`model_id` {self.model_id!r} is a {config.model_type!r} model without image support "
                        "(AutoModelForImageTextToText cannot load it); pass a vision-language model such as "
                        "'llava-hf/llava-1.5-7b-hf' or 'HuggingFaceM4/Idefics3-8B-Llama3'.")
                processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
                # AutoProcessor falls back to the bare tokenizer for model types it has no processor for.
                if getattr(processor, "image_processor", None) is None:
                    raise UnsupportedModelError(
                        f"`model_id` {self.model_id!r} has no image processor (AutoProcessor gave a "
                        f"{type(processor).__name__}), so it is a model without image support here; save the "
                        "model's full processor (processor.save_pretrained) next to its weights.")
                if not getattr(processor, "chat_template", None):
                    raise GeneratorLoadError(
                        f"`model_id` {self.model_id!r}: its processor has no chat template, which the prompts are "
                        "rendered with; set processor.chat_template and save it with the model.")
                # Straight onto the device: no full copy of the weights in CPU memory first.
                model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=self.dtype,
                                                                    device_map=self.device, use_safetensors=True,
                                                                    **kwargs)
            except (OSError, ValueError) as error:
                raise GeneratorLoadError(f"Could not load the VLM `model_id` {self.model_id!r}: {error} Check the "
                                         "id or path; Hub models need network access.") from error
            self._processor = processor
            self._model = model.eval()
        return self

    @property
    def model(self):
        return self.warm_up()._model

    @property
    def processor(self):
        return self.warm_up()._processor

    # ------------------------------------------------------------------------------------- prompts
    def build_prompt(self, question: str, images: Any = None, references: Sequence[Reference] | None = (),
                     choices: Sequence[str] | None = None) -> tuple[str, list[PIL.Image.Image]]:
        """The rendered prompt and its images in prompt order (query image(s), then reference images).
        With ``choices``, the prompt that lists them lettered (what ``choose(choice_format="letters")`` scores)."""
        _check_question(question)
        if choices is not None:
            _check_letter_choices(choices)
            _check_template(self.template, LETTER_TEMPLATE_PARTS, "choice_format='letters'")
        return self._render(question, _as_images("images", images), _check_references("references", references),
                            choices)

    def _render(self, question: str, images: list[PIL.Image.Image], references: list[Reference],
                choices: Sequence[str] | None = None) -> tuple[str, list[PIL.Image.Image]]:
        content = [_IMAGE] * len(images)
        prompt_images = list(images)

        def add_text(text: str) -> None:
            if content and content[-1] is not _IMAGE:
                content[-1] = {"type": "text", "text": content[-1]["text"] + "\n" + text}
            else:
                content.append({"type": "text", "text": text})

        if references:
            add_text(render(f"{self.template}_intro"))
            for label, reference in enumerate(references, start=1):
                if reference.parts is not None:  # a document: its parts in order, every passage labelled
                    for part in reference.parts:
                        if isinstance(part, PIL.Image.Image):
                            content.append(_IMAGE)
                            prompt_images.append(part)
                        else:
                            add_text(render(f"{self.template}_reference", label=str(label), text=part).strip())
                    if not any(isinstance(part, str) for part in reference.parts):  # images only: label after them
                        add_text(render(f"{self.template}_reference", label=str(label), text="").strip())
                    continue
                if reference.image is not None:
                    content.append(_IMAGE)
                    prompt_images.append(reference.image)
                add_text(render(f"{self.template}_reference", label=str(label), text=reference.text).strip())
        # The question part: as is, or (choices given) followed by its options lettered A, B, ...
        part = "question" if references else "plain"
        if choices is None:
            add_text(render(f"{self.template}_{part}", question=question))
        else:
            options = "\n".join(render(f"{self.template}_letters_option", letter=letter, text=choice)
                                for letter, choice in zip(CHOICE_LETTERS, choices))
            add_text(render(f"{self.template}_letters_{part}", question=question, options=options))
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True), prompt_images

    def _fit(self, question: str, images: list[PIL.Image.Image], references: list[Reference],
             reserve: int, choices: Sequence[str] | None = None) -> _FittedPrompt:
        """Render the prompt, dropping the lowest-scored reference (ties: the last; no score counts as
        the lowest) until its tokens + ``reserve`` (the tokens to generate) fit the context."""
        limit = self._context_length()
        kept, dropped = list(references), []
        while True:
            text, prompt_images = self._render(question, images, kept, choices)
            # Processing the images is the only exact count: processors expand each image differently.
            inputs = self._process([text], [prompt_images])
            input_ids = inputs["input_ids"]  # (1, length)
            length = input_ids.shape[1]
            if limit is None or length + reserve <= limit:
                return _FittedPrompt(text, prompt_images, kept, dropped, length, inputs)
            if not kept:
                image_tokens = int((input_ids == self._image_token_id()).sum())
                raise ContextLengthError(
                    f"The prompt needs {length} tokens ({image_tokens} for {len(images)} query image(s)) + {reserve} "
                    f"to generate, over the model's context of {limit} even with no references; shorten the "
                    "question, pass fewer query images, lower `max_new_tokens`, or raise `max_context_tokens`.")
            weakest = min(reversed(range(len(kept))), key=lambda i: _score(kept[i]))
            dropped.append(kept.pop(weakest))

    def _context_length(self) -> int | None:
        if self.max_context_tokens is not None:
            return self.max_context_tokens
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def _process(self, texts: list[str], images: list[list[PIL.Image.Image]], padding_side: str = "left"):
        """Tokenize ``texts`` with their images (one list per text) on the model's device."""
        bos = self.processor.tokenizer.bos_token
        inputs = self.processor(
            text=texts,
            images=images if any(images) else None,
            padding=len(texts) > 1,
            padding_side=padding_side,
            # As apply_chat_template(tokenize=True): a template that writes the BOS gets no second one.
            add_special_tokens=not (bos and texts[0].startswith(bos)),
            return_tensors="pt",
        )
        return inputs.to(self.model.device, self.model.dtype)

    def _image_token_id(self) -> int:
        token_id = getattr(self.processor, "image_token_id", None)
        return self.model.config.image_token_id if token_id is None else token_id

    # ----------------------------------------------------------------------------------- answering
    def answer(self, question: str, image: Any = None, references: Sequence[Reference] | None = (), *,
               max_new_tokens: int | None = None, do_sample: bool | None = None, seed: int | None = None,
               stream: bool = False, on_token: Callable[[str], None] | None = None) -> AnswerOutput | AnswerStream:
        """Answer ``question`` about ``image`` (a PIL image, a list of them, or None) from ``references``.

        With ``stream=True`` returns an :class:`AnswerStream` to iterate; ``on_token`` is called with each
        text chunk as it is generated (also without ``stream``).
        """
        _check_question(question)
        images = _as_images("image", image)
        references = _check_references("references", references)
        max_new_tokens, do_sample, seed = self._generation_options(max_new_tokens, do_sample, seed)
        if on_token is not None and not callable(on_token):
            raise GenerationError(f"`on_token` must be callable or None, got {type(on_token).__name__}.")

        # 1. fit the prompt into the context
        start = time.perf_counter()
        prompt = self._fit(question, images, references, reserve=max_new_tokens)
        timings = {"prompt": time.perf_counter() - start}

        # 2. generate
        def run(streamer: BaseStreamer | None = None) -> tuple[torch.Tensor, float]:
            new_ids, seconds = self._generate(prompt.inputs, max_new_tokens, do_sample, seed, streamer=streamer)
            return new_ids[0], seconds

        def finish(new_ids: torch.Tensor, seconds: float) -> AnswerOutput:
            return self._output(prompt, prompt.inputs["input_ids"][0], new_ids, timings | {"generate": seconds})

        if not stream and on_token is None:
            return finish(*run())
        streamer = _TokenQueue()
        answer_stream = AnswerStream(lambda: run(streamer), streamer, self.processor.tokenizer, finish, on_token)
        if stream:
            return answer_stream
        for _ in answer_stream:  # on_token sees each chunk
            pass
        return answer_stream.result

    def answer_batch(self, questions: list[str], images: list | None = None,
                     references: list[Sequence[Reference]] | None = None, *, max_new_tokens: int | None = None,
                     do_sample: bool | None = None, seed: int | None = None) -> list[AnswerOutput]:
        """Answer several questions with ONE left-padded ``generate`` call; ``images`` and ``references``
        hold one entry per question. The timings are the whole batch's."""
        if not isinstance(questions, (list, tuple)) or not questions:
            raise GenerationError(f"`questions` must be a non-empty list of strings, got {questions!r}.")
        for i, question in enumerate(questions):
            _check_question(question, f"questions[{i}]")
        per_question_images = _per_question("images", images, len(questions))
        per_question_references = _per_question("references", references, len(questions))
        images = [_as_images(f"images[{i}]", value) for i, value in enumerate(per_question_images)]
        references = [_check_references(f"references[{i}]", value) for i, value in enumerate(per_question_references)]
        max_new_tokens, do_sample, seed = self._generation_options(max_new_tokens, do_sample, seed)

        start = time.perf_counter()
        # Each question is fitted alone (its own dropped references), then all are processed together.
        prompts = [self._fit(q, i, r, reserve=max_new_tokens) for q, i, r in zip(questions, images, references)]
        inputs = self._process([p.text for p in prompts], [p.images for p in prompts], padding_side="left")
        timings = {"prompt": time.perf_counter() - start}
        new_ids, seconds = self._generate(inputs, max_new_tokens, do_sample, seed)
        timings["generate"] = seconds
        return [self._output(prompt, inputs["input_ids"][row], new_ids[row], timings)
                for row, prompt in enumerate(prompts)]

    def _generation_options(self, max_new_tokens, do_sample, seed) -> tuple[int, bool, int | None]:
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        _check_positive_int("max_new_tokens", max_new_tokens)
        _check_seed(seed)
        return max_new_tokens, self.do_sample if do_sample is None else bool(do_sample), (
            self.seed if seed is None else seed)

    @torch.inference_mode()
    def _generate(self, inputs, max_new_tokens: int, do_sample: bool, seed: int | None,
                  streamer: BaseStreamer | None = None) -> tuple[torch.Tensor, float]:
        """(new token ids (batch, new) on the CPU, seconds)."""
        options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        start = time.perf_counter()
        # A seed draws from a forked RNG, so seeded calls repeat and the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            output = self.model.generate(**inputs, **options, streamer=streamer)  # (batch, prompt + new)
        new_ids = output[:, inputs["input_ids"].shape[1]:].cpu()
        return new_ids, time.perf_counter() - start

    def _output(self, prompt: _FittedPrompt, input_ids: torch.Tensor, new_ids: torch.Tensor,
                timings: dict[str, float]) -> AnswerOutput:
        text = self.processor.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return AnswerOutput(
            text=text,
            cited=parse_citations(text, len(prompt.references)),
            references=prompt.references,
            dropped=prompt.dropped,
            prompt=prompt.text,
            num_image_tokens=int((input_ids == self._image_token_id()).sum()),
            timings=timings,
        )

    # ------------------------------------------------------------------------------ multiple choice
    @torch.inference_mode()
    def choose(self, question: str, choices: Sequence[str], image: Any = None,
               references: Sequence[Reference] | None = (), *, choice_format: ChoiceFormat | None = None,
               length_normalization: LengthNormalization | None = None) -> ChoiceOutput:
        """Pick the option whose reply the model finds most likely after the prompt.

        ``choice_format`` (``None``: the answerer's) says what is scored:

        - ``"options"``: the prompt does not list the options, and each option's text is scored as the
          reply, as lm-evaluation-harness scores a ``multiple_choice`` task.
        - ``"letters"``: MRAG-Bench's protocol (``eval/utils/dataloader.py``): the prompt lists the options
          as ``A: ...``, ``B: ...`` (templates ``<template>_letters_*``) and asks for the letter; each
          letter is scored as the reply, and the likeliest letter's option is chosen. At most 26 options.

        A reply's log-likelihood is the sum over its tokens of log p(token | prompt, earlier tokens),
        teacher forced in one right-padded forward pass over all replies. Its score is that divided as
        ``length_normalization`` (``None``: the answerer's) says: ``"none"``, not at all (the harness's
        ``acc``); ``"tokens"``, by the reply's token count (the mean token log-prob); ``"chars"``, by the
        length in characters of the scored text, the option or its letter (the harness's ``acc_norm``:
        ``lls / completion_len`` with ``completion_len = len(choice)``, Unicode code points of the option
        without the space before it, not UTF-8 bytes, which the harness counts only for perplexities;
        ``lm_eval/api/task.py``). Ties go to the first option.
        """
        _check_question(question)
        _check_choices(choices)
        choice_format = self.choice_format if choice_format is None else choice_format
        length_normalization = self.length_normalization if length_normalization is None else length_normalization
        _check_one_of("choice_format", choice_format, CHOICE_FORMATS)
        _check_one_of("length_normalization", length_normalization, LENGTH_NORMALIZATIONS)
        images = _as_images("image", image)
        references = _check_references("references", references)
        lettered = choice_format == "letters"
        if lettered:
            _check_letter_choices(choices)
            _check_template(self.template, LETTER_TEMPLATE_PARTS, "choice_format='letters'")
        scored = list(CHOICE_LETTERS[: len(choices)]) if lettered else list(choices)  # the texts scored as replies
        replies = [self._reply(text) for text in scored]
        tokenizer = self.processor.tokenizer
        reserve = max(len(tokenizer(reply, add_special_tokens=False)["input_ids"]) for reply in replies)
        prompt = self._fit(question, images, references, reserve=reserve, choices=choices if lettered else None)

        log_likelihoods, token_counts = self._reply_log_likelihoods(prompt, replies)  # (n,), (n,)
        if length_normalization == "tokens":
            scores = log_likelihoods / token_counts
        elif length_normalization == "chars":
            scores = log_likelihoods / torch.tensor([float(len(text)) for text in scored])
        else:
            scores = log_likelihoods
        index = int(scores.argmax())
        return ChoiceOutput(choice=choices[index], index=index, scores=scores.tolist(), prompt=prompt.text,
                            references=prompt.references, dropped=prompt.dropped,
                            log_likelihoods=log_likelihoods.tolist(), choice_format=choice_format,
                            length_normalization=length_normalization)

    def _reply_log_likelihoods(self, prompt: _FittedPrompt, replies: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(reply | prompt) per reply, float32 on the CPU; each reply's token count)."""
        # As lm-evaluation-harness: tokenize prompt + reply whole, and the reply's tokens are those after
        # the prompt's own token count (so word-start tokens come out as in a real reply).
        inputs = self._process([prompt.text + reply for reply in replies], [prompt.images] * len(replies),
                               padding_side="right")
        input_ids = inputs["input_ids"]  # (n, L), every row starting with the prompt's `start` tokens
        start = prompt.length
        keep = input_ids.shape[1] - start + 1  # logits at positions start - 1 .. L - 1
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            inputs["logits_to_keep"] = keep  # not (n, L, vocab) logits for the whole prompt
        logits = self.model(**inputs).logits[:, -keep:-1].float()  # (n, L - start, vocab): predict start .. L-1
        targets = input_ids[:, start:]  # (n, L - start)
        token_log_probs = logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = inputs["attention_mask"][:, start:].to(token_log_probs.dtype)  # 0 on right padding
        return (token_log_probs * mask).sum(dim=-1).cpu(), mask.sum(dim=-1).cpu()  # (n,), (n,)

    def _reply(self, choice: str) -> str:
        """``choice`` as the chat template writes an assistant reply right after the generation prompt
        (e.g. " A boat" after LLaVA's "ASSISTANT:"), without what closes the turn."""
        user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
        reply = [{"role": "assistant", "content": [{"type": "text", "text": choice}]}]
        asked = self.processor.apply_chat_template(user, add_generation_prompt=True)
        answered = self.processor.apply_chat_template(user + reply)
        end = answered.find(choice, len(asked))
        if not answered.startswith(asked) or end < 0:
            raise GenerationError(
                f"The chat template of {self.model_id!r} does not write a reply right after its generation prompt "
                f"(rendered {answered!r} after {asked!r}), so options cannot be scored as replies.")
        return answered[len(asked) : end + len(choice)]


class _TokenQueue(BaseStreamer):
    """``generate``'s streamer: hands each step's new token ids to the consumer (the prompt is skipped)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self._queue.get()) is not None:
            yield ids


# Held back at the end of the settled text: whitespace (the answer is stripped, and the tokenizer's
# clean-up may drop a space before punctuation) and U+FFFD (an undecodable byte, until text follows).
_UNSETTLED = " \t\n\r\x0b\x0c\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback


class AnswerStream:
    """An answer as it is generated: iterate for its text chunks, then read ``.result`` (AnswerOutput).

    ``generate`` runs in a thread; an exception raised there is re-raised here, in the consumer.
    The chunks join to exactly ``result.text``. Each step decodes the tokens so far up to the last
    one whose text stands on its own, and yields what that adds: a token that holds part of a
    character (a byte-fallback token, or bytes that decode to U+FFFD alone) can change how the
    bytes before it decode, so text waits for the next whole token. Leading whitespace is skipped;
    trailing whitespace is held back until more text follows.
    """

    def __init__(self, generate: Callable[[], tuple[torch.Tensor, float]], tokens: _TokenQueue, tokenizer: Any,
                 finish: Callable[[torch.Tensor, float], AnswerOutput], on_token: Callable[[str], None] | None):
        self._tokens = tokens
        self._tokenizer = tokenizer
        self._whole: dict[int, bool] = {}
        self._finish = finish
        self._on_token = on_token
        self._generated: tuple[torch.Tensor, float] | None = None
        self._error: BaseException | None = None
        self._result: AnswerOutput | None = None
        self._iterated = False
        self._thread = threading.Thread(target=self._run, args=(generate,), daemon=True)
        self._thread.start()

    def _run(self, generate: Callable[[], tuple[torch.Tensor, float]]) -> None:
        try:
            self._generated = generate()
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._error = error
            self._tokens.end()  # wake the consumer

    def _stands_alone(self, token_id: int) -> bool:
        whole = self._whole.get(token_id)
        if whole is None:
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            whole = not (isinstance(token, str) and _BYTE_TOKEN.fullmatch(token)) and (
                "\ufffd" not in self._tokenizer.decode([token_id], skip_special_tokens=True))
            self._whole[token_id] = whole
        return whole

    def _emit(self, chunk: str) -> str:
        if self._on_token is not None:
            self._on_token(chunk)
        return chunk

    def __iter__(self) -> Iterator[str]:
        if self._iterated:
            raise GenerationError("An AnswerStream can be iterated only once; read its `.result` instead.")
        self._iterated = True
        ids: list[int] = []
        emitted, whole = "", 0  # whole: the tokens up to the last one that stands alone
        for new_ids in self._tokens:
            ids.extend(new_ids)
            last = next((i + 1 for i in range(len(ids) - 1, whole - 1, -1) if self._stands_alone(ids[i])), whole)
            if last == whole:
                continue
            whole = last
            # decoded as the answer is (_output), so the settled text is a prefix of it
            settled = self._tokenizer.decode(ids[:whole], skip_special_tokens=True).lstrip().rstrip(_UNSETTLED)
            if len(settled) > len(emitted) and settled.startswith(emitted):
                chunk, emitted = settled[len(emitted):], settled
                yield self._emit(chunk)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._result = self._finish(*self._generated)
        answer = self._result.text
        if answer.startswith(emitted):
            if len(answer) > len(emitted):
                yield self._emit(answer[len(emitted):])
        else:  # a decoder that rewrote settled text; the answer is still the full decode
            logger.warning("The streamed chunks of this answer differ from its final text %r.", answer)

    @property
    def result(self) -> AnswerOutput:
        if self._result is None:
            raise GenerationError("The answer is not complete: iterate the AnswerStream to its end first.")
        return self._result


# ------------------------------------------------------------------------------------ validation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GenerationError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_seed(seed: Any) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise GenerationError(f"`seed` must be an integer or None, got {seed!r}.")


def _check_one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise GenerationError(f"`{name}` must be one of {', '.join(map(repr, valid))}, got {value!r}.")


def _check_template(template: str, parts: dict[str, set[str]], needed_by: str | None = None) -> None:
    for part, fields in parts.items():
        try:
            found = set(load_template(f"{template}_{part}").get_identifiers())
        except TemplateError as error:
            needed = "" if needed_by is None else f" (needed by {needed_by})"
            raise GenerationError(f"`template` {template!r} lacks its {part!r} part{needed}: {error}") from None
        if found != fields:
            raise GenerationError(f"`template` {template!r}: {template}_{part}.txt must take the fields "
                                  f"{sorted(fields)}, it takes {sorted(found)}.")


def _check_question(question: Any, name: str = "question") -> None:
    if not isinstance(question, str) or not question.strip():
        raise GenerationError(f"`{name}` must be a non-empty string, got {question!r}.")


def _check_choices(choices: Any) -> None:
    if isinstance(choices, str) or not isinstance(choices, Sequence) or len(choices) < 2:
        raise GenerationError(f"`choices` must be a list of at least 2 options, got {choices!r}.")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise GenerationError(f"`choices[{i}]` must be a non-empty string, got {choice!r}.")
    duplicates = sorted({choice for choice in choices if choices.count(choice) > 1})
    if duplicates:
        raise GenerationError(f"`choices` must be distinct; {duplicates!r} appear more than once. Remove the repeats.")


def _check_letter_choices(choices: Any) -> None:
    _check_choices(choices)
    if len(choices) > len(CHOICE_LETTERS):
        raise GenerationError(
            f"`choices` has {len(choices)} options, more than the {len(CHOICE_LETTERS)} letters A-Z that "
            f"choice_format='letters' labels them with; pass at most {len(CHOICE_LETTERS)} options, or use "
            "choice_format='options'.")


def _as_images(name: str, image: Any) -> list[PIL.Image.Image]:
    if image is None:
        return []
    if isinstance(image, PIL.Image.Image):
        return [image]
    if isinstance(image, (list, tuple)):
        for i, item in enumerate(image):
            if not isinstance(item, PIL.Image.Image):
                raise GenerationError(f"`{name}[{i}]` must be a PIL image, got {type(item).__name__}; open files "
                                      "with PIL.Image.open first.")
        return list(image)
    raise GenerationError(f"`{name}` must be a PIL image, a list of them, or None, got {type(image).__name__}; "
                          "open files with PIL.Image.open first.")


def _check_references(name: str, references: Any) -> list[Reference]:
    if references is None:  # no retrieval
        return []
    if isinstance(references, (str, Reference)) or not isinstance(references, Sequence):
        raise GenerationError(f"`{name}` must be a list of Reference, got {type(references).__name__}.")
    for i, reference in enumerate(references):
        if not isinstance(reference, Reference):
            raise GenerationError(f"`{name}[{i}]` must be a Reference, got {type(reference).__name__}.")
        if not isinstance(reference.text, str):
            raise GenerationError(f"`{name}[{i}].text` must be a string, got {reference.text!r}.")
        if reference.image is not None and not isinstance(reference.image, PIL.Image.Image):
            raise GenerationError(f"`{name}[{i}].image` must be a PIL image or None, got "
                                  f"{type(reference.image).__name__}.")
        if reference.parts is not None:
            if isinstance(reference.parts, (str, PIL.Image.Image)) or not isinstance(reference.parts, Sequence) \
                    or not reference.parts:
                raise GenerationError(f"`{name}[{i}].parts` must be a non-empty list of strings and PIL images, "
                                      f"got {reference.parts!r}.")
            for j, part in enumerate(reference.parts):
                if not (isinstance(part, PIL.Image.Image) or (isinstance(part, str) and part.strip())):
                    raise GenerationError(f"`{name}[{i}].parts[{j}]` must be a non-empty string or a PIL image, "
                                          f"got {part!r}.")
        elif not reference.text.strip() and reference.image is None:
            raise GenerationError(f"`{name}[{i}]` has neither text nor image; drop it or give it one.")
        if reference.score is not None and not _is_number(reference.score):
            raise GenerationError(f"`{name}[{i}].score` must be a finite number or None, got {reference.score!r}.")
    return list(references)


def _per_question(name: str, values: list | None, n: int) -> list:
    if values is None:
        return [None] * n
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise GenerationError(f"`{name}` must be None or a list with one entry per question ({n}), got {values!r}.")
    return list(values)


def _score(reference: Reference) -> float:
    return -math.inf if reference.score is None else reference.score
