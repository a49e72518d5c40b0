"""Interleaved multi-image documents, after Lee et al., "Unified Multi-Modal Interleaved Document
Representation": an ordered list of passages and images ingested as ONE record.

- Every part is validated as its kind is anywhere else (``prepare_text``, ``prepare_image``); one
  bad part rejects the whole document, so a document is stored whole or not at all.
- The record's ``text`` is the passages joined (a blank line between them) and its ``image`` the
  first image part, so every feature that reads a record (display, the near-duplicate pass,
  rerankers, the lexical index) works on a document unchanged. Its metadata marks it:
  ``mmrag_parts`` (how many) and ``mmrag_parts_sha256`` (a digest of them all, in order).
- Its vector is :func:`document_vector` of its parts' vectors, stored as both its image and its
  text vector (see there why).
- The parts themselves (vector, kind, text or image) go to the KB's parts collection
  (``parts.py``), so a hit can say which part matched (``retrievers/passages.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidItemError
from .images import PreparedImage, prepare_image
from .parts import DOC_KEY, INDEX_KEY, KIND_KEY, KINDS
from .records import ItemPart
from .sources import MAX_DOCUMENT_PARTS, prepare_text
from .store import IMAGE_KEY, SHA_KEY, SOURCE_PATH_KEY, ImageStore, check_text

PASSAGE_SEPARATOR = "\n\n"


@dataclass
class PreparedPart:
    """One validated part: a passage (``text``) or an image (``image``)."""

    kind: str  # "text" | "image"
    text: str | None = None
    image: PreparedImage | None = None
    source_path: str | None = None  # the image as its manifest wrote it

    @property
    def relpath(self) -> str:
        return ImageStore.relpath(self.image.sha256, self.image.ext)


@dataclass
class PreparedDocument:
    text: str  # the passages joined
    image: PreparedImage  # the first image part, carrying every image part's conversion notes
    parts: list[PreparedPart]
    digest: str  # sha256 over the parts in order: the record's dedup key beside its metadata


def prepare_document(parts: Sequence[ItemPart], *, max_text_chars: int, max_image_pixels: int) -> PreparedDocument:
    """Validate every part (raises :class:`InvalidItemError` naming the first bad one)."""
    if not isinstance(parts, (list, tuple)) or not parts:
        raise InvalidItemError(f"a document needs a non-empty list of parts, got {parts!r}")
    if len(parts) > MAX_DOCUMENT_PARTS:
        raise InvalidItemError(f"the document has {len(parts)} parts, over the limit of {MAX_DOCUMENT_PARTS}")
    prepared: list[PreparedPart] = []
    for i, part in enumerate(parts):
        kind = getattr(part, "kind", None)
        try:
            if kind == "text":
                text = prepare_text(part.value, max_chars=max_text_chars)
                _check("text", text)
                prepared.append(PreparedPart("text", text=text))
            elif kind == "image":
                if part.source_path is not None:
                    _check("source path", part.source_path)
                prepared.append(PreparedPart("image", image=prepare_image(part.value, max_pixels=max_image_pixels),
                                             source_path=part.source_path))
            else:
                raise InvalidItemError(f"unknown part kind {kind!r}; expected one of {list(KINDS)}")
        except InvalidItemError as e:
            raise InvalidItemError(f"part {i} ({kind}): {e.reason}") from None
    kinds = {p.kind for p in prepared}
    if kinds != set(KINDS):
        raise InvalidItemError(f"a document needs at least one text part and one image part; this one has no "
                               f"{(set(KINDS) - kinds).pop()} part")
    images = [p.image for p in prepared if p.kind == "image"]
    notes = [n for im in images for n in im.notes]  # counted once per converted image, as for records
    digest = hashlib.sha256()
    for p in prepared:
        digest.update(f"{p.kind}\0{p.text if p.kind == 'text' else p.image.sha256}\0".encode())
    return PreparedDocument(text=PASSAGE_SEPARATOR.join(p.text for p in prepared if p.kind == "text"),
                            image=dataclasses.replace(images[0], notes=notes), parts=prepared,
                            digest=digest.hexdigest())


def _check(what: str, text: str) -> None:
    try:
        check_text(what, text)
    except ValueError as e:
        raise InvalidItemError(str(e)) from None


def document_vector(part_vectors: np.ndarray) -> np.ndarray:
    """The document's vector from its parts' ``(n_parts, dim)`` unit vectors.

    The paper merges a document's passage representations by mean pooling; we L2-normalise the
    mean because every collection is cosine space and every vector in it a unit vector (the
    near-duplicate pass and MMR take dot products as cosines). The one vector is stored as both
    the record's image vector and its text vector: a document has no single image or text, and
    with the same vector in both collections every channel scores it by its whole content (a text
    query reaches its images through ``text_to_image``, an image query its passages through
    ``image_to_text``); per-modality means would hide a document's passages from the image
    channels and its images from the text ones.
    """
    mean = np.asarray(part_vectors, dtype=np.float64).mean(axis=0)  # (dim,)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def part_rows(doc_id: str, parts: Sequence[PreparedPart]) -> list[tuple[dict, str]]:
    """Each part's ``(metadata, document)`` for the parts collection (``parts.py``)."""
    rows = []
    for i, p in enumerate(parts):
        meta = {DOC_KEY: doc_id, INDEX_KEY: i, KIND_KEY: p.kind}
        if p.kind == "image":
            meta.update({IMAGE_KEY: p.relpath, SHA_KEY: p.image.sha256})
            if p.source_path is not None:
                meta[SOURCE_PATH_KEY] = p.source_path
        rows.append((meta, p.text if p.kind == "text" else ""))
    return rows
