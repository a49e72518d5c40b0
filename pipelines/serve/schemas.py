"""Request and response models of the HTTP API (pydantic): they validate requests and generate the
OpenAPI schema at ``/openapi.json``, so the schema is the code.

Requests forbid unknown fields (a typo is a 422 naming it, never ignored), refuse NaN and infinity,
and bound the sizes a request may ask for (``k``, steps, images) so that one request cannot make
the service do unbounded work; the bounds are the server's, the library has none.
Images travel as base64 (a ``data:`` URL is accepted too) in JSON, or as files in multipart forms.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import models_json_schema

from mmrag.generators.guidance import GUIDANCES
from mmrag.retrievers.hubness import METHODS as HUBNESS_METHODS
from mmrag.retrievers.settings import CHANNELS, COMPOSED_METHODS, FUSIONS

MAX_K = 100  # hits or references per request
MAX_STEPS = 200
MAX_IMAGES = 8  # drawn per request, and reference images given to a draw
MAX_SIDE = 2048  # pixels of a drawing
MAX_RECORDS = 1000  # per upload
MAX_PAGE = 1000  # records per page of GET /v1/records

Channel = Literal[tuple(CHANNELS)]  # type: ignore[valid-type]
GuidanceName = Literal[tuple(GUIDANCES)]  # type: ignore[valid-type]
Fusion = Literal[tuple(FUSIONS)]  # type: ignore[valid-type]
ComposedMethod = Literal[tuple(COMPOSED_METHODS)]  # type: ignore[valid-type]
Hubness = Literal[(*HUBNESS_METHODS, "none")]  # type: ignore[valid-type]
# the retriever settings a search request may set; the rest (and the models) are the server's config
SEARCH_OVERRIDES = ("channels", "fusion", "composed_method", "hubness")

IMAGE_DOC = ("base64 of an encoded image (JPEG, PNG, WebP, GIF, BMP or TIFF), or a data: URL; it gets the checks "
             "an ingested image gets (format allow-list, pixel and aspect-ratio limits)")


def _no_surrogates(value: Any, name: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``); Chroma and the tokenizers store and read
    UTF-8 only and fail on them deep inside, so they are refused here, naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"`{name}` is not valid UTF-8 text (lone surrogate at position {e.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_surrogates(k, name)
            _no_surrogates(v, name)
    elif isinstance(value, list):
        for v in value:
            _no_surrogates(v, name)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _utf8(cls, value: Any, info) -> Any:
        _no_surrogates(value, info.field_name)
        return value


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- errors
class ErrorBody(_Response):
    type: str = Field(description="invalid_request, authentication_error, permission_denied, not_found, conflict, "
                                  "payload_too_large, all_rejected, invalid_item, busy, model_unavailable, "
                                  "internal_error, ...")
    message: str = Field(description="what is wrong and how to fix it (the library's own message)")
    param: str | None = Field(None, description="the request field at fault, when one is")
    report: IngestReportOut | None = Field(None, description="all_rejected only: the ingest report with the reasons")


class ErrorEnvelope(_Response):
    error: ErrorBody


# ---------------------------------------------------------------------------- queries
class _QueryFields(RequestModel):
    record_id: str | None = Field(None, description="use this record's stored image as the query image")
    where: dict[str, Any] | None = Field(None, description='Chroma metadata filter, e.g. {"kind": "dog"}')
    rerank: bool = Field(True, description="apply the configured reranker (if any)")


class _SearchFields(_QueryFields):
    text: str | None = Field(None, description="query text (with an image: the modifier of a composed query)")
    reference_text: str | None = Field(None, description="description of the image (composed method pdv)")
    channels: list[Channel] | None = Field(None, description="restrict to these channels (default: all the query "
                                                             "allows)", max_length=len(CHANNELS))
    k: int = Field(10, ge=1, le=MAX_K, description="number of hits")
    fusion: Fusion | None = Field(None, description="rrf (reciprocal rank fusion) or weighted (scaled scores); "
                                                    "default: the server's retriever.fusion")
    composed_method: ComposedMethod | None = Field(None, description="for image + text: weimocir, pdv or cirevl; "
                                                                     "default: the server's retriever.composed_method")
    hubness: Hubness | None = Field(None, description="hubness normalisation: qbnorm, dbnorm, or none (off); "
                                                      "default: the server's retriever.hubness")


class SearchRequest(_SearchFields):
    """A text, an image (or a record's image), or both."""

    image: str | None = Field(None, description=IMAGE_DOC)


class SearchForm(_SearchFields):
    """The multipart form of POST /v1/search: the same fields, the image as a file; ``where`` is JSON
    text, ``channels`` repeats."""

    image: bytes | None = Field(None, description="the query image file")


class _AskFields(_QueryFields):
    question: str = Field(description="the question about the image")
    k: int | None = Field(None, ge=1, le=MAX_K, description="references (default: the config's vqa.k)")
    choices: list[str] | None = Field(None, min_length=2, max_length=26,
                                      description="multiple choice: the most likely option is the answer")
    stream: bool = Field(False, description="server-sent events: `token` events, then one `done` event")


class AskRequest(_AskFields):
    image: str | None = Field(None, description=IMAGE_DOC)


class AskForm(_AskFields):
    """The multipart form of POST /v1/ask: the same fields, the image as a file; ``where`` is JSON
    text, ``choices`` repeats."""

    image: bytes | None = Field(None, description="the image the question is about")


class PartOut(_Response):
    """One part of a retrieved interleaved document, as the hit gives it."""

    index: int = Field(description="0-based position in the document")
    kind: Literal["text", "image"]
    score: float = Field(description="cosine with the query (the mean over its text and image)")
    text: str | None = Field(description="a passage's text (null for an image)")
    source_path: str | None = Field(description="an image part as its manifest wrote it")


class HitOut(_Response):
    id: str
    rank: int
    score: float = Field(description="fused score (after a rerank: the reranker's)")
    scores: dict[str, float] = Field(description="each channel's own score, and 'rerank'")
    text: str
    source_path: str | None = Field(description="where the record came from in its source")
    metadata: dict[str, Any]
    image_url: str
    parts: list[PartOut] = Field(default_factory=list,
                                 description="an interleaved document's best parts for the query, best first")


class SearchResponse(_Response):
    hits: list[HitOut]
    collapsed: int = Field(description="near-duplicates left out")
    timings: dict[str, float] = Field(description="seconds per stage")


class ReferenceOut(_Response):
    id: str
    rank: int = Field(description="1-based, in the order the pipeline ranked the references")
    score: float
    scores: dict[str, float] = Field(description="each channel's own score, and 'rerank'")
    text: str
    source_path: str | None
    metadata: dict[str, Any]
    image_url: str | None = Field(description="null for an image given with the request")
    parts: list[PartOut] = Field(default_factory=list,
                                 description="an interleaved document's parts in the prompt, best first")


class AskResponse(_Response):
    """``VQAOutput.to_dict()``, with each reference's image as a URL (server paths are not shown)."""

    answer: str
    choice: str | None
    choice_scores: list[float] | None
    references: list[ReferenceOut] = Field(description="in prompt order, [1]..[k]")
    cited: list[str] = Field(description="ids of the references the answer cites")
    prompt: str = Field(description="the prompt the VLM was given, its images as the model's placeholders")
    no_retrieval: bool
    message: str | None
    dropped: list[str] = Field(description="ids left out because the prompt would not fit the model")
    timings: dict[str, float]


# ---------------------------------------------------------------------------- draw and jobs
class DrawRequest(RequestModel):
    prompt: str
    k: int | None = Field(None, ge=1, le=MAX_K, description="references (default: draw.k)")
    guidance: GuidanceName | None = Field(None, description="at the configured scales (default: draw.guidance)")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                              description="denoising steps (default: draw.num_inference_steps)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="for a reproducible drawing")
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    width: int | None = Field(None, ge=8, le=MAX_SIDE)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    references: list[str] | None = Field(None, max_length=MAX_IMAGES,
                                         description="reference images (base64); skips retrieval")
    where: dict[str, Any] | None = None
    rerank: bool = True


class DrawResponse(_Response):
    images: list[str] = Field(description="base64 PNGs")
    references: list[ReferenceOut]
    guidance: dict[str, Any] = Field(description="the guidance actually used")
    fallback: str | None = Field(description="why the requested guidance was replaced, if it was")
    timings: dict[str, float]
    # retrieve-or-generate (draw.decide in the server's config); all null when the server did not decide
    decision: Literal["retrieved", "generated"] | None = Field(
        None, description="retrieved: `images` is the best reference's stored image and nothing was drawn")
    decision_score: float | None = Field(None, description="the best reference's text->image cosine with the prompt")
    decision_threshold: float | None = None
    decision_reason: str | None = None


class JobAccepted(_Response):
    job: str
    status: Literal["queued", "running", "done", "failed"]
    status_url: str


class JobProgress(_Response):
    step: int
    of: int


class JobStatus(_Response):
    job: str
    status: Literal["queued", "running", "done", "failed"]
    created: float = Field(description="Unix time")
    started: float | None
    finished: float | None
    progress: JobProgress | None = Field(description="denoising steps done")
    result: DrawResponse | None
    error: ErrorBody | None


# ---------------------------------------------------------------------------- records
class RecordIn(RequestModel):
    text: str
    image: str = Field(description=IMAGE_DOC)
    id: str | None = Field(None, description="default: derived from the image and text (re-uploads add nothing)")
    metadata: dict[str, Any] = Field(default_factory=dict)
    source_path: str | None = Field(None, description="where the item came from, kept as provenance")


class RecordsRequest(RequestModel):
    records: list[RecordIn] = Field(min_length=1, max_length=MAX_RECORDS)


class RecordsForm(RequestModel):
    """The multipart form of POST /v1/records: ``files`` repeat; ``texts`` and ``ids`` repeat in the
    files' order; ``metadata`` is one JSON array of objects, one per file."""

    files: list[bytes] = Field(min_length=1, max_length=MAX_RECORDS)
    texts: list[str] | None = None
    ids: list[str] | None = None
    metadata: str | None = Field(None, description="JSON array of objects, one per file")


class Rejected(_Response):
    ref: str
    reason: str


class IngestReportOut(_Response):
    """``IngestReport.to_dict()``, plus each rejected item with its reason."""

    added: int
    updated: int
    existing: int
    duplicates: int
    rejected: int
    seen: int
    all_rejected: bool
    notes: dict[str, int]
    texts_truncated: int
    seconds: float
    timings: dict[str, float]
    rejections: list[Rejected]


class RecordOut(_Response):
    id: str
    text: str
    metadata: dict[str, Any]
    source_path: str | None
    image_url: str


class RecordsPage(_Response):
    records: list[RecordOut]
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; null on the last one")


class Deleted(_Response):
    deleted: int


# ---------------------------------------------------------------------------- service
class KBInfo(BaseModel):
    """``KnowledgeBase.info()``."""

    model_config = ConfigDict(extra="allow")
    path: str
    backend: str
    url: str | None
    count: int
    image_vectors: int
    text_vectors: int
    images_stored: int
    embedder: str
    dim: int
    schema_version: int
    library_version: str
    created_at: str
    bytes_on_disk: int


class Health(_Response):
    status: Literal["ok"]
    version: str


for _model in (ErrorBody, ErrorEnvelope, JobStatus):  # ErrorBody names IngestReportOut, defined after it
    _model.model_rebuild()

# Models only referenced from hand-written request bodies (a route reads JSON or a multipart form
# itself, which FastAPI cannot declare): added to the OpenAPI components by add_body_schemas().
BODY_MODELS = [SearchRequest, SearchForm, AskRequest, AskForm, DrawRequest, RecordsRequest, RecordsForm]


def json_or_form(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that takes ``json_model`` as JSON or ``form_model`` as a form."""
    extra = json_body(json_model)
    extra["requestBody"]["content"]["multipart/form-data"] = {"schema": _ref(form_model)}
    return extra


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads ``model`` as JSON itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def add_body_schemas(openapi: dict[str, Any], models: list[type[BaseModel]]) -> dict[str, Any]:
    """Add ``models`` (and the models they use) to ``openapi``'s components, keeping FastAPI's own."""
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return openapi
