"""Helpers of the `mmrag serve` tests: a tiny KB, the tiny preset pointed at it, and a real uvicorn
server in a background thread."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import socket
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import uvicorn
import yaml
from PIL import Image, ImageDraw

from mmrag.pipelines.cli import _common
from mmrag.pipelines.config import CONFIG_DIR
from mmrag.pipelines.serve.commands import add_keys_parser, add_serve_parser, cmd_keys, cmd_serve
from mmrag.retrievers import DualEncoder, KnowledgeBase, Record

SHAPES = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("black", "square"), ("orange", "star"),
          ("purple", "star")]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "black": (10, 10, 10),
           "orange": (250, 150, 20), "purple": (140, 30, 160)}


def shape_image(colour: str, shape: str, size: int = 32, shift: int = 0) -> Image.Image:
    im = Image.new("RGB", (size, size), (240, 240, 240))
    box = (2 + shift, 3, size - 3, size - 2 - shift)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        c = size // 2
        draw.polygon([(c, 2), (size - 3, size - 3), (2, c - 2), (size - 3, c - 2), (2, size - 3)], fill=COLOURS[colour])
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bomb_header_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data behind it: a
    decoder that trusted the header would allocate gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def build_kb(path: Path, clip_model: Path) -> Path:
    """A KB of the six SHAPES records (ids r0..r5, metadata shape/colour/n)."""
    kb = KnowledgeBase.open(path, DualEncoder(clip_model))
    report = kb.add([Record(id=f"r{i}", text=f"a {colour} {shape}, number {i}",
                            image=shape_image(colour, shape, shift=i),
                            metadata={"shape": shape, "colour": colour, "n": i})
                     for i, (colour, shape) in enumerate(SHAPES)])
    assert report.added == len(SHAPES), report.summary()
    return path


def tiny_config(tiny_models_dir: Path, kb_path: Path) -> dict:
    """The tiny preset on this session's tiny models, near-duplicate collapse off (the random tiny
    encoder sees every image as one), short generations and drawings."""
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["tiny_models"] = {"cache_dir": str(tiny_models_dir)}
    data["kb"] = {"path": str(kb_path)}
    data.setdefault("retriever", {})["near_duplicate_threshold"] = None
    data.setdefault("vlm", {})["max_new_tokens"] = 8
    data.setdefault("draw", {}).update(num_inference_steps=2, k=1)
    return data


@contextlib.contextmanager
def live_server(app, startup_timeout_s: float = 300.0) -> Iterator[str]:
    """Run ``app`` on a real uvicorn server on 127.0.0.1 (a free port, bound here so that no other
    process can take it between choosing and binding); yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s  # a bound on a hang, not a timing assertion
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """``(event, data)`` of each server-sent event in a response body (comments skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:"):].removeprefix(" "))
        if data:
            events.append((event, "\n".join(data)))
    return events


def serve_cli(argv: list[str]) -> int:
    """``mmrag serve|keys ...`` through the parsers and commands that pipelines/cli.py wires in."""
    parser = argparse.ArgumentParser(prog="mmrag")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub, [_common()])
    add_keys_parser(sub, [_common(models=False)])
    args = parser.parse_args(argv)
    return {"serve": cmd_serve, "keys": cmd_keys}[args.command](args)



if __name__ == "__main__":  # python -m tests.serve_fixtures serve --kb DIR ...
    sys.exit(serve_cli(sys.argv[1:]))
