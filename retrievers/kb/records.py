"""Plain data types shared by ingestion sources, the knowledge base and its users."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from ..errors import InvalidItemError

# What an ingestion item may carry as its image before validation: a local path, raw encoded
# bytes (a WebDataset member, a fetched URL) or an image already in memory.
ImageInput = Union[str, os.PathLike, bytes, Image.Image]


@dataclass
class Record:
    """One (image, text) entry of a knowledge base.

    When handed to :meth:`KnowledgeBase.add`, ``image`` may be a path, encoded bytes or a PIL image
    and ``id`` may be left out (it is then derived from the content, see :func:`content_id`).
    Records returned by the knowledge base carry the stored image's absolute path.

    ``source_path`` says where the item came from inside its source, so that a hit can be traced
    back to the user's file: ``"sub/red_ring.jpg"`` (relative to an ingested folder), the ``image``
    field as written in a JSONL/CSV manifest, ``"shard-000.tar:00001/000010042"`` (shard name and
    member key). It is provenance kept by the knowledge base, apart from the user's ``metadata``
    (so no user key can clash with it); records given to :meth:`KnowledgeBase.add` keep their own,
    by default none.
    """

    text: str
    image: ImageInput | None = None
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source_path: str | None = None

    def open_image(self) -> Image.Image:
        """The record's image (a path, encoded bytes or a PIL image) as 8-bit RGB, through the
        checks ingestion applies (format allow-list, pixel and shape limits, modes): a reference a
        user hands to a pipeline reaches no decoder or encoder resize that ingestion would refuse.
        Raises :class:`InvalidItemError` (with the reason) for an image that fails them."""
        from .images import normalise_image

        if self.image is None:
            raise InvalidItemError(f"record {self.id!r} has no image")
        rgb, _ = normalise_image(self.image)
        return rgb


@dataclass
class SourceItem:
    """One raw item read from an ingestion source, before validation.

    ``ref`` locates the item for humans (``"photos/cat.jpg"``, ``"data.jsonl:12"``,
    ``"shard-000.tar:000042"``). When the source already knows the item is unusable (a malformed
    manifest line, a path escaping the manifest's folder, a URL with remote fetching off, an image
    without text), ``error`` holds the reason and the other fields may be empty. ``source_path`` is
    what the stored record keeps as :attr:`Record.source_path`.

    A document (an interleaved list of passages and images, a JSONL line with ``parts``) has
    ``parts`` instead of ``text`` and ``image`` (see ``retrievers/kb/documents.py``).
    """

    ref: str
    source: str
    text: str | bytes | None = None
    image: ImageInput | None = None
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    source_path: str | None = None
    parts: list[ItemPart] | None = None


@dataclass
class ItemPart:
    """One part of a document item, before validation: a passage (``kind="text"``, ``value`` its
    text) or an image (``kind="image"``, ``value`` a path, bytes or PIL image, ``source_path`` the
    path as the manifest wrote it)."""

    kind: str
    value: Any
    source_path: str | None = None


@dataclass
class Rejection:
    """A bad ingestion item and why it was refused."""

    ref: str
    reason: str
    source: str = ""


@dataclass
class IngestReport:
    """What one ingestion did. Every source item is counted exactly once in one of the buckets.

    - ``added``: new records written;
    - ``updated``: records whose id already existed with other content, metadata, source or source
      path (overwritten: a user-given id with a new image, a file moved inside its folder);
    - ``existing``: records already in the knowledge base with the same content (nothing written);
    - ``duplicates``: items repeating an earlier item of the same ingestion (the same content at
      another source path too: the first one's path is kept);
    - ``rejected``: bad items, each with its reason.
    """

    added: int = 0
    updated: int = 0
    existing: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)
    texts_truncated: int = 0
    seconds: float = 0.0
    # wall seconds per stage; "prepare" (read, decode, validate) overlaps the others in a worker thread
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seen(self) -> int:
        return self.added + self.updated + self.existing + self.duplicates + len(self.rejected)

    @property
    def all_rejected(self) -> bool:
        """True when items were seen and every one was rejected: nothing was stored or found
        present (the CLI exits non-zero on it). An empty source is not all rejected."""
        return self.seen > 0 and len(self.rejected) == self.seen

    def note(self, what: str, n: int = 1) -> None:
        """Count a non-fatal conversion (``"converted CMYK to RGB"``, ``"applied EXIF orientation"``)."""
        self.notes[what] = self.notes.get(what, 0) + n

    def time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def merge(self, other: "IngestReport") -> None:
        self.added += other.added
        self.updated += other.updated
        self.existing += other.existing
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)
        self.texts_truncated += other.texts_truncated
        for k, v in other.notes.items():
            self.note(k, v)
        for k, v in other.timings.items():
            self.time(k, v)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rejected"] = len(self.rejected)
        d["seen"] = self.seen
        d["all_rejected"] = self.all_rejected
        return d

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """Write one JSON line per rejected item, after a first line with the totals."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"summary": self.to_dict()}) + "\n")
            for r in self.rejected:
                f.write(json.dumps({"ref": r.ref, "source": r.source, "reason": r.reason}, ensure_ascii=False) + "\n")
        return path

    def summary(self, max_reasons: int = 10) -> str:
        """A one-screen, human-readable summary."""
        lines = [
            f"seen {self.seen}: added {self.added}, updated {self.updated}, already present {self.existing}, "
            f"duplicates {self.duplicates}, rejected {len(self.rejected)} ({self.seconds:.1f}s)"
        ]
        if self.texts_truncated:
            lines.append(f"texts truncated to the embedder's length limit: {self.texts_truncated}")
        for what, n in sorted(self.notes.items()):
            lines.append(f"{what}: {n}")
        for r in self.rejected[:max_reasons]:
            lines.append(f"  rejected {r.ref}: {r.reason}")
        if len(self.rejected) > max_reasons:
            lines.append(f"  ... and {len(self.rejected) - max_reasons} more rejected (see the JSONL report)")
        return "\n".join(lines)


def content_id(image_sha256: str, text: str) -> str:
    """Stable record id derived from the stored image's sha256 and the text.

    The same (image, text) pair always gets the same id, on any machine, so re-ingesting a source
    finds its records already present instead of duplicating them.
    """
    h = hashlib.sha256()
    h.update(image_sha256.encode("ascii"))
    h.update(b"\0")
    h.update(text.encode("utf-8"))
    return h.hexdigest()[:32]
