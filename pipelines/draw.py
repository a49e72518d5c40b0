"""EntityImagePipeline: draw a prompt grounded on reference images retrieved from the KB.

After Re-Imagen (Chen et al., 2022): retrieve (image, text) references for the entity the prompt
names, then generate with interleaved classifier-free guidance between the text condition and
the reference condition (see generators/guidance.py). The references reach a stock Stable
Diffusion model through an IP-Adapter, training-free.

Retrieve or generate (``decide``): GILL (Koh et al., 2023) learns when to return a retrieved image
instead of drawing one. Ours is training-free: the best reference's text -> image cosine with the
prompt (the KB's stored image vector against the prompt's text vector, the score the retriever's
``text_to_image`` channel ranks by) against ``decide_threshold``, calibrated per embedder with
``mmrag eval decide`` (:func:`mmrag.pipelines.evaluation.best_decide_threshold`).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from mmrag.generators import ReferenceDiffusionGenerator
from mmrag.retrievers import ConfigError, Hit, InvalidItemError, MultimodalRetriever, Query, Record

from .config import Config, decide_threshold_problem, load_config
from .outputs import ImageOutput
from .search import SearchPipeline, require_records


class EntityImagePipeline:
    """Retrieval-augmented text-to-image generation.

    Args:
        generator: the :class:`ReferenceDiffusionGenerator` (also at ``.generator``); ``None`` for a
            pipeline that only scores references (:meth:`best_reference`, ``mmrag eval decide``).
        retriever: over the KB; ``None`` for a pipeline that only uses given references.
        reranker: optional ``rank(query, hits, top_k)``.
        channels: retrieval channels for the prompt; text -> image finds look-alikes of what the
            prompt describes and lexical catches the entity's rare name.
        fold_reference_texts: also fold the references' texts into the prompt (a prompts/ template).
        decide: retrieve or generate: return the best retrieved image instead of drawing when its
            text -> image cosine with the prompt is at least ``decide_threshold`` (see the module doc).
        decide_threshold: that cosine, in [-1, 1]; needed with ``decide``, calibrated per embedder.
    """

    def __init__(self, generator: ReferenceDiffusionGenerator | None, retriever: MultimodalRetriever | None = None,
                 *, reranker: Any = None, channels: Sequence[str] = ("text_to_image", "lexical"),
                 fold_reference_texts: bool = False, k: int = 2, num_inference_steps: int = 30,
                 height: int | None = None, width: int | None = None, decide: bool = False,
                 decide_threshold: float | None = None):
        _check_positive_int("k", k)
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_decide(decide, decide_threshold, None)  # a threshold kept for calls that pass decide=True is fine
        self.generator = generator
        self.retriever = retriever
        self.reranker = reranker
        self.channels = tuple(channels)
        self.fold_reference_texts = fold_reference_texts
        self.k = k
        self.num_inference_steps = num_inference_steps
        self.height = height
        self.width = width
        self.decide = decide
        self.decide_threshold = None if decide_threshold is None else float(decide_threshold)

    @classmethod
    def from_config(cls, config: str | Path | Mapping | Config | None = None, *, kb_path: str | None = None,
                    with_kb: bool = True, with_generator: bool = True) -> "EntityImagePipeline":
        """Every component and call default from a config (path, preset name, dict or :class:`Config`):
        ``draw.k``, ``draw.num_inference_steps``, ``draw.height``/``width``, ``draw.channels``,
        ``draw.decide``/``decide_threshold``, and the generator's ``draw.guidance``.
        ``with_generator=False`` leaves the diffusion model out (a pipeline that only scores)."""
        from .builders import build_generator, build_reranker, build_retriever, open_knowledge_base

        cfg = load_config(config, {} if kb_path is None else {"kb.path": kb_path})
        retriever = build_retriever(cfg, open_knowledge_base(cfg, create=False)) if with_kb else None
        d = cfg.draw
        return cls(build_generator(cfg) if with_generator else None, retriever,
                   reranker=build_reranker(cfg, kb=retriever.kb) if with_kb else None,
                   channels=d.channels, fold_reference_texts=d.fold_reference_texts, k=d.k,
                   num_inference_steps=d.num_inference_steps, height=d.height, width=d.width,
                   decide=d.decide, decide_threshold=d.decide_threshold)

    def __call__(self, prompt: str, k: int | None = None, references: Sequence[Image.Image] | None = None,
                 guidance: str | Mapping | None = None, num_inference_steps: int | None = None,
                 seed: int | None = None, where: dict | None = None, rerank: bool = True,
                 height: int | None = None, width: int | None = None, decide: bool | None = None,
                 decide_threshold: float | None = None, **generate_kwargs: Any) -> ImageOutput:
        """Draw ``prompt`` grounded on ``k`` references retrieved for it, or on ``references``
        (PIL images, bypassing retrieval).

        An argument left at ``None`` means "as configured": ``k``, ``num_inference_steps``,
        ``height``, ``width``, ``decide`` and ``decide_threshold`` take the pipeline's values
        (``draw.*`` in a config), ``guidance`` the generator's (``draw.guidance``); a bare guidance
        name keeps the configured scales. Other keyword arguments go to the generator
        (``num_images_per_prompt``, ``negative_prompt``, ``ip_adapter_scale``, ``callback_on_step_end``, ...).

        With ``decide``, the best retrieved reference whose text -> image cosine with the prompt
        reaches ``decide_threshold`` is returned instead of a drawing (one image, whatever
        ``num_images_per_prompt``; no diffusion runs); ``decision*`` of the output say which and why.
        Given ``references`` skip retrieval and so the configured ``decide``."""
        timings: dict[str, float] = {}
        k = self.k if k is None else k
        num_inference_steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        height = self.height if height is None else height
        width = self.width if width is None else width
        threshold = self.decide_threshold if decide_threshold is None else decide_threshold
        # 0. validate
        if self.generator is None:
            raise ConfigError("This pipeline has no generator (built with generator=None or with_generator=False): "
                              "it scores references (best_reference) but cannot draw; build it with a generator.")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"`prompt` must be a non-empty string, got {prompt!r}.")
        _check_positive_int("k", k)
        _check_positive_int("num_inference_steps", num_inference_steps)
        self._check_generate_kwargs(generate_kwargs)
        if decide is None:  # the configured default; given references skip retrieval, so nothing to decide
            decide = self.decide and references is None
        decide = _check_decide(decide, threshold, decide_threshold)
        if references is not None:
            if decide:
                raise ConfigError("`decide=True` chooses between a retrieved image and a drawing, so it needs retrieval, "
                                  "which `references` skips: pass references or decide=True, not both.")
            bad = [i for i, r in enumerate(references) if not isinstance(r, Image.Image)]
            if bad:
                raise ConfigError(f"`references[{bad[0]}]` must be a PIL image, got {type(references[bad[0]]).__name__}.")
        elif self.retriever is None:
            raise ConfigError("This pipeline has no knowledge base: pass references=[PIL images] (or build it with a KB).")
        guidance = self._guidance(guidance)  # a bad guidance fails here, also when no drawing follows
        # 1. retrieve, 2. rerank (unless references are given)
        t = time.perf_counter()
        if references is not None:
            hits = [Hit(id=f"given-{i + 1}", record=Record(text="", image=im, id=f"given-{i + 1}"), score=1.0, rank=i + 1)
                    for i, im in enumerate(references)]
        else:
            hits = self._retrieve(prompt.strip(), k, where, rerank, timings)
        timings.setdefault("retrieve", time.perf_counter() - t)
        # 3. decide: return the best reference instead of drawing when it matches the prompt well enough
        decision: dict[str, Any] = {}
        if decide:
            t = time.perf_counter()
            best, score = self._best_of(prompt.strip(), hits)
            timings["decide"] = time.perf_counter() - t
            decision = _decision(best, score, threshold, len(hits))
            if decision["decision"] == "retrieved":
                return ImageOutput(images=[_open(best, None)], references=[best], guidance={}, timings=timings,
                                   **decision)
        # 4. the references' images (and texts, when folded into the prompt)
        images = [_open(h, i if references is not None else None) for i, h in enumerate(hits)]
        texts = [h.record.text for h in hits] if self.fold_reference_texts and hits and references is None else None
        # 5. generate
        t = time.perf_counter()
        out = self.generator(prompt, images or None, guidance=guidance,
                             num_inference_steps=num_inference_steps, seed=seed, height=height, width=width,
                             reference_texts=texts, **generate_kwargs)
        timings["generate"] = time.perf_counter() - t
        return ImageOutput(images=list(out.images), references=hits, guidance=out.guidance, fallback=out.fallback,
                           timings=timings, generation=out, **decision)

    def best_reference(self, prompt: str, k: int | None = None, where: dict | None = None,
                       rerank: bool = True) -> tuple[Hit | None, float | None]:
        """What ``decide`` compares with the threshold: the ``k`` references a call retrieves for
        ``prompt`` (same channels, reranker and filter), the one whose stored image vector has the
        highest cosine with the prompt's text vector, and that cosine; ``(None, None)`` when none
        was retrieved. ``mmrag eval decide`` calibrates the threshold on these scores."""
        k = self.k if k is None else k
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"`prompt` must be a non-empty string, got {prompt!r}.")
        _check_positive_int("k", k)
        if self.retriever is None:
            raise ConfigError("This pipeline has no knowledge base to retrieve references from: build it with a KB.")
        return self._best_of(prompt.strip(), self._retrieve(prompt.strip(), k, where, rerank, {}))

    def _best_of(self, prompt: str, hits: Sequence[Hit]) -> tuple[Hit | None, float | None]:
        """The hit whose STORED image vector (what the KB was built with and retrieval scored, not a
        re-embedding of the image) is closest to the prompt's text vector, and that cosine. Scored
        here rather than read from ``Hit.scores["text_to_image"]``: that score is absent for a hit only
        the lexical channel found (or with channels without text_to_image) and hubness-normalised
        when hubness is on, while the decision needs the raw cosine for every hit."""
        if not hits:
            return None, None
        kb = self.retriever.kb
        got = kb.vectors.fetch("images", [h.id for h in hits], include=["embeddings"])
        stored = {rid: np.asarray(e, dtype=np.float64) for rid, e in zip(got["ids"], got["embeddings"])}
        text = np.asarray(kb.embedder.embed_texts([prompt])[0], dtype=np.float64)  # (dim,)
        best, best_score = None, None
        for h in hits:  # in rank order, so that a tie keeps the better-ranked hit
            v = stored.get(h.id)
            if v is None:  # deleted since retrieval, or half-written by a concurrent writer
                continue
            score = float(v @ text / max(float(np.linalg.norm(v) * np.linalg.norm(text)), 1e-12))
            if best_score is None or score > best_score:
                best, best_score = h, score
        return best, best_score

    def _check_generate_kwargs(self, generate_kwargs: Mapping[str, Any]) -> None:
        """Unknown names fail here, typed and before any retrieval, instead of as a TypeError from
        the generator after it; the valid ones are the generator's own keyword arguments less those
        this pipeline passes itself."""
        params = inspect.signature(self.generator.__call__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return  # a generator that takes any keyword checks its own
        own = [name for name, p in inspect.signature(EntityImagePipeline.__call__).parameters.items()
               if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
        passed = set(own) | _PASSED_TO_GENERATOR
        valid = sorted(name for name, p in params.items()
                       if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                       and name not in passed)
        unknown = sorted(set(generate_kwargs) - set(valid))
        if unknown:
            raise ConfigError(
                f"Unknown keyword argument(s) {', '.join(map(repr, unknown))} for EntityImagePipeline: pass "
                f"the pipeline's own ({', '.join(own)}) or the generator's ({', '.join(valid)})."
            )

    def _guidance(self, guidance):
        """``None`` is the generator's configured guidance. A bare name keeps the configured
        scales: "joint" means joint guidance at the text and reference scales the generator was
        configured with, not at library defaults."""
        if guidance is None:
            return self.generator.guidance
        if not isinstance(guidance, str):
            return guidance
        from mmrag.generators import GUIDANCES, guidance_from_config

        configured = self.generator.guidance.to_dict()
        configured.setdefault("text_scale", configured.get("scale"))
        cls = GUIDANCES.get(guidance)
        if cls is None:
            return guidance_from_config(guidance)  # raises the error listing the valid names
        params = {"scale": configured["text_scale"], "text_scale": configured["text_scale"],
                  "reference_scale": configured.get("reference_scale"), "eta": configured.get("eta")}
        fields = {f for f in cls.__dataclass_fields__}
        return guidance_from_config(guidance, **{k: v for k, v in params.items() if k in fields and v is not None})

    def _retrieve(self, prompt: str, k: int, where, rerank: bool, timings: dict[str, float]) -> list[Hit]:
        require_records(self.retriever.kb)
        return SearchPipeline(self.retriever, self.reranker)(Query(text=prompt), k, where=where, rerank=rerank,
                                   channels=self.channels, timings=timings)


# What __call__ hands the generator under these names itself, besides its own same-named arguments.
_PASSED_TO_GENERATOR = {"reference_texts"}


def _check_decide(decide: Any, threshold: Any, given_threshold: Any) -> bool:
    """``decide`` (resolved) and its ``threshold`` are usable; ``given_threshold`` is the one passed
    in, which means nothing without deciding."""
    if not isinstance(decide, bool):
        raise ConfigError(f"`decide` must be True or False, got {decide!r}.")
    problem = decide_threshold_problem(threshold)
    if problem is not None:
        raise ConfigError(problem + ".")
    if decide and threshold is None:
        raise ConfigError("`decide=True` needs `decide_threshold`, a cosine in [-1, 1] for this embedder (draw.decide_"
                          "threshold in a config); calibrate one with `mmrag eval decide --labels FILE.jsonl --kb DIR`.")
    if not decide and given_threshold is not None:
        raise ConfigError(f"`decide_threshold` {given_threshold!r} applies only when deciding: pass decide=True too "
                          "(or build the pipeline with decide=True).")
    return decide


def _decision(best: Hit | None, score: float | None, threshold: float, n_hits: int) -> dict[str, Any]:
    """The ImageOutput fields of a decision: retrieve when the best score reaches the threshold."""
    fields = {"decision_score": score, "decision_threshold": float(threshold)}
    if best is None:
        why = "no reference was retrieved" if n_hits == 0 else "no retrieved reference has a stored image vector"
        return {**fields, "decision": "generated", "decision_reason": f"{why}, so none could be returned: drew the prompt"}
    if score >= threshold:
        return {**fields, "decision": "retrieved", "decision_reason":
                f"best reference {best.id!r} scores {score:.4f} >= threshold {threshold:.4f}: returned it instead of drawing"}
    return {**fields, "decision": "generated", "decision_reason":
            f"best reference {best.id!r} scores {score:.4f} < threshold {threshold:.4f}: drew the prompt grounded on "
            f"{n_hits} reference(s)"}


def _open(hit: Hit, given_index: int | None) -> Image.Image:
    """A reference's image, with the checks ingested images got (``given_index``: a given one's place)."""
    try:
        return hit.record.open_image()
    except InvalidItemError as e:
        what = f"`references[{given_index}]`" if given_index is not None else f"the stored image of {hit.id!r}"
        raise ConfigError(f"{what} cannot be used: {e.reason}.") from None


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
