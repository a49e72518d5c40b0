"""The ``mmrag`` command line. Each subcommand maps to one library function.

Errors print one line on stderr and exit non-zero; set ``MMRAG_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_ERROR = 2  # a problem with the input or the environment the user can fix
EXIT_BUG = 1  # an unexpected failure


DTYPES = ("float32", "float16", "bfloat16")


def _common(models: bool = True) -> argparse.ArgumentParser:
    """Options every subcommand takes (``models``: the ones that load models also take --device/--dtype)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE",
                   help="YAML config or preset name (default, tiny); flags override its values")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show mmrag's info logs and third-party loading bars and warnings (MMRAG_LOG=debug: all)")
    if models:
        p.add_argument("--device", metavar="DEVICE",
                       help="run every model here: cpu, cuda, cuda:N or mps (default: CUDA when present, else CPU)")
        p.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: float16 on CUDA, float32 on CPU)")
    return p


def _add_kb(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--kb", metavar="DIR", required=required, help="knowledge-base folder")
    p.add_argument("--url", metavar="URL", help="Chroma server holding the vectors (http://127.0.0.1:PORT)")


def _add_output(p: argparse.ArgumentParser, what: str = "JSON") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")


def add_ray_arguments(p: argparse.ArgumentParser, actors: str, cpus_default: str) -> None:
    """``--ray [ADDRESS]``, ``--concurrency``, ``--num-gpus`` and ``--num-cpus`` (the ``mmrag[ray]`` extra)."""
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray Data: alone, a local Ray; or a cluster's address ('auto', 'ray://HOST:10001'); "
                        "extra: mmrag[ray]")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help=f"with --ray: {actors} (default 1)")
    p.add_argument("--num-gpus", type=float, metavar="N",
                   help="with --ray: GPUs per actor (default: 1 where the cluster has GPUs and --device is not cpu)")
    p.add_argument("--num-cpus", type=float, metavar="N",
                   help=f"with --ray: CPUs per actor, also its torch threads (default: {cpus_default})")


def ray_address(args: argparse.Namespace) -> str | None:
    """The Ray address of ``--ray`` (None: start a local Ray); ray options without ``--ray`` are refused."""
    from mmrag.retrievers import ConfigError

    if args.ray is None:
        given = [flag for flag, value in (("--concurrency", args.concurrency != 1), ("--num-gpus", args.num_gpus),
                                          ("--num-cpus", args.num_cpus)) if value is not None and value is not False]
        if given:
            raise ConfigError(f"`{given[0]}` applies to Ray runs only: add `--ray` (a local Ray) or `--ray ADDRESS`.")
    return None if args.ray in (None, "local") else args.ray


def build_parser() -> argparse.ArgumentParser:
    from mmrag import __version__
    from mmrag.retrievers.settings import CHANNELS, COMPOSED_METHODS, FUSIONS

    from .client_cli import add_server_arguments

    channels = ", ".join(CHANNELS)
    models, plain = _common(), _common(models=False)
    parser = argparse.ArgumentParser(prog="mmrag", description="Retrieval-augmented multimodal generation.")
    parser.add_argument("--version", action="version", version=f"mmrag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    p = sub.add_parser("ingest", parents=[models],
                       help="add a folder, JSONL/CSV manifest, or WebDataset shards to a knowledge base")
    p.add_argument("source", help="folder, .jsonl, .csv, .tar (or a glob of .tar shards)")
    _add_kb(p)
    p.add_argument("--base-dir", metavar="DIR",
                   help="let a manifest name absolute paths or paths outside its folder, when inside DIR "
                        "(off by default: manifest paths must stay in the manifest's folder)")
    p.add_argument("--batch-size", type=int, help="items embedded and written per batch")
    p.add_argument("--report", metavar="FILE", help="write the full report as JSONL here (default: KB/reports/)")
    p.add_argument("--allow-remote", action="store_true", default=None, help="fetch http(s) image URLs in manifests")
    p.add_argument("--lock-timeout", type=float, metavar="S", help="wait this many seconds for another writer")
    p.add_argument("--late-interaction", metavar="MODEL",
                   help="give a new KB a late-interaction index built with this ColPali-family model "
                        "(e.g. vidore/colpali-v1.3-hf, tiny:colpali), searched by --channels late_interaction "
                        "(default: late_interaction.model of the config)")
    add_ray_arguments(p, "embedding actors (each holds one copy of the embedder)",
                      "1 while that leaves a CPU for the read tasks")
    _add_output(p, "the report summary as JSON")

    kb = sub.add_parser("kb", help="inspect a knowledge base").add_subparsers(
        dest="kb_command", required=True, metavar="SUBCOMMAND", help="info or verify")
    for name, helptext in (("info", "counts, embedder, size on disk"),
                           ("verify", "check ids, vectors and images agree (exit 2 when they do not)")):
        p = kb.add_parser(name, parents=[plain], help=helptext)
        _add_kb(p)
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("search", parents=[models], help="retrieve records for a text, an image, or both")
    p.add_argument("text", nargs="?", help="query text (with --image: the modifier of a composed query)")
    p.add_argument("--image", metavar="PATH", help="query image")
    p.add_argument("--reference-text", metavar="TEXT", help="description of --image (for composed_method pdv)")
    _add_kb(p, required=False)  # not with --server: the server's KB applies
    add_server_arguments(p)
    p.add_argument("-k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--where", metavar="JSON", help='metadata filter, e.g. \'{"kind": "dog"}\'')
    p.add_argument("--channels", nargs="+", metavar="NAME", choices=list(CHANNELS),
                   help=f"restrict to these channels: {channels} (default: all the query allows)")
    p.add_argument("--fusion", choices=list(FUSIONS), help="rrf (reciprocal rank fusion) or weighted (scaled scores)")
    p.add_argument("--composed", choices=list(COMPOSED_METHODS), help="composed-query method for image + text")
    p.add_argument("--hubness", choices=["qbnorm", "dbnorm"], help="hubness normalisation of the scores")
    p.add_argument("--rerank", choices=["dual_encoder", "cross_encoder", "vlm"],
                   help="rerank with this reranker (its model from the config)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--html", metavar="FILE", help="also write an HTML gallery")

    p = sub.add_parser("ask", parents=[models], help="answer a question about an image with references from the KB")
    p.add_argument("question", help="the question")
    p.add_argument("--image", metavar="PATH", help="the image the question is about")
    _add_kb(p, required=False)  # not with --server: the server's KB applies
    add_server_arguments(p)
    p.add_argument("-k", type=int, help="references to retrieve (default: vqa.k of the config)")
    p.add_argument("--where", metavar="JSON", help="metadata filter for the references")
    p.add_argument("--choices", metavar="A;B;C", help="multiple choice: options separated by ';'")
    p.add_argument("--choice-format", choices=["options", "letters"],
                   help="multiple choice: score each option's text, or list them A:, B:, ... and score the "
                        "letter (MRAG-Bench) (default: vlm.choice_format)")
    p.add_argument("--length-normalization", choices=["none", "tokens", "chars"],
                   help="multiple choice: divide an option's log-likelihood by nothing, its tokens, or its "
                        "characters (lm-evaluation-harness acc_norm) (default: vlm.length_normalization)")
    p.add_argument("--rerank", choices=["dual_encoder", "cross_encoder", "vlm"],
                   help="rerank the references with this reranker (default: reranker.name of the config)")
    p.add_argument("--no-rerank", action="store_true", help="skip the rerank stage")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write an HTML report")

    p = sub.add_parser("draw", parents=[models], help="draw a prompt grounded on reference images from the KB")
    p.add_argument("prompt", help="what to draw")
    _add_kb(p, required=False)
    add_server_arguments(p)
    p.add_argument("-k", type=int, help="references (default: draw.k of the config)")
    p.add_argument("--reference", action="append", metavar="IMAGE",
                   help="use this image as a reference (repeatable); skips retrieval")
    p.add_argument("--guidance", choices=["interleaved", "joint", "cfg"],
                   help="guidance at the config's scales (default: draw.guidance of the config)")
    p.add_argument("--steps", type=int, help="denoising steps (default: draw.num_inference_steps)")
    p.add_argument("--seed", type=int, help="random seed, for a reproducible drawing")
    p.add_argument("--num-images", type=int, default=1, help="images to draw (default 1)")
    p.add_argument("-o", "--output", default="mmrag-draw.png", metavar="FILE.png",
                   help="image path (more images: FILE-1.png, ...); the contact sheet goes to FILE.sheet.png")
    p.add_argument("--where", metavar="JSON", help="metadata filter for the references")
    p.add_argument("--rerank", choices=["dual_encoder", "cross_encoder", "vlm"],
                   help="rerank the references with this reranker (default: reranker.name of the config)")
    p.add_argument("--retrieve-or-generate", action=argparse.BooleanOptionalAction, default=None,
                   help="return the best retrieved image instead of drawing when it matches the prompt well enough "
                        "(its text->image cosine >= the threshold) (default: draw.decide)")
    p.add_argument("--decide-threshold", type=float, metavar="T",
                   help="with --retrieve-or-generate: that cosine (default: draw.decide_threshold; calibrate it with "
                        "`mmrag eval decide`)")
    _add_output(p)
    p.add_argument("--html", metavar="FILE", help="also write an HTML report")

    ev = sub.add_parser("eval", help="evaluate retrieval, VQA, generation or retrieve-or-generate").add_subparsers(
        dest="eval_command", required=True, metavar="WHAT", help="retrieval, vqa, generation or decide")
    p = ev.add_parser("decide", parents=[models],
                      help="calibrate draw.decide_threshold: the threshold that best tells prompts the KB can answer "
                           "with a stored image from prompts to draw")
    _add_kb(p)
    p.add_argument("--labels", required=True, metavar="FILE.jsonl",
                   help='lines {"prompt": ..., "label": "retrieve" | "generate"} (retrieve: the KB holds an image '
                        'that satisfies the prompt)')
    p.add_argument("-k", type=int, help="references retrieved per prompt (default: draw.k)")
    p.add_argument("--decide-threshold", type=float, metavar="T",
                   help="also report accuracy at this threshold (e.g. one calibrated on another file)")
    _add_output(p)
    p = ev.add_parser("generation", parents=[models], help="CLIP-T, CLIP-I (and attribute accuracy) for cfg / joint / "
                                                            "interleaved, per bucket")
    _add_kb(p)
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                   help="prompt, entity, held-out images, bucket, attributes (for --judge)")
    p.add_argument("-k", type=int, help="references per prompt (default: draw.k)")
    p.add_argument("--steps", type=int, help="denoising steps (default: draw.num_inference_steps)")
    p.add_argument("--seed", type=int, default=0, help="random seed shared by every guidance (default 0)")
    p.add_argument("--judge", nargs="?", const=True, metavar="DIR",
                   help="also score shape / colour / background / pattern accuracy with an attribute judge; alone: "
                        "the shipped toy-world judge (the prompts need `attributes`)")
    p.add_argument("--guidances", nargs="+", metavar="NAME", choices=["text_only", "cfg", "joint", "interleaved"],
                   help="settings to compare: text_only (no references), cfg, joint, interleaved "
                        "(default: cfg joint interleaved)")
    p.add_argument("--eta", nargs="+", type=float, metavar="ETA",
                   help="draw interleaved at each of these shares of text-enhanced steps, at the configured scales "
                        "(default: draw.guidance's eta)")
    add_ray_arguments(p, "drawing actors (each holds the models)", "1; as many as this process's torch threads "
                      "repeat its drawings exactly")
    p.add_argument("--runs", metavar="DIR", help="with --ray: the batch jobs' folder, resumed when run again "
                                                 "(default: beside the prompts, PROMPTS.runs/)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="with --ray: drawings per batch (default 8)")
    _add_output(p)

    p = ev.add_parser("vqa", parents=[models], help="accuracy with no retrieval, gold references and retrieved references")
    _add_kb(p)
    p.add_argument("--dataset", required=True, metavar="FILE.jsonl", help="image, question, answers or choices+answer")
    p.add_argument("-k", type=int, help="references per question (default: vqa.k)")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="where to write predictions (default: beside the dataset)")
    add_ray_arguments(p, "answering actors (each holds the models)", "1; as many as this process's torch threads "
                      "repeat its answers exactly")
    p.add_argument("--runs", metavar="DIR", help="with --ray: the batch job's folder, resumed when run again "
                                                 "(default: beside the predictions, PREDICTIONS.runs/)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="with --ray: runs per batch (default 8)")
    _add_output(p)
    p = ev.add_parser("retrieval", parents=[models], help="Recall@1/5/10, MRR, nDCG@10, mAP@50 per category and channel")
    _add_kb(p)
    p.add_argument("--queries", required=True, metavar="FILE.jsonl", help="text/image, relevant ids, category")
    p.add_argument("--where", metavar="JSON", help="metadata filter applied to every query")
    p.add_argument("--rerank", choices=["dual_encoder", "cross_encoder", "vlm"],
                   help="rerank with this reranker (default: reranker.name of the config)")
    p.add_argument("--fusion", choices=list(FUSIONS), help="rrf or weighted (default: retriever.fusion)")
    p.add_argument("--composed", choices=list(COMPOSED_METHODS),
                   help="composed-query method for image + text queries (default: retriever.composed_method)")
    p.add_argument("--hubness", choices=["qbnorm", "dbnorm"], help="hubness normalisation (default: retriever.hubness)")
    p.add_argument("--no-ablation", action="store_true", help="skip the per-channel runs")
    _add_output(p)

    from .match import add_match_parser
    from .mcp_server import add_mcp_parser
    from .scale.batch import add_batch_parser
    from .serve.commands import add_keys_parser, add_serve_parser

    add_mcp_parser(sub, [models])
    add_serve_parser(sub, [models])
    add_keys_parser(sub, [plain])
    add_batch_parser(sub, models, _add_kb)
    add_match_parser(sub, models)

    p = sub.add_parser("tiny-models", parents=[plain], help="build the tiny offline models into DIR")
    p.add_argument("directory", metavar="DIR", help="where to write them (one folder per model)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these (clip, siglip, llava, idefics3, "
                                                               "blip-itm, colpali, sd, ip-adapter)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")

    toy = sub.add_parser("toy-models", help="train the toy world's models (toy:clip, toy:llava, toy:sd)").add_subparsers(
        dest="toy_models_command", required=True, metavar="SUBCOMMAND", help="train")
    p = toy.add_parser("train", parents=[models], help="train them with the shipped recipes (resumes a killed run)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=("clip", "llava", "sd", "ip-adapter"),
                   help="train only these (clip, llava, sd, ip-adapter; sd and ip-adapter train together)")
    p.add_argument("--out", metavar="DIR", help="where to write them (default: the config's tiny_models.cache_dir, "
                                                 "where toy:NAME is looked up when the package lacks it)")

    toy = sub.add_parser("toy-bench", help="the toy world's benchmark files (known ground truth)").add_subparsers(
        dest="toy_command", required=True, metavar="SUBCOMMAND", help="make")
    p = toy.add_parser("make", parents=[plain], help="write a gallery manifest and queries for `mmrag eval retrieval`")
    p.add_argument("directory", metavar="DIR", help="where to write them")
    p.add_argument("--seed", type=int, default=0, help="the toy world's seed and the queries' (default 0)")
    p.add_argument("--views", type=int, default=2, help="renders of each gallery entity (default 2)")

    p = sub.add_parser("demo", parents=[models], help="search, ask and draw on a generated sample KB; writes an HTML report")
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")

    sub.add_parser("env", parents=[plain], help="versions and devices, for bug reports")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose or os.environ.get("MMRAG_LOG", "").lower() == "debug"
    _configure_logging(args.verbose, os.environ.get("MMRAG_LOG", ""))
    remote = getattr(args, "server", None) and args.command in ("search", "ask")
    if not verbose and not os.environ.get("MMRAG_DEBUG") and not remote:
        _quiet_libraries()
    from mmrag.errors import MMRAGError

    try:
        return _COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print(f"mmrag {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback on request
        if isinstance(e, MMRAGError):  # every error a user can cause, from any subpackage
            print(f"mmrag {args.command}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        if os.environ.get("MMRAG_DEBUG"):
            raise
        print(f"mmrag {args.command}: unexpected {type(e).__name__}: {e} (set MMRAG_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_BUG


def _configure_logging(verbose: bool, level_name: str) -> None:
    """mmrag's own loggers print ``mmrag: message`` on stderr: warnings by default, info with
    ``--verbose``, anything ``MMRAG_LOG`` names (debug, info, warning, error)."""
    import logging

    level = getattr(logging, level_name.upper(), None) if level_name else None
    if not isinstance(level, int):
        level = logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("mmrag")
    if not any(getattr(h, "_mmrag_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mmrag: %(message)s"))
        handler._mmrag_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _quiet_libraries() -> None:
    """Keep the terminal for mmrag's own output: no weight-loading bars or advisory warnings from
    transformers, diffusers or the Hub client (``--verbose`` shows them)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    global _QUIET
    _QUIET = True


_QUIET = False


def _quiet_diffusers() -> None:
    """Same for diffusers, imported only by the commands that draw (it is slow to import)."""
    if not _QUIET:
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def _bar(args, total: int | None, desc: str, unit: str = "item"):
    """A progress callback ``progress(done)`` drawing a bar with the total and an ETA on stderr
    (only on a terminal, and not with --no-progress); ``None`` when no bar is drawn."""
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def progress(done: int, of: int | None = None) -> None:
        if of is not None and bar.total != of:
            bar.total = of
            bar.refresh()
        bar.update(done - bar.n)
        if bar.total is not None and done >= bar.total:
            bar.close()

    return progress


def _config(args, **overrides: Any):
    """The command's config: ``--config`` with the flags on top (a flag left out keeps the
    config's value); ``--device``/``--dtype`` apply to every model, ``--rerank`` names the reranker."""
    from .config import load_config

    device, dtype = getattr(args, "device", None), getattr(args, "dtype", None)
    if device is not None:
        from .builders import check_device

        check_device("--device", device)
    for section in ("embedder", "late_interaction", "vlm", "diffusion", "reranker"):
        overrides.setdefault(f"{section}.device", device)
        if section != "reranker":
            overrides.setdefault(f"{section}.dtype", dtype)
    overrides.setdefault("reranker.name", getattr(args, "rerank", None))
    return load_config(getattr(args, "config", None), {k: v for k, v in overrides.items() if v is not None})


def _cmd_ingest(args) -> int:
    from mmrag.retrievers.kb.sources import iter_source

    from .builders import open_knowledge_base

    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "kb.allow_remote": args.allow_remote,
                           "kb.lock_timeout": args.lock_timeout, "ingest.batch_size": args.batch_size,
                           "ingest.report": args.report, "late_interaction.model": args.late_interaction})
    # a bad source (or --base-dir) fails before any model loads
    iter_source(args.source, allow_remote=cfg.kb.allow_remote, base_dir=args.base_dir)
    address = ray_address(args)
    kb = open_knowledge_base(cfg)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.ray is not None:
        from .scale.ingest import ray_ingest

        report = ray_ingest(kb, args.source, address=address, concurrency=args.concurrency, num_gpus=args.num_gpus,
                            num_cpus=args.num_cpus, batch_size=cfg.ingest.batch_size, base_dir=args.base_dir,
                            progress=progress)
    else:
        report = kb.ingest(args.source, batch_size=cfg.ingest.batch_size, base_dir=args.base_dir, progress=progress)
    report_path = Path(cfg.ingest.report) if cfg.ingest.report else (
        kb.path / "reports" / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    report.write_jsonl(report_path)
    if args.json:
        print(json.dumps({**report.to_dict(), "report": str(report_path), "count": kb.count()}))
    else:
        print(report.summary())
        print(f"knowledge base {kb.path}: {kb.count()} records; full report: {report_path}")
    if report.all_rejected:
        print(f"mmrag ingest: error: all {report.seen} items were rejected; see {report_path}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _cmd_batch(args) -> int:
    from .scale.batch import cmd_batch

    return cmd_batch(args)


def _cmd_match(args) -> int:
    from .match import cmd_match

    return cmd_match(args)


def _cmd_kb(args) -> int:
    from .builders import open_knowledge_base

    kb = open_knowledge_base(_config(args, **{"kb.path": args.kb, "kb.url": args.url}), create=False)
    if args.kb_command == "info":
        info = kb.info()
        if args.json:
            print(json.dumps(info))
        else:
            width = max(map(len, info))
            for k, v in info.items():
                print(f"{k:<{width}}  {v}")
        return 0
    problems = kb.verify()
    if args.json:
        print(json.dumps(problems))
    else:
        for k, v in problems.items():
            print(f"{k}: {len(v)}" + (f"  e.g. {v[:3]}" if v else ""))
    return 0 if not any(problems.values()) else EXIT_ERROR


# ---------------------------------------------------------------- output (local and --server alike)
def print_hits(hits: Sequence, as_json: bool) -> None:
    """The hits as ``mmrag search`` prints them: one JSON list, or the table."""
    if as_json:
        print(json.dumps([{"rank": h.rank, "id": h.id, "score": h.score, "scores": h.scores, "text": h.record.text,
                           "source_path": h.record.source_path, "image": h.record.image,
                           "metadata": h.record.metadata, "parts": [dataclasses.asdict(p) for p in h.parts]}
                          for h in hits]))
        return
    if not hits:
        print("no hits")
    for h in hits:
        text = h.record.text if len(h.record.text) <= 60 else h.record.text[:57] + "..."
        print(f"{h.rank:>3}  {h.score:8.4f}  {h.id:<34}  {text:<60}  {h.record.source_path or '-'}")
        for p in h.parts:  # a document: the parts that matched, best first
            shown = p.text if p.kind == "text" else (p.source_path or p.image or "-")
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            print(f"{'':>3}  {p.score:8.4f}  {f'part {p.index} ({p.kind})':<34}  {shown}")


def print_stream(out: Any) -> Any:
    """Print a streamed answer's chunks as they arrive, then a newline; its VQAOutput."""
    for chunk in out:
        print(chunk, end="", flush=True)
    print()
    return out.result


def print_answer(out: Any, choices: Sequence[str] | None, as_json: bool) -> None:
    """After the (streamed) answer: the choice, the note and the references, as ``mmrag ask``."""
    if as_json:
        print(json.dumps(out.to_dict()))
        return
    if choices is not None:
        print(out.choice + "   (" + ", ".join(f"{c}: {s:.3f}" for c, s in zip(choices, out.choice_scores)) + ")")
    if out.message:
        print(f"note: {out.message}")
    cited = {h.id for h in out.cited}
    for i, h in enumerate(out.references, start=1):
        print(f"[{i}]{'*' if h.id in cited else ' '} {h.score:8.4f}  {h.id}  {h.record.text[:70]}")


def print_drawing(out: Any, paths: Sequence[Path], sheet: Path, as_json: bool) -> None:
    """What ``mmrag draw`` prints once the files are written."""
    if as_json:
        print(json.dumps({"images": [str(p) for p in paths], "contact_sheet": str(sheet), "guidance": out.guidance,
                          "fallback": out.fallback, "references": [{"id": h.id, "score": h.score, "text": h.record.text}
                                                                   for h in out.references], "timings": out.timings,
                          "decision": out.decision, "decision_score": out.decision_score,
                          "decision_threshold": out.decision_threshold, "decision_reason": out.decision_reason}))
        return
    if out.decision is not None:
        print(f"{out.decision}: {out.decision_reason}")
    if out.fallback:
        print(f"note: {out.fallback}")
    if out.decision != "retrieved":
        print(f"guidance: {out.guidance}")
    for h in out.references:
        print(f"reference {h.rank}: {h.score:8.4f}  {h.id}  {h.record.text[:70]}")
    print("wrote " + ", ".join(str(p) for p in paths) + f" and the contact sheet {sheet}")


def _parse_where(text: str | None):
    if text is None:
        return None
    from mmrag.retrievers import ConfigError

    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"`--where` must be JSON, e.g. '{{\"kind\": \"dog\"}}', got {text!r} ({e}).") from None


def _cmd_search(args) -> int:
    if args.server:
        from .client_cli import search_via_server

        return search_via_server(args)
    from mmrag.retrievers import ConfigError, Query

    from .builders import build_reranker, build_retriever, open_knowledge_base, uses_tiny_models
    from .dev.report import TINY_NOTE, render_search, write_report
    from .search import SearchPipeline

    if args.text is None and args.image is None:
        raise ConfigError("Give a query: TEXT, --image PATH, or both.")
    if args.kb is None:
        raise ConfigError("Give --kb DIR, or --server URL to search through a running `mmrag serve`.")
    query = Query.coerce(Query(text=args.text, image=args.image, reference_text=args.reference_text))
    where = _parse_where(args.where)
    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "retriever.fusion": args.fusion,
                           "retriever.channels": args.channels, "retriever.composed_method": args.composed,
                           "retriever.hubness": args.hubness})
    kb = open_knowledge_base(cfg, create=False)
    captioner = rewriter = None
    needs_vlm = query.image is not None and query.text is not None and (
        cfg.retriever.composed_method == "cirevl"
        or (cfg.retriever.composed_method == "pdv" and query.reference_text is None))
    if needs_vlm:  # the VLM of the config captions the image and rewrites the caption
        from .builders import build_answerer, vlm_captioner, vlm_rewriter

        answerer = build_answerer(cfg)
        captioner, rewriter = vlm_captioner(answerer), vlm_rewriter(answerer)
        rewriter = rewriter if cfg.retriever.composed_method == "cirevl" else None
    search = SearchPipeline(build_retriever(cfg, kb, captioner=captioner, rewriter=rewriter), build_reranker(cfg, kb=kb))
    hits = search(query, k=args.k, where=where)
    if hits.collapsed:
        print(f"note: {hits.collapsed} near-duplicate(s) left out (retriever.near_duplicate_threshold "
              f"{cfg.retriever.near_duplicate_threshold}; null keeps them)", file=sys.stderr)
    if args.html:
        note = TINY_NOTE if uses_tiny_models(cfg, kb) else None
        path = write_report(args.html, "mmrag search", [render_search("query", query, hits)], note=note)
        print(f"wrote {path}", file=sys.stderr)
    print_hits(hits, args.json)
    return 0


def _cmd_ask(args) -> int:
    if args.server:
        from .client_cli import ask_via_server

        return ask_via_server(args)
    from mmrag.retrievers import ConfigError

    from .builders import uses_tiny_models
    from .dev.report import TINY_NOTE, render_answer, write_report
    from .vqa import RAGVQAPipeline

    choices = None
    if args.choices is not None:
        choices = [c.strip() for c in args.choices.split(";")]
        if len(choices) < 2 or not all(choices):
            raise ConfigError(f"`--choices` needs at least 2 non-empty options separated by ';', got {args.choices!r}.")
    if args.kb is None:
        raise ConfigError("Give --kb DIR, or --server URL to ask through a running `mmrag serve`.")
    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "vqa.k": args.k,
                           "vlm.choice_format": args.choice_format, "vlm.length_normalization": args.length_normalization})
    pipe = RAGVQAPipeline.from_config(cfg)
    stream = not args.json and choices is None
    out = pipe(args.question, image=args.image, where=_parse_where(args.where), rerank=not args.no_rerank,
               choices=choices, stream=stream)
    if stream:
        out = print_stream(out)
    if args.html:
        note = TINY_NOTE if uses_tiny_models(cfg, pipe.retriever.kb) else None
        path = write_report(args.html, "mmrag ask", [render_answer(args.question, args.image, out)], note=note)
        print(f"wrote {path}", file=sys.stderr)
    print_answer(out, choices, args.json)
    return 0


def _check_decide_threshold_flag(value: float | None) -> None:
    """``--decide-threshold`` is a cosine; refused here, naming the flag, before any model loads."""
    from mmrag.retrievers import ConfigError

    from .config import decide_threshold_problem

    if value is not None and decide_threshold_problem(value) is not None:
        raise ConfigError(f"`--decide-threshold` must be a cosine similarity in [-1, 1], got {value!r}; calibrate "
                          "one with `mmrag eval decide --labels FILE.jsonl --kb DIR`.")


def _cmd_draw(args) -> int:
    from mmrag.retrievers import ConfigError, Query

    _check_decide_threshold_flag(args.decide_threshold)
    if args.server:
        if args.retrieve_or_generate is not None or args.decide_threshold is not None:
            raise ConfigError("`--retrieve-or-generate` and `--decide-threshold` are not available with --server: the "
                              "server decides when its config sets draw.decide and draw.decide_threshold.")
        from .client_cli import draw_via_server

        return draw_via_server(args)

    from .builders import uses_tiny_models
    from .draw import EntityImagePipeline
    from .outputs import contact_sheet
    from .dev.report import TINY_NOTE, render_drawing, write_report

    _quiet_diffusers()
    if args.kb is None and not args.reference:
        raise ConfigError("Give --kb DIR to retrieve references, or --reference IMAGE (repeatable).")
    references = [Query.coerce(Query(image=r)).image for r in args.reference] if args.reference else None
    if args.retrieve_or_generate and args.reference:
        raise ConfigError("`--retrieve-or-generate` chooses between a retrieved image and a drawing, and `--reference` "
                          "skips retrieval: use one or the other.")
    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "draw.k": args.k,
                           "draw.num_inference_steps": args.steps, "draw.decide_threshold": args.decide_threshold})
    deciding = cfg.draw.decide if args.retrieve_or_generate is None else args.retrieve_or_generate
    if args.decide_threshold is not None and not deciding:
        raise ConfigError("`--decide-threshold` applies only when deciding: add `--retrieve-or-generate` "
                          "(or set draw.decide: true in the config).")
    if deciding and cfg.draw.decide_threshold is None:
        raise ConfigError("`--retrieve-or-generate` needs a threshold: `--decide-threshold T` (a cosine in [-1, 1] for "
                          "this embedder) or draw.decide_threshold in the config; calibrate one with `mmrag eval decide "
                          "--labels FILE.jsonl --kb DIR`.")
    pipe = EntityImagePipeline.from_config(cfg, with_kb=args.kb is not None)
    progress = _bar(args, pipe.num_inference_steps, "draw", unit="step")
    step_bar = {} if progress is None else {"callback_on_step_end": lambda gen, i, t, tensors: progress(i + 1) or {}}
    out = pipe(args.prompt, references=references, guidance=args.guidance, seed=args.seed,
               where=_parse_where(args.where), num_images_per_prompt=args.num_images,
               decide=args.retrieve_or_generate, **step_bar)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(out.images))]
    for image, path in zip(out.images, paths):
        image.save(path)
    sheet = output.with_name(f"{output.stem}.sheet.png")
    contact_sheet([h.record.open_image() for h in out.references], out.images).save(sheet)
    if args.html:
        note = TINY_NOTE if uses_tiny_models(cfg, pipe.retriever.kb if pipe.retriever else None) else None
        write_report(args.html, "mmrag draw", [render_drawing(args.prompt, out)], note=note)
    print_drawing(out, paths, sheet, args.json)
    return 0


def _cmd_eval(args) -> int:
    from .builders import build_reranker, build_retriever, open_knowledge_base
    from .evaluation import evaluate_retrieval, evaluate_vqa, load_queries, load_vqa_dataset, vqa_table

    if args.eval_command == "decide":
        from .draw import EntityImagePipeline
        from .evaluation import decide_table, evaluate_decide, load_decide_labels

        items = load_decide_labels(args.labels)
        _check_decide_threshold_flag(args.decide_threshold)  # now, not after every prompt is scored
        cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "draw.k": args.k})
        pipe = EntityImagePipeline.from_config(cfg, with_generator=False)  # scoring needs no diffusion model
        summary = evaluate_decide(pipe, items, threshold=args.decide_threshold,
                                  progress=_bar(args, len(items), "eval decide", unit="prompt"))
        print(json.dumps(summary) if args.json else decide_table(summary))
        return 0
    if args.eval_command == "generation":
        from .draw import EntityImagePipeline
        from .evaluation import (check_judge_items, evaluate_generation, generation_table, guidance_grid,
                                 load_generation_prompts)

        _quiet_diffusers()
        address = ray_address(args)
        items = load_generation_prompts(args.prompts)
        judge = None
        if args.judge is not None:  # loaded and checked against the prompts before any model
            from .toyworld.judge import load_judge

            judge = load_judge(None if args.judge is True else args.judge)
            check_judge_items(items, judge)
        cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "draw.k": args.k,
                               "draw.num_inference_steps": args.steps})
        guidances = guidance_grid(cfg.draw.guidance, args.guidances, args.eta)
        if args.ray is not None:
            from .scale.batch_eval import evaluate_generation_batch

            summary = evaluate_generation_batch(
                cfg, items, args.runs or str(Path(args.prompts).with_suffix(".runs")), guidances=guidances,
                seed=args.seed, judge=judge, ray_address=address, batch_size=args.batch_size,
                concurrency=args.concurrency, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                progress=not args.no_progress and sys.stderr.isatty())
        else:
            pipe = EntityImagePipeline.from_config(cfg)
            summary = evaluate_generation(pipe, items, pipe.retriever.kb.embedder, guidances=guidances, seed=args.seed,
                                          judge=judge, progress=_bar(args, len(items), "eval generation"))
        print(json.dumps(summary) if args.json else generation_table(summary))
        return 0
    if args.eval_command == "vqa":
        from .vqa import RAGVQAPipeline

        address = ray_address(args)
        items = load_vqa_dataset(args.dataset)
        cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "vqa.k": args.k})
        predictions = args.predictions or str(Path(args.dataset).with_suffix(".predictions.jsonl"))
        if args.ray is not None:
            from .scale.batch_eval import evaluate_vqa_batch

            runs = args.runs or str(Path(predictions).with_suffix(".runs"))
            summary = evaluate_vqa_batch(cfg, items, runs, predictions_path=predictions, ray_address=address,
                                         batch_size=args.batch_size, concurrency=args.concurrency,
                                         num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                                         progress=not args.no_progress and sys.stderr.isatty())
        else:
            summary = evaluate_vqa(RAGVQAPipeline.from_config(cfg), items, predictions_path=predictions,
                                   progress=_bar(args, len(items), "eval vqa"))
        print(json.dumps(summary) if args.json else vqa_table(summary) + f"\npredictions: {predictions}")
        return 0

    queries = load_queries(args.queries)
    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url, "retriever.fusion": args.fusion,
                           "retriever.composed_method": args.composed, "retriever.hubness": args.hubness})
    kb = open_knowledge_base(cfg, create=False)
    from .search import SearchPipeline

    search = SearchPipeline(build_retriever(cfg, kb), build_reranker(cfg, kb=kb))
    report = evaluate_retrieval(search, queries, where=_parse_where(args.where), ablate_channels=not args.no_ablation,
                                progress=_bar(args, None, "eval retrieval", unit="query"))
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0


def _cmd_tiny_models(args) -> int:
    from .dev.tiny_models import build_tiny_models

    paths = build_tiny_models(args.directory, args.only, seed=args.seed, progress=lambda m: print(m, file=sys.stderr))
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def _cmd_toy_models(args) -> int:
    from .toyworld.models import train_toy_models

    out = Path(args.out) if args.out else Path(_config(args).tiny_models.cache_dir).expanduser()
    paths = train_toy_models(out, args.only, log=lambda line: print(line, file=sys.stderr, flush=True))
    for name, path in paths.items():
        print(f"toy:{name}\t{path}")
    return 0


def _cmd_toy_bench(args) -> int:
    from .toyworld.bench import make_toy_bench

    paths = make_toy_bench(args.directory, seed=args.seed, views=args.views)
    print(paths["readme"].read_text(encoding="utf-8"), end="")
    return 0


def _cmd_demo(args) -> int:
    from .dev.demo import run_demo

    _quiet_diffusers()
    args.config = args.config or "toy"  # offline, on the trained toy models, unless told otherwise
    run_demo(_config(args), Path(args.out))
    return 0


def _cmd_env(args) -> int:
    import importlib.metadata as md

    import torch

    from mmrag import __version__

    lines = {"mmrag": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "diffusers", "accelerate", "chromadb", "llama-index-core", "pillow",
                "numpy", "pydantic"):
        try:
            lines[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            lines[pkg] = "not installed"
    lines["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    lines["hf_hub_offline"] = os.environ.get("HF_HUB_OFFLINE", "0")
    for k, v in lines.items():
        print(f"{k:<18}{v}")
    return 0


def _cmd_serve(args) -> int:
    from .serve.commands import cmd_serve

    return cmd_serve(args)


def _cmd_keys(args) -> int:
    from .serve.commands import cmd_keys

    return cmd_keys(args)


def _cmd_mcp(args) -> int:
    from .mcp_server import cmd_mcp

    return cmd_mcp(args)


_COMMANDS = {"ingest": _cmd_ingest, "kb": _cmd_kb, "search": _cmd_search, "ask": _cmd_ask, "draw": _cmd_draw, "eval": _cmd_eval, "tiny-models": _cmd_tiny_models, "demo": _cmd_demo, "env": _cmd_env, "mcp": _cmd_mcp, "serve": _cmd_serve, "keys": _cmd_keys, "batch": _cmd_batch, "match": _cmd_match, "toy-models": _cmd_toy_models, "toy-bench": _cmd_toy_bench}

if __name__ == "__main__":
    sys.exit(main())
