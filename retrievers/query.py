"""Query and Hit: what goes into a retriever and what comes out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

from .errors import ConfigError
from .kb.records import Record
from .kb.sources import IMAGE_EXTENSIONS


@dataclass
class Query:
    """A text, an image, or both (a composed query: reference image + modifier text).

    ``reference_text`` optionally describes the image (PDV's reference caption); when absent, a
    composed query that needs it gets it from an injected captioner.
    """

    text: str | None = None
    image: Image.Image | None = None
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
        :class:`pathlib.Path` or a PIL image; validate and load the image."""
        if isinstance(query, Query):
            q = query
        elif isinstance(query, Image.Image):
            q = cls(image=query)
        elif isinstance(query, Path):
            q = cls(image=query)
        elif isinstance(query, str):
            looks_like_image = Path(query).suffix.lower() in IMAGE_EXTENSIONS and "\n" not in query and len(query) < 4096
            q = cls(image=Path(query)) if looks_like_image and Path(query).is_file() else cls(text=query)
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
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ConfigError(f"`query.image` {str(path)!r} does not exist; pass an image file path or a PIL image.")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"`query.image` {str(path)!r} is not a readable image ({e}).") from None
    raise ConfigError(f"`query.image` must be a PIL image or a path, got {type(image).__name__}.")


@dataclass
class Hit:
    """One retrieved record.

    ``score`` is the fused score (higher is better; after a rerank, the reranker's score);
    ``scores`` holds each channel's own score (cosine similarity, or BM25 for ``lexical``) and,
    after a rerank, ``"rerank"``; ``rank`` is 1-based.
    """

    id: str
    record: Record
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    rank: int = 0

    def with_score(self, score: float, rank: int, **extra: float) -> "Hit":
        return replace(self, score=float(score), rank=rank, scores={**self.scores, **extra})
