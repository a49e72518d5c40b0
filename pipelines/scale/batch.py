"""Batch jobs: ``mmrag batch ask`` answers a JSONL file of questions, ``mmrag batch draw`` draws a
JSONL file of prompts, in this process or on a Ray Data actor pool (``--ray``).

Input lines (JSONL; an image path is relative to the file's folder)::

    ask:  {"id": "q1", "question": "...", "image": "img.jpg", "choices": ["a", "b"], "k": 3, "seed": 0,
           "references": ["rec-1", "rec-2"]}
    draw: {"id": "p1", "prompt": "...", "k": 2, "guidance": "interleaved", "steps": 30, "seed": 0,
           "height": 512, "width": 512}

Everything but ``question`` / ``prompt`` is optional; ``id`` defaults to ``line-N``. An ask
item's ``references`` names the KB records to answer from, in prompt order, instead of retrieving
(``[]``: no references). The files of
``mmrag eval vqa|generation`` run as they are (their ``answers``, ``gold_ids``, ``category``,
``entity``, ``images`` and ``bucket`` are ignored here). Two kinds of
bad input, treated differently on purpose:

* a structural error (not JSON, no question, a wrong type, an unknown key, a duplicate id, an image
  file that does not exist) fails the whole job up front, before any model loads, with
  ``FILE:LINE``: it is a mistake in the file, and finding it after hours of work helps nobody;
* an item that fails while it runs (an image that exists but does not decode, a size the model
  refuses) becomes an error row ``{"id": ..., "error": ...}`` in the output and is counted; the
  job goes on. Any other exception is a bug or the machine (out of memory): it stops the job, and
  a re-run resumes after the last finished batch.

Outputs in ``out_dir``: ``answers.jsonl`` or ``drawings.jsonl`` (one object per item, in input
order) and, for draw, ``images/{safe_id}-{n}.png``. Each finished batch is appended with one write,
flushed and fsynced, after its PNGs are on disk, so a line never names a missing file and a killed
job loses at most the batch in flight. A re-run with the same ``out_dir`` skips the ids already
written (error rows included: delete a row to retry it) and drops a torn last line.

Every item has a seed (its ``seed``, default 0), so a job is reproducible, and the Ray path gives
the serial path's answers and pixels: both run :class:`AskWorker` / :class:`DrawWorker`. On the CPU
that takes the same torch thread count on both sides (``num_cpus`` per actor): float sums split
over 1 or 2 threads differ in the last bits, which moved one pixel by one level in a tiny drawing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmrag.errors import MMRAGError
from mmrag.generators.errors import GenerationError, GuidanceError
from mmrag.retrievers.errors import ConfigError, InvalidItemError

from .items import AskItem, DrawItem, load_ask_items, load_draw_items

logger = logging.getLogger(__name__)

ASK_OUTPUT = "answers.jsonl"
DRAW_OUTPUT = "drawings.jsonl"
IMAGES_DIR = "images"
# A PNG name keeps at most this much of the id (file names are limited to 255 bytes).
_MAX_NAME_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASHED = re.compile(r"-[0-9a-f]{8}$")  # how a hashed name ends: a plain one never does
# Failures that belong to one item (its image, its size, a prompt too long for the model), recorded as
# an error row. Anything else (a model or the KB failing, out of memory, a bug) stops the job: it
# would fail every item alike, and a re-run resumes after the last batch written.
_ITEM_ERRORS = (ConfigError, InvalidItemError, GenerationError, GuidanceError)


def safe_name(item_id: str) -> str:
    """A file-name stem for ``item_id``, distinct for distinct ids: the id itself when it is short,
    lower-case ASCII (``[a-z0-9._-]``) and does not end like a hashed name; else a sanitised prefix
    plus ``-`` and 8 hex digits of its SHA-1 (so ``A`` and ``a`` differ on case-insensitive file
    systems too, and ``a/b`` and ``a_b`` never share a file)."""
    cleaned = _UNSAFE.sub("_", item_id)[:_MAX_NAME_CHARS]
    if (cleaned == item_id and item_id == item_id.lower() and item_id not in (".", "..")
            and not _HASHED.search(item_id)):
        return item_id
    return f"{cleaned}-{hashlib.sha1(item_id.encode('utf-8')).hexdigest()[:8]}"


# ---------------------------------------------------------------------------- workers
class AskWorker:
    """Answers ask items; builds its :class:`RAGVQAPipeline` (models, KB) once, in ``__init__``.

    The serial path calls :meth:`run`; on Ray it is the actor class of ``map_batches`` (one per
    actor: the pool holds the models) and :meth:`__call__` answers a batch of JSON-encoded items.
    """

    def __init__(self, config: Mapping[str, Any]):
        from ..config import load_config
        from ..vqa import RAGVQAPipeline

        self.pipe = RAGVQAPipeline.from_config(load_config(config))
        _warm_up(self.pipe.answerer, self.pipe.retriever.kb.embedder, self.pipe.reranker)

    def run(self, item: AskItem) -> tuple[dict[str, Any], list[bytes]]:
        """The output row of ``item`` (an error row when the item itself fails) and no files."""
        from ..evaluation import records_in_order

        answerer = self.pipe.answerer
        seed = answerer.seed
        answerer.seed = item.seed  # the per-item seed (it matters only when vlm.do_sample is on)
        try:
            references = None if item.references is None else records_in_order(self.pipe.retriever.kb,
                                                                                item.references)
            out = self.pipe(item.question, image=item.image, k=item.k, choices=item.choices, references=references)
        except _ITEM_ERRORS as e:
            return {"id": item.id, "question": item.question, "error": str(e)}, []
        finally:
            answerer.seed = seed
        return {"id": item.id, "question": item.question, "answer": out.answer, "choice": out.choice,
                "choice_scores": out.choice_scores, "references": [h.id for h in out.references],
                "cited": [h.id for h in out.cited], "no_retrieval": out.no_retrieval, "message": out.message,
                "timings": out.timings}, []

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return _run_encoded(self, AskItem, batch)


class DrawWorker:
    """Draws draw items; builds its :class:`EntityImagePipeline` once, in ``__init__``. Returns
    each drawing as PNG bytes (on Ray they travel back in the rows; the driver writes the files)."""

    def __init__(self, config: Mapping[str, Any]):
        from ..config import load_config
        from ..draw import EntityImagePipeline

        self.pipe = EntityImagePipeline.from_config(load_config(config))
        _warm_up(self.pipe.generator, self.pipe.retriever.kb.embedder, self.pipe.reranker)

    def run(self, item: DrawItem) -> tuple[dict[str, Any], list[bytes]]:
        from ..evaluation import records_in_order

        try:
            references = None if item.references is None else [
                r.open_image() for r in records_in_order(self.pipe.retriever.kb, item.references)]
            out = self.pipe(item.prompt, k=item.k, guidance=item.guidance, num_inference_steps=item.steps,
                            seed=item.seed, height=item.height, width=item.width, references=references)
        except _ITEM_ERRORS as e:
            return {"id": item.id, "prompt": item.prompt, "error": str(e)}, []
        pngs = []
        for image in out.images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        ids = item.references if item.references is not None else [h.id for h in out.references]
        return {"id": item.id, "prompt": item.prompt, "references": ids,
                "guidance": out.guidance, "fallback": out.fallback, "timings": out.timings}, pngs

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        return _run_encoded(self, DrawItem, batch)


class _RayActor:
    """The actor of ``map_batches``: one :class:`AskWorker` or :class:`DrawWorker`.

    An mmrag error while it builds (a model that cannot load, a device this node lacks) is raised
    by the first batch instead: Ray reports a failed ``__init__`` as an ``ActorDiedError`` that keeps
    only the traceback's text, while a batch's error reaches the driver as the exception itself,
    which the driver prints as its one line."""

    def __init__(self, worker_cls: type, config: Mapping[str, Any]):
        self.worker, self.error = None, None
        try:
            self.worker = worker_cls(config)
        except MMRAGError as e:
            self.error = e

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        if self.error is not None:
            raise self.error
        return self.worker(batch)


def _warm_up(*components: Any) -> None:
    """Load every model now: a model that cannot load fails the job here, once, instead of every
    item on first use (and the actor pool holds the models from the start)."""
    for component in components:
        if component is not None and hasattr(component, "warm_up"):
            component.warm_up()


def _run_encoded(worker: AskWorker | DrawWorker, item_type: type, batch: Mapping[str, Any]) -> dict[str, list]:
    # Items travel as one JSON string column: Arrow would otherwise have to type ragged, optional
    # fields (choices, guidance dicts); rows come back the same way, PNGs as a list of bytes.
    rows, pngs = [], []
    for encoded in batch["item"]:
        row, files = worker.run(item_type(**json.loads(encoded)))
        rows.append(json.dumps(row))
        pngs.append(files)
    return {"row": rows, "pngs": pngs}


# ---------------------------------------------------------------------------- output
class _Output:
    """The output JSONL of one job: what is already done, and appending finished batches."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            self._recover()

    def _recover(self) -> None:
        """Read the ids written so far; a torn last line (a job killed mid-write) is cut off."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a partial write
        lines = data[:end].split(b"\n")[:-1]
        for n, line in enumerate(lines, start=1):
            problem = _row_problem(line)
            if problem is not None:
                if n < len(lines):  # only the last write can be torn; anything before it is damage
                    raise ConfigError(f"{self.path}:{n} is not an output row ({problem}); this file was changed "
                                      "by something else than `mmrag batch`. Fix or delete that line, or use "
                                      "another --out.")
                end -= len(line) + 1
                break
            self.done.add(json.loads(line)["id"])
        if end < len(data):
            logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run; its item runs again",
                           self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """One write per batch, flushed and fsynced: a kill tears at most this batch's last line."""
        if not rows:
            return
        with open(self.path, "ab") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.done.update(r["id"] for r in rows)


def _row_problem(line: bytes) -> str | None:
    try:
        row = json.loads(line)
    except ValueError as e:
        return f"not JSON: {e}"
    return None if isinstance(row, dict) and isinstance(row.get("id"), str) else "no string 'id'"


def _write_pngs(out_dir: Path, item_id: str, pngs: Sequence[bytes]) -> list[str]:
    """Write one item's drawings (each to a temporary name, fsynced, then renamed); their paths
    relative to ``out_dir``."""
    names = []
    for n, data in enumerate(pngs):
        name = f"{IMAGES_DIR}/{safe_name(item_id)}-{n}.png"
        tmp = out_dir / f"{name}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / name)
        names.append(name)
    return names


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # the renames above are durable once their folder is synced
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- report
@dataclass
class BatchReport:
    """What a batch job did: ``done`` items answered or drawn by this run, ``failed`` items written
    as error rows by this run, ``skipped`` items already in the output from an earlier run."""

    command: str  # "ask" or "draw"
    done: int
    skipped: int
    failed: int
    seconds: float
    output: Path
    images: Path | None = None
    errors: list[dict[str, str]] = field(default_factory=list)  # this run's error rows: id, error
    ray: bool = False

    @property
    def total(self) -> int:
        return self.done + self.skipped + self.failed

    def summary(self) -> str:
        where = "on Ray" if self.ray else "in-process"
        text = (f"batch {self.command}: {self.done} done, {self.failed} failed, {self.skipped} skipped (already in "
                f"{self.output}) of {self.total} in {self.seconds:.1f}s {where}")
        if self.errors:
            text += f"; first error: {self.errors[0]['id']}: {self.errors[0]['error']}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "total": self.total, "seconds": self.seconds, "output": str(self.output),
                "images": None if self.images is None else str(self.images), "errors": self.errors, "ray": self.ray}


# ---------------------------------------------------------------------------- jobs
def run_batch_ask(config: Any, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                  ray_address: str | None = None, use_ray: bool = False, batch_size: int = 8, concurrency: int = 1,
                  num_gpus: float | None = None, num_cpus: float | None = None, progress: bool = False) -> BatchReport:
    """Answer every question of ``dataset`` (JSONL) into ``out_dir/answers.jsonl``, resuming a
    previous run there.

    ``config``: a :class:`Config`, a path, a preset name or a dict. ``use_ray``: on a Ray Data pool
    of ``concurrency`` actors (``ray_address``: None starts a local Ray, ``"auto"`` or
    ``"ray://HOST:10001"`` joins a cluster, whose workers must see the KB, or ``kb.url`` for a
    Chroma server, and the dataset's images at the same paths); ``num_gpus`` per actor defaults to
    1 when the cluster has GPUs and the models are not placed on the CPU; ``num_cpus`` per actor
    defaults to Ray Data's 1, and is also the actor's torch thread count (Ray sets
    ``OMP_NUM_THREADS``). ``batch_size`` items are answered and written together (and lost together
    by a kill).

    On the CPU, floating-point sums depend on how many threads split them, so the Ray path repeats
    the serial one bit for bit (pixels; answers, barring a near tie) when each actor has as many
    CPUs as the serial process has torch threads (``torch.get_num_threads()``)."""
    return run_job("ask", load_ask_items(dataset), config, out_dir, ASK_OUTPUT, AskWorker,
                ray_address=ray_address, use_ray=use_ray, batch_size=batch_size, concurrency=concurrency,
                num_gpus=num_gpus, num_cpus=num_cpus, progress=progress)


def run_batch_draw(config: Any, prompts: str | os.PathLike, out_dir: str | os.PathLike, *,
                   ray_address: str | None = None, use_ray: bool = False, batch_size: int = 8, concurrency: int = 1,
                   num_gpus: float | None = None, num_cpus: float | None = None, progress: bool = False) -> BatchReport:
    """Draw every prompt of ``prompts`` (JSONL) into ``out_dir/drawings.jsonl`` and
    ``out_dir/images/``, resuming a previous run there; the options are :func:`run_batch_ask`'s."""
    return run_job("draw", load_draw_items(prompts), config, out_dir, DRAW_OUTPUT, DrawWorker,
                ray_address=ray_address, use_ray=use_ray, batch_size=batch_size, concurrency=concurrency,
                num_gpus=num_gpus, num_cpus=num_cpus, progress=progress)


def run_job(command: str, items: list, config: Any, out_dir: str | os.PathLike, output_name: str, worker_cls: type, *,
            ray_address: str | None, use_ray: bool, batch_size: int, concurrency: int, num_gpus: float | None,
            num_cpus: float | None, progress: bool) -> BatchReport:
    """Run ``items`` (checked :class:`AskItem` / :class:`DrawItem`) through ``worker_cls`` into
    ``out_dir/output_name``, skipping the ids already there; the jobs and the evaluations share it."""
    from ..config import load_config

    _check_options(ray_address, use_ray, batch_size, concurrency, num_gpus, num_cpus)
    cfg = load_config(config)
    payload = _config_payload(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = out / IMAGES_DIR if command == "draw" else None
    if images is not None:
        images.mkdir(exist_ok=True)
    output = _Output(out / output_name)
    pending = [item for item in items if item.id not in output.done]
    stale = len(output.done) - (len(items) - len(pending))
    if stale:
        logger.warning("%s holds %d id(s) that are not in the input; they are kept and not counted", output.path, stale)
    report = BatchReport(command, done=0, skipped=len(items) - len(pending), failed=0, seconds=0.0,
                         output=output.path, images=images, ray=use_ray)
    t = time.perf_counter()
    if pending:
        bar = _progress_bar(len(pending), f"batch {command}") if progress else None
        results = (_ray_results(pending, payload, worker_cls, command, cfg, ray_address, batch_size, concurrency,
                                num_gpus, num_cpus) if use_ray else _serial_results(pending, payload, worker_cls, batch_size))
        try:
            for batch in results:
                rows = []
                for row, pngs in batch:
                    if "error" in row:
                        report.failed += 1
                        report.errors.append({"id": row["id"], "error": row["error"]})
                    else:
                        report.done += 1
                        if images is not None:
                            row["images"] = _write_pngs(out, row["id"], pngs)  # the files before the line
                    rows.append(row)
                if images is not None:
                    _fsync_dir(images)
                output.append(rows)
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
    report.seconds = time.perf_counter() - t
    return report


def _check_options(ray_address, use_ray, batch_size, concurrency, num_gpus, num_cpus) -> None:
    for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if num_gpus is not None and not (number(num_gpus) and num_gpus >= 0):
        raise ConfigError(f"`num_gpus` must be a number >= 0 (GPUs per actor, fractions share one), got {num_gpus!r}.")
    if num_cpus is not None and not (number(num_cpus) and num_cpus > 0):
        raise ConfigError(f"`num_cpus` must be a number > 0 (CPUs, and torch threads, per actor), got {num_cpus!r}.")
    if not use_ray:
        for name, value in (("ray_address", ray_address), ("num_gpus", num_gpus), ("num_cpus", num_cpus)):
            if value is not None:
                raise ConfigError(f"`{name}` {value!r} is for Ray but `use_ray` is False; pass use_ray=True, or "
                                  "leave it out (in-process, the config's devices and torch's threads apply).")


def _config_payload(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict that rebuilds it in another process: only the keys it sets
    (which keys a config names matters, see ``load_config``), with the paths made absolute."""
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data.setdefault("kb", {})["path"] = str(Path(cfg.kb.path).expanduser().resolve())
    data.setdefault("tiny_models", {})["cache_dir"] = str(Path(cfg.tiny_models.cache_dir).expanduser().resolve())
    return data


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _serial_results(pending: list, payload: dict, worker_cls: type, batch_size: int) -> Iterator[list]:
    worker = worker_cls(payload)
    for chunk in _chunks(pending, batch_size):
        yield [worker.run(item) for item in chunk]


def _ray_results(pending: list, payload: dict, worker_cls: type, command: str, cfg: Any, ray_address: str | None,
                 batch_size: int, concurrency: int, num_gpus: float | None,
                 num_cpus: float | None) -> Iterator[list]:
    from ..builders import open_knowledge_base
    from .ray_runtime import gpus_available, init_ray

    # A KB that cannot be opened fails here in one line, not as a traceback from every actor.
    open_knowledge_base(cfg, create=False)
    ray = init_ray(ray_address)
    if num_gpus is None:
        num_gpus = 1 if gpus_available(ray) > 0 and _wants_gpu(cfg, command) else 0
    ds = ray.data.from_items([{"item": json.dumps(asdict(item))} for item in pending])
    resources = {"num_gpus": num_gpus} if num_cpus is None else {"num_gpus": num_gpus, "num_cpus": num_cpus}
    ds = ds.map_batches(_RayActor, fn_constructor_kwargs={"worker_cls": worker_cls, "config": payload},
                        compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size,
                        batch_format="numpy", **resources)
    try:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield [(json.loads(row), list(files)) for row, files in zip(batch["row"], batch["pngs"])]
    except Exception as e:  # an mmrag error raised in an actor: its own one line, not Ray's wrapper
        cause = _mmrag_cause(e)
        if cause is None:
            raise
        raise cause from None


def _mmrag_cause(error: BaseException) -> MMRAGError | None:
    """The mmrag error behind Ray's wrappers (``RayTaskError(UserCodeException)`` whose chain ends at
    the exception the actor raised), or None when it is not one."""
    from ray.exceptions import RayError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MMRAGError) and not isinstance(error, RayError):  # not RayTaskError(ConfigError)
            return error
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else (error.__cause__ or error.__context__)
    return None


def _wants_gpu(cfg: Any, command: str) -> bool:
    """Whether the command's models go to CUDA: a device left at None means CUDA when present."""
    sections = [cfg.embedder.device, cfg.vlm.device if command == "ask" else cfg.diffusion.device]
    if cfg.reranker.name is not None:
        sections.append(cfg.reranker.device)
    return any(d is None or str(d).startswith("cuda") for d in sections)


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False)


# ---------------------------------------------------------------------------- command line
def add_batch_parser(sub, models_parent: argparse.ArgumentParser,
                     add_kb: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """``mmrag batch ask|draw`` on ``mmrag``'s subparsers (``models_parent``: the options of the
    commands that load models; ``add_kb``: cli's ``--kb``/``--url``)."""
    batch = sub.add_parser("batch", help="answer or draw a JSONL file of items, resumably, in-process or on Ray")
    kinds = batch.add_subparsers(dest="batch_command", required=True, metavar="WHAT", help="ask or draw")
    p = kinds.add_parser("ask", parents=[models_parent], help="answer every question of a JSONL dataset")
    p.add_argument("--dataset", required=True, metavar="FILE.jsonl",
                   help="one question a line: id, question, image (relative to the file), choices, k, seed")
    _add_batch_options(p, add_kb, ASK_OUTPUT)
    p = kinds.add_parser("draw", parents=[models_parent], help="draw every prompt of a JSONL file")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                   help="one prompt a line: id, prompt, k, guidance, steps, seed, height, width")
    _add_batch_options(p, add_kb, f"{DRAW_OUTPUT} and {IMAGES_DIR}/")
    return batch


def _add_batch_options(p: argparse.ArgumentParser, add_kb: Callable, what: str) -> None:
    from ..cli import add_ray_arguments

    add_kb(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help=f"output folder ({what}); a re-run with the same DIR skips the items already there")
    add_ray_arguments(p, "actors, each holding the models",
                      "1; as many as the serial run's threads repeat its results bit for bit on the CPU")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="items run and written together; a kill loses at most one batch (default 8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")


def cmd_batch(args: argparse.Namespace) -> int:
    """``mmrag batch ask|draw``: run the job, print the report's summary (or JSON). Exit 2 when
    every item this run tried failed."""
    from ..cli import EXIT_ERROR, _config, _quiet_diffusers, ray_address

    address = ray_address(args)  # refuses actor options without --ray
    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url})
    options = {"use_ray": args.ray is not None, "ray_address": address,
               "batch_size": args.batch_size, "concurrency": args.concurrency, "num_gpus": args.num_gpus,
               "num_cpus": args.num_cpus, "progress": not args.no_progress and sys.stderr.isatty()}
    if args.batch_command == "ask":
        report = run_batch_ask(cfg, args.dataset, args.out, **options)
    else:
        _quiet_diffusers()
        report = run_batch_draw(cfg, args.prompts, args.out, **options)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    if report.failed and not report.done:
        print(f"mmrag batch {args.batch_command}: error: all {report.failed} items failed; see {report.output}",
              file=sys.stderr)
        return EXIT_ERROR
    return 0


__all__ = ["AskItem", "AskWorker", "BatchReport", "DrawItem", "DrawWorker", "add_batch_parser", "cmd_batch",
           "load_ask_items", "load_draw_items", "run_batch_ask", "run_batch_draw", "safe_name"]
