"""Typed errors raised by the knowledge base, the encoders and the retrievers.

Every error message names the argument (or file), shows the offending value and says how to fix
it, so that the CLI can print ``str(error)`` as one line and exit non-zero.
"""

from __future__ import annotations

from mmrag.errors import MMRAGError

__all__ = ["MMRAGError"]  # re-exported: the one base class, shared with generators and prompts


class ConfigError(MMRAGError, ValueError):
    """An argument or configuration value is invalid."""


class KnowledgeBaseError(MMRAGError):
    """The knowledge base cannot be opened, read or written."""


class NotAKnowledgeBaseError(KnowledgeBaseError):
    """A path was given as a knowledge base but holds none."""


class EmbedderMismatchError(KnowledgeBaseError):
    """A knowledge base was opened with another embedder than the one that built it."""


class SchemaVersionError(KnowledgeBaseError):
    """The knowledge base was written by an incompatible version of mmrag."""


class KnowledgeBaseLockedError(KnowledgeBaseError):
    """Another writer holds the knowledge base's write lock."""


class UnsafePathError(KnowledgeBaseError):
    """A path read back from the knowledge base's Chroma metadata does not name a file of its image
    store (anyone who can write to a shared Chroma server can set one): it is neither read nor
    deleted."""


class WriteRefusedError(KnowledgeBaseError):
    """Chroma refused a journaled write, which was rolled back (the collections agree again).

    ``reason`` is Chroma's complaint; ``kept`` is where a copy of the refused journal was kept
    (under ``<kb>/reports/``), or None when the caller reports the refusal itself.
    """

    def __init__(self, message: str, reason: str, kept: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.kept = kept


class MissingExtraError(MMRAGError, ImportError):
    """An optional dependency (a packaging extra) is not installed; the message has the pip command."""


class ModelLoadError(MMRAGError):
    """A model could not be found or loaded."""


class InvalidItemError(MMRAGError):
    """One ingestion item is unusable; ``reason`` is the line written to the ingest report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
