"""Generators: the VLM answerer, the reference-grounded diffusion generator and its guidance.

Names load on first use (PEP 562): ``mmrag.generators.guidance`` needs only torch, and importing it
(the config does, for the default guidance) must not pay for importing diffusers.
"""

from __future__ import annotations

from mmrag._lazy import lazy_exports

_MODULES = {
    "diffusion": ("CALLBACK_TENSOR_INPUTS", "SCHEDULERS", "GenerationOutput", "ReferenceDiffusionGenerator"),
    "errors": ("ContextLengthError", "GenerationError", "GeneratorLoadError", "GeneratorsError", "GuidanceError",
               "UnsupportedModelError"),
    "guidance": ("GUIDANCES", "ROWS", "ClassifierFreeGuidance", "Guidance", "InterleavedGuidance", "JointGuidance",
                 "Row", "guidance_from_config"),
    "vlm": ("AnswerOutput", "AnswerStream", "ChoiceOutput", "Reference", "VLMAnswerer", "parse_citations"),
}
_EXPORTS = {name: f"mmrag.generators.{module}" for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("mmrag.generators", globals(), _EXPORTS)
