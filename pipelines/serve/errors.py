"""Typed errors of the HTTP service, and the one table that turns any error into a status and an
``{"error": {"type", "message", "param"}}`` body.

The library's own errors keep their messages (they already name the argument, the value and the
fix); this module only decides the HTTP status and the error ``type`` a client can branch on. The
table is used by the app's exception handlers, by the SSE streams (an error after the first token
becomes an ``error`` event) and by draw jobs (a failed job keeps the same body).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from mmrag.errors import MMRAGError
from mmrag.generators import errors as gerrors
from mmrag.retrievers import errors as rerrors

logger = logging.getLogger("mmrag.serve")


class ServeError(MMRAGError):
    """An error of a request to ``mmrag serve``; ``status`` and ``type`` go into the response.

    ``param`` names the request field at fault (None when no one field is); ``headers`` are added
    to the response (``WWW-Authenticate`` on a 401, ``Retry-After`` on a 429)."""

    status = 400
    type = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.param = param
        self.headers = headers or {}


class InvalidRequestError(ServeError):
    """A request field is malformed (bad base64, JSON that is not JSON, two inputs that exclude
    each other)."""


class AuthenticationError(ServeError):
    """No API key, or one that is not (or no longer) in the key store."""

    status = 401
    type = "authentication_error"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(ServeError):
    """A valid key whose scope is below what the endpoint needs."""

    status = 403
    type = "permission_denied"


class NotFoundError(ServeError):
    """A record or a job that does not exist (or a job that expired)."""

    status = 404
    type = "not_found"


class AllRejectedError(ServeError):
    """Every uploaded record was rejected; ``report`` is the ingest report with the reasons (the
    HTTP twin of ``mmrag ingest`` exiting 2 when every item was rejected)."""

    status = 422
    type = "all_rejected"

    def __init__(self, message: str, report: dict[str, Any], *, param: str | None = None):
        super().__init__(message, param=param)
        self.report = report


class BusyError(ServeError):
    """Too many draws are waiting for the models."""

    status = 429
    type = "busy"


class StartupError(ServeError):
    """``mmrag serve`` refuses to start (an unsafe bind, a bad flag)."""


# Library error class -> (status, type), looked up along the exception's MRO, most specific first,
# so that a subclass added later gets its parent's mapping instead of a 500.
_LIBRARY: dict[type, tuple[int, str]] = {
    # a lock held by another writer, a KB opened with another embedder or schema, an image path in
    # Chroma outside the image store: the KB's state conflicts with the request; retrying later
    # (or repairing the KB) helps, changing the request does not
    rerrors.KnowledgeBaseLockedError: (409, "conflict"),
    rerrors.NotAKnowledgeBaseError: (404, "not_found"),
    rerrors.WriteRefusedError: (422, "write_refused"),
    rerrors.KnowledgeBaseError: (409, "conflict"),
    # a model that cannot be found or loaded: the service is unavailable, the request is fine
    rerrors.ModelLoadError: (503, "model_unavailable"),
    gerrors.GeneratorLoadError: (503, "model_unavailable"),
    rerrors.MissingExtraError: (503, "model_unavailable"),
    # well-formed requests whose content cannot be processed
    rerrors.InvalidItemError: (422, "invalid_item"),
    gerrors.ContextLengthError: (422, "context_length_exceeded"),
    # bad arguments (ConfigError, GenerationError, GuidanceError, TemplateError, ...)
    MMRAGError: (400, "invalid_request"),
}

GENERIC_MESSAGE = "An unexpected error occurred; the server log has the details."
# The library names the argument at fault first, in backticks: "`k` must be a positive integer".
_PARAM = re.compile(r"`([A-Za-z_][\w.\[\]]*)`")


def error_status(error: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` for any exception; an unexpected one is logged with its traceback
    and answered with a generic message (its text may carry paths or data)."""
    if isinstance(error, ServeError):
        body = error_body(error.type, str(error), error.param)
        if isinstance(error, AllRejectedError):
            body["error"]["report"] = error.report
        return error.status, body, dict(error.headers)
    if isinstance(error, MMRAGError):
        # MMRAGError itself is in every MRO here, so the lookup always ends
        status, kind = next(_LIBRARY[c] for c in type(error).__mro__ if c in _LIBRARY)
        message = str(error)
        found = _PARAM.search(message) if kind == "invalid_request" else None
        return status, error_body(kind, message, found.group(1) if found else None), {}
    logger.error("unexpected error serving a request", exc_info=error)
    return 500, error_body("internal_error", GENERIC_MESSAGE, None), {}


def error_body(kind: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "param": param}}
