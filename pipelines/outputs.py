"""What the pipelines return: :class:`VQAOutput` (and :class:`VQAStream`) and :class:`ImageOutput`,
plus :func:`contact_sheet`. Light on purpose (Pillow only): the HTTP client and the command line
build these from a server's answers without importing torch, transformers or diffusers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from mmrag.generators.diffusion import GenerationOutput
    from mmrag.retrievers.query import Hit


@dataclass
class VQAOutput:
    """The answer and how it was reached.

    ``references`` are the hits put in the prompt, in prompt order ([1]..[k]); ``cited`` the ones
    the answer cites; ``no_retrieval`` is true when the VLM answered without references (none
    retrieved, none strong enough, or ``references=[]``), and ``message`` says why.
    """

    answer: str
    references: list[Hit]
    cited: list[Hit]
    prompt: str
    no_retrieval: bool = False
    message: str | None = None
    choice: str | None = None
    choice_scores: list[float] | None = None
    dropped: list[Hit] = field(default_factory=list)  # left out: the prompt would not fit the model
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ref = lambda h: {"id": h.id, "rank": h.rank, "score": h.score, "scores": h.scores, "text": h.record.text,
                         "source_path": h.record.source_path, "metadata": h.record.metadata, "image": h.record.image,
                         "parts": [dataclasses.asdict(p) for p in getattr(h, "parts", [])]}
        return {"answer": self.answer, "choice": self.choice, "choice_scores": self.choice_scores,
                "references": [ref(h) for h in self.references], "cited": [h.id for h in self.cited],
                "prompt": self.prompt,
                "no_retrieval": self.no_retrieval, "message": self.message,
                "dropped": [h.id for h in self.dropped], "timings": self.timings}


class VQAStream:
    """Iterate to get the answer's text as it is generated; then ``.result`` is the VQAOutput."""

    def __init__(self, chunks: Iterator[str], finish: Callable[[], VQAOutput]):
        self._chunks, self._finish = chunks, finish
        self.result: VQAOutput | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._chunks
        self.result = self._finish()


@dataclass
class ImageOutput:
    """Generated images and what grounded them.

    ``references`` are the hits whose images conditioned the generation (empty: plain CFG, and
    ``fallback`` says so); ``guidance`` is the guidance actually used, as a dict.

    With retrieve-or-generate (``decide``), ``decision`` is ``"retrieved"`` or ``"generated"`` (None:
    the pipeline did not decide); ``decision_score`` is the best reference's text -> image cosine with
    the prompt (None: nothing was retrieved), compared with ``decision_threshold``; and
    ``decision_reason`` says it in words. When retrieved, no diffusion ran: ``images`` holds that
    reference's stored image, ``references`` that one hit, ``guidance`` is empty and ``generation`` None.
    """

    images: list[Image.Image]
    references: list[Hit]
    guidance: dict[str, Any]
    fallback: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    generation: GenerationOutput | None = None
    decision: str | None = None
    decision_score: float | None = None
    decision_threshold: float | None = None
    decision_reason: str | None = None


def contact_sheet(references: Sequence[Image.Image], results: Sequence[Image.Image], height: int = 256) -> Image.Image:
    """References on the left, results on the right, one row, a gap between the two groups."""
    def fit(im: Image.Image) -> Image.Image:
        im = im.convert("RGB")
        return im.resize((max(1, round(im.width * height / im.height)), height))

    refs, outs = [fit(r) for r in references], [fit(r) for r in results]
    gap, pad = 24, 4
    width = sum(i.width + pad for i in refs) + (gap if refs else 0) + sum(i.width + pad for i in outs)
    sheet = Image.new("RGB", (max(width, 1), height), (255, 255, 255))
    x = 0
    for im in refs:
        sheet.paste(im, (x, 0))
        x += im.width + pad
    x += gap if refs else 0
    for im in outs:
        sheet.paste(im, (x, 0))
        x += im.width + pad
    return sheet
