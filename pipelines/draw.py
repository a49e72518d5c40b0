"""EntityImagePipeline: draw a prompt grounded on reference images retrieved from the KB.

After Re-Imagen (Chen et al., 2022): retrieve (image, text) references for the entity the prompt
names, then generate with interleaved classifier-free guidance between the text condition and
the reference condition (see generators/guidance.py). The references reach a stock Stable
Diffusion model through an IP-Adapter, training-free.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from mmrag.generators import ReferenceDiffusionGenerator
from mmrag.retrievers import ConfigError, Hit, InvalidItemError, MultimodalRetriever, Query, Record

from .config import Config, load_config
from .outputs import ImageOutput
from .search import SearchPipeline, require_records


class EntityImagePipeline:
    """Retrieval-augmented text-to-image generation.

    Args:
        generator: the :class:`ReferenceDiffusionGenerator` (also at ``.generator``).
        retriever: over the KB; ``None`` for a pipeline that only uses given references.
        reranker: optional ``rank(query, hits, top_k)``.
        channels: retrieval channels for the prompt; text -> image finds look-alikes of what the
            prompt describes and lexical catches the entity's rare name.
        fold_reference_texts: also fold the references' texts into the prompt (a prompts/ template).
    """

    def __init__(self, generator: ReferenceDiffusionGenerator, retriever: MultimodalRetriever | None = None, *,
                 reranker: Any = None, channels: Sequence[str] = ("text_to_image", "lexical"),
                 fold_reference_texts: bool = False, k: int = 2, num_inference_steps: int = 30,
                 height: int | None = None, width: int | None = None):
        _check_positive_int("k", k)
        _check_positive_int("num_inference_steps", num_inference_steps)
        self.generator = generator
        self.retriever = retriever
        self.reranker = reranker
        self.channels = tuple(channels)
        self.fold_reference_texts = fold_reference_texts
        self.k = k
        self.num_inference_steps = num_inference_steps
        self.height = height
        self.width = width

    @classmethod
    def from_config(cls, config: str | Path | Mapping | Config | None = None, *, kb_path: str | None = None,
                    with_kb: bool = True) -> "EntityImagePipeline":
        """Every component and call default from a config (path, preset name, dict or :class:`Config`):
        ``draw.k``, ``draw.num_inference_steps``, ``draw.height``/``width``, ``draw.channels``, and
        the generator's ``draw.guidance``."""
        from .builders import build_generator, build_reranker, build_retriever, open_knowledge_base

        cfg = load_config(config, {} if kb_path is None else {"kb.path": kb_path})
        retriever = build_retriever(cfg, open_knowledge_base(cfg, create=False)) if with_kb else None
        d = cfg.draw
        return cls(build_generator(cfg), retriever, reranker=build_reranker(cfg) if with_kb else None,
                   channels=d.channels, fold_reference_texts=d.fold_reference_texts, k=d.k,
                   num_inference_steps=d.num_inference_steps, height=d.height, width=d.width)

    def __call__(self, prompt: str, k: int | None = None, references: Sequence[Image.Image] | None = None,
                 guidance: str | Mapping | None = None, num_inference_steps: int | None = None,
                 seed: int | None = None, where: dict | None = None, rerank: bool = True,
                 height: int | None = None, width: int | None = None, **generate_kwargs: Any) -> ImageOutput:
        """Draw ``prompt`` grounded on ``k`` references retrieved for it, or on ``references``
        (PIL images, bypassing retrieval).

        An argument left at ``None`` means "as configured": ``k``, ``num_inference_steps``,
        ``height`` and ``width`` take the pipeline's values (``draw.*`` in a config), ``guidance``
        the generator's (``draw.guidance``); a bare guidance name keeps the configured scales.
        Other keyword arguments go to the generator (``num_images_per_prompt``,
        ``negative_prompt``, ``ip_adapter_scale``, ``callback_on_step_end``, ...)."""
        timings: dict[str, float] = {}
        k = self.k if k is None else k
        num_inference_steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        height = self.height if height is None else height
        width = self.width if width is None else width
        # 0. validate
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"`prompt` must be a non-empty string, got {prompt!r}.")
        _check_positive_int("k", k)
        _check_positive_int("num_inference_steps", num_inference_steps)
        self._check_generate_kwargs(generate_kwargs)
        if references is not None:
            bad = [i for i, r in enumerate(references) if not isinstance(r, Image.Image)]
            if bad:
                raise ConfigError(f"`references[{bad[0]}]` must be a PIL image, got {type(references[bad[0]]).__name__}.")
        elif self.retriever is None:
            raise ConfigError("This pipeline has no knowledge base: pass references=[PIL images] (or build it with a KB).")
        # 1. retrieve, 2. rerank (unless references are given)
        t = time.perf_counter()
        if references is not None:
            hits = [Hit(id=f"given-{i + 1}", record=Record(text="", image=im, id=f"given-{i + 1}"), score=1.0, rank=i + 1)
                    for i, im in enumerate(references)]
        else:
            hits = self._retrieve(prompt.strip(), k, where, rerank, timings)
        timings.setdefault("retrieve", time.perf_counter() - t)
        # 3. the references' images (and texts, when folded into the prompt)
        images = []
        for i, h in enumerate(hits):  # given references get the checks ingested images got
            try:
                images.append(h.record.open_image())
            except InvalidItemError as e:
                what = f"`references[{i}]`" if references is not None else f"the stored image of {h.id!r}"
                raise ConfigError(f"{what} cannot be used: {e.reason}.") from None
        texts = [h.record.text for h in hits] if self.fold_reference_texts and hits and references is None else None
        # 4. generate
        t = time.perf_counter()
        out = self.generator(prompt, images or None, guidance=self._guidance(guidance),
                             num_inference_steps=num_inference_steps, seed=seed, height=height, width=width,
                             reference_texts=texts, **generate_kwargs)
        timings["generate"] = time.perf_counter() - t
        return ImageOutput(images=list(out.images), references=hits, guidance=out.guidance, fallback=out.fallback,
                           timings=timings, generation=out)

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


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
