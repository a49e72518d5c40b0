"""Typed errors raised by the generators and their guidance objects.

Every message names the argument, shows the offending value and says how to fix it (listing the
valid choices where there are some), so that the CLI can print ``str(error)`` as one line.
Their base, `GeneratorsError`, derives from the library's one root, :class:`mmrag.errors.MMRAGError`
(`generators` may not import `retrievers`; both import the root).
"""

from __future__ import annotations

from mmrag.errors import MMRAGError


class GeneratorsError(MMRAGError):
    """Base class of every error the generators raise on purpose."""


class GuidanceError(GeneratorsError, ValueError):
    """A guidance name, parameter or saved configuration is invalid."""


class GenerationError(GeneratorsError, ValueError):
    """An argument of a generator call is invalid (prompt, references, size, steps, callback...)."""


class GeneratorLoadError(GeneratorsError):
    """A generator's model could not be found, recognised or loaded."""


class UnsupportedModelError(GeneratorLoadError):
    """A model loaded for a job it cannot do (e.g. a text-only model, or one without an image processor,
    given to the VLM answerer)."""


class ContextLengthError(GenerationError):
    """A prompt does not fit the model's context, even after dropping every droppable part."""
