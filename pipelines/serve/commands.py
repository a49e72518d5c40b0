"""``mmrag serve`` and ``mmrag keys``: their parsers and commands, wired into ``pipelines/cli.py``.

Nothing heavy is imported here at module level, so ``mmrag --help`` works without the ``serve``
extra; ``mmrag serve`` without it fails with the pip command. Errors are raised as typed
:class:`MMRAGError` for the CLI to print as one line (exit 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Sequence

from .keys import SCOPES, KeyStore

LOOPBACK_NAMES = ("localhost",)


def add_serve_parser(sub, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..cli import _add_kb

    p = sub.add_parser("serve", parents=list(parents),
                       help="serve search, ask, draw and the KB's records over HTTP (extra: serve)")
    _add_kb(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other than a loopback one needs API keys)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin call the API (CORS; repeatable; default: none)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="N",
                   help="largest request body in MiB (default 20); larger ones get 413")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="S",
                   help="a draw still running after S seconds answers 202 with a job to poll (default 60)")
    return p


def add_keys_parser(sub, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    keys = sub.add_parser("keys", help="API keys of `mmrag serve`").add_subparsers(
        dest="keys_command", required=True, metavar="SUBCOMMAND", help="create, list or revoke")
    p = keys.add_parser("create", parents=list(parents), help="create a key and print it (once: it is not stored)")
    p.add_argument("--kb", metavar="DIR", required=True, help="knowledge-base folder")
    p.add_argument("--scope", required=True, choices=SCOPES,
                   help="read: search, ask, draw, list; write: also add and delete records; admin: everything")
    p.add_argument("--name", help="a label, e.g. who the key is for")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = keys.add_parser("list", parents=list(parents), help="the keys (ids, scopes, names; never the secrets)")
    p.add_argument("--kb", metavar="DIR", required=True, help="knowledge-base folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = keys.add_parser("revoke", parents=list(parents), help="revoke a key (a running server stops taking it)")
    p.add_argument("--kb", metavar="DIR", required=True, help="knowledge-base folder")
    p.add_argument("id", help="the key's id (`mmrag keys list`)")
    return keys


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def cmd_serve(args) -> int:
    from mmrag.retrievers.errors import ConfigError

    from ..cli import _config
    from . import require_serve_extra
    from .errors import StartupError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"`--port` must be in 0..65535, got {args.port}.")
    if not args.max_upload_mb > 0:
        raise ConfigError(f"`--max-upload-mb` must be > 0, got {args.max_upload_mb}.")
    if not args.request_timeout >= 0:
        raise ConfigError(f"`--request-timeout` must be >= 0 seconds, got {args.request_timeout}.")
    keys = KeyStore.for_kb(args.kb)  # also: --kb names a KB, before anything loads
    local = is_loopback(args.host)
    if not local and not keys.has_keys():
        raise StartupError(
            f"`--host {args.host}` is not a loopback address and the knowledge base {args.kb} has no API keys, "
            "so anyone who reaches the port could read and change it: create one first with "
            f"`mmrag keys create --kb {args.kb} --scope read` (or bind --host 127.0.0.1).", param="host")
    require_serve_extra()
    import uvicorn

    from .app import create_app

    cfg = _config(args, **{"kb.path": args.kb, "kb.url": args.url})
    app = create_app(cfg, kb_path=args.kb, keys=keys, allow_origins=args.allow_origin,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), request_timeout_s=args.request_timeout,
                     require_auth=not local)
    auth = "API keys required" if not local or keys.has_keys() else "open to this machine (no API keys yet)"
    print(f"mmrag serve: http://{_url_host(args.host)}:{args.port} ({auth}); API docs at /docs", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                  log_level="info" if args.verbose else "warning")).run()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def cmd_keys(args) -> int:
    store = KeyStore.for_kb(args.kb)
    if args.keys_command == "create":
        key, token = store.create(args.scope, args.name)
        if args.json:
            print(json.dumps({**key.public(), "key": token}))
        else:
            print(token)
            print(f"key {key.id} ({key.scope}) created: this is the only time it is shown; the server stores "
                  "only its hash.", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        keys = [k.public() for k in store.keys()]
        if args.json:
            print(json.dumps(keys))
        elif not keys:
            print("no API keys (a server bound to 127.0.0.1 is open to this machine)")
        for k in keys if not args.json else []:
            print(f"{k['id']}  {k['scope']:<5}  {k['created']}  {k['name'] or ''}".rstrip())
        return 0
    key = store.revoke(args.id)
    print(f"revoked {key.id} ({key.scope}{', ' + key.name if key.name else ''})")
    return 0
