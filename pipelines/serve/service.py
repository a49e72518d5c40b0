"""The warm library objects behind the HTTP API: one knowledge base, one retriever, one reranker,
and the search, VQA and drawing pipelines built on them once, on first use.

Nothing here reimplements a stage: each request calls :class:`SearchPipeline`,
:class:`RAGVQAPipeline` or :class:`EntityImagePipeline` exactly as the CLI does. The pipelines are
built by their own ``from_config(..., with_kb=False)`` (so their settings come from the config the
way the CLI's do) and then given the shared retriever and reranker, instead of each opening the
KB again and loading its own copy of the embedder and the reranker.

Concurrency: Hugging Face fast tokenizers are not safe to call from several threads at once (one
shared by two threads can fail with "Already borrowed": a call that sets padding or truncation
changes the shared Rust object), torch promises no thread safety for modules, and two generations
at once on one device only split it and double the memory. So every call that runs a model holds
``model_lock``: search (it embeds the query), ask, draw, and uploads (they embed the images). KB
reads (records, info) do not take it and run concurrently; writes also go through the KB's own
writer lock.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from PIL import Image

from mmrag.retrievers import Hits, KnowledgeBase, Query, Record

from ..builders import build_reranker, build_retriever, open_knowledge_base
from ..config import Config
from ..draw import EntityImagePipeline, ImageOutput
from ..search import SearchPipeline
from ..vqa import RAGVQAPipeline, VQAOutput
from .errors import NotFoundError

Emit = Callable[[str, Any], None]


class Service:
    """The models and the KB of one ``mmrag serve``. Opening the KB happens here, at once (a wrong
    ``kb.path`` fails at startup); every model loads lazily, once."""

    def __init__(self, config: Config):
        self.config = config
        self.kb: KnowledgeBase = open_knowledge_base(config, create=False)
        self.model_lock = threading.Lock()
        self._build_lock = threading.RLock()  # builds each component once, whichever request comes first
        self._built: dict[str, Any] = {}

    # ------------------------------------------------------------------ components, built once
    def _once(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._built:
            with self._build_lock:  # re-entrant: a component's build asks for the ones it needs
                if name not in self._built:
                    self._built[name] = build()
        return self._built[name]

    @property
    def answerer(self):
        """The VQA pipeline's VLM, also the ``vlm`` reranker's and the composed queries' captioner."""
        return self._bare_vqa.answerer

    @property
    def _bare_vqa(self) -> RAGVQAPipeline:
        return self._once("bare_vqa", lambda: RAGVQAPipeline.from_config(self.config, with_kb=False))

    @property
    def retriever(self):
        def build():
            cfg, captioner, rewriter = self.config, None, None
            method = cfg.retriever.composed_method
            if method in ("cirevl", "pdv"):  # composed queries that caption with the VLM, as `mmrag search`
                from ..builders import vlm_captioner, vlm_rewriter

                # looked up per call: the VLM is built (and loaded) only when a composed query needs it
                def captioner(image):
                    return vlm_captioner(self.answerer)(image)

                def rewrite(caption, modifier):
                    return vlm_rewriter(self.answerer)(caption, modifier)

                rewriter = rewrite if method == "cirevl" else None
            return build_retriever(cfg, self.kb, captioner=captioner, rewriter=rewriter)

        return self._once("retriever", build)

    @property
    def reranker(self):
        # the vlm reranker scores with the answering VLM instead of loading a second copy of it
        return self._once("reranker", lambda: build_reranker(
            self.config, vlm=self.answerer if self.config.reranker.name == "vlm" else None, kb=self.kb))

    @property
    def search_pipeline(self) -> SearchPipeline:
        return self._once("search", lambda: SearchPipeline(self.retriever, self.reranker))

    @property
    def vqa(self) -> RAGVQAPipeline:
        def build():
            pipe = self._bare_vqa
            pipe.retriever, pipe.reranker = self.retriever, self.reranker
            return pipe

        return self._once("vqa", build)

    @property
    def draw_pipeline(self) -> EntityImagePipeline:
        def build():
            pipe = EntityImagePipeline.from_config(self.config, with_kb=False)
            pipe.retriever, pipe.reranker = self.retriever, self.reranker
            return pipe

        return self._once("draw", build)

    # ------------------------------------------------------------------ requests
    def record(self, record_id: str, param: str = "record_id") -> Record:
        found = self.kb.get([record_id])
        if not found:
            raise NotFoundError(f"No record with id {record_id!r} in the knowledge base.", param=param)
        return found[0]

    def record_image(self, record_id: str) -> Image.Image:
        """A record's stored image as a query image (it passed ingestion's checks once; the query
        path checks it again, as it does every image)."""
        return Query.coerce(Query(image=self.record(record_id).image)).image

    def search(self, query: Query, k: int, where: dict | None, rerank: bool,
               overrides: dict[str, Any]) -> tuple[Hits, dict[str, float]]:
        """``overrides``: retriever settings of this request only (``channels``, ``fusion``,
        ``composed_method``, ``hubness``; ``hubness="none"`` turns a configured one off)."""
        timings: dict[str, float] = {}
        overrides = dict(overrides)
        if "channels" in overrides:  # an empty list: every channel the query allows, as when left out
            channels = tuple(overrides.pop("channels"))
            overrides.update({"channels": channels} if channels else {})
        if overrides.get("hubness") == "none":
            overrides["hubness"] = None
        with self.model_lock:
            hits = self.search_pipeline(query, k=k, where=where, rerank=rerank, timings=timings, **overrides)
        return hits, timings

    def ask(self, question: str, **kwargs: Any) -> VQAOutput:
        with self.model_lock:
            return self.vqa(question, **kwargs)

    def ask_stream(self, question: str, **kwargs: Any) -> "EventQueue":
        """A streamed answer, generated in its own thread: events ``("token", text)``..., then
        ``("done", VQAOutput)``, or ``("error", exception)`` at any point."""

        def run(emit: Emit) -> None:
            with self.model_lock:  # for the whole generation, released by the thread that took it
                stream = self.vqa(question, stream=True, **kwargs)
                for chunk in stream:
                    emit("token", chunk)
            emit("done", stream.result)

        return EventQueue(run)

    def draw(self, prompt: str, **kwargs: Any) -> ImageOutput:
        with self.model_lock:
            return self.draw_pipeline(prompt, **kwargs)

    def add_records(self, records: list[Record]):
        with self.model_lock:  # ingestion embeds every image and text with the query embedder
            return self.kb.add(records, batch_size=self.config.ingest.batch_size)

    def delete_record(self, record_id: str) -> int:
        return self.kb.delete([record_id])


class EventQueue:
    """Runs ``run(emit)`` in a daemon thread and hands its events over through a queue.

    The worker, not the HTTP response, owns the generation: a client that disconnects mid-answer
    leaves it to finish (generation is bounded by ``vlm.max_new_tokens``) and release the model
    lock from the thread that took it, instead of leaving the lock to a generator nobody closes."""

    def __init__(self, run: Callable[[Emit], None]):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True, name="mmrag-serve-answer")
        self._thread.start()

    def _work(self, run: Callable[[Emit], None]) -> None:
        try:
            run(lambda kind, value: self._queue.put((kind, value)))
        except BaseException as error:  # handed to the response, which reports it
            self._queue.put(("error", error))

    def get(self) -> tuple[str, Any]:
        """The next event (blocks until there is one)."""
        return self._queue.get()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            kind, value = self.get()
            yield kind, value
            if kind in ("done", "error"):
                return
