"""``mmrag search|ask|draw --server URL``: the CLI's commands against a running ``mmrag serve``.

Each function takes the command's parsed arguments (the parsers of ``pipelines/cli.py`` plus
:func:`add_server_arguments`) and prints what the local command prints (table, JSON, streamed
answer, files, HTML report) from :class:`~mmrag.pipelines.client.Client` results, without loading a
model in this process. The differences are where a server must differ: ``"image"`` in ``--json``
output is the stored image's URL instead of a path on the server's disk, and flags that choose
models or settings (``--config``, ``--device``, ``--rerank NAME``, ...) are refused
with a message, since the server's config decides them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .client import Client

# flag -> argparse dest of the flags that choose models, settings or a local KB: under --server the
# server's config decides them, so giving one would silently not apply
_LOCAL_FLAGS = {"--kb": "kb", "--url": "url", "--config": "config", "--device": "device", "--dtype": "dtype"}
_SEARCH_SETTINGS = {"--rerank": "rerank"}  # --fusion, --composed and --hubness are sent with the request
_ASK_SETTINGS = {"--rerank": "rerank", "--choice-format": "choice_format",
                 "--length-normalization": "length_normalization"}
_DRAW_SETTINGS = {"--rerank": "rerank"}


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server URL`` and ``--api-key KEY`` on a search/ask/draw subparser."""
    parser.add_argument("--server", metavar="URL",
                        help="use the `mmrag serve` at URL (its KB, models and config) instead of loading models here")
    parser.add_argument("--api-key", metavar="KEY",
                        help="API key for --server (default: the MMRAG_API_KEY environment variable)")


def client_for(args: argparse.Namespace) -> Client:
    """The client of ``--server`` with ``--api-key`` (else ``MMRAG_API_KEY``)."""
    return Client(args.server, api_key=getattr(args, "api_key", None))


def search_via_server(args: argparse.Namespace) -> int:
    """``mmrag search --server URL``: what ``_cmd_search`` prints, from the server's hits."""
    from mmrag.retrievers import ConfigError, Query

    from .cli import _parse_where, print_hits

    _refuse_local_flags(args, "search", {**_LOCAL_FLAGS, **_SEARCH_SETTINGS})
    if args.text is None and args.image is None:
        raise ConfigError("Give a query: TEXT, --image PATH, or both.")
    query = Query(text=args.text, image=args.image, reference_text=args.reference_text)
    with client_for(args) as client:
        overrides = {"channels": args.channels, "fusion": args.fusion, "composed_method": args.composed,
                     "hubness": args.hubness}
        hits = client.retrieve(query, k=args.k, where=_parse_where(args.where),
                               **{name: value for name, value in overrides.items() if value is not None})
        if hits.collapsed:
            print(f"note: {hits.collapsed} near-duplicate(s) left out (the server's "
                  "retriever.near_duplicate_threshold; null keeps them)", file=sys.stderr)
        if args.html:
            from .dev.report import TINY_NOTE, render_search, write_report

            shown = [with_image(client, h) for h in hits]
            note = TINY_NOTE if server_uses_tiny_models(client) else None
            path = write_report(args.html, "mmrag search", [render_search("query", Query.coerce(query), shown)],
                                note=note)
            print(f"wrote {path}", file=sys.stderr)
    print_hits(hits, as_json=args.json)
    return 0


def ask_via_server(args: argparse.Namespace) -> int:
    """``mmrag ask --server URL``: the streamed answer, then the references, as ``_cmd_ask``."""
    from mmrag.retrievers import ConfigError

    from .cli import _parse_where, print_answer, print_stream

    _refuse_local_flags(args, "ask", {**_LOCAL_FLAGS, **_ASK_SETTINGS})
    choices = None
    if args.choices is not None:
        choices = [c.strip() for c in args.choices.split(";")]
        if len(choices) < 2 or not all(choices):
            raise ConfigError(f"`--choices` needs at least 2 non-empty options separated by ';', got {args.choices!r}.")
    stream = not args.json and choices is None
    with client_for(args) as client:
        out = client.ask(args.question, image=args.image, k=args.k, where=_parse_where(args.where),
                         rerank=not args.no_rerank, choices=choices, stream=stream)
        if stream:
            out = print_stream(out)
        if args.html:
            from .dev.report import TINY_NOTE, render_answer, write_report

            shown = replace(out, references=[with_image(client, h) for h in out.references])
            note = TINY_NOTE if server_uses_tiny_models(client) else None
            path = write_report(args.html, "mmrag ask", [render_answer(args.question, args.image, shown)], note=note)
            print(f"wrote {path}", file=sys.stderr)
    print_answer(out, choices, as_json=args.json)
    return 0


def draw_via_server(args: argparse.Namespace) -> int:
    """``mmrag draw --server URL``: the image(s), the contact sheet and the summary, as ``_cmd_draw``."""
    from mmrag.retrievers import Query

    from .cli import _bar, _parse_where, print_drawing
    from .outputs import contact_sheet

    _refuse_local_flags(args, "draw", {**_LOCAL_FLAGS, **_DRAW_SETTINGS})
    references = [Query.coerce(Query(image=r)).image for r in args.reference] if args.reference else None
    # the total comes with the job's first progress report (the server's draw.num_inference_steps)
    progress = _bar(args, args.steps, "draw", unit="step")
    with client_for(args) as client:
        out = client.draw(args.prompt, k=args.k, references=references, guidance=args.guidance,
                          num_inference_steps=args.steps, seed=args.seed, where=_parse_where(args.where),
                          num_images_per_prompt=args.num_images, progress=progress)
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        paths = [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}")
                 for i in range(len(out.images))]
        for image, path in zip(out.images, paths):
            image.save(path)
        sheet = output.with_name(f"{output.stem}.sheet.png")
        shown = replace(out, references=[with_image(client, h) for h in out.references])
        contact_sheet([h.record.image for h in shown.references], out.images).save(sheet)
        if args.html:
            from .dev.report import TINY_NOTE, render_drawing, write_report

            note = TINY_NOTE if server_uses_tiny_models(client) else None
            write_report(args.html, "mmrag draw", [render_drawing(args.prompt, shown)], note=note)
    print_drawing(out, paths, sheet, as_json=args.json)
    return 0


def with_image(client: Client, hit: Any) -> Any:
    """``hit`` with its record's image fetched (a PIL image), for the reports and the contact
    sheet, which read ``record.image`` as a local picture."""
    return replace(hit, record=replace(hit.record, image=client.image(hit)))


def server_uses_tiny_models(client: Client) -> bool:
    """Whether the server's embedder is one of the tiny random models (the reports then say so).

    Uses the server's ``tiny_models`` flag when it sends one; else the local rule of
    ``builders.uses_tiny_models``, which recognises a built tiny model's folder only when the
    client shares the server's disk."""
    info = client.info()
    if "tiny_models" in info:
        return bool(info["tiny_models"])
    model = str(info.get("embedder", ""))
    from .config import TINY_PREFIX

    return model.startswith(TINY_PREFIX) or (Path(model).is_absolute() and (Path(model) / ".complete").exists())


def _refuse_local_flags(args: argparse.Namespace, command: str, flags: dict[str, str]) -> None:
    from mmrag.retrievers import ConfigError

    given = [flag for flag, dest in flags.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(f'`{f}`' for f in given)} cannot be used with `--server`: the server's own KB, "
                          f"models and config apply there. Drop {'it' if len(given) == 1 else 'them'}, or run "
                          f"`mmrag {command}` without --server to use them locally.")
