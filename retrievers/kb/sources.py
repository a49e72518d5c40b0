"""Ingestion sources: read (image, text) items from a folder, a JSONL or CSV manifest, WebDataset tar
shards or an iterable of records, lazily and in a deterministic order.

A source only locates and reads items. Checking them is the job of :func:`prepare_text` and
:func:`~retrievers.images.prepare_image`; what a source already knows to be wrong (a malformed
manifest line, a path escaping the manifest's folder, an image without text) comes out as a
:class:`SourceItem` whose ``error`` says why, so that one bad item never stops an ingestion.

Folder layout: every image (by extension) pairs with a sidecar of the same stem, ``x.txt`` (the
text, UTF-8) and/or ``x.json`` (``{"text", "id", "metadata"}``; any other key goes into the
metadata too). With both, the text comes from ``x.txt``. Hidden files and folders are skipped.
Everything a folder source reads must lie inside the folder: symlinks are followed only where they
resolve inside it (the rule manifests follow), and only regular files are read (a FIFO, socket or
device is refused without being opened, see :func:`~retrievers.kb.images.read_regular_file`).

WebDataset tar layout (as img2dataset writes it): members are grouped by key, the member name up to
the first dot of its base name (``00001/000010042.jpg`` -> ``00001/000010042``); a key's image,
``.txt`` (the text) and ``.json`` (metadata; its ``text`` or ``caption`` is the text when there is
no ``.txt``). The tar is read in one streaming pass, holding one key's members at a time, which
relies on a key's members being adjacent, as img2dataset and ``tar --sort=name`` write them. A key
whose members are scattered cannot be regrouped in bounded memory: its stray members come out as an
error item that says so (the earlier part of the key was already given out on its own).

Each good item carries its ``source_path``, where it lies inside its source (kept by the knowledge
base as :attr:`Record.source_path`): the image's path relative to the folder (``sub/x.jpg``), the
manifest's ``image`` field as written, or ``shard.tar:key``.

Manifest image paths resolve against the manifest's folder and must stay inside it; with
``base_dir`` they resolve against ``base_dir`` instead and must stay inside that (an absolute path
too), which is how a manifest names images kept elsewhere.

A JSONL line with ``parts`` (``[{"text": ...}, {"image": "a.png"}, ...]``, plus ``id`` and
``metadata``) is an interleaved document (``documents.py``): its image parts follow the rules above,
and any bad part makes the whole line an error item.

CSV manifests are parsed strictly: a row that is not valid CSV is reported, never mended. A quote
that is never closed would make the rest of the file one field; that row is reported ("unterminated
quote starting at line N") and the lines after its first are read again as rows of their own.

Reasons quote item content (a manifest value, a tar member name) only escaped and cut short
(:data:`_MAX_QUOTED_CHARS`), and never the content of a file outside the source, which is not read.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from ..errors import ConfigError, InvalidItemError
from .images import DEFAULT_MAX_IMAGE_BYTES, check_regular_file, open_regular_file, read_regular_file
from .records import ItemPart, Record, SourceItem

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
DEFAULT_MAX_TEXT_CHARS = 8192
# Parts of one document (a JSONL line with 'parts'): bounds the memory one item costs.
MAX_DOCUMENT_PARTS = 64

_ACCEPTED = (
    "a folder of images with .txt/.json sidecars, a .jsonl or .csv manifest, a WebDataset .tar shard "
    "(or a glob / list of them), or an iterable of Record"
)
_MANIFEST_KINDS = {".jsonl": "jsonl", ".csv": "csv", ".tar": "tar"}
_TEXT_KEYS = ("text",)
# img2dataset's per-sample JSON names the text "caption".
_TAR_TEXT_KEYS = ("text", "caption")
# A tar member is read into memory whole; one bigger than an image may be is refused unread.
_MAX_MEMBER_BYTES = DEFAULT_MAX_IMAGE_BYTES
# A sidecar is read whole too: far above any caption and its metadata, far below a memory problem.
_MAX_SIDECAR_BYTES = 16 * 2**20
# Longest quotation of item content in a reason (a manifest value can be megabytes long).
_MAX_QUOTED_CHARS = 160
# Header cells quoted when a CSV header is refused.
_MAX_QUOTED_COLUMNS = 8


def iter_source(
    source: Any,
    *,
    allow_remote: bool = False,
    fetch_timeout: float = 10.0,
    max_remote_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    base_dir: str | os.PathLike | None = None,
) -> Iterator[SourceItem]:
    """Return a lazy iterator over the items of ``source``.

    ``source`` is a folder, a ``.jsonl``/``.csv`` manifest, a WebDataset ``.tar`` shard, a glob
    string or a list of such paths, or any iterable of :class:`Record` (or :class:`SourceItem`,
    passed through). Paths are checked now, so an unreadable source raises :class:`ConfigError`
    before anything is read; item problems come out later as items with ``error`` set.

    Manifest images may be http(s) URLs; they are fetched (``fetch_timeout`` seconds in all,
    at most ``max_remote_bytes``) only with ``allow_remote=True``. Manifest image paths resolve
    against the manifest's folder and must stay inside it; with ``base_dir`` (an existing folder)
    they resolve against ``base_dir`` and must stay inside it, absolute paths included.
    """
    paths = _source_paths(source)
    kinds = None if paths is None else [(path, _kind(path)) for path in paths]
    base = _base_dir(base_dir, source, kinds)
    if kinds is None:
        return _iter_records(source)
    fetch = _Fetcher(allow_remote, fetch_timeout, max_remote_bytes)
    return _iter_paths(kinds, fetch, base)


def source_parts(source: Any, *, base_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]] | None:
    """The paths ``source`` names with their kinds (``"folder"``, ``"jsonl"``, ``"csv"``, ``"tar"``),
    checked as :func:`iter_source` checks them; None for an iterable of records. Reading each path
    alone, in order, with the same ``base_dir`` gives what ``iter_source(source)`` gives, which is
    how distributed ingestion splits a source (a shard per task)."""
    paths = _source_paths(source)
    kinds = None if paths is None else [(path, _kind(path)) for path in paths]
    _base_dir(base_dir, source, kinds)
    return kinds


def count_source(source: Any) -> int | None:
    """The number of items :func:`iter_source` gives for ``source``, found cheaply (no image is
    read, no JSON parsed), for a progress bar's total; None when it is not known in advance.

    Folders are walked and grouped as the iterator groups them, JSONL lines and CSV rows are
    counted, tar shards have their headers scanned (None for a shard that cannot be scanned);
    an iterable of records gives its ``len()``, a generator None.
    """
    paths = _source_paths(source)
    if paths is None:
        return len(source) if isinstance(source, Sized) else None
    total = 0
    for path in paths:
        kind = _kind(path)
        if kind == "folder":
            total += sum(1 for _ in _folder_groups(path))
        elif kind == "jsonl":
            total += sum(1 for _ in _jsonl_lines(path))
        elif kind == "csv":
            total += sum(1 for _ in _csv_rows(path))
        else:
            n = _count_tar(path)
            if n is None:
                return None
            total += n
    return total


def describe_source(source: Any) -> str:
    """A short label for ``source``, stored in each record's metadata as ``"source"``."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return text if _is_glob(text) else str(Path(text).resolve())
    if _is_path_list(source):
        first = describe_source(source[0])
        return first if len(source) == 1 else f"{first} (+{len(source) - 1} more)"
    return "records"


def prepare_text(text: str | bytes | None, *, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Decode and check one item's text; return it stripped of surrounding whitespace."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not text
        except UnicodeDecodeError as e:
            raise InvalidItemError(
                f"text is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at position {e.start})"
            ) from None
    elif text is not None and not isinstance(text, str):
        raise InvalidItemError(f"text must be a string, got {type(text).__name__}")
    text = (text or "").strip()
    if not text:
        raise InvalidItemError("empty text")
    nul = text.find("\0")
    if nul >= 0:
        raise InvalidItemError(f"text contains a NUL character (at position {nul})")
    if len(text) > max_chars:
        raise InvalidItemError(f"text has {len(text)} characters, over the limit of {max_chars} (raise max_text_chars)")
    return text


# ---------------------------------------------------------------------------------------- dispatch
def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[") and not os.path.exists(text)


def _is_path_list(source: Any) -> bool:
    return (
        isinstance(source, (list, tuple))
        and len(source) > 0
        and all(isinstance(p, (str, os.PathLike)) for p in source)
    )


def _source_paths(source: Any) -> list[Path] | None:
    """The paths ``source`` names, or None when it is an iterable of records."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not _is_glob(text):
            return [Path(text)]
        matches = sorted(glob.glob(text))
        if not matches:
            raise ConfigError(f"`source` glob {text!r} matches no files. Pass {_ACCEPTED}.")
        return [Path(m) for m in matches]
    if _is_path_list(source):
        return [Path(p) for p in source]
    if isinstance(source, (bytes, Mapping, Image.Image)) or not isinstance(source, Iterable):
        raise ConfigError(f"`source` must be {_ACCEPTED}; got a {type(source).__name__}.")
    return None


def _kind(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"`source` does not exist: {str(path)!r}. Pass {_ACCEPTED}.")
    if path.is_dir():
        return "folder"
    try:
        check_regular_file(str(path), "`source`")  # a FIFO would block the first read forever
    except InvalidItemError as e:
        raise ConfigError(f"{e.reason}. Pass {_ACCEPTED}.") from None
    kind = _MANIFEST_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"`source` has an unsupported extension {path.suffix!r}: {str(path)!r}. "
            f"Pass {_ACCEPTED} (extensions: {', '.join(_MANIFEST_KINDS)})."
        )
    if kind == "csv":
        _check_csv_header(path)
    return kind


def _base_dir(base_dir: str | os.PathLike | None, source: Any, kinds: list[tuple[Path, str]] | None) -> Path | None:
    """``base_dir`` resolved and checked: an existing folder, given for a source with a manifest."""
    if base_dir is None:
        return None
    if not isinstance(base_dir, (str, os.PathLike)) or not os.fspath(base_dir):
        raise ConfigError(f"`base_dir` must be a folder path, got {base_dir!r}.")
    if not Path(base_dir).is_dir():
        raise ConfigError(f"`base_dir` must be an existing folder, got {os.fspath(base_dir)!r}.")
    if kinds is None or not any(kind in ("jsonl", "csv") for _, kind in kinds):
        raise ConfigError(
            f"`base_dir` applies to the image paths of .jsonl/.csv manifests, but `source` "
            f"({describe_source(source)}) has no manifest. Drop `base_dir`."
        )
    return Path(base_dir).resolve()


def _iter_paths(kinds: list[tuple[Path, str]], fetch: "_Fetcher", base_dir: Path | None) -> Iterator[SourceItem]:
    for path, kind in kinds:
        label = describe_source(path)
        if kind == "folder":
            yield from _iter_folder(path, label)
        elif kind in ("jsonl", "csv"):
            root = _Root(base_dir, "base_dir") if base_dir is not None else _Root(path.parent.resolve(), None)
            reader = _iter_jsonl if kind == "jsonl" else _iter_csv
            yield from reader(path, label, fetch, root)
        else:
            yield from _iter_tar(path, label)


def _iter_records(records: Iterable[Any]) -> Iterator[SourceItem]:
    for i, r in enumerate(records):
        ref = f"records[{i}]"
        if isinstance(r, SourceItem):
            yield r
        elif isinstance(r, Record):
            yield SourceItem(ref=ref, source="records", text=r.text, image=r.image, id=r.id, metadata=dict(r.metadata),
                             source_path=r.source_path)
        else:
            yield SourceItem(ref=ref, source="records",
                             error=f"expected a Record or SourceItem, got {type(r).__name__}")


# ------------------------------------------------------------------------------------------ fields
def _item_fields(obj: dict[str, Any], text_keys: tuple[str, ...], use_text: bool = True):
    """Split a JSON object into (text, id, metadata): every key that is not text/id/metadata is
    metadata too, so nothing the user wrote is dropped."""
    obj = dict(obj)
    record_id = obj.pop("id", None)
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)
    if record_id is not None and not isinstance(record_id, str):
        raise InvalidItemError(f"'id' must be a string, got {type(record_id).__name__}")
    metadata = obj.pop("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidItemError(f"'metadata' must be a JSON object, got {type(metadata).__name__}")
    text = None
    if use_text:
        key = next((k for k in text_keys if k in obj), None)
        if key is not None:
            text = obj.pop(key)
            if text is not None and not isinstance(text, str):
                raise InvalidItemError(f"'{key}' must be a string, got {type(text).__name__}")
    return text, record_id, {**obj, **metadata}


def _sidecar_json(data: bytes, name: str, text_keys: tuple[str, ...], use_text: bool):
    try:
        obj = json.loads(data)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise InvalidItemError(f"{name} is not valid JSON ({_cut(str(e))})") from None
    if not isinstance(obj, dict):
        raise InvalidItemError(f"{name} must hold a JSON object, got {type(obj).__name__}")
    return _item_fields(obj, text_keys, use_text)


def _grouped_item(ref: str, label: str, image: str | bytes, txt: bytes | None, js: bytes | None,
                  js_name: str, text_keys: tuple[str, ...]) -> SourceItem:
    """One item from an image and its .txt / .json companions (folder sidecars, tar members).
    The .txt is the text when there is one; the .json's text key is then left in the metadata.
    ``ref`` (the image's path in the folder, ``shard.tar:key``) is also the item's source path."""
    text, record_id, metadata = txt, None, {}
    if js is not None:
        try:
            json_text, record_id, metadata = _sidecar_json(js, js_name, text_keys, use_text=txt is None)
        except InvalidItemError as e:
            return SourceItem(ref=ref, source=label, error=e.reason)
        text = txt if txt is not None else json_text
    return SourceItem(ref=ref, source=label, text=text, image=image, id=record_id, metadata=metadata,
                      source_path=ref)


# ------------------------------------------------------------------------------------------ folder
class _Outside:
    """A symlinked folder that resolves outside the source folder: one error item, not walked."""

    def __init__(self, ref: str):
        self.ref = ref


def _iter_folder(root: Path, label: str) -> Iterator[SourceItem]:
    inside = Path(os.path.realpath(root))
    for entry in _folder_groups(root):
        if isinstance(entry, OSError):
            ref = os.path.relpath(entry.filename, root) if entry.filename else "."
            yield SourceItem(ref=ref, source=label, error=f"cannot read folder: {entry.strerror or entry}")
        elif isinstance(entry, _Outside):
            yield SourceItem(ref=entry.ref, source=label, error=_outside_reason(PurePosixPath(entry.ref).name, inside))
        else:
            yield _folder_group_item(root, inside, label, *entry)


def _is_inside(path: Path | str, inside: Path) -> bool:
    # realpath follows every link on the way, so a link in a linked-in folder is judged by its target.
    return Path(os.path.realpath(path)).is_relative_to(inside)


def _outside_reason(name: str, inside: Path) -> str:
    return (f"{name} is a symlink that resolves outside the source folder {inside}; a folder source reads "
            "only what lies inside it (copy the files in, or list them in a manifest with base_dir)")


def _folder_groups(root: Path) -> Iterator[tuple[Path, str, dict[str, list[str]]] | OSError | _Outside]:
    """In walk order, each ``(folder, stem, {"image": [...], ".txt": [...], ".json": [...]})`` group
    of files sharing a stem, each folder that could not be read (its OSError) and each linked folder
    that leads outside ``root`` (an :class:`_Outside`): one per item, so that :func:`count_source`
    counts what :func:`_iter_folder` gives without reading a file."""
    unreadable: list[OSError] = []
    visited: set[str] = set()
    inside = Path(os.path.realpath(root))
    # Linked-in folders are followed when they resolve inside the root (datasets often link their
    # parts together); one that leads out is reported, not walked: it could lead anywhere, even "/".
    # A link back up the tree is visited once.
    for folder, dirs, files in os.walk(root, onerror=unreadable.append, followlinks=True):
        yield from _drain(unreadable)
        real = os.path.realpath(folder)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        subfolders = sorted(d for d in dirs if not d.startswith("."))
        outside = [d for d in subfolders if not _is_inside(os.path.join(folder, d), inside)]
        dirs[:] = [d for d in subfolders if d not in outside]  # in place: os.walk's order
        groups: dict[str, dict[str, list[str]]] = {}
        for name in sorted(f for f in files if not f.startswith(".")):
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            role = "image" if ext in IMAGE_EXTENSIONS else ext if ext in (".txt", ".json") else None
            if role is not None:
                groups.setdefault(stem, {"image": [], ".txt": [], ".json": []})[role].append(name)
        for stem in sorted(groups):
            yield Path(folder), stem, groups[stem]
        for d in outside:
            yield _Outside(Path(os.path.relpath(os.path.join(folder, d), root)).as_posix())
    yield from _drain(unreadable)


def _drain(errors: list[OSError]) -> Iterator[OSError]:
    while errors:
        yield errors.pop(0)


def _folder_group_item(root: Path, inside: Path, label: str, folder: Path, stem: str,
                       group: dict[str, list[str]]) -> SourceItem:
    images, txts, jsons = group["image"], group[".txt"], group[".json"]
    first = (images or txts or jsons)[0]
    ref = (folder / first).relative_to(root).as_posix()
    # First: a file outside the folder is neither read nor described (not even its type).
    # The folder itself is inside (only such folders are walked), so only a link can lead out.
    escaping = [name for name in images + txts + jsons
                if os.path.islink(folder / name) and not _is_inside(folder / name, inside)]
    if escaping:
        return SourceItem(ref=ref, source=label, error=_outside_reason(escaping[0], inside))
    if len(images) > 1 or len(txts) > 1 or len(jsons) > 1:
        found = ", ".join(images + txts + jsons)
        return SourceItem(ref=ref, source=label, error=f"ambiguous files share the stem {stem!r} ({found}); "
                                                       "give each image its own name")
    if not images:
        sidecar = (txts or jsons)[0]
        return SourceItem(ref=ref, source=label,
                          error=f"no image for this sidecar (no {stem}.jpg, .png, ... next to {sidecar})")
    if not txts and not jsons:
        return SourceItem(ref=ref, source=label, error=f"no sidecar text ({stem}.txt or {stem}.json)")
    return _folder_item(folder, ref, label, images[0], txts, jsons)


def _folder_item(folder: Path, ref: str, label: str, image: str, txts: list[str], jsons: list[str]) -> SourceItem:
    try:
        # Raw bytes, so that prepare_text is the one place that reports a text that is not UTF-8.
        txt = _read_sidecar(folder / txts[0]) if txts else None
        js = _read_sidecar(folder / jsons[0]) if jsons else None
    except InvalidItemError as e:
        return SourceItem(ref=ref, source=label, error=e.reason)
    return _grouped_item(ref, label, str(folder / image), txt, js, jsons[0] if jsons else None, _TEXT_KEYS)


def _read_sidecar(path: Path) -> bytes:
    def check(size: int) -> None:
        if size > _MAX_SIDECAR_BYTES:
            raise InvalidItemError(f"sidecar {path.name} is {size:,} bytes, over the limit of {_MAX_SIDECAR_BYTES:,}")

    data = read_regular_file(str(path), "sidecar", _MAX_SIDECAR_BYTES, check)
    check(len(data))  # it may have grown since fstat
    return data


# --------------------------------------------------------------------------------------- manifests
class _Root:
    """The folder a manifest's image paths resolve against and must stay inside: the manifest's
    own folder, or ``base_dir`` when one is given (``name`` then says so in rejections)."""

    def __init__(self, folder: Path, name: str | None):
        self.folder = folder
        self.name = name

    def describe(self) -> str:
        if self.name is None:
            return (f"the manifest's folder {self.folder} (paths must stay inside it; "
                    "pass base_dir / --base-dir to allow another folder)")
        return f"{self.name} {self.folder} (paths must stay inside it)"


def _open_manifest(path: Path) -> io.BufferedReader:
    # _kind checked that it is a regular file; this checks the descriptor again, in case the path
    # was swapped since (see read_regular_file).
    return open_regular_file(str(path), "manifest")


def _jsonl_lines(path: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """``(ref, line, error)`` per non-blank line: the decoded line, or why it cannot be decoded."""
    try:
        f = _open_manifest(path)
    except InvalidItemError as e:
        yield path.name, None, e.reason
        return
    with f:
        for number, raw in enumerate(f, 1):
            ref = f"{path.name}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ref, None, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")  # byte-order mark written by some editors
            if line.strip():
                yield ref, line, None


def _iter_jsonl(path: Path, label: str, fetch: "_Fetcher", root: _Root) -> Iterator[SourceItem]:
    for ref, line, error in _jsonl_lines(path):
        if error is not None:
            yield SourceItem(ref=ref, source=label, error=error)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield SourceItem(ref=ref, source=label, error=f"line is not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield SourceItem(ref=ref, source=label, error=f"line holds a JSON {type(obj).__name__}, "
                                                          "expected an object with 'image' and 'text'")
            continue
        yield _jsonl_item(obj, ref, label, root, fetch)


def _jsonl_item(obj: dict[str, Any], ref: str, label: str, root: _Root, fetch: "_Fetcher") -> SourceItem:
    if "parts" in obj:
        return _jsonl_document(obj, ref, label, root, fetch)
    try:
        for key in ("image", "text"):
            if key not in obj:
                raise InvalidItemError(f"missing the {key!r} field")
        obj = dict(obj)
        written = obj.pop("image")
        text, record_id, metadata = _item_fields(obj, _TEXT_KEYS)
        image = _manifest_image(written, root, fetch)  # last: nothing is fetched for an item already bad
    except InvalidItemError as e:
        return SourceItem(ref=ref, source=label, error=e.reason)
    return SourceItem(ref=ref, source=label, text=text, image=image, id=record_id, metadata=metadata,
                      source_path=written)


def _jsonl_document(obj: dict[str, Any], ref: str, label: str, root: _Root, fetch: "_Fetcher") -> SourceItem:
    """A document line: ``{"parts": [{"text": ...}, {"image": "a.png"}, ...], "id", "metadata"}``.
    Its image parts follow the rules of an ``image`` field (inside the manifest's folder or
    ``base_dir``; URLs with remote fetching on); any bad part rejects the whole line."""
    try:
        obj = dict(obj)
        parts = obj.pop("parts")
        clash = [key for key in ("image", "text") if key in obj]
        if clash:
            raise InvalidItemError(f"a document line ('parts') cannot also have {' or '.join(map(repr, clash))}: its "
                                   "text is its passages joined and its image its first image part; drop the field")
        if not isinstance(parts, list) or not parts:
            raise InvalidItemError(f"'parts' must be a non-empty list of {{\"text\": ...}} and {{\"image\": ...}} "
                                   f"objects, got {_shown(parts)}")
        if len(parts) > MAX_DOCUMENT_PARTS:
            raise InvalidItemError(f"'parts' has {len(parts)} parts, over the limit of {MAX_DOCUMENT_PARTS} "
                                   "(split the document)")
        for i, part in enumerate(parts):
            if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in ("text", "image"):
                raise InvalidItemError(f"part {i} must be an object with one key, 'text' or 'image', got {_shown(part)}")
            if "text" in part and not isinstance(part["text"], str):
                raise InvalidItemError(f"part {i}: 'text' must be a string, got {type(part['text']).__name__}")
        kinds = {next(iter(part)) for part in parts}
        if kinds != {"text", "image"}:
            missing = ({"text", "image"} - kinds).pop()
            raise InvalidItemError(f"a document needs at least one text part and one image part; this one has no "
                                   f"{missing} part")
        _, record_id, metadata = _item_fields(obj, _TEXT_KEYS, use_text=False)
        items: list[ItemPart] = []
        for i, part in enumerate(parts):  # images last: nothing is fetched for a line already bad
            if "text" in part:
                items.append(ItemPart("text", part["text"]))
                continue
            try:
                items.append(ItemPart("image", _manifest_image(part["image"], root, fetch), part["image"]))
            except InvalidItemError as e:
                raise InvalidItemError(f"part {i} (image): {e.reason}") from None
    except InvalidItemError as e:
        return SourceItem(ref=ref, source=label, error=e.reason)
    first_image = next(p.source_path for p in items if p.kind == "image")
    return SourceItem(ref=ref, source=label, id=record_id, metadata=metadata, source_path=first_image, parts=items)


def _open_csv(path: Path) -> io.TextIOWrapper:
    # surrogateescape turns bytes that are not UTF-8 into markers found per row, instead of an
    # exception that would end the whole file.
    return io.TextIOWrapper(_open_manifest(path), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _check_csv_header(path: Path) -> None:
    try:
        with _open_csv(path) as f:
            header = next(csv.reader(f, strict=True), [])
    except InvalidItemError as e:
        raise ConfigError(f"`source` CSV {str(path)!r} cannot be read ({e.reason}).") from None
    except (OSError, csv.Error) as e:
        raise ConfigError(f"`source` CSV {str(path)!r} cannot be read (header row: {e}).") from None
    if "image" not in header or "text" not in header or len(set(header)) != len(header):
        shown = ", ".join(_shown(c, 40) for c in header[:_MAX_QUOTED_COLUMNS])
        more = f", ... ({len(header)} columns)" if len(header) > _MAX_QUOTED_COLUMNS else ""
        raise ConfigError(
            f"`source` CSV {str(path)!r} needs a header row naming distinct columns, including 'image' and "
            f"'text' (optional 'id', others become metadata); found [{shown}{more}]."
        )


class _CsvLines:
    """A CSV file's lines for ``csv.reader``, numbered, keeping the lines of the record being read
    so that a broken record spanning several lines can give back all but its first, to be read
    again. Memory stays bounded: the csv module refuses a field over ``csv.field_size_limit()``,
    and the lines kept belong to one record."""

    def __init__(self, f: io.TextIOWrapper):
        self._file = f
        self._read = 0  # lines taken from the file so far
        self._again: list[tuple[int, str]] = []  # given back, last first (popped from the end)
        self.record: list[tuple[int, str]] = []  # (number, line) of the record being read

    def __iter__(self) -> "_CsvLines":
        return self

    def __next__(self) -> str:
        if self._again:
            number, line = self._again.pop()
        else:
            line = self._file.readline()
            if not line:
                raise StopIteration
            self._read += 1
            number = self._read
        self.record.append((number, line))
        return line

    def give_back_all_but_first(self) -> None:
        self._again.extend(reversed(self.record[1:]))


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, str] | None, str | None]]:
    """``(ref, row, error)`` per non-blank row: the row by column name, or why it cannot be read.
    ``ref`` names the row's first line."""
    try:
        f = _open_csv(path)
    except InvalidItemError as e:
        yield path.name, None, e.reason
        return
    with f:
        lines = _CsvLines(f)
        # strict: a quote out of place is an error, not silently kept as text.
        rows = csv.reader(lines, strict=True)
        try:
            header = next(rows)
        except (StopIteration, csv.Error) as e:  # _kind read it; the file changed since
            yield path.name, None, f"the header row can no longer be read ({e or 'empty file'})"
            return
        while True:
            lines.record = []
            try:
                fields, error = next(rows), None
            except StopIteration:
                return
            except csv.Error as e:  # the parser resets and goes on with the next line
                fields, error = None, e
            first, last = lines.record[0][0], lines.record[-1][0]
            ref = f"{path.name}:{first}"
            if error is not None:
                yield ref, None, _csv_error(error, first, last)
                if last > first:
                    # Only an open quote carries a record over a line end, so the quote opened on
                    # its first line and swallowed the lines after it. They are read again as rows
                    # of their own (each checked like any row): one stray quote costs one row.
                    lines.give_back_all_but_first()
            elif not fields:
                continue  # a blank line
            elif len(fields) != len(header):
                yield ref, None, f"row has {len(fields)} fields, the header has {len(header)}"
            elif not all(_is_utf8(v) for v in fields):
                yield ref, None, "row is not valid UTF-8"
            else:
                yield ref, dict(zip(header, fields)), None


def _csv_error(error: csv.Error, first: int, last: int) -> str:
    again = f"; lines {first + 1}-{last} were read again as rows" if last > first else ""
    if str(error) == "unexpected end of data":  # strict mode's word for end of file inside quotes
        return f"unterminated quote starting at line {first}: the quoted field runs to the end of the file{again}"
    if last > first:
        return (f"row starting at line {first} is not valid CSV ({error}, at line {last}; a quote opened on line "
                f"{first} is probably not closed where it should be){again}")
    return f"row is not valid CSV ({error})"


def _iter_csv(path: Path, label: str, fetch: "_Fetcher", root: _Root) -> Iterator[SourceItem]:
    for ref, row, error in _csv_rows(path):
        if error is not None:
            yield SourceItem(ref=ref, source=label, error=error)
        else:
            yield _csv_item(row, ref, label, root, fetch)


def _csv_item(row: dict[str, str], ref: str, label: str, root: _Root, fetch: "_Fetcher") -> SourceItem:
    written = row.pop("image")
    try:
        image = _manifest_image(written, root, fetch)
    except InvalidItemError as e:
        return SourceItem(ref=ref, source=label, error=e.reason)
    text = row.pop("text")
    record_id = row.pop("id", None) or None  # an empty id cell means "no id"
    return SourceItem(ref=ref, source=label, text=text, image=image, id=record_id, metadata=row,
                      source_path=written)


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: Any, limit: int = _MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` (quoted, control characters escaped) cut to ``limit`` characters: reasons
    quote item content, and a manifest value or a tar member name can be any length."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _cut(text: str, limit: int = _MAX_QUOTED_CHARS) -> str:
    """Like :func:`_shown`, without the quotation marks (for a URL, a server's message)."""
    escaped = repr(text)[1:-1]
    return escaped if len(escaped) <= limit else f"{escaped[:limit]}... ({len(escaped):,} characters)"


def _listed(names: list[str], limit: int = _MAX_QUOTED_COLUMNS) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(_cut(n) for n in names[:limit]) + more


def _manifest_image(value: Any, root: _Root, fetch: "_Fetcher") -> str | bytes:
    if not isinstance(value, str) or not value.strip():
        raise InvalidItemError(f"the 'image' field must be a path or an http(s) URL, got {_shown(value)}")
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        return fetch(value)
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise InvalidItemError(f"unsupported URL scheme {_shown(scheme)} in 'image' (use a path or an http(s) URL)")
    # resolve() follows symlinks, so a link inside the folder that points outside counts as outside;
    # an absolute path replaces the folder in the join and is held to the same rule.
    resolved = (root.folder / value).resolve()
    if not resolved.is_relative_to(root.folder):
        raise InvalidItemError(f"image path {_shown(value)} is outside {root.describe()}")
    return str(resolved)


class _Fetcher:
    """Fetches a manifest's http(s) image URLs, or refuses them when remote fetching is off."""

    def __init__(self, allow_remote: bool, timeout: float, max_bytes: int):
        self.allow_remote = allow_remote
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects)

    def __call__(self, url: str) -> bytes:
        if not self.allow_remote:
            raise InvalidItemError(
                "remote image URL but remote fetching is off (set allow_remote=True / --allow-remote)"
            )
        # The socket timeout bounds each read; the deadline bounds the whole download, so a server
        # trickling bytes cannot hold the ingestion forever.
        deadline = time.monotonic() + self.timeout
        chunks, size = [], 0
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                while chunk := response.read1(1 << 16):  # read1: whatever has arrived, not a full chunk
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InvalidItemError(f"remote image is over the limit of {self.max_bytes:,} bytes "
                                               f"(raise max_remote_bytes): {_cut(url)}")
                    if time.monotonic() > deadline:
                        raise InvalidItemError(f"could not fetch {_cut(url)}: took longer than {self.timeout} s")
        except urllib.error.HTTPError as e:
            # The reason is the server's words (a redirect's target, a status line): cut short.
            raise InvalidItemError(f"could not fetch {_cut(url)}: HTTP {e.code} {_cut(str(e.reason))}") from None
        except urllib.error.URLError as e:
            raise InvalidItemError(f"could not fetch {_cut(url)}: {_cut(str(e.reason))}") from None
        except (OSError, ValueError) as e:  # timeouts, resets, malformed responses (http.client)
            raise InvalidItemError(f"could not fetch {_cut(url)}: {_cut(str(e))}") from None
        return b"".join(chunks)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib follows redirects to ftp:// too; a manifest URL must stay on http(s).
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# --------------------------------------------------------------------------------------- WebDataset
class _TarGroup:
    """The members of one key read so far."""

    def __init__(self, key: str, scattered: bool):
        self.key = key
        self.names: list[str] = []
        self.data: dict[str, bytes] = {}  # extension ("jpg", "txt", "json", ...) -> bytes
        self.problems: list[str] = []
        if scattered:
            self.problems.append(
                f"members of key {_shown(key)} are not adjacent in the tar, so they were read apart; "
                "repack the shard with each key's files together (e.g. tar --sort=name)"
            )

    def item(self, shard: str, label: str) -> SourceItem:
        ref = f"{shard}:{self.key}"
        images = [ext for ext in self.data if f".{ext}" in IMAGE_EXTENSIONS]
        if not self.problems:
            if len(images) != 1:
                self.problems.append(f"{'no image' if not images else 'several images'} for key {_shown(self.key)} "
                                     f"(members: {_listed(self.names)})")
            elif "txt" not in self.data and "json" not in self.data:
                self.problems.append(f"no text for key {_shown(self.key)} (no .txt or .json member)")
        if self.problems:
            return SourceItem(ref=ref, source=label, error="; ".join(self.problems))
        return _grouped_item(ref, label, self.data[images[0]], self.data.get("txt"), self.data.get("json"),
                             f"{self.key}.json", _TAR_TEXT_KEYS)


def _tar_key(member: tarfile.TarInfo) -> tuple[str, str, str] | None:
    """``(key, base name, extension)`` of a member, None for one that is no part of any item."""
    folder, base = posixpath.split(member.name)
    if member.isdir() or base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), base, ext


def _count_tar(path: Path) -> int | None:
    """Items in a shard: runs of adjacent members sharing a key, as :func:`_iter_tar` groups them.
    Only headers are read ("r:" seeks past the data); None when the shard cannot be scanned."""
    runs, last = 0, None
    try:
        with _open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                parts = _tar_key(member)
                if parts is not None and parts[0] != last:
                    runs, last = runs + 1, parts[0]
    except (tarfile.TarError, OSError, EOFError, InvalidItemError):
        return None
    return runs


def _open_shard(path: Path) -> io.BufferedReader:
    return open_regular_file(str(path), "shard")  # the descriptor checked again, as for manifests


def _iter_tar(path: Path, label: str) -> Iterator[SourceItem]:
    try:
        f = _open_shard(path)
    except InvalidItemError as e:
        yield SourceItem(ref=f"{path.name}:?", source=label, error=e.reason)
        return
    with f:
        yield from _iter_tar_members(f, path, label)


def _iter_tar_members(f: io.BufferedReader, path: Path, label: str) -> Iterator[SourceItem]:
    wanted = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS} | {"txt", "json"}
    group: _TarGroup | None = None
    done: set[str] = set()  # keys already given out (names only, to notice scattered members)
    yielded = 0
    try:
        # "r|" streams: one pass, nothing but the current member in memory.
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                parts = _tar_key(member)
                if parts is None:
                    continue
                key, base, ext = parts
                if group is None or key != group.key:
                    if group is not None:
                        yield group.item(path.name, label)
                        yielded += 1
                        done.add(group.key)
                    group = _TarGroup(key, scattered=key in done)
                ext = ext.lower()
                if not member.isfile():
                    group.names.append(f"{base} (not a regular file)")
                    continue
                group.names.append(base)
                if ext in group.data:
                    group.problems.append(f"member {_shown(base)} appears twice")
                elif ext in wanted and member.size > _MAX_MEMBER_BYTES:  # skipped unread, not loaded
                    group.problems.append(f"member {_shown(base)} is {member.size:,} bytes, over the limit of "
                                          f"{_MAX_MEMBER_BYTES:,}")
                elif ext in wanted:
                    group.data[ext] = tar.extractfile(member).read()
            end = tar.offset
        # tarfile ends quietly at a cut or garbled header; a real end of archive is a zero block.
        if not _zero_block_at(f, end):
            raise tarfile.ReadError(f"no end-of-archive marker at byte {end}")
    except (tarfile.TarError, OSError, EOFError) as e:
        # The key being read may have lost members to the damage, so it is reported, not given out.
        where = f"after {yielded} items" + (f", while reading key {_shown(group.key)}" if group is not None else "")
        yield SourceItem(ref=f"{path.name}:{group.key if group is not None else '?'}", source=label,
                         error=f"tar is truncated or corrupt {where} ({_cut(str(e))}); "
                               "the rest of the shard was not read")
        return
    if group is not None:
        yield group.item(path.name, label)


def _zero_block_at(f: io.BufferedReader, offset: int) -> bool:
    f.seek(offset)
    return f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
