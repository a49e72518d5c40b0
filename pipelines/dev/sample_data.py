"""A small, seeded sample knowledge base of procedurally drawn "entities" for the demo and tests.

Each entity has an invented name, a shape, two colours and a pattern; it is drawn two or three
times with a different layout, and each drawing gets a text that names the entity. Nothing is
downloaded and the same seed gives the same files byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

_SYLLABLES = ["zor", "bla", "qui", "tam", "vel", "chor", "tai", "pic", "aro", "nes", "mib", "lun", "dra", "fex", "oku"]
_SHAPES = ["circle", "square", "triangle", "diamond", "star", "ring"]
_COLOURS = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 210, 40), "green": (40, 170, 70),
    "teal": (30, 160, 160), "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (235, 110, 170),
    "brown": (130, 80, 40), "grey": (128, 128, 128), "black": (20, 20, 20), "white": (245, 245, 245),
}
_PATTERNS = ["plain", "striped", "dotted", "checked"]


def make_sample_set(folder: str | os.PathLike, *, n_entities: int = 24, images_per_entity: tuple[int, int] = (2, 3),
                    size: int = 96, seed: int = 0) -> Path:
    """Write ``<folder>/<entity>_<n>.png`` with a ``.json`` sidecar (text + metadata) per image.

    Returns the folder, ready for ``KnowledgeBase.ingest`` / ``mmrag ingest``.
    """
    if n_entities <= 0:
        raise ValueError(f"`n_entities` must be positive, got {n_entities!r}.")
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    colours = list(_COLOURS)
    for _ in range(n_entities):
        name = _entity_name(rng, names)
        shape, pattern = rng.choice(_SHAPES), rng.choice(_PATTERNS)
        fg, bg = rng.sample(colours, 2)
        for n in range(rng.randint(*images_per_entity)):
            image = _draw(rng, shape, pattern, _COLOURS[fg], _COLOURS[bg], size)
            stem = f"{name.lower()}_{n}"
            image.save(folder / f"{stem}.png", optimize=False)
            text = f"The {name}: a {pattern} {fg} {shape} on a {bg} background."
            meta = {"entity": name, "shape": shape, "colour": fg, "background": bg, "pattern": pattern, "view": n}
            (folder / f"{stem}.json").write_text(json.dumps({"text": text, "metadata": meta}, indent=1), encoding="utf-8")
    return folder


def _entity_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in taken:
            taken.add(name)
            return name


def _draw(rng: random.Random, shape: str, pattern: str, fg, bg, size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.25, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    angle = rng.uniform(0, 2 * math.pi)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=max(2, size // 12))
    elif shape == "square":
        d.polygon(_regular(cx, cy, r, 4, angle), fill=fg)
    elif shape == "diamond":
        d.polygon(_regular(cx, cy, r, 4, math.pi / 4), fill=fg)
    elif shape == "triangle":
        d.polygon(_regular(cx, cy, r, 3, angle), fill=fg)
    else:  # star
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = angle + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=fg)
    mark = tuple(255 - c for c in fg)
    step = max(4, size // 10)
    if pattern == "striped":
        for x in range(0, size, step * 2):
            d.line([(x, 0), (x, size)], fill=mark, width=1)
    elif pattern == "dotted":
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                d.point((x, y), fill=mark)
    elif pattern == "checked":
        for x in range(0, size, step * 2):
            for y in range(0, size, step * 2):
                d.rectangle([x, y, x + 1, y + 1], fill=mark)
    return im


def _regular(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n)) for i in range(n)]
