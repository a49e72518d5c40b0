"""Set matching: assign a set of images to a set of texts globally, one to one or one to many.

After Llabrés et al., "Image-text matching for large-scale book collections" (arXiv:2407.19812):
instead of retrieving the best text for each image independently (two images can then take the
same text), treat the two sets as a bipartite matching problem and solve it as a whole.

1. **Candidates.** Every image and text is embedded with the project's :class:`DualEncoder`; the
   cosine similarity matrix ``S`` (images x texts) is exact, but only the top ``n_candidates``
   texts of each image and the top ``n_candidates`` images of each text (the union of the two) are
   allowed. A pair outside that sparse set gets a prohibitive cost, so the solver uses one only
   where no complete assignment avoids it, and such a pair is never reported: an item whose
   candidates all went to others stays unmatched (a small ``n_candidates`` trades recall for speed).
2. **Assignment.** ``scipy.optimize.linear_sum_assignment`` maximises the summed similarity. With
   ``max_per_text=N`` each text column is replicated N times, so that a text can take up to N
   images (one per copy) while each image still takes at most one text.
3. **Threshold.** A pair scoring below ``threshold`` is dropped after the assignment (see
   :func:`assign` for why after, not before).

``scipy`` is the ``mmrag[match]`` extra; it is imported only when an assignment runs.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmrag.retrievers.errors import ConfigError, InvalidItemError, MissingExtraError

INSTALL_COMMAND = 'pip install "mmrag[match]"'
DEFAULT_N_CANDIDATES = 10  # per image and per text; >= the set sizes makes stage 1 a no-op
_TEXT_KEYS = ("id", "text")

ImagesInput = str | os.PathLike | Mapping[str, Any]  # a folder, or id -> image path / PIL image
TextsInput = str | os.PathLike | Mapping[str, str]  # a JSONL file, or id -> text


@dataclass
class MatchResult:
    """What :func:`match_sets` returns.

    ``pairs`` are ``(image_id, text_id, score)`` in the images' order; ``score`` is the cosine
    similarity of the pair. Every input id appears exactly once: in a pair or in ``unmatched_*``
    (with ``max_per_text > 1`` a text id can be in several pairs).
    """

    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    unmatched_images: list[str] = field(default_factory=list)
    unmatched_texts: list[str] = field(default_factory=list)

    @property
    def mean_score(self) -> float | None:
        """The mean score of the pairs; None when there are none."""
        return sum(s for _, _, s in self.pairs) / len(self.pairs) if self.pairs else None

    def to_jsonl(self, path: str | os.PathLike | None = None) -> str:
        """One JSON object a line: the pairs ``{"image", "text", "score"}``, then each unmatched
        image (``"text": null``) and text (``"image": null``) with ``"score": null``, so that the
        file accounts for every input. Written to ``path`` as well when given; returns the text."""
        rows = [{"image": i, "text": t, "score": s} for i, t, s in self.pairs]
        rows += [{"image": i, "text": None, "score": None} for i in self.unmatched_images]
        rows += [{"image": None, "text": t, "score": None} for t in self.unmatched_texts]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def summary(self) -> str:
        mean = "n/a" if self.mean_score is None else f"{self.mean_score:.4f}"
        return (f"matched {len(self.pairs)} pair(s), mean score {mean}; unmatched: "
                f"{len(self.unmatched_images)} image(s), {len(self.unmatched_texts)} text(s)")


# ---------------------------------------------------------------------------- the algorithm
def candidate_mask(similarity: np.ndarray, n_candidates: int) -> np.ndarray:
    """Stage 1: a boolean matrix, True where the text is among the image's ``n_candidates`` most
    similar texts or the image among the text's ``n_candidates`` most similar images."""
    _check_positive("n_candidates", n_candidates)
    s = _check_matrix(similarity)
    n, m = s.shape
    mask = np.zeros(s.shape, dtype=bool)
    if n == 0 or m == 0:
        return mask
    k = min(n_candidates, m)  # per image (row): its best k texts
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]  # (n, k)
    mask[np.arange(n)[:, None], top] = True
    k = min(n_candidates, n)  # per text (column): its best k images
    top = np.argpartition(-s, k - 1, axis=0)[:k, :]  # (k, m)
    mask[top, np.arange(m)[None, :]] = True
    return mask


def assign(similarity: np.ndarray, *, candidates: np.ndarray | None = None, max_per_text: int = 1,
           threshold: float | None = None) -> list[tuple[int, int, float]]:
    """Stages 2 and 3 on a similarity matrix (rows: images, columns: texts): the pairs
    ``(row, column, similarity)`` of the assignment that maximises the summed similarity, sorted by row.

    * ``candidates`` (a boolean matrix of the same shape, from :func:`candidate_mask`; None: every
      pair) restricts the pairs. The others get a cost larger than any sum of similarities, so the
      solver takes the assignment with the fewest non-candidate pairs and, among those, the largest
      summed similarity; the non-candidate pairs it had to take are left out of the result.
    * ``max_per_text``: each text takes up to this many images (its column is replicated that many
      times); each image takes at most one text.
    * A rectangular problem leaves the surplus unmatched: with more images than
      ``texts * max_per_text`` slots, the images that lose the global optimum get no text, and with
      more slots than images the surplus texts get none. The assignment always has
      ``min(images, texts * max_per_text)`` pairs before the threshold (when every pair is a candidate).
    * ``threshold`` (None: no threshold) drops an assigned pair whose similarity is below it,
      *after* the assignment: the partners of a dropped pair stay unmatched even where a worse
      assignment would have given them a pair above the threshold. Applied before (masking the
      low pairs out of the problem), the solver could swap a confident pair for two weaker ones
      above the threshold; applied after, the kept pairs are those of the unconstrained optimum,
      and raising the threshold only ever removes pairs, which makes a threshold easy to tune.
    """
    s = _check_matrix(similarity)
    _check_options(max_per_text, threshold)
    if candidates is not None:
        candidates = np.asarray(candidates)
        if candidates.shape != s.shape or candidates.dtype != bool:
            raise ConfigError(f"`candidates` must be a boolean matrix of the similarity's shape {s.shape}, "
                              f"got {candidates.dtype} {candidates.shape}.")
    n, m = s.shape
    if n == 0 or m == 0:
        return []
    linear_sum_assignment = _scipy_assignment()
    work = s.astype(np.float64)
    if candidates is not None:
        # One non-candidate pair must cost more than any difference of summed similarities (at most
        # min(n, m * max_per_text) terms, each within max|s| of zero), so that the solver avoids it
        # whenever a complete assignment can; +1 keeps the margin away from rounding.
        pairs = min(n, m * max_per_text)
        penalty = 2.0 * pairs * float(np.abs(work).max()) + 1.0
        work = np.where(candidates, work, -penalty)
    work = np.repeat(work, max_per_text, axis=1)  # column c is a copy of text c // max_per_text
    rows, cols = linear_sum_assignment(work, maximize=True)
    out = []
    for r, c in zip(rows.tolist(), cols.tolist()):
        t = c // max_per_text
        if candidates is not None and not candidates[r, t]:
            continue
        score = float(s[r, t])
        if threshold is not None and score < threshold:
            continue
        out.append((r, t, score))
    return sorted(out)


def _scipy_assignment() -> Callable:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise MissingExtraError(f"Set matching needs scipy ({e}); install it with: {INSTALL_COMMAND}") from None
    return linear_sum_assignment


def _check_options(max_per_text: Any, threshold: Any) -> None:
    _check_positive("max_per_text", max_per_text)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not math.isfinite(threshold)):
        raise ConfigError(f"`threshold` must be a finite number or None, got {threshold!r}.")


def _check_matrix(similarity: Any) -> np.ndarray:
    s = np.asarray(similarity)
    if s.ndim != 2 or not np.issubdtype(s.dtype, np.number):
        raise ConfigError(f"`similarity` must be a 2-d numeric matrix (images x texts), got shape {s.shape} "
                          f"of {s.dtype}.")
    if not np.isfinite(s).all():
        raise ConfigError("`similarity` holds NaN or infinite values; every pair needs a finite score.")
    return s


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")


# ---------------------------------------------------------------------------- inputs
def read_images(folder: str | os.PathLike) -> dict[str, Path]:
    """The images of ``folder`` (recursively, by extension; hidden files and folders skipped, as
    ingestion does), keyed by id: the path relative to the folder without its suffix (``sub/p001``)."""
    from mmrag.retrievers.kb.sources import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"`--images` {str(root)!r} is not a folder; pass a folder of images.")
    found: dict[str, Path] = {}
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(here) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            image_id = path.relative_to(root).with_suffix("").as_posix()
            if image_id in found:
                raise ConfigError(f"{path} and {found[image_id]} both have the id {image_id!r} (the path without "
                                  "its suffix); rename one so that each image has its own id.")
            found[image_id] = path
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ConfigError(f"`--images` {str(root)!r} holds no images ({extensions}).")
    return found


def read_texts(path: str | os.PathLike) -> dict[str, str]:
    """The texts of a JSONL file, one object a line with a string ``id`` and ``text`` (other keys
    are allowed and ignored), keyed by id in file order. Errors name ``FILE:LINE``."""
    from mmrag.retrievers.kb.sources import prepare_text

    from .evaluation import _jsonl  # the eval commands' JSONL reader (FILE:LINE errors)

    texts: dict[str, str] = {}
    lines: dict[str, str] = {}
    for _, obj, where in _jsonl(path, "--texts"):
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: each line must be a JSON object with `id` and `text`, got {type(obj).__name__}.")
        missing = [k for k in _TEXT_KEYS if k not in obj]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(f'`{k}`' for k in missing)}; each line needs "
                              '{"id": "...", "text": "..."}.')
        text_id = obj["id"]
        if not isinstance(text_id, str) or not text_id.strip():
            raise ConfigError(f"{where}: `id` must be a non-empty string, got {text_id!r}.")
        if text_id in texts:
            raise ConfigError(f"{where}: duplicate id {text_id!r}, already used on {lines[text_id]}; "
                              "ids name the matches and must be unique.")
        try:
            texts[text_id] = prepare_text(obj["text"])
        except InvalidItemError as e:
            raise ConfigError(f"{where}: `text` is unusable: {e.reason}.") from None
        lines[text_id] = where
    return texts


def _image_items(images: Any) -> dict[str, Any]:
    if isinstance(images, (str, os.PathLike)):
        return read_images(images)
    if not isinstance(images, Mapping) or not images:
        raise ConfigError(f"`images` must be a folder or a non-empty mapping of id -> image path or PIL image, "
                          f"got {type(images).__name__}{'' if images else ' (empty)'}.")
    _check_ids("images", images)
    return dict(images)


def _text_items(texts: Any) -> dict[str, str]:
    if isinstance(texts, (str, os.PathLike)):
        return read_texts(texts)
    if not isinstance(texts, Mapping) or not texts:
        raise ConfigError(f"`texts` must be a JSONL file or a non-empty mapping of id -> text, "
                          f"got {type(texts).__name__}{'' if texts else ' (empty)'}.")
    _check_ids("texts", texts)
    bad = next((k for k, v in texts.items() if not isinstance(v, str) or not v.strip()), None)
    if bad is not None:
        raise ConfigError(f"`texts[{bad!r}]` must be a non-empty string, got {texts[bad]!r}.")
    return dict(texts)


def _check_ids(name: str, items: Mapping) -> None:
    bad = next((k for k in items if not isinstance(k, str) or not k.strip()), None)
    if bad is not None:
        raise ConfigError(f"`{name}` ids must be non-empty strings, got {bad!r}.")


# ---------------------------------------------------------------------------- the pipeline
def match_sets(images: ImagesInput, texts: TextsInput, *, encoder: Any, n_candidates: int = DEFAULT_N_CANDIDATES,
               max_per_text: int = 1, threshold: float | None = None,
               progress: Callable[[int, int], None] | None = None) -> MatchResult:
    """Match a set of images to a set of texts (see the module docstring and :func:`assign`).

    Args:
        images: a folder (ids: the relative path without suffix, see :func:`read_images`) or a
            mapping of id -> image path or PIL image.
        texts: a JSONL file of ``{"id", "text"}`` lines (see :func:`read_texts`) or a mapping of id -> text.
        encoder: the :class:`~mmrag.retrievers.DualEncoder` (``build_embedder(config)``).
        n_candidates: stage 1 keeps this many texts per image and images per text.
        max_per_text: a text takes up to this many images (1: one to one).
        threshold: drop assigned pairs whose cosine similarity is below it (None: keep them all).
        progress: called as ``progress(done, total)`` after each embedded batch.
    """
    # 0. check every input before a model loads
    _check_positive("n_candidates", n_candidates)
    image_items, text_items = _image_items(images), _text_items(texts)
    _check_options(max_per_text, threshold)
    _scipy_assignment()  # a missing extra fails now, not after the embedding

    # 1. embed (images decoded one batch at a time: a large folder never sits in memory)
    image_vectors, text_vectors = _embed(encoder, image_items, list(text_items.values()), progress)
    similarity = image_vectors @ text_vectors.T  # (images, texts): cosine, the vectors are unit length

    # 2. narrow the candidates, 3. assign globally and threshold
    mask = candidate_mask(similarity, n_candidates)
    chosen = assign(similarity, candidates=mask, max_per_text=max_per_text, threshold=threshold)

    image_ids, text_ids = list(image_items), list(text_items)
    matched_images, matched_texts = {r for r, _, _ in chosen}, {c for _, c, _ in chosen}
    return MatchResult(pairs=[(image_ids[r], text_ids[c], score) for r, c, score in chosen],
                       unmatched_images=[i for r, i in enumerate(image_ids) if r not in matched_images],
                       unmatched_texts=[t for c, t in enumerate(text_ids) if c not in matched_texts])


def _embed(encoder: Any, image_items: Mapping[str, Any], texts: list[str],
           progress: Callable[[int, int], None] | None) -> tuple[np.ndarray, np.ndarray]:
    from mmrag.retrievers.kb.images import normalise_image

    batch_size = encoder.batch_size
    total, done = len(image_items), 0
    items = list(image_items.items())
    chunks = []
    for start in range(0, len(items), batch_size):
        batch = []
        for image_id, image in items[start:start + batch_size]:
            try:
                batch.append(normalise_image(image)[0])
            except InvalidItemError as e:
                where = image if isinstance(image, (str, os.PathLike)) else f"image {image_id!r}"
                raise ConfigError(f"{where}: {e.reason}.") from None
        chunks.append(encoder.embed_images(batch))  # (batch, dim)
        done += len(batch)
        if progress is not None:
            progress(done, total + len(texts))
    text_vectors = encoder.embed_texts(texts)  # (texts, dim)
    if progress is not None:
        progress(total + len(texts), total + len(texts))
    return np.concatenate(chunks), text_vectors


# ---------------------------------------------------------------------------- command line
def add_match_parser(sub, models_parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``mmrag match`` on ``mmrag``'s subparsers (``models_parent``: --config, --device, --dtype)."""
    p = sub.add_parser("match", parents=[models_parent],
                       help="assign a folder of images to a JSONL file of texts, globally (one to one or many)")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="folder of images (recursive); an image's id is its path without suffix")
    p.add_argument("--texts", required=True, metavar="FILE.jsonl", help='one text a line: {"id": ..., "text": ...}')
    p.add_argument("--n-candidates", type=int, default=DEFAULT_N_CANDIDATES, metavar="N",
                   help=f"CLIP stage: keep the N best texts per image and images per text (default {DEFAULT_N_CANDIDATES})")
    p.add_argument("--max-per-text", type=int, default=1, metavar="N",
                   help="a text takes up to N images (default 1: one to one)")
    p.add_argument("--threshold", type=float, metavar="S",
                   help="leave assigned pairs scoring below S unmatched (default: keep every pair)")
    p.add_argument("--out", metavar="FILE", help="write the JSONL here (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")
    return p


def cmd_match(args: argparse.Namespace) -> int:
    """``mmrag match``: the matches as JSONL on stdout (or ``--out``), a one-line summary on stderr."""
    from .builders import build_embedder
    from .cli import _bar, _config

    images, texts = read_images(args.images), read_texts(args.texts)  # bad input fails before a model loads
    encoder = build_embedder(_config(args))
    result = match_sets(images, texts, encoder=encoder, n_candidates=args.n_candidates,
                        max_per_text=args.max_per_text, threshold=args.threshold,
                        progress=_bar(args, len(images) + len(texts), "match embed"))
    if args.out is None:
        sys.stdout.write(result.to_jsonl())
        print(f"mmrag match: {result.summary()}", file=sys.stderr)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result.to_jsonl(args.out)
        print(f"mmrag match: {result.summary()}; wrote {args.out}", file=sys.stderr)
    return 0


__all__ = ["MatchResult", "add_match_parser", "assign", "candidate_mask", "cmd_match", "match_sets", "read_images",
           "read_texts"]
