"""Query and Hit: what goes into a retriever and what comes out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence, Union

from PIL import Image

from .errors import ConfigError, InvalidItemError
from .kb.images import normalise_image
from .kb.records import Record
from .kb.sources import IMAGE_EXTENSIONS


@dataclass
class Query:
    """A text, an image, or both (a composed query: reference image + modifier text).

    ``reference_text`` optionally describes the image (PDV's reference caption); when absent, a
    composed query that needs it gets it from an injected captioner.
    """

    text: str | None = None
    image: Image.Image | None = None  # before coerce(): also an image path or encoded bytes
    reference_text: str | None = None

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @classmethod
    def coerce(cls, query: "QueryLike") -> "Query":
        """Accept a :class:`Query`, a string (text, or the path of an image file), a
        :class:`pathlib.Path` or a PIL image; validate and load the image.

        The image (a PIL image, a path or encoded bytes) gets the checks an ingested one gets
        (:func:`~retrievers.kb.images.normalise_image`: the format allow-list, the pixel and shape
        limits, mode conversions to 8-bit RGB), so that no query reaches a decoder or an
        encoder's resize that ingestion would have kept away from it."""
        if isinstance(query, Query):
            q = query
        elif isinstance(query, Image.Image):
            q = cls(image=query)
        elif isinstance(query, Path):
            q = cls(image=query)
        elif isinstance(query, str):
            looks_like_image = Path(query).suffix.lower() in IMAGE_EXTENSIONS and "\n" not in query and len(query) < 4096
            # Any existing entry, not only a regular file: a FIFO named x.jpg is refused as an image
            # rather than searched for as the text "x.jpg".
            q = cls(image=Path(query)) if looks_like_image and os.path.lexists(query) else cls(text=query)
        else:
            raise ConfigError(
                f"`query` must be a str, a PIL image, an image path or a Query, got {type(query).__name__}."
            )
        text = q.text
        if text is not None:
            if not isinstance(text, str):
                raise ConfigError(f"`query.text` must be a string, got {type(text).__name__}.")
            text = text.strip()
            if not text:
                raise ConfigError("`query.text` is empty; give some text, an image, or both.")
        image = _load_query_image(q.image) if q.image is not None else None
        if text is None and image is None:
            raise ConfigError("The query is empty: give `text`, `image`, or both.")
        ref = q.reference_text.strip() if isinstance(q.reference_text, str) and q.reference_text.strip() else None
        return cls(text=text, image=image, reference_text=ref)


QueryLike = Union[Query, str, os.PathLike, Image.Image]


def _load_query_image(image: Any) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not os.path.lexists(path):
            raise ConfigError(f"`query.image` {str(path)!r} does not exist; pass an image file path or a PIL image.")
        shown = repr(str(path))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        shown = f"({len(image):,} bytes)"
    elif isinstance(image, Image.Image):
        shown = f"(a {image.width}x{image.height} PIL image in mode {image.mode!r})"
    else:
        raise ConfigError(f"`query.image` must be a PIL image, an image file path or encoded image bytes, "
                          f"got {type(image).__name__}.")
    try:
        rgb, _ = normalise_image(image)
    except InvalidItemError as e:
        raise ConfigError(
            f"`query.image` {shown} is not a readable image: {e.reason}. Query images are held to the checks "
            "ingested images pass: give a JPEG, PNG, WebP, GIF, BMP or TIFF picture within those limits."
        ) from None
    return rgb


@dataclass
class DocumentPart:
    """One part of a retrieved interleaved document (``retrievers/kb/documents.py``): a passage or
    an image, with its cosine similarity to the query (see ``retrievers/passages.py``)."""

    index: int  # 0-based position in the document
    kind: str  # "text" | "image"
    score: float
    text: str | None = None  # a passage's text
    image: str | None = None  # an image part's stored file (absolute path; None from a server)
    source_path: str | None = None  # an image part as its manifest wrote it


@dataclass
class Hit:
    """One retrieved record.

    ``score`` is the fused score (higher is better; after a rerank, the reranker's score);
    ``scores`` holds each channel's own score (cosine similarity, or BM25 for ``lexical``) and,
    after a rerank, ``"rerank"``; ``rank`` is 1-based. For a document, ``parts`` holds its best
    parts for the query, best first (``document_parts`` of them; empty for a plain record).
    """

    id: str
    record: Record
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    parts: list[DocumentPart] = field(default_factory=list)

    @property
    def matched_part(self) -> DocumentPart | None:
        """The document part closest to the query (None for a plain record)."""
        return self.parts[0] if self.parts else None

    def with_score(self, score: float, rank: int, **extra: float) -> "Hit":
        return replace(self, score=float(score), rank=rank, scores={**self.scores, **extra})


class Hits(list):
    """What ``retrieve()`` returns: a plain ``list`` of :class:`Hit`, plus what the call did.

    Attributes:
        requested: the ``k`` asked for. ``len(hits) < requested`` only when the KB (or the filter)
            has fewer distinct records.
        collapsed: candidates that ranked above the last returned hit and were dropped as
            near-duplicates of a better one. With MMR, every candidate is walked, so all of them count.

    The numbers live on the returned object, not on the retriever, so concurrent calls cannot
    overwrite each other's. Slicing gives a plain list.
    """

    def __init__(self, hits: Sequence[Hit] = (), *, requested: int, collapsed: int = 0):
        super().__init__(hits)
        self.requested = requested
        self.collapsed = collapsed

    def __repr__(self) -> str:
        return f"Hits({list.__repr__(self)}, requested={self.requested}, collapsed={self.collapsed})"
