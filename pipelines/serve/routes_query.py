"""POST /v1/search, /v1/ask and /v1/draw, and GET /v1/jobs/{id}: the pipelines over HTTP.

Each route validates its body, turns images into checked PIL images (``payloads``), calls the one
library pipeline through :class:`Service` and converts the output (``views``). Endpoints that run
models are ``def``: FastAPI runs them in its threadpool, off the event loop.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, Query as QueryParam, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from mmrag.retrievers import Query

from .auth import Authenticator
from .errors import InvalidRequestError, error_status
from .jobs import Job, JobRunner
from .payloads import decode_base64, load_image, read_body
from .schemas import (AskForm, AskRequest, AskResponse, DrawRequest, DrawResponse, JobAccepted, JobStatus,
                      SEARCH_OVERRIDES, SearchForm, SearchRequest, SearchResponse, json_body, json_or_form)
from .service import EventQueue, Service
from .views import ask_out, draw_out, search_out

SSE_DOC = {"text/event-stream": {"schema": {"type": "string"}, "description": (
    "with `stream: true`: `event: token` with data {\"text\": chunk} per chunk, then one `event: done` whose data is "
    "the AskResponse (an `event: error` with the error envelope instead, when generation fails)")}}
_PREFER_WAIT = re.compile(r"\bwait\s*=\s*(\d+)")


def body_of(json_model, form_model=None) -> Callable:
    """A dependency reading the body as ``json_model`` (or ``form_model``, multipart)."""
    async def read(request: Request):
        return await read_body(request, json_model, form_model)

    return read


def query_image(service: Service, image: str | bytes | None, record_id: str | None):
    """The request's query image: uploaded (base64 in JSON, a file in a form) or a stored record's."""
    if image is not None and record_id is not None:
        raise InvalidRequestError("Give `image` or `record_id`, not both.", param="record_id")
    if record_id is not None:
        return service.record_image(record_id)
    if image is None:
        return None
    return load_image("image", image if isinstance(image, bytes) else decode_base64("image", image))


def build_router(service: Service, jobs: JobRunner, auth: Authenticator, request_timeout_s: float) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["query"])
    read = [Depends(auth.require("read"))]

    @router.post("/search", response_model=SearchResponse, dependencies=read, summary="Retrieve records",
                 openapi_extra=json_or_form(SearchRequest, SearchForm))
    def search(body=Depends(body_of(SearchRequest, SearchForm))) -> SearchResponse:
        """Top-`k` hits for a text, an image (or a stored record's image), or both, reranked when the
        config names a reranker: `SearchPipeline`, as `mmrag search`."""
        image = query_image(service, body.image, body.record_id)
        query = Query.coerce(Query(text=body.text, image=image, reference_text=body.reference_text))
        overrides = {name: getattr(body, name) for name in SEARCH_OVERRIDES if getattr(body, name) is not None}
        hits, timings = service.search(query, body.k, body.where, body.rerank, overrides)
        return search_out(hits, timings)

    @router.post("/ask", response_model=AskResponse, dependencies=read, summary="Answer a question about an image",
                 openapi_extra=json_or_form(AskRequest, AskForm), responses={200: {"content": SSE_DOC}})
    def ask(body=Depends(body_of(AskRequest, AskForm))):
        """`RAGVQAPipeline`, as `mmrag ask`: references retrieved for the image and the question, then
        the VLM's answer and the references it cites."""
        kwargs = dict(image=query_image(service, body.image, body.record_id), k=body.k, where=body.where,
                      rerank=body.rerank, choices=body.choices)
        if not body.stream:
            return ask_out(service.ask(body.question, **kwargs))
        events = service.ask_stream(body.question, **kwargs)
        first = events.get()  # retrieval and the first token: an error here is still a plain HTTP error
        if first[0] == "error":
            raise first[1]
        return EventSourceResponse(_ask_events(first, events))

    @router.post("/draw", response_model=DrawResponse, dependencies=read,
                 summary="Draw a prompt grounded on references",
                 openapi_extra=json_body(DrawRequest), responses={
                     200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                           "description": "the drawing: JSON, or the first image as PNG with `Accept: image/png` "
                                          "or `?format=png`"},
                     202: {"model": JobAccepted, "description": "still drawing after the request timeout (or "
                                                                "`Prefer: respond-async`): poll status_url, whose "
                                                                "result is JSON whatever the Accept header"}})
    def draw(request: Request, body=Depends(body_of(DrawRequest)),
             format: str | None = QueryParam(None, pattern="^(json|png)$", description="json (default) or png")):
        """`EntityImagePipeline`, as `mmrag draw`. Every draw runs as a job; the request waits for it
        up to the server's request timeout (`Prefer: wait=N` waits less, `Prefer: respond-async` not
        at all) and then answers 202 with the job to poll."""
        references = ([load_image(f"references[{i}]", decode_base64(f"references[{i}]", r))
                       for i, r in enumerate(body.references)] if body.references is not None else None)
        want_png = format == "png" or (format is None and _prefers_png(request.headers.get("accept", "")))

        def work(job: Job) -> DrawResponse:
            steps = body.steps if body.steps is not None else service.draw_pipeline.num_inference_steps

            def on_step(pipe, i, t, tensors) -> dict:
                job.progress = {"step": i + 1, "of": steps}
                return {}  # nothing changed: the latents go on as they are

            out = service.draw(body.prompt, k=body.k, references=references, guidance=body.guidance,
                               num_inference_steps=body.steps, seed=body.seed, where=body.where, rerank=body.rerank,
                               height=body.height, width=body.width, num_images_per_prompt=body.num_images,
                               callback_on_step_end=on_step)
            return draw_out(out, given_references=references is not None)

        job = jobs.submit(work)
        if job.done.wait(_wait_s(request.headers.get("prefer", ""), request_timeout_s)):
            if job.failure is not None:
                status, error, headers = job.failure
                return JSONResponse(error, status_code=status, headers=headers)
            if want_png:
                return Response(base64.b64decode(job.result.images[0]), media_type="image/png")
            return job.result
        url = f"/v1/jobs/{job.id}"
        return JSONResponse(JobAccepted(job=job.id, status=job.status, status_url=url).model_dump(), status_code=202,
                            headers={"Location": url})

    @router.get("/jobs/{job_id}", response_model=JobStatus, dependencies=read, summary="A draw job's status")
    def job_status(job_id: str) -> JobStatus:
        """`queued`, `running` (with the steps done), `done` (with the drawing) or `failed` (with the
        error); finished jobs are kept an hour."""
        return JobStatus(**jobs.get(job_id).report())

    return router


async def _ask_events(first: tuple[str, Any], events: EventQueue) -> AsyncIterator[ServerSentEvent]:
    kind, value = first
    while True:
        if kind == "token":
            yield ServerSentEvent(json.dumps({"text": value}), event="token")
        elif kind == "done":
            yield ServerSentEvent(ask_out(value).model_dump_json(), event="done")
            return
        else:
            yield ServerSentEvent(json.dumps(error_status(value)[1]), event="error")
            return
        # a blocking get in a worker thread; abandoned (not waited for) when the client goes away
        kind, value = await anyio.to_thread.run_sync(events.get, abandon_on_cancel=True)


def _prefers_png(accept: str) -> bool:
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "image/png" in types and "application/json" not in types


def _wait_s(prefer: str, timeout_s: float) -> float:
    """RFC 7240: ``Prefer: respond-async`` does not wait; ``Prefer: wait=N`` waits at most N s."""
    if "respond-async" in prefer.lower():
        return 0.0
    found = _PREFER_WAIT.search(prefer.lower())
    return min(timeout_s, float(found.group(1))) if found else timeout_s
