"""Self-contained HTML reports (thumbnails inlined as data URIs; every text escaped).

Open the file in any browser, no server needed. Record texts are user data and may contain
markup such as ``<script>``: they are always shown as text.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from mmrag.retrievers import Hit, Query

TINY_NOTE = ("These results come from mmrag's tiny, randomly initialised offline models: they show the plumbing "
             "(what was retrieved, fused, cited and drawn, with every score), not quality; answers and images from "
             "random weights are noise.")

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
.note{background:#fff4d6;border:1px solid #e0c060;padding:.6rem 1rem;border-radius:6px}
.query{display:flex;gap:1rem;align-items:center;margin:.5rem 0}
.hits{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:1rem}
.hit{border:1px solid #ddd;border-radius:6px;padding:.5rem;font-size:.85rem}
.hit img,.query img{width:160px;height:160px;object-fit:contain;background:#f4f4f4;display:block}
.scores{color:#555;font-family:monospace;font-size:.75rem;white-space:pre-wrap;word-break:break-all}
"""


# Our only script: once the page has loaded, count images that failed to decode, so that a
# headless browser's DOM dump tells whether the report is whole (see tests/test_report_browser.py).
_CHECK_IMAGES = (
    "window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
    "document.body.setAttribute('data-images',im.length);"
    "document.body.setAttribute('data-broken',im.filter(function(i){return !i.complete||i.naturalWidth===0;}).length);});"
)


def image_data_uri(image: Image.Image | str | os.PathLike, size: int = 160) -> str:
    """A JPEG thumbnail (longest side ``size``) as a ``data:`` URI."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            image = im.convert("RGB")
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_query(query: Query) -> str:
    parts = []
    if query.image is not None:
        parts.append(f'<img alt="query image" src="{image_data_uri(query.image)}">')
    if query.text is not None:
        parts.append(f"<div><b>text:</b> {_esc(query.text)}</div>")
    return f'<div class="query">{"".join(parts)}</div>'


def render_hits(hits: Sequence[Hit]) -> str:
    cards = []
    for h in hits:
        scores = "\n".join(f"{_esc(k)}: {v:.4f}" for k, v in sorted(h.scores.items()))
        img = h.record.image
        img_html = f'<img alt="{_esc(h.id)}" src="{image_data_uri(img)}">' if img is not None else ""
        cards.append(
            f'<div class="hit" data-id="{_esc(h.id)}">{img_html}'
            f"<div><b>#{h.rank}</b> score {h.score:.4f}</div>"
            f"<div>{_esc(h.record.text)}</div>"
            f'<div class="scores">{scores}</div>'
            f'<div class="scores">id {_esc(h.id)}</div>'
            + (f'<div class="scores source">{_esc(h.record.source_path)}</div>' if h.record.source_path else "")
            + "</div>"
        )
    return f'<div class="hits">{"".join(cards)}</div>'


def render_search(title: str, query: Query, hits: Sequence[Hit]) -> str:
    return f"<section><h2>{_esc(title)}</h2>{render_query(query)}{render_hits(hits)}</section>"


def write_report(path: str | os.PathLike, title: str, sections: Iterable[str], note: str | None = None) -> Path:
    """Write one HTML page with ``sections`` (already rendered by the functions above)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    note_html = f'<p class="note">{_esc(note)}</p>' if note else ""
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>{note_html}{''.join(sections)}"
            f"<script>{_CHECK_IMAGES}</script></body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def render_answer(question: str, image, out) -> str:
    """A VQA answer: the question and image, the answer with each [n] linked to its reference,
    and the references (cited ones marked)."""
    import re

    query = Query(text=question, image=Query.coerce(image).image if image is not None else None)
    answer = re.sub(r"\[(\d+)\]", lambda m: f'<a href="#ref-{m.group(1)}">[{m.group(1)}]</a>'
                    if 1 <= int(m.group(1)) <= len(out.references) else m.group(0), _esc(out.answer))
    cited = {h.id for h in out.cited}
    refs = []
    for i, h in enumerate(out.references, start=1):
        img = f'<img alt="reference {i}" src="{image_data_uri(h.record.image)}">' if h.record.image is not None else ""
        refs.append(f'<div class="hit" id="ref-{i}">{img}<div><b>[{i}]</b>{" cited" if h.id in cited else ""} '
                    f"score {h.score:.4f}</div><div>{_esc(h.record.text)}</div></div>")
    message = f"<p><i>{_esc(out.message)}</i></p>" if out.message else ""
    return (f"<section><h2>question</h2>{render_query(query)}<h2>answer</h2><p class=\"answer\">{answer}</p>"
            f'{message}<h2>references</h2><div class="hits">{"".join(refs)}</div></section>')


def render_drawing(prompt: str, out) -> str:
    """A generation: the prompt and guidance, the image(s), and the references they were grounded on."""
    images = "".join(f'<div class="hit"><img alt="result {i + 1}" src="{image_data_uri(im, 256)}"></div>'
                     for i, im in enumerate(out.images))
    refs = "".join(
        f'<div class="hit" data-id="{_esc(h.id)}"><img alt="reference {h.rank}" src="{image_data_uri(h.record.image)}">'
        f"<div><b>#{h.rank}</b> score {h.score:.4f}</div><div>{_esc(h.record.text)}</div></div>" for h in out.references)
    guidance = ", ".join(f"{_esc(k)}={_esc(v)}" for k, v in out.guidance.items())
    fallback = f"<p><i>{_esc(out.fallback)}</i></p>" if out.fallback else ""
    return (f"<section><h2>prompt</h2><p>{_esc(prompt)}</p><p class=\"scores\">guidance: {guidance}</p>{fallback}"
            f'<h2>generated</h2><div class="hits">{images}</div>'
            f'<h2>references</h2><div class="hits">{refs or "<p>none</p>"}</div></section>')
