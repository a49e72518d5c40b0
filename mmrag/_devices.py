"""Device checks shared by every component that places a model: a device this machine does not
have is refused up front with the fix, instead of torch's ``AssertionError`` at the first ``.to()``."""

from __future__ import annotations

from typing import Any


def device_problem(device: Any) -> str | None:
    """Why ``device`` cannot be used here, or ``None`` when it can (``None`` itself: the default)."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{str(device)!r} is not a device; use cpu, cuda, cuda:N or mps"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{str(device)!r}: CUDA is not available on this machine; use cpu"
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"{str(device)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            return f"{str(device)!r}: MPS is not available on this machine; use cpu"
    elif dev.type != "cpu":
        return f"{str(device)!r} is not supported; use cpu, cuda, cuda:N or mps"
    return None
