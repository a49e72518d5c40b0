"""``toy:NAME`` models: tiny models trained on the toy world, shipped as safetensors in the package.

Why shipped rather than trained on first use: toy:clip is 3.8 MB of safetensors, and training it to
its held-out bar takes about five minutes on two shared cores (see ``TOY_CLIP_RECIPE``), too long
for a first ``mmrag search`` or a test session. The weights under ``weights/clip/`` were written by
:func:`~mmrag.pipelines.toyworld.train_clip.train_toy_clip` with that recipe; their
``train_log.jsonl`` and ``toyworld.json`` record how. They load through the normal
``from_pretrained`` path like any local directory.

Where the package was installed without them (a build that dropped the package data), the model is
trained once into ``cache_dir`` with the same recipe, under a file lock, and reused from there.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import filelock
from mmrag.retrievers.errors import ConfigError

from ..dev.tiny_models import COMPLETE_MARKER

TOY_MODEL_NAMES = ("clip",)
WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
# What a loadable CLIPModel + CLIPProcessor directory holds (save_pretrained's layout).
_REQUIRED_FILES = {"clip": ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")}
# The shipped toy:clip's recipe (train_toy_clip keywords); seed and thread count fix the bytes.
TOY_CLIP_RECIPE = dict(steps=900, seed=0, threads=2)


def shipped_model_dir(name: str) -> pathlib.Path | None:
    """The packaged weights of ``toy:<name>``, or ``None`` when this installation lacks them."""
    _check_name(name)
    target = WEIGHTS_DIR / name
    return target if _is_complete(target, name) else None


def ensure_toy_model(name: str, cache_dir: str | os.PathLike) -> pathlib.Path:
    """A directory ``from_pretrained`` loads for ``toy:<name>``: the shipped weights, else a cached or
    freshly trained copy in ``cache_dir/toy-<name>`` (trained once, under a file lock, into a staging
    directory renamed into place, so a killed run never leaves a directory that passes for complete).
    """
    shipped = shipped_model_dir(name)
    if shipped is not None:
        return shipped
    cache_dir = pathlib.Path(cache_dir)
    target = cache_dir / f"toy-{name}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(cache_dir / f".toy-{name}.lock"):
        if (target / COMPLETE_MARKER).is_file():  # another process trained it while we waited
            return target
        for stale in cache_dir.glob(f".toy-{name}-training-*"):  # a killed run's; we hold the lock
            shutil.rmtree(stale)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".toy-{name}-training-") as staging:
            from .train_clip import train_toy_clip

            built = pathlib.Path(staging) / name
            train_toy_clip(built, **TOY_CLIP_RECIPE)
            (built / COMPLETE_MARKER).touch()
            if target.exists():  # a partial copy from a killed process (no marker)
                shutil.rmtree(target)
            os.replace(built, target)
    return target


def _check_name(name: str) -> None:
    if name not in TOY_MODEL_NAMES:
        raise ConfigError(f"`name` must be one of {', '.join(map(repr, TOY_MODEL_NAMES))} (as toy:NAME), got {name!r}.")


def _is_complete(directory: pathlib.Path, name: str) -> bool:
    return all((directory / f).is_file() for f in _REQUIRED_FILES[name])
