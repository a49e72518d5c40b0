"""Ingestion corpora written to real files: good (image, text) pairs, one bad or tricky item per
failure case, manifests and WebDataset shards. Everything is drawn procedurally and seeded, so two
calls with the same arguments write identical bytes.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import os
import random
import shutil
import socket
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# The bad corpus's decompression bomb is over this limit and over the default one; every other
# image in it is far below both.
BAD_CORPUS_MAX_PIXELS = 100_000
BOMB_SIZE = (8200, 8200)  # 67,240,000 pixels: over DEFAULT_MAX_IMAGE_PIXELS, under Pillow's own limits
BAD_MANIFEST = "bad.jsonl"
HOSTILE_CSV = "hostile.csv"
HOSTILE_JSONL = "hostile.jsonl"
# Shape bombs: tiny files, few pixels, shapes that explode when an encoder resizes them. WIDE_SIZE
# is the case; the corpus's are under BAD_CORPUS_MAX_PIXELS, so that only their shape is wrong.
WIDE_SIZE = (200_000, 1)
CORPUS_WIDE_SIZE = (90_000, 1)
CORPUS_TALL_SIZE = (1, 90_000)
PANORAMA_SIZE = (600, 60)  # 10:1, as wide as real panoramas get: accepted
# Written into every file outside the source that a hostile link points to: no reason may quote it.
SECRET = "root:x:0:0:secret-outside-the-source:/root:/bin/bash"
FIRST_FRAME_RGB = (220, 40, 40)
SECOND_FRAME_RGB = (40, 40, 220)
EXIF_ORIENTATION = 0x0112

_SHAPES = ("circle", "square", "triangle", "bar")
_HUE_NAMES = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")


# ------------------------------------------------------------------------------------ good images
def drawn_image(index: int, *, seed: int = 0, size: tuple[int, int] = (48, 40)) -> tuple[Image.Image, str]:
    """A procedurally drawn RGB picture (a shape on a background) and a caption that describes it."""
    rng = random.Random(seed * 1_000_003 + index)
    bg_hue = (index * 0.618034 + seed * 0.1) % 1.0  # golden-ratio steps spread neighbours' colours
    fg_hue = (bg_hue + 0.5) % 1.0
    bg = _rgb(bg_hue, 0.35, 0.9)
    fg = _rgb(fg_hue, 0.9, 0.6)
    shape = rng.choice(_SHAPES)
    im = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(im)
    w, h = size
    x0, y0 = rng.randrange(w // 3), rng.randrange(h // 3)
    x1, y1 = x0 + rng.randrange(w // 3, w // 2 + 1), y0 + rng.randrange(h // 3, h // 2 + 1)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fg)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fg)
    elif shape == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fg)
    else:
        draw.rectangle((0, y0, w - 1, y0 + max(2, h // 8)), fill=fg)
    fg_name, bg_name = _HUE_NAMES[int(fg_hue * 8)], _HUE_NAMES[int(bg_hue * 8)]
    text = f"a {fg_name} {shape} on a pale {bg_name} background, picture {seed}-{index}"
    return im, text


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def make_good_images(folder, n: int, *, seed: int = 0, size: tuple[int, int] = (48, 40),
                     sidecar: str | None = "txt") -> list[tuple[Path, str]]:
    """Write ``n`` distinct plain RGB images (JPEG and PNG in turn) with distinct texts.

    ``sidecar`` is ``"txt"`` (the text), ``"json"`` (``{"text", "metadata": {"seed", "index"}}``) or
    None (no sidecar, for manifests). Plain RGB JPEG/PNG files are stored byte for byte by ingestion.
    Returns ``(image path, text)`` pairs.
    """
    if sidecar not in ("txt", "json", None):
        raise ValueError(f"`sidecar` must be 'txt', 'json' or None, got {sidecar!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        im, text = drawn_image(i, seed=seed, size=size)
        path = folder / f"good_{seed}_{i:04d}{'.jpg' if i % 2 == 0 else '.png'}"
        im.save(path, quality=90)
        if sidecar == "txt":
            path.with_suffix(".txt").write_text(text, encoding="utf-8")
        elif sidecar == "json":
            path.with_suffix(".json").write_text(json.dumps({"text": text, "metadata": {"seed": seed, "index": i}}))
        written.append((path, text))
    return written


# ---------------------------------------------------------------------------------- tricky images
def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    """A CMYK JPEG: cyan grows left to right, magenta top to bottom, some yellow and black."""
    x = np.linspace(0, 255, 32).astype(np.uint8)
    y = np.linspace(0, 255, 24).astype(np.uint8)
    c, m = np.meshgrid(x, y)
    cmyk = np.dstack([c, m, np.full_like(c, 60), np.full_like(c, 30)])
    return encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)


def gray16_png() -> bytes:
    """A 16-bit grayscale PNG whose values span 0..65535 (most of them above 255)."""
    values = np.linspace(0, 65535, 32 * 16).round().astype(np.uint16).reshape(16, 32)
    return encode(Image.fromarray(values), "PNG")


def palette_alpha_png() -> bytes:
    """A palette PNG whose entries are transparent (0), half transparent (1) and opaque (2, 3)."""
    indices = np.tile(np.repeat(np.arange(4, dtype=np.uint8), 6), (16, 1))  # 16 x 24, four colour bands
    im = Image.fromarray(indices, "P")
    im.putpalette([200, 30, 30, 30, 160, 30, 30, 30, 200, 90, 90, 90])
    return encode(im, "PNG", transparency=bytes([0, 128, 255, 255]))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), FIRST_FRAME_RGB), Image.new("RGB", (16, 16), SECOND_FRAME_RGB)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 40x24 white JPEG with a red block in its top-left corner, tagged with an EXIF orientation
    (6: the viewer must turn it 90 degrees clockwise, to 24x40 with the block top-right)."""
    im = Image.new("RGB", (40, 24), (255, 255, 255))
    ImageDraw.Draw(im).rectangle((0, 0, 11, 7), fill=(255, 0, 0))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def noisy_jpeg(size: tuple[int, int] = (120, 96), seed: int = 0) -> bytes:
    """A JPEG of random noise (large scan data, so a cut lands in the pixels, not the header)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = noisy_jpeg()
    return data[: len(data) * 6 // 10]


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, a few KB on disk: a decompression bomb.

    Written chunk by chunk, so that making it never holds the decoded pixels in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit gray
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------ bad corpora
def make_bad_corpus(folder) -> dict[str, str]:
    """Write one bad or tricky item per case into ``folder`` (each with a correct sidecar unless the
    sidecar is the case) and return ``{ref: expected outcome}``.

    ``ref`` is the path relative to ``folder`` that the folder source reports: the image's, or the
    sidecar's for a sidecar without an image. The outcome is ``"reject:<part of the reason>"`` or
    ``"accept:<part of a conversion note, or ''>"``. Outcomes hold for the default limits and for
    ``max_pixels=BAD_CORPUS_MAX_PIXELS``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def item(name: str, image: bytes | None, outcome: str, text: bytes | None = None) -> None:
        path = folder / name
        if image is not None:
            path.write_bytes(image)
        if text is None:
            text = f"tricky case {Path(name).stem}".encode()
        path.with_suffix(".txt").write_bytes(text)
        expected[name if image is not None else path.with_suffix(".txt").name] = outcome

    def distinct(k: int) -> bytes:
        return encode(drawn_image(k, seed=99)[0], "JPEG", quality=90)

    item("missing.jpg", None, "reject:no image for this sidecar")
    (folder / "no_sidecar.jpg").write_bytes(distinct(0))
    expected["no_sidecar.jpg"] = "reject:no sidecar text"
    item("zero_bytes.jpg", b"", "reject:empty (0 bytes)")
    item("truncated.jpg", truncated_jpeg(), "reject:truncated")
    item("not_an_image.jpg", b"this is a text file, not a JPEG\n" * 4, "reject:not an image file")
    item("bomb.png", png_bomb(*BOMB_SIZE), "reject:pixels, over the limit of")
    item("cmyk.jpg", cmyk_jpeg(), "accept:converted CMYK to RGB")
    item("gray16.png", gray16_png(), "accept:converted 16-bit to 8-bit")
    item("palette_alpha.png", palette_alpha_png(), "accept:flattened transparency onto white")
    item("animated.gif", animated_gif(), "accept:animated image: kept the first frame")
    item("rotated.jpg", exif_rotated_jpeg(), "accept:applied EXIF orientation")
    item("plain.jpg", distinct(1), "accept:")
    item("bad_utf8.jpg", distinct(2), "reject:not valid UTF-8", text=b"caf\xe9 au lait")  # Latin-1, not UTF-8
    item("empty_text.jpg", distinct(3), "reject:empty text", text=b" \n\t ")
    item("long_text.jpg", distinct(4), "reject:over the limit of 8192", text=b"word " * 2000)
    item("nul_text.jpg", distinct(5), "reject:NUL character", text=b"before\x00after")
    return expected


def make_hostile_corpus(folder, outside) -> dict[str, str]:
    """Write one hostile item per kind into ``folder`` and return ``{ref: expected outcome}`` as
    :func:`make_bad_corpus` does (and, as there, for both pixel limits): files that are not regular
    (FIFO, socket, character device), symlinks leading out of the folder (an image, sidecars, a
    folder), a symlink inside it, shape bombs and a wide-but-real panorama.

    ``outside`` is a folder outside whatever is ingested; the escaping links point into it, at
    files holding :data:`SECRET`. The device kind is written only where ``mknod`` is permitted
    (root); the returned outcomes always match the files written.
    """
    folder, outside = Path(folder), Path(outside)
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def text_for(name: str) -> None:
        (folder / name).with_suffix(".txt").write_text(f"hostile case {Path(name).stem}", encoding="utf-8")

    def picture(k: int) -> bytes:
        return encode(drawn_image(k, seed=97)[0], "PNG")

    # Not regular files: each would block open() (FIFO) or act on being opened (device).
    os.mkfifo(folder / "fifo.jpg")
    text_for("fifo.jpg")
    expected["fifo.jpg"] = "reject:is a FIFO (named pipe), not a regular file"
    (folder / "fifo_sidecar.png").write_bytes(picture(0))
    os.mkfifo(folder / "fifo_sidecar.txt")
    expected["fifo_sidecar.png"] = "reject:is a FIFO (named pipe), not a regular file"
    unix_socket(folder / "socket.png")
    text_for("socket.png")
    expected["socket.png"] = "reject:is a socket, not a regular file"
    try:
        os.mknod(folder / "device.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is
    except (PermissionError, OSError):
        pass
    else:
        text_for("device.jpg")
        expected["device.jpg"] = "reject:is a character device, not a regular file"

    # Symlinks out of the folder: never read, never described beyond their name.
    (outside / "photo.png").write_bytes(picture(1))
    (outside / "secret.txt").write_text(SECRET, encoding="utf-8")
    (outside / "secret.json").write_text(SECRET, encoding="utf-8")  # not JSON: its error must not quote it
    (outside / "more").mkdir(exist_ok=True)
    (outside / "more" / "deep.png").write_bytes(picture(2))
    (outside / "more" / "deep.txt").write_text(SECRET, encoding="utf-8")
    os.symlink(outside / "photo.png", folder / "link_out.png")
    text_for("link_out.png")
    expected["link_out.png"] = "reject:resolves outside the source folder"
    (folder / "secret_text.png").write_bytes(picture(3))
    os.symlink(outside / "secret.txt", folder / "secret_text.txt")
    expected["secret_text.png"] = "reject:resolves outside the source folder"
    (folder / "secret_json.png").write_bytes(picture(4))
    os.symlink(outside / "secret.json", folder / "secret_json.json")
    expected["secret_json.png"] = "reject:resolves outside the source folder"
    os.symlink(outside / "more", folder / "linked_out")
    expected["linked_out"] = "reject:resolves outside the source folder"
    # A link that stays inside is fine (its target hides in a dot-folder, which is not walked).
    (folder / ".targets").mkdir(exist_ok=True)
    (folder / ".targets" / "inside.png").write_bytes(picture(5))
    os.symlink(folder / ".targets" / "inside.png", folder / "link_in.png")
    text_for("link_in.png")
    expected["link_in.png"] = "accept:"

    # Shape bombs: about 100 bytes, 90,000 pixels, gigabytes once resized for an encoder.
    for name, size in (("wide.png", CORPUS_WIDE_SIZE), ("tall.png", CORPUS_TALL_SIZE)):
        (folder / name).write_bytes(png_bomb(*size))
        text_for(name)
        expected[name] = "reject:over the limit of 100:1"
    panorama = Image.new("RGB", PANORAMA_SIZE, (90, 140, 200))
    ImageDraw.Draw(panorama).rectangle((0, 40, 599, 59), fill=(60, 120, 40))
    (folder / "panorama.jpg").write_bytes(encode(panorama, "JPEG", quality=90))
    text_for("panorama.jpg")
    expected["panorama.jpg"] = "accept:"
    return expected


def unix_socket(path) -> Path:
    """Leave a unix socket file at ``path``. Bound in a short temporary folder and moved, because a
    socket's path is limited to about 100 bytes and ``path`` may be longer."""
    short = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(short / "s"))
        os.rename(short / "s", path)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    return Path(path)


def make_hostile_manifests(folder) -> dict[str, str]:
    """Write ``folder/hostile.csv`` and ``folder/hostile.jsonl`` (and the images they name) with
    one hostile row or line per manifest kind; return ``{"NAME:LINE": expected outcome}``.

    The CSV has a quote that is never closed on line 3: the rows after it must still be read.
    The JSONL has values megabytes long (their reasons must stay short) and a FIFO image path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(3):
        name = f"row{k}.jpg"
        (folder / name).write_bytes(encode(drawn_image(k, seed=96)[0], "JPEG", quality=90))
        names.append(name)
    os.mkfifo(folder / "fifo.png")
    lines = [
        "image,text",
        f"{names[0]},a good row before the broken one",
        f'{names[1]},"a caption whose quote is never closed',
        f"{names[1]},a good row the open quote swallowed",
        f"{names[2]},another good row after it",
        "fifo.png,a row naming a FIFO",
    ]
    (folder / HOSTILE_CSV).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    expected = {
        f"{HOSTILE_CSV}:2": "accept:",
        f"{HOSTILE_CSV}:3": "reject:unterminated quote starting at line 3",
        f"{HOSTILE_CSV}:4": "accept:",
        f"{HOSTILE_CSV}:5": "accept:",
        f"{HOSTILE_CSV}:6": "reject:is a FIFO (named pipe), not a regular file",
    }
    huge = "x" * 1_000_000
    jsonl = [
        ({"image": "../" + huge, "text": "a path a megabyte long"}, "reject:outside the manifest's folder"),
        ({"image": [huge], "text": "an image field that is a list"}, "reject:must be a path or an http(s) URL"),
        ({"image": huge + "://x", "text": "a megabyte-long URL scheme"}, "reject:unsupported URL scheme"),
        ({"image": "fifo.png", "text": "a FIFO named by a manifest"}, "reject:is a FIFO (named pipe)"),
    ]
    (folder / HOSTILE_JSONL).write_text("".join(json.dumps(obj) + "\n" for obj, _ in jsonl), encoding="utf-8")
    expected.update({f"{HOSTILE_JSONL}:{n}": outcome for n, (_, outcome) in enumerate(jsonl, 1)})
    return expected


def make_bad_manifest(folder) -> dict[str, str]:
    """Write ``folder/bad.jsonl`` (and the one good image it names) with one bad line per manifest
    case; return ``{"bad.jsonl:LINE": expected outcome}`` as :func:`make_bad_corpus` does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ok.jpg").write_bytes(encode(drawn_image(0, seed=98)[0], "JPEG", quality=90))
    outside = folder.resolve().parent / "outside.jpg"  # named, never written: it must not be read
    os.symlink(outside, folder / "escape_link.jpg")
    lines = [
        (json.dumps({"image": "ok.jpg", "text": "a good manifest line", "id": "m1", "metadata": {"k": "v"}}),
         "accept:"),
        ("", None),  # blank lines are skipped but still counted in line numbers
        ('{"image": "ok.jpg", "text": ', "reject:not valid JSON"),
        (json.dumps(["ok.jpg", "a list, not an object"]), "reject:expected an object"),
        (json.dumps({"text": "no image field"}), "reject:missing the 'image' field"),
        (json.dumps({"image": "../outside.jpg", "text": "dot-dot"}), "reject:outside the manifest's folder"),
        (json.dumps({"image": str(outside), "text": "absolute"}), "reject:outside the manifest's folder"),
        (json.dumps({"image": "escape_link.jpg", "text": "symlink"}), "reject:outside the manifest's folder"),
        (json.dumps({"image": "http://127.0.0.1:9/remote.jpg", "text": "remote"}), "reject:remote fetching is off"),
        (json.dumps({"image": "does_not_exist.jpg", "text": "missing file"}), "reject:image file not found"),
    ]
    (folder / BAD_MANIFEST).write_text("".join(line + "\n" for line, _ in lines), encoding="utf-8")
    return {f"{BAD_MANIFEST}:{n}": outcome for n, (_, outcome) in enumerate(lines, 1) if outcome is not None}


# ------------------------------------------------------------------------- manifests and shards
def make_jsonl_manifest(path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_csv_manifest(path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    """Write a CSV manifest; ``columns`` defaults to the keys of the first row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_webdataset_tar(path, samples: list[tuple[str, dict[str, Any]]]) -> Path:
    """Write a WebDataset shard: for each ``(key, {ext: content})`` the members ``key.ext`` in the
    given order. Content is bytes, a str (UTF-8) or a dict (JSON), as img2dataset writes them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, content in members.items():
                if isinstance(content, dict):
                    content = json.dumps(content).encode()
                elif isinstance(content, str):
                    content = content.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def img2dataset_samples(n: int, *, seed: int = 0, with_txt: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """``n`` samples laid out as img2dataset writes them: ``key.jpg``, ``key.txt``, ``key.json``."""
    samples = []
    for i in range(n):
        im, caption = drawn_image(i, seed=seed)
        key = f"{seed:05d}{i:04d}"
        members: dict[str, Any] = {"jpg": encode(im, "JPEG", quality=90)}
        if with_txt:
            members["txt"] = caption
        members["json"] = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key,
                           "status": "success", "width": im.width, "height": im.height}
        samples.append((key, members))
    return samples
