"""Generators: the VLM answerer and the reference-grounded diffusion generator (see ARCHITECTURE.md)."""

from mmrag.generators.diffusion import CALLBACK_TENSOR_INPUTS, SCHEDULERS, GenerationOutput, ReferenceDiffusionGenerator
from mmrag.generators.errors import (
    ContextLengthError,
    GenerationError,
    GeneratorLoadError,
    GeneratorsError,
    GuidanceError,
    UnsupportedModelError,
)
from mmrag.generators.guidance import (
    GUIDANCES,
    ROWS,
    ClassifierFreeGuidance,
    Guidance,
    InterleavedGuidance,
    JointGuidance,
    Row,
    guidance_from_config,
)
from mmrag.generators.vlm import AnswerOutput, AnswerStream, ChoiceOutput, Reference, VLMAnswerer, parse_citations

__all__ = [
    "AnswerOutput",
    "AnswerStream",
    "CALLBACK_TENSOR_INPUTS",
    "GUIDANCES",
    "ROWS",
    "SCHEDULERS",
    "ChoiceOutput",
    "ClassifierFreeGuidance",
    "ContextLengthError",
    "GenerationError",
    "GenerationOutput",
    "GeneratorLoadError",
    "GeneratorsError",
    "Guidance",
    "GuidanceError",
    "InterleavedGuidance",
    "JointGuidance",
    "Reference",
    "ReferenceDiffusionGenerator",
    "Row",
    "UnsupportedModelError",
    "VLMAnswerer",
    "guidance_from_config",
    "parse_citations",
]
