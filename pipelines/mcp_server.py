"""``mmrag mcp``: a knowledge base as an MCP server over stdio, for agents and MCP clients.

Four tools: ``search`` (:class:`~pipelines.search.SearchPipeline`), ``ask``
(:class:`~pipelines.vqa.RAGVQAPipeline`), ``draw`` (:class:`~pipelines.draw.EntityImagePipeline`)
and ``kb_info`` (:meth:`KnowledgeBase.info`). Built on the official MCP Python SDK 2.x
(``MCPServer``, FastMCP's successor); the ``mcp`` extra installs it.

The pipelines are built from one config on the first call that needs them and kept: one
knowledge base, retriever and reranker serve all three, and the VLM too when the reranker (or the
composed-query method) uses it. Models load lazily, on first use. Calls that run models take
turns (the models are not thread-safe); ``kb_info`` does not wait for them.

A typed mmrag error (:class:`~mmrag.errors.MMRAGError`) becomes an error result carrying the
library's one-line message, so an agent can read it and fix its call; any other exception is a
bug, logged with its traceback on stderr, and still an error result: the server keeps serving.
stdout carries the protocol only; logs go to stderr.
"""

# No `from __future__ import annotations`: the SDK reads the tools' annotations, which name
# classes imported inside build_server (the SDK is an optional extra).
import argparse
import base64
import binascii
import contextlib
import inspect
import io
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Sequence

from pydantic import Field, WithJsonSchema
from typing_extensions import TypedDict

from mmrag.errors import MMRAGError
from mmrag.retrievers import ConfigError, Hit, Query
from mmrag.retrievers.errors import MissingExtraError
from mmrag.retrievers.settings import CHANNELS

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from .config import Config
    from .draw import EntityImagePipeline
    from .search import SearchPipeline
    from .vqa import RAGVQAPipeline

log = logging.getLogger("mmrag.mcp")

INSTALL_HINT = 'pip install "mmrag[mcp]"  (the MCP Python SDK, mcp>=2)'
GUIDANCE_NAMES = ("interleaved", "joint", "cfg")


# ------------------------------------------------------------------------------ the tools' outputs
class HitOut(TypedDict):
    """One knowledge-base record found for the query."""

    id: Annotated[str, Field(description="the record's id")]
    rank: Annotated[int, Field(description="1-based position, best first")]
    score: Annotated[float, Field(description="fused score (after a rerank: the reranker's); higher is better")]
    scores: Annotated[dict[str, float], Field(description="each channel's own score (cosine, BM25 for lexical); "
                                                          "'rerank' after a rerank")]
    text: Annotated[str, Field(description="the record's text")]
    source_path: Annotated[str | None, Field(description="where the record came from in its ingested source")]
    metadata: Annotated[dict[str, Any], Field(description="the record's metadata (what `where` filters on)")]
    image_path: Annotated[str | None, Field(description="the stored image file, on the server's machine")]


class SearchOut(TypedDict):
    hits: list[HitOut]


class AskOut(TypedDict):
    answer: Annotated[str, Field(description="the answer (with choices: the chosen option)")]
    references: Annotated[list[HitOut], Field(description="the references shown to the model, as [1]..[k]")]
    cited: Annotated[list[str], Field(description="ids of the references the answer cites")]
    message: Annotated[str | None, Field(description="why it answered without references, when it did")]
    choice_scores: Annotated[list[float] | None, Field(description="with choices: each option's score, in order")]
    timings: Annotated[dict[str, float], Field(description="seconds per stage")]


class DrawOut(TypedDict):
    references: Annotated[list[HitOut], Field(description="the records whose images conditioned the drawing")]
    guidance: Annotated[dict[str, Any], Field(description="the guidance used, with its scales")]
    fallback: Annotated[str | None, Field(description="why no reference conditioned the drawing, when none did")]
    width: int
    height: int
    timings: Annotated[dict[str, float], Field(description="seconds per stage")]


def hit_to_dict(hit: Hit) -> dict[str, Any]:
    """A hit as the tools return it (JSON-ready)."""
    image = hit.record.image
    return {"id": hit.id, "rank": hit.rank, "score": float(hit.score),
            "scores": {name: float(s) for name, s in hit.scores.items()}, "text": hit.record.text,
            "source_path": hit.record.source_path, "metadata": dict(hit.record.metadata),
            "image_path": str(image) if isinstance(image, (str, os.PathLike)) else None}


# ------------------------------------------------------------------------------ the pipelines
class ToolBackend:
    """The pipelines behind the tools, built from ``config`` on first use and shared.

    One knowledge base, retriever and reranker serve search, ask and draw; the VLM answerer also
    serves a ``vlm`` reranker and the PDV / CIReVL composed-query helpers (as ``mmrag search``
    wires them). ``ask`` and ``draw`` get their call defaults from their ``from_config``
    (``vqa.*``, ``draw.*``). Methods that run models must hold :attr:`lock`.
    """

    def __init__(self, config: "Config"):
        self.config = config
        self.lock = threading.Lock()  # one model-running call at a time
        self._kb_lock = threading.Lock()
        self._kb = None
        self._search: "SearchPipeline | None" = None
        self._vqa: "RAGVQAPipeline | None" = None
        self._draw: "EntityImagePipeline | None" = None

    @property
    def kb(self):
        """The knowledge base (opening it loads no model)."""
        with self._kb_lock:
            if self._kb is None:
                from .builders import open_knowledge_base

                self._kb = open_knowledge_base(self.config, create=False)
            return self._kb

    def search(self) -> "SearchPipeline":
        if self._search is None:
            from .builders import build_reranker, build_retriever, vlm_captioner, vlm_rewriter
            from .search import SearchPipeline

            cfg = self.config
            method = cfg.retriever.composed_method
            vlm = self._answering().answerer if cfg.reranker.name == "vlm" or method in ("pdv", "cirevl") else None
            helpers = {}
            if method in ("pdv", "cirevl"):  # as `mmrag search` does: the VLM captions (and rewrites)
                helpers = {"captioner": vlm_captioner(vlm),
                           "rewriter": vlm_rewriter(vlm) if method == "cirevl" else None}
            # what SearchPipeline.from_config builds, on the KB kb_info reads
            self._search = SearchPipeline(build_retriever(cfg, self.kb, **helpers), build_reranker(cfg, vlm=vlm, kb=self.kb))
        return self._search

    def vqa(self) -> "RAGVQAPipeline":
        pipe = self._answering()
        if pipe.retriever is None:
            search = self.search()
            pipe.retriever, pipe.reranker = search.retriever, search.reranker
        return pipe

    def draw(self) -> "EntityImagePipeline":
        if self._draw is None:
            from .cli import _quiet_diffusers
            from .draw import EntityImagePipeline

            _quiet_diffusers()
            search = self.search()
            pipe = EntityImagePipeline.from_config(self.config, with_kb=False)
            pipe.retriever, pipe.reranker = search.retriever, search.reranker
            self._draw = pipe
        return self._draw

    def _answering(self) -> "RAGVQAPipeline":
        """The VQA pipeline with its answerer and ``vqa.*`` defaults, before the shared retriever is attached."""
        if self._vqa is None:
            from .vqa import RAGVQAPipeline

            self._vqa = RAGVQAPipeline.from_config(self.config, with_kb=False)
        return self._vqa


def query_image(image_path: str | None, image_base64: str | None) -> Path | bytes | None:
    """The tools' image argument: a path on the server's machine or base64 file bytes (a ``data:``
    URL too). The pipelines decode and check it as they check any query image."""
    if image_path is not None and image_base64 is not None:
        raise ConfigError("Give `image_path` or `image_base64`, not both.")
    if image_path is not None:
        path = Path(image_path).expanduser()
        if not path.exists():
            raise ConfigError(f"`image_path` {image_path!r} does not exist on the server's machine (working folder "
                              f"{os.getcwd()!r}); give an absolute path, or the image as `image_base64`.")
        return path
    if image_base64 is None:
        return None
    data = image_base64.strip()
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"`image_base64` is not valid base64 ({e}); give the image file's bytes base64-encoded "
                          f"(a data:image/png;base64,... URL works too), got {image_base64[:40]!r}...") from None
    if not raw:
        raise ConfigError("`image_base64` is empty; give the image file's bytes base64-encoded.")
    return raw


# ------------------------------------------------------------------------------ the server
_K = "a positive integer"
# Schema-only constraints: agents see the valid values, and the library (not the schema
# validator) refuses a bad one, with its own message.
Channel = Annotated[str, WithJsonSchema({"type": "string", "enum": list(CHANNELS)})]
GuidanceName = Annotated[str, WithJsonSchema({"type": "string", "enum": list(GUIDANCE_NAMES)})]
PositiveInt = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1})]
TextArg = Annotated[str | None, Field(description=(
    "Query text. Alone: records matching it. With an image: how the result should differ from that image "
    "(a composed query, e.g. 'the same but blue')."))]
ImagePathArg = Annotated[str | None, Field(description=(
    "Query image: a file on the server's machine (JPEG, PNG, WebP, GIF, BMP or TIFF), absolute path "
    "recommended (a relative one is resolved against the server's working folder)."))]
ImageBase64Arg = Annotated[str | None, Field(description=(
    "Query image as its file's bytes, base64-encoded (a data:image/...;base64, URL is accepted). "
    "Give image_path or image_base64, not both."))]


def build_server(config: "Config", *, backend: "ToolBackend | None" = None,
                 log_level: str = "WARNING") -> "MCPServer":
    """The MCP server for the knowledge base of ``config`` (opened now: a bad KB fails here, before
    any client connects; models load on the first call that needs them)."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
    except ImportError as e:
        raise MissingExtraError(f"`mmrag mcp` needs the MCP Python SDK 2.x ({e}): {INSTALL_HINT}.") from None

    from mmrag import __version__

    backend = ToolBackend(config) if backend is None else backend
    kb = backend.kb
    server = MCPServer(
        "mmrag", title="mmrag knowledge base", version=__version__, log_level=log_level,
        instructions=(
            f"A multimodal knowledge base of (image, text) records at {str(kb.path)!r}. `search` finds records "
            "for a text, an image or both; `ask` answers a question (about an image) with a vision-language "
            "model grounded on retrieved records and says which it cites; `draw` draws a prompt grounded on "
            "retrieved reference images (slow without a GPU); `kb_info` describes the knowledge base. Images "
            "go in as a path on the server's machine (image_path) or base64 (image_base64)."),
    )
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                                open_world_hint=False)

    def tool(title: str):
        """Register a tool; its docstring, dedented, is the description agents read."""
        def register(fn):
            server.add_tool(fn, title=title, description=inspect.cleandoc(fn.__doc__), annotations=read_only)
            return fn
        return register

    def error(message: str) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)

    def run(name: str, fn: Callable[[], CallToolResult], *, models: bool = True) -> CallToolResult:
        """``fn()`` (holding the model lock), its typed errors as the library's one-line message."""
        try:
            if not models:
                return fn()
            # stdout is the protocol's: a stray print from any library goes to stderr (the SDK
            # writes the protocol through its own descriptor, not sys.stdout)
            with backend.lock, contextlib.redirect_stdout(sys.stderr):
                return fn()
        except MMRAGError as e:
            log.info("%s: %s", name, e)
            return error(str(e))
        except Exception as e:  # not anticipated: the agent gets one line, the log the traceback
            log.exception("%s: unexpected error", name)
            return error(f"unexpected {type(e).__name__} in mmrag: {e} (the server's log on stderr has the traceback)")

    def result(data: dict[str, Any], text: Any, *extra: Any) -> CallToolResult:
        return CallToolResult(content=[*extra, TextContent(type="text", text=json.dumps(text, indent=1))],
                              structured_content=data)

    @tool("Search the knowledge base")
    def search(
        text: TextArg = None,
        image_path: ImagePathArg = None,
        image_base64: ImageBase64Arg = None,
        k: Annotated[PositiveInt, Field(description=f"Number of hits, {_K} (default 10).")] = 10,
        where: Annotated[dict[str, Any] | None, Field(description=(
            'Metadata filter (Chroma syntax), e.g. {"shape": "star"}, {"year": {"$gte": 2020}} or '
            '{"$and": [{"kind": "dog"}, {"colour": {"$in": ["red", "blue"]}}]}.'))] = None,
        channels: Annotated[list[Channel] | None, Field(description=(
            "Retrieval channels to fuse (default: every one the query allows): text_to_image, text_to_text "
            "and lexical (BM25) need text; image_to_image and image_to_text need an image; composed needs both."
        ))] = None,
    ) -> Annotated[CallToolResult, SearchOut]:
        """Search the knowledge base for records matching a text, an image, or both.

        Give `text`, an image (`image_path` or `image_base64`), or both (a composed query: the image,
        changed as the text says). Hits come best first. Returns a JSON list of hits, each with id,
        rank, score (higher is better), scores (per channel), text, source_path (where the record came
        from), metadata and image_path (the stored image, on the server's machine)."""
        def call() -> CallToolResult:
            image = query_image(image_path, image_base64)
            if text is None and image is None:
                raise ConfigError("Give a query: `text`, an image (`image_path` or `image_base64`), or both.")
            overrides = {} if channels is None else {"channels": list(channels)}
            hits = [hit_to_dict(h) for h in backend.search()(Query(text=text, image=image), k=k, where=where,
                                                               **overrides)]
            return result({"hits": hits}, hits)

        return run("search", call)

    @tool("Answer a question with retrieved references")
    def ask(
        question: Annotated[str, Field(description="The question, e.g. 'What is the name of this building?'.")],
        image_path: Annotated[str | None, Field(description=(
            "The image the question is about: a file on the server's machine (absolute path recommended)."))] = None,
        image_base64: Annotated[str | None, Field(description=(
            "The image the question is about, as its file's bytes base64-encoded (a data: URL is accepted). "
            "Give image_path or image_base64, not both."))] = None,
        k: Annotated[PositiveInt | None, Field(description=f"References to retrieve, {_K} (default: the "
                                                          "server's config, vqa.k).")] = None,
        choices: Annotated[list[str] | None, Field(description=(
            "Multiple choice: at least 2 options; the answer is the most likely one and choice_scores gives "
            "each option's score."))] = None,
    ) -> Annotated[CallToolResult, AskOut]:
        """Answer a question, usually about an image, grounded on records retrieved from the knowledge base.

        A vision-language model sees the image, then the top-k retrieved reference images with their
        texts labelled [1]..[k], then the question, and answers citing references by number. Returns
        answer, references (the records shown, in order [1]..[k]), cited (ids of the references the
        answer cites), message (why it answered without references, when it did), choice_scores (with
        choices) and timings (seconds per stage)."""
        def call() -> CallToolResult:
            image = query_image(image_path, image_base64)
            out = backend.vqa()(question, image=image, k=k, choices=choices)
            data = {"answer": out.answer, "references": [hit_to_dict(h) for h in out.references],
                    "cited": [h.id for h in out.cited], "message": out.message,
                    "choice_scores": out.choice_scores, "timings": out.timings}
            return result(data, data)

        return run("ask", call)

    @tool("Draw a prompt grounded on reference images")
    def draw(
        prompt: Annotated[str, Field(description="What to draw, e.g. 'a Shiba Inu wearing a red scarf, in the snow'.")],
        k: Annotated[PositiveInt | None, Field(description=f"Reference images to retrieve, {_K} (default: the "
                                                          "server's config, draw.k).")] = None,
        guidance: Annotated[GuidanceName | None, Field(description=(
            "How the text and the references steer the drawing, at the configured scales: interleaved "
            "(Re-Imagen: each step enhances either the text or the references), joint (both every step: 3 "
            "denoiser passes a step instead of 2, slower) or cfg (plain classifier-free guidance: text and "
            "references dropped together). Default: the server's config, draw.guidance."))] = None,
        steps: Annotated[PositiveInt | None, Field(description=(
            f"Denoising steps (num_inference_steps), {_K} (default: the server's config, "
            "draw.num_inference_steps); more is slower."))] = None,
        seed: Annotated[int | None, Field(description="Random seed: the same seed and arguments draw the same "
                                                      "image (default: a random one).")] = None,
    ) -> Annotated[CallToolResult, DrawOut]:
        """Draw an image of `prompt`, grounded on reference images retrieved from the knowledge base for it.

        The references condition Stable Diffusion through an IP-Adapter (Re-Imagen-style guidance),
        so entities the diffusion model does not know look like their records. Returns the image
        (PNG) and a JSON text with the references used, the guidance, a fallback note (when no
        reference was used), the size and timings. Slow without a GPU."""
        def call() -> CallToolResult:
            out = backend.draw()(prompt, k=k, guidance=guidance, num_inference_steps=steps, seed=seed)
            image = out.images[0]
            png = io.BytesIO()
            image.save(png, format="PNG")
            data = {"references": [hit_to_dict(h) for h in out.references], "guidance": out.guidance,
                    "fallback": out.fallback, "width": image.width, "height": image.height, "timings": out.timings}
            picture = ImageContent(type="image", data=base64.b64encode(png.getvalue()).decode("ascii"),
                                   mime_type="image/png")
            return result(data, data, picture)

        return run("draw", call)

    @tool("Describe the knowledge base")
    def kb_info() -> Annotated[CallToolResult, dict[str, Any]]:
        """The knowledge base: path, backend, record count, vector and image counts, embedder model,
        vector dimension, schema and library versions, creation time and bytes on disk."""
        def call() -> CallToolResult:
            info = backend.kb.info()
            return result(info, info)

        return run("kb_info", call, models=False)

    return server


# ------------------------------------------------------------------------------ command line
def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_kb

    _add_kb(p)


def add_mcp_parser(sub, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``mcp`` subcommand on ``mmrag``'s subparsers (``parents``: the options model commands take)."""
    p = sub.add_parser("mcp", parents=list(parents),
                       help="serve the knowledge base to MCP clients over stdio (tools: search, ask, draw, kb_info)",
                       description="An MCP server over stdio: stdout carries the protocol, logs go to stderr. "
                                   "Models load on the first tool call that needs them. Needs " + INSTALL_HINT + ".")
    _add_arguments(p)
    return p


def cmd_mcp(args) -> int:
    """``mmrag mcp``: serve until the client closes stdin."""
    from .cli import _config

    config = _config(args, **{"kb.path": args.kb, "kb.url": args.url})
    verbose = args.verbose or os.environ.get("MMRAG_LOG", "").lower() == "debug"
    level = "INFO" if verbose else "WARNING"
    # Other libraries' records on stderr at this level. The SDK would otherwise install a root
    # handler without one, letting through the DEBUG records of loggers that set their own level.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    server = build_server(config, log_level=level)
    log.info("serving %s over stdio", config.kb.path)
    server.run("stdio")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmrag.pipelines.mcp_server --kb DIR``: the same as ``mmrag mcp``."""
    from .cli import EXIT_ERROR, _common, _configure_logging, _quiet_libraries

    parser = argparse.ArgumentParser(prog="mmrag mcp", parents=[_common()],
                                     description="Serve a knowledge base to MCP clients over stdio.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, os.environ.get("MMRAG_LOG", ""))
    if not (args.verbose or os.environ.get("MMRAG_LOG", "").lower() == "debug" or os.environ.get("MMRAG_DEBUG")):
        _quiet_libraries()
    try:
        return cmd_mcp(args)
    except KeyboardInterrupt:
        return 130
    except MMRAGError as e:
        print(f"mmrag mcp: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
