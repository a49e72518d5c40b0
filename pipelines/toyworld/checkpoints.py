"""Resumable training checkpoints for the toy models, shared by ``train_llava`` and ``train_sd``, and
:func:`seeded_run`, the seeded, thread-pinned scope every toy trainer runs in.

A checkpoint (``checkpoints/step-NNNNNN/``) holds the trainable weights and the AdamW moments as
safetensors, and the step, elapsed time and torch RNG state as JSON. It is written into a staging
directory renamed into place, so a run killed at any moment resumes from its last complete checkpoint;
because every batch is a function of ``(seed, step)`` alone, the resumed run continues exactly as an
uninterrupted one would at the same thread count. Only the last :data:`KEEP_CHECKPOINTS` are kept.

Nothing here unpickles: state is safetensors and JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import safetensors.torch
import torch
from mmrag.retrievers.errors import ConfigError

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2

Trainable = Sequence[tuple[str, torch.nn.Parameter]]


@contextmanager
def seeded_run(seed: int, threads: int | None) -> Iterator[None]:
    """Run the body with torch seeded by ``seed`` (the caller's generator untouched) and ``threads``
    intra-op threads (``None``: as they are); both restored afterwards. Bytes repeat only at the same
    thread count."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)


def check_run_arguments(required: dict[str, object], optional: dict[str, object]) -> None:
    """``required`` must be positive integers, ``optional`` positive integers or None (named in the error)."""
    for argument, value in required.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"`{argument}` must be a positive integer, got {value!r}.")
    for argument, value in optional.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"`{argument}` must be a positive integer or None, got {value!r}.")


def run_directory(out_dir: str | os.PathLike, resume: bool) -> tuple[pathlib.Path, pathlib.Path | None]:
    """``(out_dir, its latest checkpoint or None)``; a non-empty ``out_dir`` must hold one to resume."""
    out_dir = pathlib.Path(out_dir)
    latest = latest_checkpoint(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (resume and latest is not None):
        raise ConfigError(f"`out_dir` {str(out_dir)!r} is not empty and holds no checkpoint to resume "
                          f"(resume={resume!r}); pass a new or empty directory.")
    return out_dir, latest


def latest_checkpoint(out_dir: pathlib.Path) -> pathlib.Path | None:
    """The newest complete checkpoint under ``out_dir`` (one with its ``state.json``), or ``None``."""
    root = out_dir / CHECKPOINTS
    found = sorted(root.glob("step-*[0-9]")) if root.is_dir() else []
    complete = [c for c in found if (c / "state.json").is_file()]
    return complete[-1] if complete else None


def save_checkpoint(out_dir: pathlib.Path, step: int, seconds: float, trainable: Trainable,
                    optimiser: torch.optim.Optimizer, export: Callable[[pathlib.Path], None]) -> None:
    """Weights + AdamW moments + state, staged then renamed; then ``export(staging_dir)`` writes the
    loadable model into a fresh directory whose entries are renamed over ``out_dir``'s one by one."""
    root = out_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    staging = root / f".staging-{step:06d}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    safetensors.torch.save_file({name: p.detach().contiguous() for name, p in trainable},
                                staging / "trainable.safetensors")
    moments, steps_done = {}, {}
    for name, p in trainable:
        state = optimiser.state.get(p, {})
        if state:
            moments[f"{name}.exp_avg"] = state["exp_avg"].contiguous()
            moments[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            steps_done[name] = float(state["step"])
    safetensors.torch.save_file(moments, staging / "optimizer.safetensors")
    state = {"step": step, "seconds": seconds, "adam_steps": steps_done, "torch_rng": torch.get_rng_state().tolist()}
    (staging / "state.json").write_text(json.dumps(state), encoding="utf-8")
    target = root / f"step-{step:06d}"
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    for old in sorted(root.glob("step-*[0-9]"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    fresh = root / ".export"
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir()
    export(fresh)
    for entry in fresh.iterdir():
        replace_entry(entry, out_dir / entry.name)
    fresh.rmdir()


def replace_entry(source: pathlib.Path, target: pathlib.Path) -> None:
    """Move ``source`` (a file or a directory) to ``target``, replacing what is there: a file by one
    rename; a directory by renaming the old one aside first, so ``target`` is never half written."""
    if source.is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def load_checkpoint(checkpoint: pathlib.Path, trainable: Trainable, optimiser: torch.optim.Optimizer) -> tuple[int, float]:
    """Restore ``trainable``, the optimiser's moments and torch's RNG; returns ``(step, seconds)``."""
    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    weights = safetensors.torch.load_file(checkpoint / "trainable.safetensors")
    moments = safetensors.torch.load_file(checkpoint / "optimizer.safetensors")
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(weights[name])
            if name in state["adam_steps"]:
                optimiser.state[p] = {"step": torch.tensor(state["adam_steps"][name]),
                                      "exp_avg": moments[f"{name}.exp_avg"].clone(),
                                      "exp_avg_sq": moments[f"{name}.exp_avg_sq"].clone()}
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state["step"], state["seconds"]


def check_same_run(path: pathlib.Path, settings: dict, say: Callable[[str], None]) -> None:
    """Refuse to resume under other settings (it would no longer be the run its checkpoint belongs to);
    a longer or shorter schedule (``steps``) and another thread count are allowed, and recorded."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = {k: (saved.get(k), v) for k, v in settings.items()
               if k not in ("steps", "threads") and json.loads(json.dumps(v)) != saved.get(k)}
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"`out_dir` holds a run with other settings ({listed}); pass them as that run did, "
                          "or a new directory.")
    if saved.get("steps") != settings["steps"]:
        say(f"schedule length changed from {saved.get('steps')} to {settings['steps']} steps")
        path.write_text(json.dumps(saved | {"steps": settings["steps"]}, indent=1), encoding="utf-8")


def truncate_log(log: pathlib.Path, step: int) -> None:
    """Drop the lines a killed run logged after its last checkpoint: the resumed run logs them again."""
    if log.is_file():
        lines = [line for line in log.read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line).get("step", 0) <= step]
        log.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
