"""Torch dtypes by name, shared by the generators (configs name them as strings)."""

from __future__ import annotations

import torch

from mmrag.generators.errors import GenerationError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"`` -> ``torch.float16``; a torch dtype or None passes through."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise GenerationError(f"`dtype` must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}.")
    return DTYPES[dtype]
