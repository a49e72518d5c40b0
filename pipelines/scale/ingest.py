"""Distributed ingestion on Ray Data: read and decode in tasks, embed in an actor pool, write
through the KB's one journaled writer.

    source ──► read units ──► prepare (tasks) ──► embed (actors, map_batches) ──► driver: KB write path
               a shard each,   validate, decode,    DualEncoder per actor,          dedupe, lookup,
               or 64 listed    normalise, hash      concurrency=N, num_gpus          journal, Chroma
               items

What is distributed is what costs: reading and decoding images, and the embedding model. What is
not is the write: the driver holds the KB's writer lock and hands each batch to
:meth:`Ingestion.consume`, the serial ingestion's own code. So the result equals a serial ingest
(same ids, metadata and images; vectors equal to float32 noise, since batches are composed
differently), with the same report, idempotence and journal. Ray keeps the source's order
(``preserve_order``), so even the first-seen rules for repeated ids agree.

Faults: Ray retries a read task whose worker dies (Ray's default, 3 times) and restarts a dead
embedding actor and resubmits its batch (Ray Data's default for actor pools: no limit); a retried
task's rows replace the lost ones, never add to them, and the writer drops repeated ids in any case. A driver that dies loses at most the batch being written (the journal rolls it back
or forward on the next open); re-running finds what landed (ids are content-derived or the
user's) and adds the rest. A record already in the KB is not embedded again: the actors skip ids
the KB held when the run started, and the writer's lookup confirms they are unchanged (a changed
one is embedded by the driver).

Folder and manifest items are listed by the driver (paths and texts, no pixels) and read by the
tasks, so in a cluster the source's files must be visible to every worker at the same path (a
shared file system or object-store mount); WebDataset shards are opened by the tasks themselves.
Remote (http) manifest images are fetched by the driver while listing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmrag.retrievers.errors import ConfigError, InvalidItemError
from mmrag.retrievers.kb.ingest import Ingestion, PreparedItem, prepare_item, progress_bar
from mmrag.retrievers.kb.records import IngestReport, Rejection, SourceItem
from mmrag.retrievers.kb.sources import count_source, describe_source, iter_source, source_parts

from .ray_runtime import actor_cpus, gpus_available, init_ray

logger = logging.getLogger(__name__)

LISTED_PER_UNIT = 64  # folder or manifest items per read task


def ray_ingest(kb: Any, source: Any, *, address: str | None = None, concurrency: int = 1,
               num_gpus: float | None = None, batch_size: int = 64, base_dir: str | None = None,
               num_cpus: float | None = None, progress: bool | Callable[[int], None] = False,
               embed_actor: type | None = None) -> IngestReport:
    """Ingest ``source`` into ``kb`` with Ray Data; the same result and report as ``kb.ingest``.

    Args:
        kb: an open :class:`~mmrag.retrievers.KnowledgeBase` (its embedder names the model the
            actors load; its limits are the tasks').
        source: what ``kb.ingest`` takes: a folder, a JSONL/CSV manifest, WebDataset ``.tar``
            shards (a glob or a list; each shard is read by its own task), or records.
        address: a Ray cluster (``"auto"``, ``"ray://HOST:10001"``); None starts a local Ray.
        concurrency: embedding actors (each holds one copy of the model).
        num_gpus: GPUs per actor; None: 1 where the cluster has GPUs and the KB's embedder is not
            pinned to the CPU, else 0.
        num_cpus: CPUs per actor (Ray sets its torch threads from it); None: 1 while that leaves
            a CPU for the read tasks (on 2 CPUs, 2 actors get 0.5 each).
        batch_size: items per embedding call and per write.
        embed_actor: the actor class (default :class:`EmbedActor`); a subclass may add behaviour.
    """
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float))
                                 or num_gpus < 0):
        raise ConfigError(f"`num_gpus` must be a number >= 0 (GPUs per embedding actor) or None, got {num_gpus!r}.")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float))
                                 or num_cpus <= 0):
        raise ConfigError(f"`num_cpus` must be a number > 0 (CPUs per embedding actor) or None, got {num_cpus!r}.")
    parts = source_parts(source, base_dir=base_dir)  # a bad source fails before Ray starts
    ray = init_ray(address)
    embedder = kb.embedder
    if num_gpus is None:
        num_gpus = 1 if gpus_available(ray) and str(embedder.device) != "cpu" else 0
    label = describe_source(source)
    total = count_source(source) if progress and not callable(progress) else None
    bar = progress_bar(progress, total=total)
    start = time.perf_counter()
    try:
        with kb.journal.write_lock():
            known = set(kb.vectors.all_ids())
            units = list(_units(source, parts, kb.allow_remote, base_dir))
            ingestion = Ingestion(kb, label)
            if units:
                dataset = _dataset(ray, units, kb, label, known, concurrency, num_gpus,
                                   actor_cpus(ray, concurrency, num_cpus), batch_size, embed_actor or EmbedActor)
                waited = time.perf_counter()
                for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
                    ingestion.report.time("distributed", time.perf_counter() - waited)
                    done = _write(ingestion, batch)
                    bar(done)
                    waited = time.perf_counter()
    finally:
        bar(None)
    report = ingestion.report
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------- read units
def _units(source: Any, parts: list[tuple[Path, str]] | None, allow_remote: bool,
           base_dir: str | None) -> Iterator[dict[str, Any]]:
    """What each read task gets, in source order: a shard path, or a list of listed items."""
    if parts is None:  # records in memory: listed here
        yield from _listed(iter_source(source))
        return
    for path, kind in parts:
        if kind == "tar":
            yield {"shard": str(path), "items": None}
        else:
            yield from _listed(iter_source(path, allow_remote=allow_remote, base_dir=base_dir))


def _listed(items: Iterable[SourceItem]) -> Iterator[dict[str, Any]]:
    chunk: list[SourceItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == LISTED_PER_UNIT:
            yield {"shard": None, "items": chunk}
            chunk = []
    if chunk:
        yield {"shard": None, "items": chunk}


def _prepare_unit(unit: dict[str, Any], *, label: str, max_text_chars: int,
                  max_image_pixels: int) -> Iterator[dict[str, Any]]:
    """A read task: the unit's items validated and decoded, one row each (an item or its rejection)."""
    items = iter_source(unit["shard"]) if unit["shard"] is not None else unit["items"]
    for item in items:
        try:
            prepared = prepare_item(item, label, max_text_chars=max_text_chars, max_image_pixels=max_image_pixels)
            yield {"item": prepared, "rejection": None}
        except InvalidItemError as e:
            yield {"item": None, "rejection": Rejection(ref=item.ref, reason=e.reason, source=item.source or label)}


def _dataset(ray: Any, units: list[dict[str, Any]], kb: Any, label: str, known: set[str], concurrency: int,
             num_gpus: float, num_cpus: float, batch_size: int, actor: type) -> Any:
    embedder = kb.embedder
    dataset = ray.data.from_items(units, override_num_blocks=len(units))
    dataset = dataset.flat_map(_prepare_unit, fn_kwargs={"label": label, "max_text_chars": kb.max_text_chars,
                                                         "max_image_pixels": kb.max_image_pixels})
    return dataset.map_batches(
        actor, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus, num_cpus=num_cpus,
        fn_constructor_kwargs={"model_id": embedder.model_id, "dim": kb.dim, "known": known,
                               # an actor on a GPU picks it (and fp16); else the driver's CPU settings
                               "device": None if num_gpus else "cpu", "dtype": None if num_gpus else embedder.dtype,
                               "trust_remote_code": embedder.trust_remote_code})


# ---------------------------------------------------------------------------- embedding actors
class EmbedActor:
    """One embedding model per actor; embeds a batch of prepared rows, passes rejections through.

    Rows whose id the KB held when the run started are not embedded (``embedded`` False, zero
    vectors): the writer's lookup finds them unchanged, or embeds the few that changed.
    """

    def __init__(self, model_id: str, dim: int, known: set[str], device: str | None = None, dtype: Any = None,
                 trust_remote_code: bool = False):
        from mmrag.retrievers.encoders import DualEncoder

        self.encoder = DualEncoder(model_id, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.dim = dim
        self.known = known

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = batch["item"]
        n = len(items)
        # an interleaved document is embedded by the writer, from its parts (retrievers/kb/documents.py)
        embedded = np.array([item is not None and item.id not in self.known and item.parts is None for item in items],
                            dtype=bool)
        image_vectors = np.zeros((n, self.dim), dtype=np.float32)
        text_vectors = np.zeros((n, self.dim), dtype=np.float32)
        truncated = np.zeros(n, dtype=np.int64)
        todo = np.flatnonzero(embedded)
        if len(todo):
            before = self.encoder.texts_truncated
            image_vectors[todo] = self.encoder.embed_images([items[i].image.image for i in todo])
            text_vectors[todo] = self.encoder.embed_texts([items[i].text for i in todo])
            truncated[todo[0]] = self.encoder.texts_truncated - before
        return {"item": items, "rejection": batch["rejection"], "embedded": embedded,
                "image_vector": image_vectors, "text_vector": text_vectors, "truncated": truncated}


# ---------------------------------------------------------------------------- the writer
def _write(ingestion: Ingestion, batch: dict[str, np.ndarray]) -> int:
    """Hand one batch to the serial ingestion's write path; returns the items it held."""
    prepared: list[PreparedItem] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for item, rejection, embedded, image_vector, text_vector in zip(
            batch["item"], batch["rejection"], batch["embedded"], batch["image_vector"], batch["text_vector"]):
        if item is None:
            rejected.append(rejection)
            continue
        prepared.append(item)
        notes.extend(item.image.notes)
        if embedded and item.id not in vectors:  # a repeated id: the writer keeps the first
            vectors[item.id] = (image_vector, text_vector)
    ingestion.report.texts_truncated += int(batch["truncated"].sum())
    ingestion.consume(prepared, rejected, notes, vectors)
    return len(prepared) + len(rejected)
