"""Configuration: YAML files -> validated pydantic models, every field defaulted.

Unknown keys are errors that name the key and list the valid ones, so a typo never passes
silently. CLI flags override file values through dotted keys (``{"kb.path": "my-kb"}``).

Model names are Hugging Face ids, local directories, or ``tiny:NAME`` for the project's tiny
offline models (built into ``tiny_models.cache_dir`` on first use).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from mmrag.retrievers.errors import ConfigError
from mmrag.retrievers.rerank import DEFAULT_CROSS_ENCODER_RERANKER, DEFAULT_DUAL_ENCODER_RERANKER
from mmrag.retrievers.retriever import RetrieverSettings
from mmrag.retrievers.kb.images import DEFAULT_MAX_IMAGE_PIXELS
from mmrag.retrievers.kb.sources import DEFAULT_MAX_TEXT_CHARS

TINY_PREFIX = "tiny:"
TOY_PREFIX = "toy:"  # trained in the toy world (pipelines/toyworld): shipped weights
# The presets ship inside the wheel as package data: found the same way from any working directory.
CONFIG_DIR = importlib.resources.files("mmrag.configs")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EmbedderConfig(_Section):
    """The dual encoder (CLIP / SigLIP family) that embeds images and texts."""

    model: str = "openai/clip-vit-base-patch32"
    device: str | None = None  # None: CUDA when present, else CPU
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None: fp16 on CUDA, fp32 on CPU
    batch_size: int = Field(32, gt=0)
    trust_remote_code: bool = False


class KnowledgeBaseConfig(_Section):
    path: str = "mmrag-kb"
    url: str | None = None  # a Chroma server, e.g. http://127.0.0.1:8000; None: embedded Chroma
    lock_timeout: float = Field(0.0, ge=0)
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0)
    max_text_chars: int = Field(DEFAULT_MAX_TEXT_CHARS, gt=0)
    allow_remote: bool = False  # fetch http(s) image URLs found in manifests
    # Chroma HNSW settings of a new KB; {}: ef_search 400 and max_neighbors 32, with ef_search raised
    # as the KB grows (retrievers/kb/hnsw.py). A key set here is never changed.
    hnsw: dict[Literal["ef_search", "ef_construction", "max_neighbors"], int] = Field(default_factory=dict)


class LateInteractionConfig(_Section):
    """The multi-vector (ColPali-family) encoder of a KB's late-interaction index, which the
    ``late_interaction`` channel searches. A new KB gets the index only when ``model`` is set; an
    existing KB keeps the one it was built with (``mmrag kb info`` names it)."""

    model: str | None = None  # e.g. vidore/colpali-v1.3-hf, tiny:colpali; None: no index for a new KB
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    batch_size: int = Field(8, gt=0)  # a real ColPali page is over a thousand vectors
    trust_remote_code: bool = False
    # FDE settings (retrievers/muvera.py FDEConfig, without `dim`, which is the encoder's); {}: DEFAULT_FDE
    fde: dict[Literal["k_sim", "r_reps", "d_proj", "final_dim", "fill_empty", "seed"], int | bool | None] = Field(
        default_factory=dict)


class IngestConfig(_Section):
    batch_size: int = Field(64, gt=0)
    report: str | None = None  # JSONL report path; None: <kb>/reports/ingest-<time>.jsonl


class _RetrieverSection(_Section):
    @model_validator(mode="after")
    def _check(self):
        try:  # the retriever's own checks, so that a bad value fails when the config loads
            RetrieverSettings(**self.model_dump()).validate()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self


def _retriever_config() -> type[_Section]:
    """RetrieverConfig takes its fields, types and defaults from :class:`RetrieverSettings` (one
    source of truth: what a config sets is exactly what ``retrieve(**overrides)`` may change)."""
    hints = typing.get_type_hints(RetrieverSettings)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(RetrieverSettings):
        default = (Field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                   else f.default)
        fields[f.name] = (hints[f.name], default)
    model = create_model("RetrieverConfig", __base__=_RetrieverSection, **fields)
    model.__doc__ = "Defaults for every query: the fields of RetrieverSettings, each overridable per call."
    return model


RetrieverConfig = _retriever_config()


class RerankerConfig(_Section):
    """The rerank stage; ``name: null`` turns it off. Each reranker names its own model, so that
    switching ``name`` (``--rerank``) never reaches for a model the preset does not mean."""

    name: Literal["dual_encoder", "cross_encoder", "vlm"] | None = None
    dual_encoder_model: str = DEFAULT_DUAL_ENCODER_RERANKER
    cross_encoder_model: str = DEFAULT_CROSS_ENCODER_RERANKER
    batch_size: int = Field(16, gt=0)
    device: str | None = None  # None: CUDA when present, else CPU ("vlm" uses the VLM's own)


class VLMConfig(_Section):
    """The vision-language model that answers (and can rerank)."""

    model: str = "llava-hf/llava-interleave-qwen-0.5b-hf"
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    template: str = "vqa"
    max_context_tokens: int | None = Field(None, gt=0)  # None: the model's own limit
    # Multiple choice (VLMAnswerer.choose; values as generators.vlm.CHOICE_FORMATS / LENGTH_NORMALIZATIONS):
    # score each option's text as the reply, or list the options lettered and score the letter (MRAG-Bench).
    choice_format: Literal["options", "letters"] = "options"
    # Divide the reply's log-likelihood by nothing, its token count, or its characters (the harness's acc_norm).
    length_normalization: Literal["none", "tokens", "chars"] = "chars"
    trust_remote_code: bool = False


class VQAConfig(_Section):
    k: int = Field(3, gt=0)
    min_score: float | None = None  # drop references scoring below (the reranker's score, else the fused one)
    two_stage: bool = False  # RoRA-VLM: the image's entity records expand the question
    expansion_k: int = Field(2, gt=0)
    channels: list[str] | None = None  # None: image_to_image + text_to_text + lexical (with an image)


class DiffusionConfig(_Section):
    """The Stable Diffusion family pipeline and its IP-Adapter (SD 1.5 or SDXL)."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    ip_adapter: str = "h94/IP-Adapter"
    ip_adapter_subfolder: str = "models"
    ip_adapter_weight_name: str = "ip-adapter_sd15.safetensors"
    image_encoder_folder: str = "image_encoder"
    ip_adapter_scale: float = Field(0.5, ge=0)  # 0.5: the IP-Adapter authors' balance of text and image
    scheduler: Literal["ddim", "euler", "euler_a", "dpm++"] | None = None  # None: the model's own
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


class DrawConfig(_Section):
    k: int = Field(2, gt=0)
    # the library's own default guidance, so that the config and the generator cannot disagree
    guidance: dict[str, Any] = Field(default_factory=lambda: _default_guidance())
    num_inference_steps: int = Field(30, gt=0)
    height: int | None = None  # None: the model's default size
    width: int | None = None
    channels: list[str] = Field(default_factory=lambda: ["text_to_image", "lexical"])
    fold_reference_texts: bool = False
    # Retrieve or generate (GILL's decision, training-free): return the best retrieved image instead of
    # drawing when its text -> image cosine with the prompt reaches decide_threshold. The cosine scale
    # is the embedder's own, so no default threshold fits every model: calibrate one per embedder
    # with `mmrag eval decide`. strict: a YAML `true` is not the cosine 1.0.
    decide: bool = False
    decide_threshold: float | None = None

    @field_validator("decide_threshold", mode="before")
    @classmethod
    def _check_threshold(cls, value):
        problem = decide_threshold_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_decide(self):
        if self.decide and self.decide_threshold is None:
            raise ValueError("`decide: true` needs `decide_threshold`, a cosine in [-1, 1] for the embedder in use; "
                             "calibrate one with `mmrag eval decide --labels FILE.jsonl --kb DIR`")
        return self


def decide_threshold_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as ``decide_threshold`` (None when nothing is): it must be a
    number in [-1, 1], the range of a cosine. A bool is refused, so that a YAML ``true`` is not 1.0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:  # NaN fails too
        return (f"`decide_threshold` must be a cosine similarity in [-1, 1], got {value!r}; calibrate one "
                "with `mmrag eval decide --labels FILE.jsonl --kb DIR`")
    return None


def _default_guidance() -> dict[str, Any]:
    from mmrag.generators.guidance import InterleavedGuidance  # torch only, not diffusers

    return InterleavedGuidance().to_dict()


class TinyModelsConfig(_Section):
    cache_dir: str = "~/.cache/mmrag/tiny-models"


class Config(_Section):
    """Everything a command needs. ``Config()`` equals ``configs/default.yaml``."""

    config_version: Literal[1] = 1
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    kb: KnowledgeBaseConfig = Field(default_factory=KnowledgeBaseConfig)
    late_interaction: LateInteractionConfig = Field(default_factory=LateInteractionConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    reranker: RerankerConfig = Field(default_factory=RerankerConfig)
    vlm: VLMConfig = Field(default_factory=VLMConfig)
    vqa: VQAConfig = Field(default_factory=VQAConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    draw: DrawConfig = Field(default_factory=DrawConfig)
    tiny_models: TinyModelsConfig = Field(default_factory=TinyModelsConfig)

    def resolve_model(self, name: str) -> str:
        """A loadable model id or path: ``tiny:NAME`` builds the tiny model on first use; a Hub id
        that cannot load (no Hub, not cached) fails here at once with one line."""
        if name.startswith(TOY_PREFIX):
            from .toyworld.models import ensure_toy_model

            return str(ensure_toy_model(name[len(TOY_PREFIX):], Path(self.tiny_models.cache_dir).expanduser()))
        if not name.startswith(TINY_PREFIX):
            from .hub import check_hub_model

            check_hub_model(name)
            return name
        from .dev.tiny_models import ensure_tiny_model

        return str(ensure_tiny_model(name[len(TINY_PREFIX):], Path(self.tiny_models.cache_dir).expanduser()))


def load_config(source: str | os.PathLike | Mapping[str, Any] | Config | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a :class:`Config` from a YAML path, a preset name (``"tiny"``), a dict, or nothing
    (defaults), then apply dotted ``overrides`` (``{"kb.path": "my-kb", "vlm.seed": None}``)."""
    if isinstance(source, Config):
        # only what was set: which keys a config names matters (an existing KB keeps its own
        # embedder unless the config names one), and a round trip must not set them all
        data = source.model_dump(exclude_unset=True)
        where = "config"
    elif source is None:
        data, where = {}, "defaults"
    elif isinstance(source, Mapping):
        data, where = copy.deepcopy(dict(source)), "config"  # overrides must not reach the caller's dict
    else:
        path = _find_config(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} is not valid YAML: {str(e).splitlines()[0]}.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must hold a mapping of sections (embedder:, kb:, ...), got {type(data).__name__}.")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)  # None is a value too: {"vlm.seed": None} sets it to None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, where)) from None


def _find_config(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    preset = CONFIG_DIR / f"{source}.yaml"
    if preset.is_file():
        return Path(str(preset))
    presets = preset_names()
    raise ConfigError(f"`--config` {str(source)!r} is neither a file nor a preset; presets: {presets}.")


def preset_names() -> list[str]:
    """The preset configs shipped with mmrag (``default``, ``tiny``, ...)."""
    return sorted(p.name[:-len(".yaml")] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Cannot set `{dotted}`: `{k}` is not a section.")
    node[keys[-1]] = value


def _explain(error: ValidationError, where: str) -> str:
    """One line per problem: the dotted key, what is wrong, and the valid keys for typos."""
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            model: type[BaseModel] = Config
            for part in err["loc"][:-1]:
                model = model.model_fields[part].annotation
            valid = ", ".join(sorted(model.model_fields))
            lines.append(f"unknown key `{loc}` in {where}; valid keys here: {valid}")
        elif err["type"] == "value_error":  # a section's own check: its message names the key
            lines.append(f"in `{loc}` of {where}: {str(err['ctx']['error']).rstrip('.')}")
        else:
            lines.append(f"`{loc}` in {where}: {err['msg']}, got {err.get('input')!r}")
    return "; ".join(lines) + "."
