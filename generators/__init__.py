"""Generators: the VLM answerer and the reference-grounded diffusion generator (see ARCHITECTURE.md)."""

from generators.diffusion import CALLBACK_TENSOR_INPUTS, SCHEDULERS, GenerationOutput, ReferenceDiffusionGenerator
from generators.errors import GenerationError, GeneratorLoadError, GeneratorsError, GuidanceError
from generators.guidance import (
    GUIDANCES,
    ROWS,
    ClassifierFreeGuidance,
    Guidance,
    InterleavedGuidance,
    JointGuidance,
    Row,
    guidance_from_config,
)

__all__ = [
    "CALLBACK_TENSOR_INPUTS",
    "GUIDANCES",
    "ROWS",
    "SCHEDULERS",
    "ClassifierFreeGuidance",
    "GenerationError",
    "GenerationOutput",
    "GeneratorLoadError",
    "GeneratorsError",
    "Guidance",
    "GuidanceError",
    "InterleavedGuidance",
    "JointGuidance",
    "ReferenceDiffusionGenerator",
    "Row",
    "guidance_from_config",
]
