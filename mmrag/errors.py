"""The root of mmrag's error hierarchy.

Every error a user can cause (a bad argument, input, config, knowledge base or model) is a subclass
of :class:`MMRAGError`, whichever subpackage raises it: ``mmrag.retrievers.errors`` (knowledge base,
encoders, retrieval), ``mmrag.generators.errors`` (VLM answerer, diffusion, guidance) and
``mmrag.prompts`` (templates). The CLI prints exactly these as one line and exits 2; anything else
is a bug and says so. It lives at the root so that subpackages which may not import each other
share it.
"""

from __future__ import annotations


class MMRAGError(Exception):
    """Base class of every error mmrag raises on purpose (the CLI prints these as one line)."""
