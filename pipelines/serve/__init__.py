"""``mmrag serve``: search, ask, draw and the knowledge base's records over HTTP (extra ``serve``).

One process keeps the library objects warm (:mod:`.service`) and serves them with FastAPI:
``create_app(config, kb_path=...)`` builds the app, ``mmrag serve`` runs it with uvicorn.
Modules: ``app`` (the factory, error handlers), ``auth`` and ``keys`` (API keys), ``limits`` (body
size), ``payloads`` (bodies and images), ``schemas`` (the API's models), ``views`` (outputs as
models), ``routes_query`` (search, ask, draw, jobs), ``jobs``, ``routes_records``,
``openai_compat`` (``/v1/chat/completions``) and ``commands`` (the CLI).

Importing this package is cheap and needs no extra; :func:`require_serve_extra` says what is missing.
"""

from __future__ import annotations

import importlib.util

from mmrag.retrievers.errors import MissingExtraError

INSTALL_COMMAND = 'pip install "mmrag[serve]"'
# distribution -> the modules it may install (python-multipart < 0.0.13 has only `multipart`)
_EXTRA = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "sse-starlette": ("sse_starlette",),
          "python-multipart": ("python_multipart", "multipart")}


def require_serve_extra() -> None:
    """Raise :class:`MissingExtraError` with the pip command when a package of the extra is missing."""
    missing = [dist for dist, modules in _EXTRA.items()
               if all(importlib.util.find_spec(m) is None for m in modules)]
    if missing:
        raise MissingExtraError(f"`mmrag serve` needs {', '.join(missing)}, not installed here. "
                                f"Install them with: {INSTALL_COMMAND}")


def __getattr__(name: str):
    if name == "create_app":  # PEP 562: the extra is checked (and fastapi imported) on first use only
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
