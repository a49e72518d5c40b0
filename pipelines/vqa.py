"""RAGVQAPipeline: answer a question about an image with references retrieved from the KB.

Stages (after EchoSight and RoRA-VLM): validate -> retrieve (optionally two-stage: the image
finds entity records whose texts expand the question for a second retrieval) -> rerank ->
drop weak references -> answer with a VLM that sees the query image first, then each reference
image with its text, labelled [1]..[k] (an interleaved document: its best parts for the query, in
document order), then the question (MRAG-Bench's layout).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from mmrag.generators.vlm import AnswerOutput, Reference, VLMAnswerer
from mmrag.retrievers import ConfigError, Hit, InvalidItemError, KnowledgeBaseError, MultimodalRetriever, Query, Record

from .config import Config, load_config
from .outputs import VQAOutput, VQAStream
from .search import SearchPipeline, require_records


class RAGVQAPipeline:
    """Retrieval-augmented visual question answering.

    Args:
        answerer: the :class:`VLMAnswerer`.
        retriever: a :class:`MultimodalRetriever` over the KB; ``None`` for a pipeline that only
            answers with the references it is given.
        reranker: optional, ``rank(query, hits, top_k)``; applied unless ``rerank=False``.
        min_score: references whose score (the reranker's, else the fused one) is below it are
            dropped; ``None`` keeps all.
        two_stage: RoRA-VLM's image-anchored query expansion.
        expansion_k: entity records whose texts expand the question in the second stage.
        channels: retrieval channels (``None``: the image's look-alikes plus the question's words).
        k: references per question when a call does not say (``vqa.k`` in a config).
    """

    def __init__(self, answerer: VLMAnswerer, retriever: MultimodalRetriever | None = None, *, reranker: Any = None,
                 min_score: float | None = None, two_stage: bool = False, expansion_k: int = 2,
                 channels: Sequence[str] | None = None, k: int = 3):
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
        self.answerer = answerer
        self.k = k
        self.retriever = retriever
        self.reranker = reranker
        self.min_score = min_score
        self.two_stage = two_stage
        self.expansion_k = expansion_k
        self.channels = tuple(channels) if channels is not None else None

    @classmethod
    def from_config(cls, config: str | Path | Mapping | Config | None = None, *, kb_path: str | None = None,
                    with_kb: bool = True) -> "RAGVQAPipeline":
        """Build every component from a config (path, preset name, dict or :class:`Config`)."""
        from .builders import build_answerer, build_reranker, build_retriever, open_knowledge_base

        cfg = load_config(config, {} if kb_path is None else {"kb.path": kb_path})
        answerer = build_answerer(cfg)
        retriever = build_retriever(cfg, open_knowledge_base(cfg, create=False)) if with_kb else None
        reranker = build_reranker(cfg, vlm=answerer, kb=retriever.kb) if with_kb else None
        v = cfg.vqa
        return cls(answerer, retriever, reranker=reranker, min_score=v.min_score, two_stage=v.two_stage,
                   expansion_k=v.expansion_k, channels=v.channels, k=v.k)

    # ------------------------------------------------------------------ call
    def __call__(self, question: str, image: Image.Image | str | Path | None = None, k: int | None = None,
                 where: dict | None = None, rerank: bool = True, references: Sequence | None = None,
                 choices: Sequence[str] | None = None, stream: bool = False) -> VQAOutput | VQAStream:
        """Answer ``question`` (about ``image``) from ``k`` references (``None``: the pipeline's ``k``).

        ``references`` bypasses retrieval (the "gold references" setting): a list of
        :class:`Hit`, :class:`Record`, ``(image or None, text)`` pairs; ``[]`` answers without
        any. ``choices`` (at least 2) returns the most likely option instead of free text.
        ``stream=True`` returns a :class:`VQAStream` (not with ``choices``).
        """
        timings: dict[str, float] = {}
        k = self.k if k is None else k
        # 0. validate every input first
        query_image, gold = self.check_inputs(question, image, k, references, choices, stream)
        # 1. retrieve (2. rerank inside) unless references are given
        t = time.perf_counter()
        if gold is not None:
            hits, message = gold, None if gold else "no references given: answered without retrieval"
        else:
            hits = self._retrieve(question.strip(), query_image, k, where, rerank, timings)
            message = None if hits else "the knowledge base returned no references: answered without retrieval"
        # 3. drop weak references
        if gold is None and self.min_score is not None and hits:
            kept = [h for h in hits if h.score >= self.min_score]
            if not kept:
                message = (f"no reference scored >= min_score {self.min_score} (best {max(h.score for h in hits):.4f}): "
                           "answered without retrieval")
            hits = kept
        timings.setdefault("retrieve", time.perf_counter() - t)
        refs = [_reference(h) for h in hits]
        # 4. answer
        t = time.perf_counter()
        if choices is not None:
            out = self.answerer.choose(question, list(choices), image=query_image, references=refs)
            used, dropped = _match(hits, refs, out.references), _match(hits, refs, out.dropped)
            timings["answer"] = time.perf_counter() - t
            return VQAOutput(answer=out.choice, references=used, cited=[], prompt=out.prompt, no_retrieval=not used,
                             message=message, choice=out.choice, choice_scores=out.scores, dropped=dropped,
                             timings=timings)
        result = self.answerer.answer(question, image=query_image, references=refs, stream=stream)

        def finish(ans: AnswerOutput) -> VQAOutput:
            timings["answer"] = time.perf_counter() - t
            used = _match(hits, refs, ans.references)
            return VQAOutput(answer=ans.text, references=used, cited=[used[i - 1] for i in ans.cited if i <= len(used)],
                             prompt=ans.prompt, no_retrieval=not used, message=message,
                             dropped=_match(hits, refs, ans.dropped), timings=timings)

        if stream:
            return VQAStream(iter(result), lambda: finish(result.result))
        return finish(result)

    def check_inputs(self, question, image, k, references, choices, stream) -> tuple[Image.Image | None, list[Hit] | None]:
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"`question` must be a non-empty string, got {question!r}.")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"`k` must be a positive integer, got {k!r}.")
        query_image = Query.coerce(Query(text=question, image=image)).image if image is not None else None
        if choices is not None:
            if isinstance(choices, str) or len(choices) < 2:
                raise ConfigError(f"`choices` must be a list of at least 2 options, got {choices!r}.")
            if stream:
                raise ConfigError("`stream=True` streams free-text answers; it cannot be used with `choices`.")
        gold = None
        if references is not None:
            gold = [_as_hit(r, i) for i, r in enumerate(references)]
            for i, hit in enumerate(gold):  # open every given image now: a bad one fails before any work
                if hit.record.image is not None:
                    try:
                        opened = hit.record.open_image()
                    except (OSError, ValueError, InvalidItemError) as e:
                        raise ConfigError(f"`references[{i}]` has an unusable image ({e}).") from None
                    gold[i] = dataclasses.replace(hit, record=dataclasses.replace(hit.record, image=opened))
        elif self.retriever is None:
            raise ConfigError("This pipeline has no knowledge base: pass references=[...] (or build it with a KB).")
        return query_image, gold

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, question: str, image: Image.Image | None, k: int, where, rerank: bool,
                  timings: dict[str, float]) -> list[Hit]:
        t = time.perf_counter()
        text = question
        if self.two_stage and image is not None and self.retriever.kb.count() > 0:
            # RoRA-VLM stage 1: the image alone finds the entity; its records' texts expand the question
            entities = self.retriever.retrieve(Query(image=image), k=self.expansion_k, where=where,
                                               channels=["image_to_image"])
            text = " ".join([question] + [h.record.text for h in entities])
        timings["retrieve"] = time.perf_counter() - t
        require_records(self.retriever.kb)
        channels = self._channels(image)
        return SearchPipeline(self.retriever, self.reranker)(
            Query(text=text, image=image), k, where=where, rerank=rerank, rerank_query=Query(text=question, image=image),
            timings=timings, **({"channels": channels} if channels is not None else {}))

    def _channels(self, image) -> tuple[str, ...] | None:
        if self.channels is not None:
            return self.channels
        # the question is not a modification of the image, so no composed channel: the image finds
        # look-alikes, the question's words find records about what it asks
        if image is not None:
            return ("image_to_image", "text_to_text", "lexical")
        return None


def _reference(hit: Hit) -> Reference:
    # a document: its best parts for the question, in document order (an image part read back from a
    # server has no file here, only its source path: left out)
    parts = [p for p in sorted(hit.parts, key=lambda p: p.index) if p.kind == "text" or p.image is not None]
    if parts:
        return Reference(text=hit.record.text, score=hit.score, id=hit.id,
                         parts=[_part_image(hit, p) if p.kind == "image" else p.text for p in parts])
    image = hit.record.image
    if image is not None and not isinstance(image, Image.Image):
        try:
            image = hit.record.open_image()
        except (OSError, InvalidItemError) as e:
            raise KnowledgeBaseError(f"Reference {hit.id!r}: its stored image {str(image)!r} cannot be read ({e}); "
                                     "run `mmrag kb verify --kb DIR` to check the knowledge base.") from None
    return Reference(text=hit.record.text, image=image, score=hit.score, id=hit.id)


def _part_image(hit: Hit, part) -> Image.Image:
    try:  # held to ingestion's checks, as a record's image is (Record.open_image)
        return Record(text="", image=part.image, id=hit.id).open_image()
    except (OSError, InvalidItemError) as e:
        raise KnowledgeBaseError(f"Reference {hit.id!r}: the stored image {str(part.image)!r} of its part {part.index} "
                                 f"cannot be read ({e}); run `mmrag kb verify --kb DIR` to check the knowledge "
                                 "base.") from None


def _match(hits: list[Hit], refs: list[Reference], chosen: list[Reference]) -> list[Hit]:
    """The hits behind the references the answerer actually used, in its order."""
    index = {id(r): i for i, r in enumerate(refs)}
    return [hits[index[id(r)]] for r in chosen if id(r) in index]


def _as_hit(ref: Any, i: int) -> Hit:
    """User-given references as Hits (score 1: given, not retrieved)."""
    if isinstance(ref, Hit):
        return ref
    if isinstance(ref, Record):
        return Hit(id=ref.id or f"given-{i + 1}", record=ref, score=1.0, rank=i + 1)
    if isinstance(ref, (tuple, list)) and len(ref) == 2 and isinstance(ref[1], str):
        image, text = ref
        if image is not None and not isinstance(image, (Image.Image, str, Path)):
            raise ConfigError(f"`references[{i}]` image must be a PIL image, a path or None, got {type(image).__name__}.")
        if isinstance(image, (str, Path)):
            image = Query.coerce(Query(image=image)).image
        return Hit(id=f"given-{i + 1}", record=Record(text=text, image=image, id=f"given-{i + 1}"), score=1.0, rank=i + 1)
    raise ConfigError(f"`references[{i}]` must be a Hit, a Record or an (image or None, text) pair, got {ref!r}.")
