"""The inputs of ``mmrag batch ask|draw``: one :class:`AskItem` or :class:`DrawItem` per JSONL line,
every line checked before any model loads (a structural error is a :class:`ConfigError` naming
``FILE:LINE``; see :mod:`.batch` for what becomes an error row instead)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrag.errors import MMRAGError
from mmrag.retrievers.errors import ConfigError

@dataclass(frozen=True)
class AskItem:
    """One question of a ``batch ask`` dataset; ``image`` is an absolute path (or None)."""

    id: str
    question: str
    image: str | None = None
    choices: list[str] | None = None
    k: int | None = None
    seed: int = 0
    references: list[str] | None = None  # KB record ids to answer from (None: retrieve; []: none)
    line: int = 0


@dataclass(frozen=True)
class DrawItem:
    """One prompt of a ``batch draw`` file; ``None`` fields take the config's values."""

    id: str
    prompt: str
    k: int | None = None
    guidance: str | dict | None = None
    steps: int | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    references: list[str] | None = None  # KB record ids whose images ground the drawing (None: retrieve)
    line: int = 0


# plus the keys of `mmrag eval vqa|generation` files, accepted and ignored, so those files run as they are
_ASK_KEYS = ("id", "question", "image", "choices", "k", "seed", "references", "answers", "answer", "gold_ids", "category")
_DRAW_KEYS = ("id", "prompt", "k", "guidance", "steps", "seed", "height", "width", "references", "entity", "images", "bucket")


def load_ask_items(path: str | os.PathLike) -> list[AskItem]:
    """The questions of a ``batch ask`` dataset, every line checked (a structural error is a
    :class:`ConfigError` naming ``FILE:LINE``). Images must exist; they are decoded when they run."""
    path = Path(path)
    items = []
    for n, obj, where in _lines(path, "--dataset", _ASK_KEYS):
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: `question` must be a non-empty string, got {question!r}.")
        image = obj.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ConfigError(f"{where}: `image` must be a path (relative to the file's folder), got {image!r}.")
            resolved = Path(image).expanduser()
            resolved = (resolved if resolved.is_absolute() else path.parent / resolved).resolve()
            if not resolved.is_file():
                raise ConfigError(f"{where}: `image` {image!r} is not a file ({resolved}); paths are relative to "
                                  f"the dataset's folder {path.parent.resolve()}.")
            image = str(resolved)  # absolute: Ray workers do not share the driver's working directory
        choices = obj.get("choices")
        if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                    or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise ConfigError(f"{where}: `choices` must be a list of at least 2 non-empty strings, got {choices!r}.")
        items.append(AskItem(id=_item_id(obj, n, where), question=question, image=image, choices=choices,
                             k=_positive_int(obj, "k", where), seed=_seed(obj, where),
                             references=_references(obj, where), line=n))
    _check_unique(items, path)
    return items


def load_draw_items(path: str | os.PathLike) -> list[DrawItem]:
    """The prompts of a ``batch draw`` file, every line checked (a structural error is a
    :class:`ConfigError` naming ``FILE:LINE``); a guidance is checked against the guidance classes."""
    path = Path(path)
    items = []
    for n, obj, where in _lines(path, "--prompts", _DRAW_KEYS):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}: `prompt` must be a non-empty string, got {prompt!r}.")
        guidance = obj.get("guidance")
        if guidance is not None:
            _check_guidance(guidance, where)
        items.append(DrawItem(id=_item_id(obj, n, where), prompt=prompt, k=_positive_int(obj, "k", where),
                              guidance=guidance, steps=_positive_int(obj, "steps", where), seed=_seed(obj, where),
                              height=_positive_int(obj, "height", where), width=_positive_int(obj, "width", where),
                              references=_references(obj, where), line=n))
    _check_unique(items, path)
    return items


def _lines(path: Path, argument: str, keys: Sequence[str]) -> Iterator[tuple[int, dict, str]]:
    from ..evaluation import (
        _jsonl,  # the JSONL reader of the eval commands (file:line errors)
    )

    for n, obj, where in _jsonl(path, argument):
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: each line must be a JSON object, got {type(obj).__name__}.")
        unknown = sorted(set(obj) - set(keys))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(keys)}.")
        yield n, obj, where


def _references(obj: dict, where: str) -> list[str] | None:
    references = obj.get("references")
    if references is not None and (not isinstance(references, list) or not all(
            isinstance(r, str) and r.strip() for r in references)):
        raise ConfigError(f"{where}: `references` must be a list of record ids ([] for none), got {references!r}.")
    return references


def _item_id(obj: dict, n: int, where: str) -> str:
    if "id" not in obj:
        return f"line-{n}"
    value = obj["id"]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: `id` must be a non-empty string, got {value!r} (leave it out for 'line-{n}').")
    return value


def _positive_int(obj: dict, key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{where}: `{key}` must be a positive integer, got {value!r}.")
    return value


def _seed(obj: dict, where: str) -> int:
    value = obj.get("seed", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where}: `seed` must be a non-negative integer, got {value!r}.")
    return value


def _check_guidance(guidance: Any, where: str) -> None:
    from mmrag.generators.guidance import GUIDANCES, guidance_from_config  # torch only

    if isinstance(guidance, str):
        if guidance not in GUIDANCES:
            raise ConfigError(f"{where}: `guidance` {guidance!r} is not one of {', '.join(map(repr, GUIDANCES))}.")
        return
    if not isinstance(guidance, dict):
        raise ConfigError(f"{where}: `guidance` must be a name or an object with a 'name' key, got {guidance!r}.")
    try:
        guidance_from_config(guidance)
    except MMRAGError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_unique(items: Sequence[AskItem | DrawItem], path: Path) -> None:
    first: dict[str, int] = {}
    for item in items:
        if item.id in first:
            raise ConfigError(f"{path}:{item.line}: duplicate id {item.id!r}, already used on line "
                              f"{path}:{first[item.id]}; ids name the output rows and must be unique.")
        first[item.id] = item.line
