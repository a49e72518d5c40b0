"""``toy:NAME`` models: tiny models trained on the toy world, shipped as safetensors in the package.

The models (:data:`TOY_MODEL_NAMES`), each in the layout of its ``tiny:`` counterpart, so it loads
through the same ``from_pretrained`` / ``load_ip_adapter`` path as any local directory:

- ``toy:clip``: the CLIP dual encoder (``train_clip``);
- ``toy:llava``: a LLaVA on toy:clip's frozen vision tower (``train_llava``);
- ``toy:sd``: a StableDiffusionPipeline (UNet, VAE, toy:clip's text tower) and ``toy:ip-adapter``, its
  IP-Adapter in the original checkpoint's layout with toy:clip's vision tower as image encoder
  (``train_sd``, which trains the two together).

Why shipped rather than trained on first use: each is a few MB of safetensors, and training takes
from five minutes (toy:clip, ``TOY_CLIP_RECIPE``) to about an hour (toy:llava, toy:sd) on two cores,
too long for a first ``mmrag search`` or a test session. Each directory's ``train_log.jsonl`` and
``toyworld.json`` record how it was trained.

Where the package was installed without them (a build that dropped the package data), toy:clip is
trained once into ``cache_dir`` with its recipe, under a file lock, and reused from there; the others
are found in ``cache_dir/toy-NAME`` once ``mmrag toy-models train --only NAME`` has written them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import filelock
from mmrag.retrievers.errors import ConfigError

from ..dev.tiny_models import COMPLETE_MARKER

TOY_MODEL_NAMES = ("clip", "llava", "sd", "ip-adapter")
WEIGHTS_DIR = pathlib.Path(__file__).parent / "weights"
# What each loadable directory holds (save_pretrained's layouts; the IP-Adapter's is h94/IP-Adapter's).
_REQUIRED_FILES = {
    "clip": ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"),
    "llava": ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"),
    "sd": ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"),
    "ip-adapter": ("models/ip-adapter_sd15.safetensors", "models/image_encoder/model.safetensors"),
}
# The command that writes a model this installation lacks into the cache.
TRAIN_HINT = "mmrag toy-models train --only {name}"
# The shipped models' recipes (their trainers' keywords); seed and thread count fix the bytes.
TOY_CLIP_RECIPE = dict(steps=900, seed=0, threads=2)
TOY_LLAVA_RECIPE = dict(steps=6500, seed=0, threads=1, batch_size=16)
TOY_SD_RECIPE = dict(vae_steps=700, unet_steps=4500, seed=0, threads=1, batch_size=32)


def shipped_model_dir(name: str) -> pathlib.Path | None:
    """The packaged weights of ``toy:<name>``, or ``None`` when this installation lacks them."""
    _check_name(name)
    target = WEIGHTS_DIR / name
    return target if _is_complete(target, name) else None


def toy_clip_dir(clip_dir: str | os.PathLike | None) -> str | os.PathLike:
    """``clip_dir``, or (``None``) the shipped toy:clip that toy:llava and toy:sd are trained on."""
    if clip_dir is not None:
        return clip_dir
    shipped = shipped_model_dir("clip")
    if shipped is None:
        raise ConfigError("The shipped toy:clip weights are missing; pass `clip_dir` (a toy:clip directory).")
    return shipped


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
    if name != "clip":  # an hour of training is not something to start behind a user's back
        raise ConfigError(f"toy:{name}'s weights are not in this installation or in {str(cache_dir)!r}; "
                          f"train them with `{TRAIN_HINT.format(name=name)}` (about an hour on 2 cores), "
                          "or reinstall mmrag with its package data.")
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


def train_toy_models(directory: str | os.PathLike, only=None, *, log=None) -> dict[str, pathlib.Path]:
    """Train toy models with the shipped recipes into ``directory`` (by default, the tiny-model cache
    that :func:`ensure_toy_model` searches): each run in ``directory/runs/NAME`` (checkpointed, so
    calling this again resumes a killed run), then the loadable model in ``directory/toy-NAME``.

    ``only`` names some of :data:`TOY_MODEL_NAMES` (``sd`` and ``ip-adapter`` train together); toy:llava
    and toy:sd read toy:clip (the shipped one, else the cache's). Returns ``{name: loadable directory}``.
    """
    names = list(TOY_MODEL_NAMES) if not only else list(dict.fromkeys(only))
    for name in names:
        _check_name(name)
    if "ip-adapter" in names and "sd" not in names:
        names.append("sd")
    say = log if log is not None else (lambda line: None)
    directory = pathlib.Path(directory)
    runs = directory / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    built: dict[str, pathlib.Path] = {}
    for name in (n for n in TOY_MODEL_NAMES if n in names and n != "ip-adapter"):
        run = runs / name
        say(f"training toy:{name} in {run}")
        with filelock.FileLock(runs / f".{name}.lock"):
            if name == "clip":
                from .train_clip import train_toy_clip

                if run.exists():  # toy:clip trains in minutes and has no checkpoints: start again
                    shutil.rmtree(run)
                train_toy_clip(run, **TOY_CLIP_RECIPE, log=say)
                built["clip"] = _install(run, directory / "toy-clip")
            elif name == "llava":
                from .train_llava import train_toy_llava

                train_toy_llava(run, **TOY_LLAVA_RECIPE, log=say, clip_dir=ensure_toy_model("clip", directory))
                built["llava"] = _install(run, directory / "toy-llava")
            else:
                from .train_sd import train_toy_sd

                train_toy_sd(run, **TOY_SD_RECIPE, log=say, clip_dir=ensure_toy_model("clip", directory))
                built["sd"] = _install(run / "sd", directory / "toy-sd", logs_from=run)
                built["ip-adapter"] = _install(run / "ip-adapter", directory / "toy-ip-adapter", logs_from=run)
    return {n: built[n] for n in TOY_MODEL_NAMES if n in names and n in built}


def _install(source: pathlib.Path, target: pathlib.Path, logs_from: pathlib.Path | None = None) -> pathlib.Path:
    """Copy a finished run's loadable files (not its checkpoints) to ``target``, marked complete; the
    copy is staged and renamed, so ``target`` is never half written."""
    staging = target.with_name(f".{target.name}.installing")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoints"))
    if logs_from is not None:
        for log in ("train_log.jsonl", "toyworld.json"):
            if (logs_from / log).is_file():
                shutil.copy2(logs_from / log, staging / log)
    (staging / COMPLETE_MARKER).touch()
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
