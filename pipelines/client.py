"""A Python client of ``mmrag serve``: the library's search, ask, draw and records calls over HTTP.

    from mmrag.client import Client

    with Client("http://127.0.0.1:8000", api_key="mmrag_...") as client:
        hits = client.retrieve("a striped star", k=5)             # Hits of Hit, as SearchPipeline returns
        out = client.ask("What is it?", image="photo.jpg")        # VQAOutput
        stream = client.ask("What is it?", image="photo.jpg", stream=True)
        for chunk in stream:                                       # the answer as it is generated
            print(chunk, end="")
        stream.result                                              # then the VQAOutput
        drawing = client.draw("a striped star on a beach", seed=0)  # ImageOutput with PIL images
        report = client.add([Record(text="a cat", image="cat.jpg")])  # IngestReport

The calls take what the library's calls take (a query is a str, a PIL image, an image path or a
:class:`~mmrag.retrievers.Query`) and return the library's own types (:class:`Hits` of
:class:`Hit` with :class:`Record`, :class:`VQAOutput`, :class:`VQAStream`, :class:`ImageOutput`,
:class:`IngestReport`), so code written against the pipelines runs against a server. Where they
differ from the in-process results:

- ``record.image`` is the absolute URL of the stored image (``GET /v1/records/{id}/image``), not a
  path on the server's disk; :meth:`Client.image` fetches it as the checked RGB picture that
  ``record.open_image()`` gives in process. References given with a draw keep their PIL image.
- ``dropped`` references of an answer carry their id only (score NaN).
- Per-call retriever overrides are limited to ``channels``, ``fusion``, ``composed_method`` and
  ``hubness`` (``None`` or ``"none"``: off): the rest of the settings, the models and the reranker
  are the server's config.

Errors come back as the classes the library raises, so ``except ConfigError`` catches a bad
argument wherever it was found: the server's ``{"error": {"type", "message", "param"}}`` becomes
:class:`ConfigError` (``invalid_request``, ``payload_too_large``, ...), :class:`InvalidItemError`,
:class:`KnowledgeBaseError` (``conflict``, e.g. the KB's writer lock is held),
:class:`WriteRefusedError`, :class:`ModelLoadError` (``model_unavailable``),
:class:`ContextLengthError`, or one of this module's :class:`APIError` subclasses for what only a
service has (no or a wrong key, a scope too low, a job or record id not found, busy, a server
bug, a server that cannot be reached). Every error raised for a response carries ``status``,
``type`` and ``param`` attributes (the HTTP status, the envelope's type, the request field at fault).

Importing this module is cheap (httpx and Pillow); the library's types are imported on first use.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import quote, urlsplit

import httpx
from PIL import Image

from mmrag.errors import MMRAGError

if TYPE_CHECKING:  # imported on first use (they bring numpy, 0.1 s): `Client(url)` alone stays instant
    from mmrag.retrievers import Hit, Hits, IngestReport, Record

    from .outputs import ImageOutput, VQAOutput, VQAStream

__all__ = ["APIError", "AuthenticationError", "BusyError", "Client", "JobTimeoutError", "NotFoundError",
           "PermissionDeniedError", "ServerError", "ServerUnreachableError"]

API_KEY_ENV = "MMRAG_API_KEY"
_IDS_PER_REQUEST = 100  # ids in one GET /v1/records?ids=[...] (URLs stay short; the server takes up to 1000)
# the retriever settings POST /v1/search takes (the server's schemas.SEARCH_OVERRIDES, without pydantic)
SEARCH_OVERRIDES = ("channels", "fusion", "composed_method", "hubness")
DEFAULT_TIMEOUT_S = 120.0  # the first call to a cold server loads its models
DEFAULT_JOB_TIMEOUT_S = 3600.0
# Uploads are split so that each request stays well under `mmrag serve`'s default body limit
# (20 MiB), base64's 4/3 included; POST /v1/records takes at most 1000 records.
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
MAX_RECORDS_PER_REQUEST = 1000


# ---------------------------------------------------------------------------------------- errors
class APIError(MMRAGError):
    """An error only a service has (auth, a missing job, a busy or broken server, no server).

    ``status`` is the HTTP status (None when no response came), ``type`` the error envelope's
    type, ``param`` the request field at fault (None when no one field is)."""

    def __init__(self, message: str, *, status: int | None = None, type: str = "api_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param


class AuthenticationError(APIError):
    """401: no API key, or one the server does not know (malformed, unknown or revoked)."""


class PermissionDeniedError(APIError):
    """403: the key's scope is below what the endpoint needs (e.g. a ``read`` key adding records)."""


class NotFoundError(APIError):
    """404: a record id (``record_id=``) or a draw job the server does not have."""


class BusyError(APIError):
    """429: too many draws are waiting; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: the server failed (its log has the details), or it is not an mmrag server."""


class ServerUnreachableError(APIError):
    """No answer: the connection failed or timed out."""


class JobTimeoutError(APIError):
    """A draw job was still running after ``job_timeout`` seconds (it goes on on the server)."""


# envelope type -> (module, class) of the library error a user catches in process
_LIBRARY_ERRORS = {
    "invalid_request": ("mmrag.retrievers.errors", "ConfigError"),
    "unsupported_media_type": ("mmrag.retrievers.errors", "ConfigError"),
    "payload_too_large": ("mmrag.retrievers.errors", "ConfigError"),
    "invalid_item": ("mmrag.retrievers.errors", "InvalidItemError"),
    "conflict": ("mmrag.retrievers.errors", "KnowledgeBaseError"),
    "write_refused": ("mmrag.retrievers.errors", "WriteRefusedError"),
    "model_unavailable": ("mmrag.retrievers.errors", "ModelLoadError"),
    "context_length_exceeded": ("mmrag.generators.errors", "ContextLengthError"),
}
_API_ERRORS: dict[str, type[APIError]] = {
    "authentication_error": AuthenticationError, "permission_denied": PermissionDeniedError,
    "not_found": NotFoundError, "busy": BusyError, "internal_error": ServerError,
}
# the status of an error that arrives without one (an SSE `error` event, a failed job)
_TYPE_STATUS = {"invalid_request": 400, "authentication_error": 401, "permission_denied": 403, "not_found": 404,
                "conflict": 409, "payload_too_large": 413, "unsupported_media_type": 415, "invalid_item": 422,
                "write_refused": 422, "all_rejected": 422, "context_length_exceeded": 422, "busy": 429,
                "internal_error": 500, "model_unavailable": 503}


def _config_error(message: str) -> MMRAGError:
    from mmrag.retrievers.errors import ConfigError

    return ConfigError(message)


def error_from_envelope(error: Mapping[str, Any], status: int | None = None,
                        rename: Mapping[str, str] | None = None) -> MMRAGError:
    """The exception for one ``{"type", "message", "param"}`` error body (``rename`` maps the
    request's field names back to the client's argument names, e.g. ``steps`` ->
    ``num_inference_steps``)."""
    kind = str(error.get("type") or "api_error")
    message = str(error.get("message") or "the server gave no message")
    param = error.get("param")
    for field, argument in (rename or {}).items():
        message = message.replace(f"`{field}`", f"`{argument}`")
        if param == field:
            param = argument
    status = status if status is not None else _TYPE_STATUS.get(kind)
    if kind == "authentication_error":
        message += f" Pass `api_key=` to Client (the CLI: --api-key KEY, or set {API_KEY_ENV})."
    spec = _LIBRARY_ERRORS.get(kind)
    if spec is not None:
        cls = getattr(importlib.import_module(spec[0]), spec[1])
        exc = cls(message, reason=message) if spec[1] == "WriteRefusedError" else cls(message)
    else:
        cls = _API_ERRORS.get(kind) or (ServerError if status is not None and status >= 500 else APIError)
        exc = cls(message, status=status, type=kind, param=param)
    # the same three attributes on every error that came from a response, library classes included
    exc.status, exc.type, exc.param = status, kind, param
    return exc


# ---------------------------------------------------------------------------------------- client
class Client:
    """The HTTP client of one ``mmrag serve``.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a path prefix is kept).
        api_key: ``Authorization: Bearer`` key (``mmrag keys create``); default: the
            ``MMRAG_API_KEY`` environment variable; none for a loopback server without keys.
        timeout: seconds to wait for a connection and for each read (the first request to a cold
            server waits for its models to load).
        job_timeout: seconds a draw that became a job (202) is followed before
            :class:`JobTimeoutError`.
        max_request_bytes: uploads (:meth:`add`, :meth:`ingest`) are split into requests of about
            this size; keep it under the server's ``--max-upload-mb``.
        transport: an ``httpx`` transport (tests: ``httpx.ASGITransport``).

    Thread-safe: one client may serve many threads (``httpx.Client`` pools connections).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, *,
                 job_timeout: float = DEFAULT_JOB_TIMEOUT_S, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 transport: httpx.BaseTransport | None = None):
        self.url = _check_url(url)
        if api_key is None:  # as the CLI's --api-key: the environment keeps keys out of code and shell history
            api_key = os.environ.get(API_KEY_ENV) or None
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise _config_error(f"`api_key` must be a non-empty string (from `mmrag keys create`), got {api_key!r}.")
        for name, value in (("timeout", timeout), ("job_timeout", job_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _config_error(f"`{name}` must be a number of seconds > 0, got {value!r}.")
        _check_int("max_request_bytes", max_request_bytes)
        self.timeout, self.job_timeout, self.max_request_bytes = float(timeout), float(job_timeout), max_request_bytes
        headers = {"Accept": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.strip()}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout, transport=transport)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    # ------------------------------------------------------------------ service
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "version": ...}`` (no key needed)."""
        return self._request("GET", "/healthz").json()

    def info(self) -> dict[str, Any]:
        """``KnowledgeBase.info()`` of the served KB: count, embedder, dim, sizes, versions."""
        return self._request("GET", "/v1/kb").json()

    def count(self) -> int:
        """Number of records in the served KB."""
        return int(self.info()["count"])

    # ------------------------------------------------------------------ search
    def retrieve(self, query: Any = None, k: int = 10, where: dict | None = None, *, rerank: bool = True,
                 record_id: str | None = None, timings: dict[str, float] | None = None, **overrides: Any) -> "Hits":
        """``SearchPipeline(query, k, where, rerank=...)`` on the server: the top-``k`` hits for a
        text, an image (PIL, path or bytes), both (a :class:`Query`), or a stored record's image
        (``record_id``, with ``query`` as the modifier text or None).

        ``overrides`` may hold ``channels``, ``fusion``, ``composed_method`` and ``hubness``: the
        server's config fixes the other retriever settings. The server's stage seconds are added to ``timings``. ``record.image`` of each
        hit is the image's URL; :meth:`image` fetches it."""
        from mmrag.retrievers import Hits

        _check_int("k", k)
        unknown = sorted(set(overrides) - set(SEARCH_OVERRIDES))
        if unknown:
            names = ", ".join(f"`{n}`" for n in unknown)
            raise _config_error(f"{names} cannot be set per request over HTTP: POST /v1/search takes "
                                f"{', '.join(f'`{n}`' for n in SEARCH_OVERRIDES)} of the retriever settings. Set it "
                                "in the server's config (retriever.*), or search in process with SearchPipeline.")
        body: dict[str, Any] = {"k": k, "where": where, "rerank": _check_bool("rerank", rerank)}
        channels = overrides.pop("channels", None)
        if channels is not None:
            body["channels"] = [channels] if isinstance(channels, str) else list(channels)
        if "hubness" in overrides and overrides["hubness"] is None:  # in process, None turns it off
            overrides["hubness"] = "none"
        body.update(overrides)
        body.update(self._query_fields(query, record_id))
        data = self._request("POST", "/v1/search", json=_drop_none(body)).json()
        if timings is not None:
            for stage, seconds in data["timings"].items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        return Hits([self._hit(h) for h in data["hits"]], requested=k, collapsed=data["collapsed"])

    search = retrieve  # SearchPipeline's two names

    def image(self, item: "Hit | Record | str") -> Image.Image:
        """The stored image of a hit, a record or a record id, as 8-bit RGB through ingestion's
        checks (what ``record.open_image()`` gives in process). A record whose image is already a
        PIL image (a reference given with a draw) is returned checked, without a request."""
        from mmrag.retrievers import Hit, Record
        from mmrag.retrievers.kb.images import normalise_image

        record = item.record if isinstance(item, Hit) else item
        if isinstance(record, Record) and isinstance(record.image, Image.Image):
            return normalise_image(record.image)[0]
        data = self.image_bytes(item)
        try:
            return normalise_image(data)[0]
        except MMRAGError as e:  # InvalidItemError: a stored file the server should not hold
            raise ServerError(f"The server's image of {getattr(record, 'id', record)!r} is not a usable image: "
                              f"{getattr(e, 'reason', e)}; run `mmrag kb verify` on the server's KB.") from None

    def image_bytes(self, item: "Hit | Record | str") -> bytes:
        """The stored image file of a hit, a record or a record id, byte for byte."""
        from mmrag.retrievers import Hit, Record

        record = item.record if isinstance(item, Hit) else item
        if isinstance(record, Record):
            url = record.image if isinstance(record.image, str) else None
            if url is None:
                if record.id is None:
                    raise _config_error("This record has neither an image URL nor an id; give a Hit or a Record "
                                        "that came from this client, or a record id.")
                url = self._url(f"/v1/records/{quote(record.id, safe='')}/image")
        elif isinstance(record, str):
            url = self._url(f"/v1/records/{quote(record, safe='')}/image")
        else:
            raise _config_error(f"`item` must be a Hit, a Record or a record id, got {type(item).__name__}.")
        if not url.startswith(self.url):
            raise _config_error(f"The image URL {url!r} is not on this client's server {self.url!r}; fetch it with "
                                "the client of the server that returned it.")
        return self._request("GET", url[len(self.url):], headers={"Accept": "*/*"}).content

    # ------------------------------------------------------------------ ask
    def ask(self, question: str, image: Any = None, k: int | None = None, where: dict | None = None,
            rerank: bool = True, references: Sequence | None = None, choices: Sequence[str] | None = None,
            stream: bool = False, *, record_id: str | None = None) -> "VQAOutput | VQAStream":
        """``RAGVQAPipeline(question, image, k, where, rerank, choices=..., stream=...)`` on the
        server. ``image`` is a PIL image, an image path or encoded bytes; ``record_id`` asks about a
        stored record's image instead. ``stream=True`` returns a :class:`VQAStream`: iterate it for
        the answer's text as the server generates it, then ``.result`` is the :class:`VQAOutput`.

        ``references`` (gold references) is not available over HTTP."""
        from .outputs import VQAStream

        if references is not None:
            raise _config_error("`references` (gold references) cannot be given over HTTP: POST /v1/ask has no such "
                                "field. Let the server retrieve, or ask in process with RAGVQAPipeline.")
        if not isinstance(question, str):
            raise _config_error(f"`question` must be a string, got {type(question).__name__}.")
        if k is not None:
            _check_int("k", k)
        if choices is not None and (isinstance(choices, str) or not all(isinstance(c, str) for c in choices)):
            raise _config_error(f"`choices` must be a list of strings, got {choices!r}.")
        body: dict[str, Any] = {"question": question, "k": k, "where": where, "rerank": _check_bool("rerank", rerank),
                                "choices": list(choices) if choices is not None else None,
                                "stream": _check_bool("stream", stream)}
        if image is not None or record_id is not None:
            body.update(self._image_field("image", image, record_id))
        body = _drop_none(body)
        if not stream:
            return self._vqa_output(self._request("POST", "/v1/ask", json=body).json())
        response = self._request("POST", "/v1/ask", json=body, headers={"Accept": "text/event-stream"}, stream=True)
        done: dict[str, Any] = {}
        return VQAStream(self._tokens(response, done), lambda: self._vqa_output(done["result"]))

    def _tokens(self, response: httpx.Response, done: dict[str, Any]) -> Iterator[str]:
        """The ``token`` events' texts; the ``done`` event's body goes into ``done["result"]``."""
        try:
            for event, data in _sse(response.iter_lines()):
                if event == "token":
                    yield json.loads(data)["text"]
                elif event == "done":
                    done["result"] = json.loads(data)
                    return
                elif event == "error":
                    raise error_from_envelope(json.loads(data).get("error", {}))
        except httpx.TransportError as e:
            raise ServerUnreachableError(f"The answer stream from {self.url} broke off ({e}); ask again.",
                                         type="stream_broken") from None
        finally:
            response.close()  # also when the caller stops iterating early
        raise ServerError(f"The answer stream from {self.url} ended without its `done` event; ask again.",
                          status=response.status_code, type="stream_broken")

    # ------------------------------------------------------------------ draw
    def draw(self, prompt: str, k: int | None = None, references: Sequence[Image.Image] | None = None,
             guidance: str | None = None, num_inference_steps: int | None = None, seed: int | None = None,
             where: dict | None = None, rerank: bool = True, height: int | None = None, width: int | None = None,
             *, num_images_per_prompt: int = 1, progress: Callable[[int, int], None] | None = None,
             **generate_kwargs: Any) -> "ImageOutput":
        """``EntityImagePipeline(prompt, k, references, guidance, ...)`` on the server; the images
        come back decoded (PIL). A draw the server turns into a job (202: past its request
        timeout) is followed until it is done; ``progress(step, of)`` is called with the
        denoising steps as the job reports them (with it, the draw always runs as a job, so
        that there is progress to report).

        ``guidance`` is a name (``interleaved``, ``joint``, ``cfg``) at the server's configured
        scales; the generator's other keyword arguments are not available over HTTP."""
        if generate_kwargs:
            raise _config_error(f"{', '.join(f'`{n}`' for n in sorted(generate_kwargs))} cannot be passed over HTTP: "
                                "POST /v1/draw takes prompt, k, references, guidance, num_inference_steps, seed, "
                                "where, rerank, height, width and num_images_per_prompt.")
        if guidance is not None and not isinstance(guidance, str):
            raise _config_error(f"`guidance` must be a guidance name over HTTP (interleaved, joint, cfg: the server "
                                f"draws at its configured scales), got {type(guidance).__name__}.")
        for name, value in (("k", k), ("num_inference_steps", num_inference_steps), ("height", height),
                            ("width", width), ("num_images_per_prompt", num_images_per_prompt)):
            if value is not None:
                _check_int(name, value)
        if seed is not None:
            _check_int("seed", seed, minimum=0)
        if references is not None:
            bad = [i for i, r in enumerate(references) if not isinstance(r, Image.Image)]
            if bad:  # as the pipeline: PIL images only
                raise _config_error(f"`references[{bad[0]}]` must be a PIL image, "
                                    f"got {type(references[bad[0]]).__name__}.")
        given = [self._checked_image(f"references[{i}]", r) for i, r in enumerate(references)] if references else None
        body = _drop_none({"prompt": prompt, "k": k, "guidance": guidance, "steps": num_inference_steps, "seed": seed,
                           "where": where, "rerank": _check_bool("rerank", rerank), "height": height, "width": width,
                           "num_images": num_images_per_prompt,
                           "references": [_b64(_png(im)) for im in given] if given is not None else None})
        rename = {"steps": "num_inference_steps", "num_images": "num_images_per_prompt"}
        # Without progress, ask the server to hold the request a little less than our read timeout
        # (RFC 7240), so that a long draw becomes a job instead of a client timeout.
        prefer = "respond-async" if progress is not None else f"wait={max(1, int(self.timeout * 0.8))}"
        response = self._request("POST", "/v1/draw", json=body, headers={"Prefer": prefer}, rename=rename)
        data = response.json()
        if response.status_code == 202:
            data = self._follow(data["status_url"], progress, rename)
        return self._image_output(data, given)

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: a draw job's status, progress, result or error, as JSON."""
        return self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}").json()

    def _follow(self, status_url: str, progress: Callable[[int, int], None] | None,
                rename: Mapping[str, str]) -> dict[str, Any]:
        """Poll a draw job until it is done (its DrawResponse) or failed (its error, raised)."""
        deadline = time.monotonic() + self.job_timeout
        delay, seen = 0.05, None
        while True:
            status = self._request("GET", status_url).json()
            if progress is not None and status.get("progress") and status["progress"] != seen:
                seen = status["progress"]
                progress(seen["step"], seen["of"])
            if status["status"] == "done":
                return status["result"]
            if status["status"] == "failed":
                raise error_from_envelope(status.get("error") or {}, rename=rename)
            if time.monotonic() > deadline:
                raise JobTimeoutError(f"The draw job at {self.url}{status_url} was still {status['status']} after "
                                      f"{self.job_timeout:g} s; it goes on on the server: poll it with "
                                      f"client.job({status['job']!r}), or pass a larger `job_timeout`.",
                                      type="job_timeout")
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)  # quick for tiny draws, gentle for long ones

    # ------------------------------------------------------------------ records
    def add(self, records: "Record | Iterable[Record]") -> "IngestReport":
        """``KnowledgeBase.add(records)`` on the server: the ingest report (bad records are lines
        of it, never an error). Ids given are kept; others derive from the content exactly as in
        process (each image is prepared here as ingestion prepares it), so uploading the same
        records again adds nothing. Large uploads are split into several requests."""
        from mmrag.retrievers import Record
        from mmrag.retrievers.kb.sources import SourceItem

        records = [records] if isinstance(records, Record) else list(records)
        items = []
        for i, r in enumerate(records):
            if isinstance(r, Record):
                items.append(SourceItem(ref=f"records[{i}]", source="records", text=r.text, image=r.image, id=r.id,
                                        metadata=dict(r.metadata), source_path=r.source_path))
            else:
                items.append(SourceItem(ref=f"records[{i}]", source="records",
                                        error=f"expected a Record, got {type(r).__name__}"))
        return self._upload(items)

    def ingest(self, source: Any, *, base_dir: str | os.PathLike | None = None,
               allow_remote: bool = False) -> "IngestReport":
        """``KnowledgeBase.ingest(source)`` with the source read here and its records uploaded: a
        folder, a JSONL/CSV manifest or WebDataset shards on this machine (or Records). Items the
        source already knows to be bad are rejected here, with the library's reasons and refs."""
        from mmrag.retrievers.kb.sources import iter_source

        return self._upload(iter_source(source, allow_remote=allow_remote, base_dir=base_dir))

    def get(self, ids: str | Sequence[str]) -> "list[Record]":
        """``KnowledgeBase.get(ids)``: the records with these ids, in the given order; ids the
        server does not have are left out. ``record.image`` is the image's URL."""
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        found = []
        for lo in range(0, len(ids), _IDS_PER_REQUEST):  # GET /v1/records?ids=[...]: many records per request
            chunk = ids[lo:lo + _IDS_PER_REQUEST]
            page = self._request("GET", "/v1/records", params={"ids": json.dumps(chunk), "limit": len(chunk)}).json()
            found.extend(self._record(r) for r in page["records"])
        return found

    def delete(self, ids: str | Sequence[str]) -> int:
        """``KnowledgeBase.delete(ids)``: the number of records deleted (unknown ids are ignored)."""
        ids = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        deleted = 0
        for record_id in ids:
            try:
                deleted += self._request("DELETE", f"/v1/records/{quote(record_id, safe='')}").json()["deleted"]
            except NotFoundError:
                continue
        return deleted

    def records(self, where: dict | None = None, *, page_size: int = 500) -> "Iterator[Record]":
        """Every record (or those matching ``where``), in insertion order, a page at a time."""
        _check_int("page_size", page_size)
        offset: int | None = 0
        while offset is not None:
            params: dict[str, Any] = {"offset": offset, "limit": page_size}
            if where is not None:
                params["where"] = json.dumps(where)
            page = self._request("GET", "/v1/records", params=params).json()
            yield from (self._record(r) for r in page["records"])
            offset = page["next_offset"]

    def _upload(self, items: Iterable[Any]) -> "IngestReport":
        """Prepare ``items`` (SourceItems) as ingestion would, upload them in batches, and merge
        the server's reports into one whose refs are the items' own."""
        from mmrag.retrievers import IngestReport, InvalidItemError, Rejection
        from mmrag.retrievers.kb.images import prepare_image
        from mmrag.retrievers.kb.sources import prepare_text

        report, batch, refs, size = IngestReport(), [], [], 0
        start = time.perf_counter()
        for item in items:
            try:
                if item.error is not None:
                    raise InvalidItemError(item.error)
                # the server checks the length against its own limit; here only decoding and emptiness
                text = prepare_text(item.text, max_chars=2**62)
                if item.image is None:
                    raise InvalidItemError("no image")
                # the bytes ingestion would store (the user's file when kept, else the PNG it writes),
                # so the server derives the same content id as an in-process add
                prepared = prepare_image(item.image)
            except InvalidItemError as e:
                report.rejected.append(Rejection(ref=item.ref, reason=e.reason, source=item.source or "records"))
                continue
            for note in prepared.notes:
                report.note(note)
            entry = _drop_none({"text": text, "image": _b64(prepared.data), "id": item.id,
                                "metadata": item.metadata or {}, "source_path": item.source_path})
            entry_size = len(entry["image"]) + len(text) * 4 + 256
            if batch and (size + entry_size > self.max_request_bytes or len(batch) >= MAX_RECORDS_PER_REQUEST):
                self._post_records(batch, refs, report)
                batch, refs, size = [], [], 0
            batch.append(entry)
            refs.append((item.ref, item.source or "records"))
            size += entry_size
        if batch:
            self._post_records(batch, refs, report)
        report.seconds = time.perf_counter() - start
        return report

    def _post_records(self, batch: list[dict], refs: list[tuple[str, str]], report: "IngestReport") -> None:
        from mmrag.retrievers import IngestReport, Rejection

        try:
            data = self._request("POST", "/v1/records", json={"records": batch}).json()
        except MMRAGError as e:
            body = getattr(e, "report", None)
            if body is not None:  # all_rejected: a report like any other
                data = body
            elif getattr(e, "type", None) == "payload_too_large" and len(batch) == 1:
                report.rejected.append(Rejection(ref=refs[0][0], reason=str(e), source=refs[0][1]))
                return
            else:
                raise
        part = IngestReport(added=data["added"], updated=data["updated"], existing=data["existing"],
                            duplicates=data["duplicates"], notes=dict(data["notes"]),
                            texts_truncated=data["texts_truncated"], timings=dict(data["timings"]))
        for rejection in data["rejections"]:
            ref, source = _batch_ref(rejection["ref"], refs)
            part.rejected.append(Rejection(ref=ref, reason=rejection["reason"], source=source))
        report.merge(part)

    # ------------------------------------------------------------------ requests and conversions
    def _url(self, path: str) -> str:
        return self.url + path

    def _request(self, method: str, path: str, *, stream: bool = False, rename: Mapping[str, str] | None = None,
                 **kwargs: Any) -> httpx.Response:
        """One request; an error response or a transport failure is raised as its typed error."""
        try:
            request = self._http.build_request(method, path, **kwargs)
            response = self._http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            raise ServerUnreachableError(f"The mmrag server at {self.url} did not answer {method} {path} within "
                                         f"{self.timeout:g} s ({type(e).__name__}); pass a larger `timeout`, or check "
                                         "the server.", type="timeout") from None
        except httpx.TransportError as e:
            raise ServerUnreachableError(f"Cannot reach the mmrag server at {self.url} ({e}): is `mmrag serve --kb "
                                         "DIR` running there? Check the `url`.", type="unreachable") from None
        if response.status_code >= 400:
            if stream:
                response.read()
                response.close()
            raise self._error(response, rename)
        return response

    def _error(self, response: httpx.Response, rename: Mapping[str, str] | None) -> MMRAGError:
        try:
            envelope = response.json()["error"]
            assert isinstance(envelope, dict) and "type" in envelope
        except (ValueError, KeyError, TypeError, AssertionError):
            text = response.text[:200]
            cls = ServerError if response.status_code >= 500 else APIError
            return cls(f"HTTP {response.status_code} from {response.request.method} {response.request.url}: {text!r} "
                       "(not an mmrag error; is `url` an mmrag server?)", status=response.status_code)
        exc = error_from_envelope(envelope, response.status_code, rename)
        if envelope.get("type") == "all_rejected":
            exc.report = envelope.get("report")
        if isinstance(exc, BusyError):
            try:
                exc.retry_after = float(response.headers.get("retry-after", ""))
            except ValueError:
                pass
        return exc

    def _query_fields(self, query: Any, record_id: str | None) -> dict[str, Any]:
        """The request fields of a query: ``text``, ``reference_text`` and ``image`` (or ``record_id``)."""
        from mmrag.retrievers import Query

        if query is None:
            if record_id is None:
                raise _config_error("The query is empty: give `query` (a text, an image or both) or `record_id`.")
            return {"record_id": _check_str("record_id", record_id)}
        q = Query.coerce(query)  # the library's checks and errors, before anything is sent
        fields: dict[str, Any] = {"text": q.text, "reference_text": q.reference_text}
        if q.image is not None:
            if record_id is not None:
                raise _config_error("Give an image in `query` or `record_id`, not both.")
            source = query.image if isinstance(query, Query) else query
            fields["image"] = _b64(_image_upload(source, q.image))
        elif record_id is not None:
            fields["record_id"] = _check_str("record_id", record_id)
        return fields

    def _image_field(self, name: str, image: Any, record_id: str | None) -> dict[str, Any]:
        if record_id is not None:
            if image is not None:
                raise _config_error(f"Give `{name}` or `record_id`, not both.")
            return {"record_id": _check_str("record_id", record_id)}
        return {name: _b64(_image_upload(image, self._checked_image(name, image)))}

    @staticmethod
    def _checked_image(name: str, image: Any) -> Image.Image:
        """``image`` through the query path's checks, with the library's error naming ``name``."""
        from mmrag.retrievers import ConfigError, Query

        try:
            return Query.coerce(Query(image=image)).image
        except ConfigError as e:
            raise ConfigError(str(e).replace("`query.image`", f"`{name}`")) from None

    def _record(self, r: Mapping[str, Any]) -> "Record":
        from mmrag.retrievers import Record

        url = r.get("image_url")
        return Record(text=r["text"], image=self._url(url) if url else None, id=r["id"],
                      metadata=dict(r.get("metadata") or {}), source_path=r.get("source_path"))

    def _hit(self, h: Mapping[str, Any]) -> "Hit":
        from mmrag.retrievers import DocumentPart, Hit

        parts = [DocumentPart(index=int(p["index"]), kind=p["kind"], score=float(p["score"]), text=p.get("text"),
                              source_path=p.get("source_path")) for p in h.get("parts") or []]
        return Hit(id=h["id"], record=self._record(h), score=float(h["score"]), scores=dict(h.get("scores") or {}),
                   rank=int(h["rank"]), parts=parts)

    def _reference(self, ref: Mapping[str, Any], given: Image.Image | None = None) -> "Hit":
        """A reference of an answer or a drawing; one given with a draw keeps its PIL image."""
        hit = self._hit(ref)
        return hit if given is None else replace(hit, record=replace(hit.record, image=given))

    def _vqa_output(self, d: Mapping[str, Any]) -> "VQAOutput":
        from mmrag.retrievers import Hit, Record

        from .outputs import VQAOutput

        references = [self._reference(r) for r in d["references"]]
        by_id = {h.id: h for h in references}
        cited = [by_id[i] for i in d["cited"] if i in by_id]
        dropped = [Hit(id=i, record=Record(text="", id=i), score=math.nan) for i in d.get("dropped", [])]
        return VQAOutput(answer=d["answer"], references=references, cited=cited, prompt=d["prompt"],
                         no_retrieval=d["no_retrieval"], message=d["message"], choice=d["choice"],
                         choice_scores=d["choice_scores"], dropped=dropped, timings=dict(d["timings"]))

    def _image_output(self, d: Mapping[str, Any], given: list[Image.Image] | None) -> "ImageOutput":
        from .outputs import ImageOutput

        references = [self._reference(r, given[i] if given is not None and i < len(given) else None)
                      for i, r in enumerate(d["references"])]
        return ImageOutput(images=[_decode_png(s) for s in d["images"]], references=references,
                           guidance=dict(d["guidance"]), fallback=d["fallback"], timings=dict(d["timings"]),
                           decision=d.get("decision"), decision_score=d.get("decision_score"),  # absent: older server
                           decision_threshold=d.get("decision_threshold"), decision_reason=d.get("decision_reason"))


# ---------------------------------------------------------------------------------------- helpers
def _check_url(url: Any) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise _config_error(f"`url` must be the server's base URL, like 'http://127.0.0.1:8000' (http or https, no "
                            f"query), got {url!r}.")
    return url.rstrip("/")


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _config_error(f"`{name}` must be {what}, got {value!r}.")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _config_error(f"`{name}` must be True or False, got {value!r}.")
    return value


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _config_error(f"`{name}` must be a non-empty string, got {value!r}.")
    return value


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """Fields left at None are not sent: the server's default (its config) applies."""
    return {k: v for k, v in d.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image_upload(source: Any, checked: Image.Image) -> bytes:
    """What to send for a query image: the file's own bytes for a path or bytes (the server
    decodes them exactly as the library would here, and a JPEG stays small), a lossless PNG of
    the checked picture for a PIL image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        from mmrag.retrievers.kb.images import DEFAULT_MAX_IMAGE_BYTES, read_regular_file

        return read_regular_file(os.fspath(source), "image file", DEFAULT_MAX_IMAGE_BYTES, lambda size: None)
    return _png(checked)


def _decode_png(data: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(data)), formats=["PNG"]) as im:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")


def _batch_ref(ref: str, refs: list[tuple[str, str]]) -> tuple[str, str]:
    """A server rejection's ``records[j]`` (its place in the request) as the item's own ref."""
    if ref.startswith("records[") and ref.endswith("]") and ref[8:-1].isdigit() and int(ref[8:-1]) < len(refs):
        return refs[int(ref[8:-1])]
    return ref, "records"


def _sse(lines: Iterable[str]) -> Iterator[tuple[str | None, str]]:
    """``(event, data)`` of each server-sent event (comments and keep-alive pings skipped)."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)
