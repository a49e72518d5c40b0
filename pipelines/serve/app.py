"""The FastAPI app of ``mmrag serve``: :func:`create_app` wires the service, the routes, auth,
the body limit, CORS and the error handlers that give every error one shape."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from . import require_serve_extra

require_serve_extra()  # before importing fastapi: a missing extra is one line with the pip command

from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.middleware.cors import CORSMiddleware  # noqa: E402
from fastapi.openapi.utils import get_openapi  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from mmrag import __version__  # noqa: E402
from mmrag.errors import MMRAGError  # noqa: E402
from mmrag.retrievers.errors import ConfigError  # noqa: E402

from ..config import Config, load_config  # noqa: E402
from . import openai_compat, routes_query, routes_records  # noqa: E402
from .auth import Authenticator  # noqa: E402
from .errors import error_body, error_status  # noqa: E402
from .jobs import JobRunner  # noqa: E402
from .keys import KeyStore  # noqa: E402
from .limits import BodyLimitMiddleware  # noqa: E402
from .schemas import BODY_MODELS, ErrorEnvelope, Health, KBInfo, add_body_schemas  # noqa: E402
from .service import Service  # noqa: E402

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_REQUEST_TIMEOUT_S = 60.0
STATIC = Path(__file__).parent / "static"

DESCRIPTION = """\
Search, ask, draw and the knowledge base's records over HTTP: the library's pipelines, warm.

**Auth.** `Authorization: Bearer KEY`, with a key from `mmrag keys create --kb DIR --scope read|write|admin`
(admin > write > read). Search, ask, draw, chat, jobs, the KB's info and reading records need `read`;
adding and deleting records need `write`. With no key in the store and a loopback bind, every request is
allowed. `/healthz` is always open.

**Errors.** Every error is `{"error": {"type", "message", "param"}}`: the message says what is wrong and
how to fix it, `param` names the request field at fault.

**Limits.** Bodies over the server's `--max-upload-mb` are refused with 413. Images get the checks ingested
images get (format allow-list, decompression bombs, pixel and aspect-ratio limits).

**Streaming.** `POST /v1/ask` with `stream: true` and `POST /v1/chat/completions` with `stream: true`
answer with server-sent events.
"""

_STATUS_TYPES = {400: "invalid_request", 401: "authentication_error", 403: "permission_denied", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 429: "busy", 503: "model_unavailable"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": kind} for status, kind in
    {**_STATUS_TYPES, 500: "internal_error"}.items() if status != 405}


def create_app(config: str | os.PathLike | Mapping | Config | None = None, *, kb_path: str | os.PathLike,
               keys: KeyStore | None = None, allow_origins: Sequence[str] = (),
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, require_auth: bool = False) -> FastAPI:
    """The app serving the KB at ``kb_path`` with ``config``'s models (a YAML path, a preset name,
    a dict or a :class:`Config`; its ``kb.path`` is replaced by ``kb_path``).

    Args:
        keys: the API keys (default: ``<kb_path>/keys.json``).
        allow_origins: origins allowed by CORS (none: no CORS headers at all).
        max_upload_bytes: the largest request body accepted.
        request_timeout_s: how long a draw request waits before it answers 202 with a job (0: always).
        require_auth: ask for a key even while the store has none (a non-loopback bind).
    """
    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes <= 0:
        raise ConfigError(f"`max_upload_bytes` must be a positive integer, got {max_upload_bytes!r}.")
    timeout_ok = isinstance(request_timeout_s, (int, float)) and not isinstance(request_timeout_s, bool)
    if not timeout_ok or not request_timeout_s >= 0:  # `not >=` also refuses NaN
        raise ConfigError(f"`request_timeout_s` must be a number of seconds >= 0, got {request_timeout_s!r}.")
    origins = [_check_origin(o) for o in allow_origins]
    service = Service(load_config(config, {"kb.path": str(kb_path)}))
    keys = KeyStore.for_kb(service.kb.path) if keys is None else keys
    auth = Authenticator(keys, required=require_auth)
    jobs = JobRunner()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.shutdown()

    app = FastAPI(title="mmrag", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  responses=ERROR_RESPONSES)
    app.state.service, app.state.keys = service, keys
    _add_error_handlers(app)
    # the body limit inside CORS, so that a 413 carries the CORS headers a browser needs to read it
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_upload_bytes)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Accept", "Prefer"],
                           expose_headers=["Location"])
    for router in (routes_query.build_router(service, jobs, auth, float(request_timeout_s)),
                   routes_records.build_router(service, auth), openai_compat.build_router(service, auth)):
        app.include_router(router, responses=ERROR_RESPONSES)

    @app.get("/v1/kb", response_model=KBInfo, dependencies=[Depends(auth.require("read"))], tags=["service"],
             summary="The knowledge base's counts, embedder and size")
    def kb_info() -> KBInfo:
        return KBInfo(**service.kb.info())

    @app.get("/healthz", response_model=Health, tags=["service"], summary="Liveness (no auth)")
    async def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = add_body_schemas(schema, BODY_MODELS + openai_compat.BODY_MODELS)
        return app.openapi_schema

    app.openapi = openapi
    return app


def _check_origin(origin: Any) -> str:
    parsed = urlparse(origin) if isinstance(origin, str) else None
    if origin == "*" or (parsed is not None and parsed.scheme in ("http", "https") and parsed.netloc
                         and parsed.path in ("", "/") and not parsed.query):
        return origin.rstrip("/") if origin != "*" else origin
    raise ConfigError(f"`allow_origin` must be an origin like 'https://app.example.com' or 'http://localhost:3000' "
                      f"(scheme, host and port only) or '*', got {origin!r}.")


def _add_error_handlers(app: FastAPI) -> None:
    def respond(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers or None)

    @app.exception_handler(MMRAGError)
    async def library_error(request: Request, error: MMRAGError) -> JSONResponse:
        return respond(*error_status(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _param(first.get("loc", ()))
        message = f"`{param}`: {first['msg']}" if param else first["msg"]
        if "input" in first and first.get("type") != "missing":
            message += f" (got {_short(first['input'])})"
        if len(errors) > 1:
            message += f"; and {len(errors) - 1} more problem(s)"
        return respond(422, error_body("invalid_request", message + ".", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(error.status_code, "internal_error" if error.status_code >= 500 else "invalid_request")
        return respond(error.status_code, error_body(kind, str(error.detail), None), dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return respond(*error_status(error))  # logged there; the client gets a generic message


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "records", 0, "text")`` -> ``"records[0].text"``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
