"""Rerankers: re-score a retriever's top candidates with a stronger model.

One minimal API for all of them (sentence-transformers' ``CrossEncoder.rank``)::

    reranker.rank(query, hits, top_k=None) -> list[Hit]

returns new :class:`Hit` objects sorted by the reranker's score (descending; ties keep their input
order), with ``score`` and ``scores["rerank"]`` set to that score, the per-channel scores kept,
``rank`` renumbered from 1, and at most ``top_k`` of them. :class:`Reranker` does that shared work;
each implementation fills only ``_score(query, hits) -> (n,) array``:

- :class:`DualEncoderReranker`: exact rescoring with a (usually larger) CLIP/SigLIP dual encoder,
  fusing image and text similarities with EchoSight-style weights; given the knowledge base, it
  embeds each candidate image once (``kb/vector_cache.py``);
- :class:`CrossEncoderReranker`: BLIP's image-text matching (ITM) probability;
- :class:`VLMReranker`: MM-Embed's zero-shot reranking, P("yes") from a VLM asked whether the
  candidate matches the query.

Constructors only store parameters; models load in an idempotent :meth:`Reranker.warm_up` (called
by the first :meth:`Reranker.rank`). The VLM is injected (a pipeline passes its own), never loaded
here: ``retrievers`` may not import ``generators``.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from mmrag.prompts import TemplateError, load_template, render

from .encoders import DualEncoder, default_device, normalize_model_id, resolve_dtype
from mmrag._devices import device_problem

from .errors import ConfigError, InvalidItemError, ModelLoadError
from .query import Hit, Query, QueryLike

if TYPE_CHECKING:  # not at run time: the knowledge base imports Chroma
    from .kb.knowledge_base import KnowledgeBase

# Real models for configs/default.yaml (the tests use the tiny builders in pipelines/tiny_models.py).
DEFAULT_DUAL_ENCODER_RERANKER = "openai/clip-vit-large-patch14"  # CLIP ViT-L/14, a step up from a B/32 KB
DEFAULT_CROSS_ENCODER_RERANKER = "Salesforce/blip-itm-large-coco"  # BLIP ITM (ViT-L), COCO-finetuned
# The VLM reranker scores with the VLM the pipeline injects: by default the answering VLM
# (configs/default.yaml `vlm.model`); this is that model.
DEFAULT_VLM_RERANKER = "llava-hf/llava-interleave-qwen-0.5b-hf"


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")


def _hit_image(hit: Hit) -> Image.Image:
    """The candidate's image as RGB; rerankers that look at images need every hit to have one."""
    image = hit.record.image
    if image is None or isinstance(image, bytes):
        raise ConfigError(
            f"Hit {hit.id!r} has no image to rerank with (record.image is {type(image).__name__}); "
            "pass hits whose record.image is a file path or a PIL image (as the knowledge base returns them)."
        )
    try:
        return hit.record.open_image()
    except (OSError, InvalidItemError) as e:
        raise ConfigError(f"Hit {hit.id!r}: cannot use its image {str(image)!r} ({e}).") from None


class Reranker:
    """Base class: validates the inputs, calls ``_score`` once, sorts and truncates.

    Args:
        batch_size: candidates per model call.
    """

    def __init__(self, *, batch_size: int):
        _positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def warm_up(self) -> "Reranker":
        """Load the model (idempotent, thread-safe). Subclasses with a model override it."""
        return self

    def rank(self, query: QueryLike, hits: Sequence[Hit], top_k: int | None = None) -> list[Hit]:
        """Re-score ``hits`` against ``query`` and return them best first (at most ``top_k``)."""
        if top_k is not None:
            _positive_int("top_k", top_k)
        query = Query.coerce(query)
        hits = list(hits)
        for i, hit in enumerate(hits):
            if not isinstance(hit, Hit):
                raise ConfigError(f"`hits[{i}]` must be a Hit, got {type(hit).__name__}.")
        if not hits:
            return []
        self.warm_up()
        scores = np.asarray(self._score(query, hits), dtype=np.float64)
        assert scores.shape == (len(hits),), f"{type(self).__name__}._score returned shape {scores.shape}"
        # A stable sort of the negated scores: descending, and equal scores keep the retriever's order.
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [hits[i].with_score(scores[i], rank, rerank=float(scores[i])) for rank, i in enumerate(order, start=1)]

    def _score(self, query: Query, hits: list[Hit]) -> np.ndarray:
        """One score per hit, higher is better, in the order of ``hits``."""
        raise NotImplementedError

    def _batches(self, items: list) -> Iterator[list]:
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]


# ------------------------------------------------------------------------------------ dual encoder
class DualEncoderReranker(Reranker):
    """Exact rescoring with a dual encoder, fusing image and text similarities.

    With ``img_d``, ``txt_d`` the candidate's image and text embeddings and ``U`` the query's own
    embeddings (``t_q`` for its text, ``v_q`` for its image; both for an image + text query)::

        score(d) = mean_{u in U} [ image_weight * cos(u, img_d) + text_weight * cos(u, txt_d) ]

    so a text query scores ``w_img·cos(t_q, img) + w_txt·cos(t_q, txt)``, an image query the same with
    ``v_q``, and an image + text query the average of the two. EchoSight fuses its visual and section
    scores 0.5 / 0.5, hence the defaults. A weight of 0 skips embedding that side of the candidates.

    Args:
        encoder: a :class:`DualEncoder`, or a model id / directory to build one from (typically a
            larger model than the knowledge base's, e.g. :data:`DEFAULT_DUAL_ENCODER_RERANKER`).
        image_weight, text_weight: weights (>= 0, not both 0) of the candidate image and text.
        batch_size: candidates whose images are opened and embedded together.
        device, dtype: for an encoder built from a model id (a given DualEncoder keeps its own).
        kb: the :class:`KnowledgeBase` the candidates come from, to cache the encoder's vectors of
            its images in it (:meth:`KnowledgeBase.vector_cache`): a candidate image seen before is
            read back, bit-equal, instead of embedded. ``None``: every image is embedded each time.
            Candidates whose image is not a file of that KB's image store are embedded uncached.
    """

    def __init__(self, encoder: DualEncoder | str | os.PathLike, image_weight: float = 0.5, text_weight: float = 0.5,
                 *, batch_size: int = 32, device: str | None = None, dtype: str | None = None,
                 kb: KnowledgeBase | None = None):
        super().__init__(batch_size=batch_size)
        for name, weight in (("image_weight", image_weight), ("text_weight", text_weight)):
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"`{name}` must be a finite number >= 0, got {weight!r}.")
        if image_weight == 0 and text_weight == 0:
            raise ConfigError("`image_weight` and `text_weight` are both 0, so every score would be 0; make one positive.")
        if isinstance(encoder, DualEncoder):
            if device is not None or dtype is not None:
                raise ConfigError(
                    f"`device`={device!r} / `dtype`={dtype!r} apply only to an encoder given by model id; "
                    "set them on the DualEncoder you pass instead."
                )
            self.encoder = encoder
        elif isinstance(encoder, (str, os.PathLike)):
            self.encoder = DualEncoder(encoder, device=device, dtype=dtype, batch_size=batch_size)
        else:
            raise ConfigError(f"`encoder` must be a DualEncoder or a model id, got {type(encoder).__name__}.")
        self.image_weight = float(image_weight)
        self.text_weight = float(text_weight)
        if kb is not None and not callable(getattr(kb, "vector_cache", None)):
            raise ConfigError(f"`kb` must be a KnowledgeBase (or None), got {type(kb).__name__}.")
        self.kb = kb
        self._cache = None  # kb.vector_cache(encoder), made in warm_up (it needs the loaded model)

    def __repr__(self) -> str:
        return (f"DualEncoderReranker({self.encoder.model_id!r}, image_weight={self.image_weight}, "
                f"text_weight={self.text_weight})")

    def warm_up(self) -> "DualEncoderReranker":
        self.encoder.warm_up()
        with self._lock:
            if self.kb is not None and self._cache is None:
                self._cache = self.kb.vector_cache(self.encoder)
        return self

    def _score(self, query: Query, hits: list[Hit]) -> np.ndarray:
        enc = self.encoder
        vectors = []
        if query.has_text:
            vectors.append(enc.embed_texts([query.text])[0])
        if query.has_image:
            vectors.append(enc.embed_images([query.image])[0])
        queries = np.stack(vectors)  # (m, dim) unit vectors, m = 1 or 2
        scores = []
        for batch in self._batches(hits):
            s = np.zeros(len(batch))
            if self.image_weight != 0:
                images = self._image_vectors(batch)  # (b, dim)
                s += self.image_weight * (images @ queries.T).mean(axis=1)
            if self.text_weight != 0:
                texts = enc.embed_texts([h.record.text for h in batch])  # (b, dim)
                s += self.text_weight * (texts @ queries.T).mean(axis=1)
            scores.append(s)
        return np.concatenate(scores)

    def _image_vectors(self, hits: list[Hit]) -> np.ndarray:
        """The candidates' image vectors: read from the KB's cache where it has them; the others
        embedded in one call (an image shared by several candidates once) and cached."""
        cache = self._cache
        if cache is None:
            return self.encoder.embed_images([_hit_image(h) for h in hits])
        shas = [cache.sha_of(h.record.image) for h in hits]  # None: not an image of the KB's store
        found = cache.get(s for s in shas if s is not None)
        todo: dict[Any, int] = {}  # sha (or the hit's position, when uncacheable) -> a hit to embed it from
        for i, sha in enumerate(shas):
            if sha not in found:
                todo.setdefault(i if sha is None else sha, i)
        if todo:
            embedded = self.encoder.embed_images([_hit_image(hits[i]) for i in todo.values()])  # (m, dim)
            fresh = dict(zip(todo, embedded))
            cache.put({k: v for k, v in fresh.items() if isinstance(k, str)})
            found.update(fresh)
        return np.stack([found[i if sha is None else sha] for i, sha in enumerate(shas)])


# ----------------------------------------------------------------------------------- cross encoder
class CrossEncoderReranker(Reranker):
    """BLIP image-text matching: the ITM head's probability that an (image, text) pair matches,
    ``softmax(itm_logits)[:, 1]`` (``BlipForImageTextRetrieval``, ``use_itm_head=True``).

    Which pair is scored, by query kind:

    - text query: the query text against each candidate's **image**;
    - image query: the query image against each candidate's **text**;
    - image + text query: the query text against each candidate's image (the text says what the
      wanted image shows, e.g. a composed query's modifier; the query image is not used here).

    Args:
        model_id: a BLIP ITM checkpoint (Hub id or directory), e.g. :data:`DEFAULT_CROSS_ENCODER_RERANKER`.
        batch_size: pairs per forward pass.
        device, dtype: as :class:`DualEncoder` (``None``: CUDA + float16 when present, else CPU + float32).
        revision: a Hub branch, tag or commit (e.g. a ``refs/pr/N`` that adds safetensors weights).
        trust_remote_code: allow code from the model repository to run (off by default).
    """

    def __init__(self, model_id: str | os.PathLike, *, batch_size: int = 16, device: str | None = None,
                 dtype: str | None = None, revision: str | None = None, trust_remote_code: bool = False):
        super().__init__(batch_size=batch_size)
        self.model_id = normalize_model_id(model_id)
        problem = device_problem(device)
        if problem is not None:
            raise ConfigError(f"`device` {problem}.")
        self.device = device if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self._model = None
        self._processor = None

    def __repr__(self) -> str:
        return f"CrossEncoderReranker({self.model_id!r}, device={self.device!r}, dtype={self.dtype})"

    def warm_up(self) -> "CrossEncoderReranker":
        with self._lock:
            if self._model is not None:
                return self
            from transformers import AutoConfig, AutoProcessor, BlipForImageTextRetrieval

            kwargs = dict(revision=self.revision, trust_remote_code=self.trust_remote_code)
            try:
                config = AutoConfig.from_pretrained(self.model_id, **kwargs)
                if config.model_type != "blip":
                    raise ModelLoadError(
                        f"{self.model_id!r} is a {config.model_type!r} model; the cross-encoder reranker needs a "
                        f"BLIP image-text matching checkpoint such as {DEFAULT_CROSS_ENCODER_RERANKER!r}."
                    )
                processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
                model = BlipForImageTextRetrieval.from_pretrained(self.model_id, dtype=self.dtype,
                                                                  use_safetensors=True, **kwargs)
            except (OSError, ValueError) as e:
                raise ModelLoadError(
                    f"Could not load the cross-encoder reranker {self.model_id!r}: {str(e).splitlines()[0]} "
                    "Check the model id or path; Hub models need network access (offline, use configs/tiny.yaml)."
                ) from e
            self._model = model.to(self.device).eval()
            self._processor = processor
        return self

    @torch.inference_mode()
    def _score(self, query: Query, hits: list[Hit]) -> np.ndarray:
        model, processor = self._model, self._processor
        # BERT-style tokenizers report a huge model_max_length; the position table is the real limit.
        max_length = min(processor.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        scores = []
        for batch in self._batches(hits):
            if query.has_text:
                texts, images = [query.text] * len(batch), [_hit_image(h) for h in batch]
            else:
                texts, images = [h.record.text for h in batch], [query.image] * len(batch)
            enc = processor(images=images, text=texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            logits = model(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                pixel_values=enc["pixel_values"].to(self.device, self.dtype),
                use_itm_head=True,
            ).itm_score  # (b, 2): [no match, match]
            scores.append(logits.float().softmax(dim=-1)[:, 1].cpu().numpy())
        return np.concatenate(scores)


# --------------------------------------------------------------------------------------------- VLM
# What the template's $query says for queries with an image; the chat puts the query image first.
QUERY_IMAGE_ONLY = "the first image"
QUERY_IMAGE_AND_TEXT = "the first image, together with the text: {text}"


class VLMReranker(Reranker):
    """MM-Embed's zero-shot reranking: ask a VLM whether the candidate matches the query.

    One user turn per candidate: the query image (if any), the candidate's image, then the template
    (``prompts/templates/<template>.txt``, fields ``$query`` and ``$reference_text``) rendered through
    the processor's chat template with the generation prompt. The score is

        P(yes) = exp(LSE_yes) / (exp(LSE_yes) + exp(LSE_no)),   LSE_c = logsumexp of the next-token
                                                                 logits over class c's tokens,

    i.e. the yes/no probability renormalised over the two answers. Class c's tokens are, for each
    word in ``yes_tokens`` / ``no_tokens``, the first token of ``tokenizer.encode(word)`` (without
    special tokens), so spelling variants ("yes", "Yes") add up. When every candidate word begins
    with the same tokens (a SentencePiece word-start "▁" split off on its own, as in small vocabularies),
    those shared tokens are appended to the prompt and the first token after them is used: the
    answer's probability is then read after the part the two answers have in common.

    Batches are left-padded so that every row's last position is its own next-token position; with
    rotary positions (LLaVA's Llama, Qwen2) a left-padded row scores as it does alone, up to rounding.

    Args:
        vlm: the injected model: an object with ``.model`` (an ``AutoModelForImageTextToText``) and
            ``.processor`` (an ``AutoProcessor`` with a chat template), or a ``(model, processor)`` tuple.
        template: name of the prompt template.
        yes_tokens, no_tokens: answer words of each class.
        batch_size: candidates per forward pass.
    """

    def __init__(self, vlm: Any, template: str = "rerank_yes_no", *,
                 yes_tokens: Sequence[str] = ("yes", "Yes"), no_tokens: Sequence[str] = ("no", "No"),
                 batch_size: int = 4):
        super().__init__(batch_size=batch_size)
        if vlm is None:
            raise ConfigError("`vlm` is required: pass an object with .model and .processor, or (model, processor).")
        if isinstance(vlm, (tuple, list)) and len(vlm) != 2:
            raise ConfigError(f"`vlm` as a tuple must be (model, processor), got {len(vlm)} items.")
        try:
            fields = set(load_template(template).get_identifiers())
        except TemplateError as e:
            raise ConfigError(f"`template`: {e}") from None
        if fields != {"query", "reference_text"}:
            raise ConfigError(
                f"`template` {template!r} must take the fields ['query', 'reference_text'], it takes {sorted(fields)}."
            )
        for name, words in (("yes_tokens", yes_tokens), ("no_tokens", no_tokens)):
            if isinstance(words, str) or not words or not all(isinstance(w, str) and w for w in words):
                raise ConfigError(f"`{name}` must be a non-empty list of non-empty strings, got {words!r}.")
        self.vlm = vlm
        self.template = template
        self.yes_tokens = tuple(yes_tokens)
        self.no_tokens = tuple(no_tokens)
        self._model = None
        self._processor = None
        self._prefix_ids: list[int] = []
        self._yes_ids: list[int] = []
        self._no_ids: list[int] = []

    def __repr__(self) -> str:
        model = self._model if self._model is not None else self.vlm
        return f"VLMReranker({type(model).__name__}, template={self.template!r})"

    def warm_up(self) -> "VLMReranker":
        with self._lock:
            if self._model is not None:
                return self
            # Read .model/.processor only now: a pipeline's VLM wrapper may load them on first access.
            model, processor = self.vlm if isinstance(self.vlm, (tuple, list)) else (
                getattr(self.vlm, "model", None), getattr(self.vlm, "processor", None))
            if model is None or processor is None or getattr(processor, "tokenizer", None) is None:
                raise ConfigError(
                    f"`vlm` ({type(self.vlm).__name__}) must provide a model and a processor with a tokenizer: "
                    "an object with .model and .processor, or a (model, processor) tuple."
                )
            if not getattr(processor, "chat_template", None):
                raise ConfigError(f"The VLM's processor ({type(processor).__name__}) has no chat template; "
                                  "the VLM reranker formats its question with one.")
            self._prefix_ids, self._yes_ids, self._no_ids = _answer_token_ids(
                processor.tokenizer, self.yes_tokens, self.no_tokens)
            # Keep only the last position's logits where the model allows it, not (b, seq, vocab).
            self._forward_kwargs = (
                {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
            self._processor = processor
            self._model = model
        return self

    def _prompt(self, query: Query, hit: Hit) -> tuple[str, list[Image.Image]]:
        images = ([query.image] if query.has_image else []) + [_hit_image(hit)]
        if not query.has_image:
            described = query.text
        elif not query.has_text:
            described = QUERY_IMAGE_ONLY
        else:
            described = QUERY_IMAGE_AND_TEXT.format(text=query.text)
        text = render(self.template, query=described, reference_text=hit.record.text)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self._processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return prompt, images

    @torch.inference_mode()
    def _score(self, query: Query, hits: list[Hit]) -> np.ndarray:
        model, processor = self._model, self._processor
        tokenizer = processor.tokenizer
        # Without a pad token rows of different lengths cannot share a batch: score them one by one.
        can_pad = tokenizer.pad_token is not None
        step = self.batch_size if can_pad else 1
        prefix = torch.tensor(self._prefix_ids, dtype=torch.long)
        yes, no = torch.tensor(self._yes_ids), torch.tensor(self._no_ids)
        scores = []
        for start in range(0, len(hits), step):
            prompts, images = zip(*(self._prompt(query, h) for h in hits[start : start + step]))
            # As processor.apply_chat_template(tokenize=True): a template that writes the BOS itself
            # must not get a second one from the tokenizer.
            bos = tokenizer.bos_token
            inputs = processor(images=list(images), text=list(prompts), padding=can_pad, padding_side="left",
                               add_special_tokens=not (bos and prompts[0].startswith(bos)), return_tensors="pt")
            inputs = _append_tokens(dict(inputs), prefix)
            inputs = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
                      for k, v in inputs.items()}
            logits = model(**inputs, **self._forward_kwargs).logits[:, -1, :].float()  # (b, vocab)
            log_yes = torch.logsumexp(logits[:, yes.to(logits.device)], dim=-1)
            log_no = torch.logsumexp(logits[:, no.to(logits.device)], dim=-1)
            scores.append(torch.sigmoid(log_yes - log_no).cpu().numpy())  # = e^yes / (e^yes + e^no)
        return np.concatenate(scores)


def _answer_token_ids(tokenizer, yes_words: Sequence[str], no_words: Sequence[str]
                      ) -> tuple[list[int], list[int], list[int]]:
    """(shared prefix, yes token ids, no token ids); see :class:`VLMReranker`."""
    encoded = {word: tokenizer.encode(word, add_special_tokens=False) for word in (*yes_words, *no_words)}
    prefix = os.path.commonprefix(list(encoded.values()))
    for word, ids in encoded.items():
        if len(ids) <= len(prefix):
            raise ConfigError(
                f"The answer word {word!r} encodes to {tokenizer.convert_ids_to_tokens(ids)}, which no token tells "
                "apart from the other answer words; choose `yes_tokens` / `no_tokens` that differ."
            )
    yes_ids = sorted({encoded[w][len(prefix)] for w in yes_words})
    no_ids = sorted({encoded[w][len(prefix)] for w in no_words})
    shared = set(yes_ids) & set(no_ids)
    if shared:
        raise ConfigError(
            f"`yes_tokens` {list(yes_words)} and `no_tokens` {list(no_words)} share the answer token(s) "
            f"{tokenizer.convert_ids_to_tokens(sorted(shared))}; choose words whose first tokens differ."
        )
    return list(prefix), yes_ids, no_ids


def _append_tokens(inputs: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Append ``ids`` to every (left-padded) row, extending the per-token tensors to match."""
    if ids.numel() == 0:
        return inputs
    batch, length = inputs["input_ids"].shape
    out = {}
    for key, value in inputs.items():
        if key == "input_ids":
            value = torch.cat([value, ids.expand(batch, -1)], dim=1)
        elif value.dim() == 2 and value.shape == (batch, length):
            # attention_mask: attend to the new tokens; token-type ids (text = 0) and the like: zeros.
            fill = torch.ones if key == "attention_mask" else torch.zeros
            value = torch.cat([value, fill(batch, ids.numel(), dtype=value.dtype)], dim=1)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ factory
RERANKERS: dict[str, type[Reranker]] = {
    "dual_encoder": DualEncoderReranker,
    "cross_encoder": CrossEncoderReranker,
    "vlm": VLMReranker,
}


def reranker_from_config(name: str, **kwargs: Any) -> Reranker:
    """Build the reranker ``name`` (``"dual_encoder"``, ``"cross_encoder"`` or ``"vlm"``) from config
    options, e.g. ``reranker_from_config("cross_encoder", model_id=..., batch_size=8)``.

    The ``"vlm"`` reranker needs the model injected: ``vlm=`` an object with ``.model`` and
    ``.processor``, or a ``(model, processor)`` tuple (a pipeline passes its own VLM).
    """
    if name not in RERANKERS:
        raise ConfigError(f"`name` must be one of {list(RERANKERS)}, got {name!r}.")
    if name == "vlm" and kwargs.get("vlm") is None:
        raise ConfigError(
            "The 'vlm' reranker needs the VLM injected: reranker_from_config('vlm', vlm=...) with an object "
            "that has .model and .processor, or a (model, processor) tuple."
        )
    cls = RERANKERS[name]
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise ConfigError(
            f"Invalid options for the {name!r} reranker ({e}); it takes {list(signature.parameters)}."
        ) from None
    return cls(**kwargs)
