"""POST /v1/chat/completions: the RAG-VQA pipeline behind OpenAI's chat-completions API, so that
OpenAI clients (the ``openai`` package, chat UIs) can talk to a knowledge base.

How a request maps onto :class:`RAGVQAPipeline`:

- the **last user message** is the question: its text parts, joined by newlines, are the question
  and its one ``image_url`` part (at most one) is the query image. System messages and earlier turns
  are not used: the pipeline answers one question with references, it is not a chat model.
- images must be ``data:`` URLs (``data:image/png;base64,...``); an http(s) URL is refused with 400,
  because a server that fetches URLs given by clients can be made to reach internal addresses.
- ``model`` may be any string; it is echoed back. The configured VLM (``vlm.model``) answers.
- sampling parameters (``temperature``, ``top_p``, ``max_tokens``, ...) are accepted and not used:
  the config decides (``vlm.do_sample``, ``vlm.max_new_tokens``); ``n`` must be 1.
- mmrag's own options go in an extra ``mmrag`` object: ``{"k": 3, "where": {...}, "rerank": true}``
  (with the ``openai`` package: ``extra_body={"mmrag": {...}}``).

Citations come back in an extra ``mmrag`` field, on the completion and on the last stream chunk:
``{"references": [{id, score, text, source_path, image_url}], "cited": [ids], "no_retrieval",
"message", "timings"}``. The answer's ``[1]``, ``[2]`` markers index ``references``. With the
``openai`` package read it as ``completion.model_extra["mmrag"]``.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any, AsyncIterator, Literal

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..outputs import VQAOutput
from .auth import Authenticator
from .errors import InvalidRequestError, error_status
from .payloads import decode_base64, load_image
from .routes_query import body_of
from .schemas import MAX_K, ReferenceOut, RequestModel, json_body
from .service import EventQueue, Service
from .views import reference_out


# ---------------------------------------------------------------------------- requests
class _OpenAIShape(BaseModel):
    # OpenAI's objects grow fields; clients send ones this server has no use for (see the docstring)
    model_config = ConfigDict(extra="allow")


class ImageURL(_OpenAIShape):
    url: str = Field(description="a data: URL (data:image/png;base64,...); http(s) URLs are refused")
    detail: str | None = None


class TextPart(_OpenAIShape):
    type: Literal["text"]
    text: str


class ImagePart(_OpenAIShape):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_OpenAIShape):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class MMRAGOptions(RequestModel):
    k: int | None = Field(None, ge=1, le=MAX_K, description="references (default: vqa.k)")
    where: dict[str, Any] | None = Field(None, description="metadata filter for the references")
    rerank: bool = True


class ChatRequest(_OpenAIShape):
    model: str = Field(description="any name; echoed back (the server's configured VLM answers)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int | None = Field(None, ge=1, le=1, description="must be 1 when given")
    mmrag: MMRAGOptions | None = Field(None, description="mmrag's retrieval options")


# ---------------------------------------------------------------------------- responses
class Citations(BaseModel):
    references: list[ReferenceOut] = Field(description="in prompt order: the answer's [1] is the first")
    cited: list[str] = Field(description="ids of the references the answer cites")
    no_retrieval: bool
    message: str | None
    timings: dict[str, float]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    mmrag: Citations


BODY_MODELS = [ChatRequest]


def build_router(service: Service, auth: Authenticator) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.post("/chat/completions", response_model=ChatCompletion, dependencies=[Depends(auth.require("read"))],
                 summary="OpenAI-compatible chat completions (RAG-VQA)", openapi_extra=json_body(ChatRequest),
                 responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                  "description": "with `stream: true`: `chat.completion.chunk` objects as `data:` "
                                                 "lines, the last with `mmrag`, then `data: [DONE]`"}})
    def chat_completions(body=Depends(body_of(ChatRequest))):
        question, image = _question(body.messages)
        options = body.mmrag or MMRAGOptions()
        kwargs = dict(image=image, k=options.k, where=options.where, rerank=options.rerank)
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            out = service.ask(question, **kwargs)
            return ChatCompletion(id=completion_id, created=created, model=body.model,
                                  choices=[Choice(message=AssistantMessage(content=out.answer))], mmrag=_citations(out))
        events = service.ask_stream(question, **kwargs)
        first = events.get()
        if first[0] == "error":
            raise first[1]
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
        return EventSourceResponse(_chunks(first, events, head))

    return router


def _question(messages: list[ChatMessage]) -> tuple[str, Any]:
    """The last user message's text and its image (checked), or a 400 naming the message."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise InvalidRequestError("`messages` has no user message: the last user message is the question.",
                                  param="messages")
    i = users[-1]
    content = messages[i].content
    if content is None or isinstance(content, str):
        return content or "", None
    text = "\n".join(p.text for p in content if isinstance(p, TextPart))
    urls = [p.image_url.url for p in content if isinstance(p, ImagePart)]
    param = f"messages[{i}].content"
    if len(urls) > 1:
        raise InvalidRequestError(f"`{param}` has {len(urls)} images; the question is about one image.", param=param)
    if not urls:
        return text, None
    if not urls[0].startswith("data:"):
        raise InvalidRequestError(
            f"`{param}` has the image URL {urls[0][:80]!r}, which is not a data: URL. This server does not fetch URLs: "
            "send the image inline, as 'data:image/png;base64,...'.", param=param)
    return text, load_image(param, decode_base64(param, urls[0]))


def _citations(out: VQAOutput) -> Citations:
    return Citations(references=[reference_out(h) for h in out.references], cited=[h.id for h in out.cited],
                     no_retrieval=out.no_retrieval, message=out.message, timings=out.timings)


async def _chunks(first: tuple[str, Any], events: EventQueue, head: dict[str, Any]) -> AsyncIterator[ServerSentEvent]:
    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> ServerSentEvent:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return ServerSentEvent(json.dumps({**head, "choices": [choice], **extra}))

    yield chunk({"role": "assistant", "content": ""})
    kind, value = first
    while True:
        if kind == "token":
            yield chunk({"content": value})
        elif kind == "done":
            yield chunk({}, "stop", mmrag=_citations(value).model_dump())
            yield ServerSentEvent("[DONE]")
            return
        else:  # OpenAI's clients raise an APIError for a chunk with "error"
            yield ServerSentEvent(json.dumps(error_status(value)[1]))
            return
        kind, value = await anyio.to_thread.run_sync(events.get, abandon_on_cancel=True)
