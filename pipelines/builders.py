"""Build library components from a :class:`~pipelines.config.Config`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmrag.retrievers import ConfigError, DualEncoder, KnowledgeBase
from mmrag.retrievers.kb.manifest import MANIFEST_NAME

from .config import TINY_PREFIX, Config


def check_device(name: str, device: str | None) -> None:
    """Refuse a device this machine does not have, with the fix, before any model loads."""
    from mmrag._devices import device_problem

    problem = device_problem(device)
    if problem is not None:
        raise ConfigError(f"`{name}` {problem}.")


def build_embedder(config: Config) -> DualEncoder:
    e = config.embedder
    check_device("embedder.device", e.device)
    return DualEncoder(config.resolve_model(e.model), device=e.device, dtype=e.dtype, batch_size=e.batch_size,
                       trust_remote_code=e.trust_remote_code)


def open_knowledge_base(config: Config, *, create: bool = True) -> KnowledgeBase:
    """Open (or create) the KB at ``config.kb.path``.

    An existing KB keeps the embedder it was built with unless the config names one explicitly
    (then a different one is refused with :class:`EmbedderMismatchError`). A KB built with a tiny
    model whose cache folder is gone gets the model rebuilt (it is seeded, so it is the same model).
    """
    kb = config.kb
    path = Path(kb.path).expanduser()
    exists = (path / MANIFEST_NAME).exists()
    embedder = None
    if (not exists and create) or (exists and "model" in config.embedder.model_fields_set):
        embedder = build_embedder(config)
    elif exists:
        _rebuild_missing_tiny_model(path, config)
    late_interaction, fde = None, None
    if config.late_interaction.model is not None and (exists or create):
        late_interaction = build_multivector_encoder(config)
        if not exists:
            from mmrag.retrievers.muvera import DEFAULT_FDE, FDEConfig

            fde = FDEConfig.from_dict({**DEFAULT_FDE.to_dict(), **config.late_interaction.fde,
                                       "dim": late_interaction.dim})
    # (no KB and create=False: KnowledgeBase.open says so, before any model is looked for)
    return KnowledgeBase.open(path, embedder, kb.url, create=create, lock_timeout=kb.lock_timeout,
                              max_image_pixels=kb.max_image_pixels, max_text_chars=kb.max_text_chars,
                              allow_remote=kb.allow_remote, hnsw=kb.hnsw, late_interaction=late_interaction, fde=fde)


def build_multivector_encoder(config: Config):
    """The ``late_interaction`` section's multi-vector encoder (its weights load on first use)."""
    from mmrag.retrievers.multivector import MultiVectorEncoder

    li = config.late_interaction
    check_device("late_interaction.device", li.device)
    return MultiVectorEncoder(config.resolve_model(li.model), device=li.device, dtype=li.dtype,
                              batch_size=li.batch_size, trust_remote_code=li.trust_remote_code)


def _rebuild_missing_tiny_model(path: Path, config: Config) -> None:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        model_ids = [manifest["embedder"]["model_id"]]
    except (OSError, ValueError, KeyError):
        return  # KnowledgeBase.open reports an unreadable manifest properly
    if isinstance(manifest.get("late_interaction"), dict):
        model_ids.append(manifest["late_interaction"].get("model_id", ""))
    cache = Path(config.tiny_models.cache_dir).expanduser().resolve()
    for model_id in model_ids:
        model_path = Path(model_id)
        if model_path.is_absolute() and not model_path.exists() and model_path.parent == cache:
            config.resolve_model(TINY_PREFIX + model_path.name)


def build_reranker(config: Config, *, vlm: Any = None, kb: KnowledgeBase | None = None):
    """The configured reranker, or ``None`` when ``reranker.name`` is null.

    The ``vlm`` reranker scores with a VLM: ``vlm`` (an object with ``.model`` and ``.processor``,
    such as the answering pipeline's :class:`VLMAnswerer`) when given, else the config's own VLM.
    The ``dual_encoder`` reranker caches its image vectors in ``kb`` (the KB whose candidates it
    reranks), so that each KB image is embedded by it once.
    """
    from mmrag.retrievers.rerank import reranker_from_config

    r = config.reranker
    if r.name is None:
        return None
    check_device("reranker.device", r.device)
    if r.name == "vlm":
        return reranker_from_config("vlm", vlm=build_answerer(config) if vlm is None else vlm, batch_size=r.batch_size)
    if r.name == "dual_encoder":
        return reranker_from_config("dual_encoder", encoder=config.resolve_model(r.dual_encoder_model),
                                    batch_size=r.batch_size, device=r.device, kb=kb)
    return reranker_from_config("cross_encoder", model_id=config.resolve_model(r.cross_encoder_model),
                                batch_size=r.batch_size, device=r.device)


def build_retriever(config: Config, kb: KnowledgeBase, *, captioner=None, rewriter=None):
    """A :class:`MultimodalRetriever` over ``kb`` with the config's retriever settings (the
    rerank stage is :class:`~mmrag.pipelines.search.SearchPipeline`'s)."""
    from mmrag.retrievers import MultimodalRetriever

    settings = config.retriever.model_dump()
    settings["channels"] = tuple(settings["channels"]) if settings["channels"] is not None else None
    return MultimodalRetriever(kb, captioner=captioner, rewriter=rewriter, **settings)


def uses_tiny_models(config: Config, kb: KnowledgeBase | None = None) -> bool:
    """Whether the embedder is one of the tiny random models (their outputs are noise)."""
    if config.embedder.model.startswith(TINY_PREFIX):
        return True
    if kb is None:
        return False
    cache = Path(config.tiny_models.cache_dir).expanduser().resolve()
    model = Path(kb.manifest["embedder"]["model_id"])
    return model.is_absolute() and (model.parent == cache or (model / ".complete").exists())


def build_answerer(config: Config):
    """The configured :class:`~generators.vlm.VLMAnswerer` (loads lazily)."""
    from mmrag.generators.vlm import VLMAnswerer

    v = config.vlm
    check_device("vlm.device", v.device)
    return VLMAnswerer(config.resolve_model(v.model), device=v.device, dtype=v.dtype, max_new_tokens=v.max_new_tokens,
                       do_sample=v.do_sample, temperature=v.temperature, top_p=v.top_p, seed=v.seed,
                       template=v.template, trust_remote_code=v.trust_remote_code,
                       max_context_tokens=v.max_context_tokens, choice_format=v.choice_format,
                       length_normalization=v.length_normalization)


def build_generator(config: Config):
    """The configured :class:`~generators.ReferenceDiffusionGenerator` (loads lazily)."""
    from mmrag.generators import ReferenceDiffusionGenerator

    d = config.diffusion
    check_device("diffusion.device", d.device)
    return ReferenceDiffusionGenerator(config.resolve_model(d.model), ip_adapter=config.resolve_model(d.ip_adapter),
                                       ip_adapter_subfolder=d.ip_adapter_subfolder,
                                       ip_adapter_weight_name=d.ip_adapter_weight_name,
                                       image_encoder_folder=d.image_encoder_folder, ip_adapter_scale=d.ip_adapter_scale,
                                       scheduler=d.scheduler, guidance=config.draw.guidance, device=d.device,
                                       dtype=d.dtype)


def vlm_captioner(answerer):
    """CIReVL's captioner (and PDV's reference description) from a VLM: image -> one sentence."""
    from mmrag.prompts import render

    instruction = render("cirevl_caption")
    return lambda image: answerer.answer(instruction, image=image).text.strip()


def vlm_rewriter(answerer):
    """CIReVL's rewrite step from a VLM: (caption, modifier) -> the edited description."""
    from mmrag.prompts import render

    def rewrite(caption: str, modifier: str) -> str:
        text = answerer.answer(render("cirevl_rewrite", caption=caption, modifier=modifier)).text
        for line in text.splitlines():
            if line.strip().lower().startswith("edited description:"):
                return line.split(":", 1)[1].strip()
        return text.strip()

    return rewrite
