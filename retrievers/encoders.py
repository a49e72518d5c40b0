"""Dual encoders (CLIP / SigLIP family) that put images and texts in one vector space."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mmrag._devices import device_problem

from .errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` picks float16 on CUDA and float32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"`dtype` must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[dtype]


def normalize_model_id(model_id: str | os.PathLike) -> str:
    """A local directory is identified by its absolute path, a Hub model by its id."""
    p = Path(model_id).expanduser()
    return str(p.resolve()) if p.exists() else str(model_id)


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; older versions a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, each checked to be a string (a bare string is refused, not split)."""
    if isinstance(texts, str):
        raise ConfigError(f"`texts` must be a list of strings, got a single string {texts[:40]!r}; wrap it in a list.")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ConfigError(f"`texts[{i}]` must be a string, got {type(t).__name__}.")
    return texts


def check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """``images`` as a list, each checked to be a PIL image (a bare image is refused)."""
    if isinstance(images, Image.Image):
        raise ConfigError("`images` must be a list of PIL images, got a single image; wrap it in a list.")
    images = list(images)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ConfigError(f"`images[{i}]` must be a PIL.Image.Image, got {type(im).__name__}.")
    return images


class LazyEncoder:
    """What the encoders share: arguments checked at construction, weights loaded on first use
    (or :meth:`warm_up`), once, under a lock. Subclasses fill in :meth:`_load`."""

    def __init__(self, model_id: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int, trust_remote_code: bool = False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ConfigError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self.model_id = normalize_model_id(model_id)
        problem = device_problem(device)
        if problem is not None:
            raise ConfigError(f"`device` {problem}.")
        self.device = device if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self._model = None
        self._processor = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r}, device={self.device!r}, dtype={self.dtype})"

    def warm_up(self):
        """Load the model and processor (idempotent, thread-safe)."""
        with self._lock:
            if self._model is None:
                model, self._processor = self._load()
                self._model = model.to(self.device).eval()
        return self

    def _load(self) -> tuple[Any, Any]:
        """``(model, processor)``, raising :class:`ModelLoadError` with the fix when they cannot load."""
        raise NotImplementedError

    @property
    def model(self):
        return self.warm_up()._model

    @property
    def processor(self):
        return self.warm_up()._processor


class DualEncoder(LazyEncoder):
    """Embeds texts and images with one CLIP- or SigLIP-family model into L2-normalised vectors.

    The constructor only stores parameters; weights load on first use (or :meth:`warm_up`), so a
    knowledge base can be opened and inspected without loading a model.

    Args:
        model_id: Hugging Face id or local directory loadable by ``AutoModel`` and ``AutoProcessor``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when present.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"``; ``None`` picks float16 on CUDA, else float32.
        batch_size: items per forward pass.
        trust_remote_code: allow code from the model repository to run (off by default).
    """

    def __init__(self, model_id: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 32, trust_remote_code: bool = False):
        super().__init__(model_id, device=device, dtype=dtype, batch_size=batch_size,
                         trust_remote_code=trust_remote_code)
        self.texts_truncated = 0  # running count of texts cut to the model's length limit

    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoProcessor

        kwargs = dict(trust_remote_code=self.trust_remote_code)
        try:
            processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
            model = AutoModel.from_pretrained(self.model_id, dtype=self.dtype, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"Could not load the dual encoder {self.model_id!r}: {str(e).splitlines()[0]} "
                "Check the model id or path; Hub models need network access (offline, use configs/tiny.yaml)."
            ) from e
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise ModelLoadError(
                f"{self.model_id!r} is a {type(model).__name__}, not a dual encoder: it needs "
                "get_text_features and get_image_features (use a CLIP- or SigLIP-family model)."
            )
        return model, processor

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        config = self.model.config
        dim = getattr(config, "projection_dim", None)
        if dim is None:  # SigLIP has no projection: the pooled text hidden size is the embedding
            dim = config.text_config.hidden_size
        return int(dim)

    @property
    def max_text_tokens(self) -> int:
        """Longest text, in tokens, the text tower accepts."""
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def _pads_to_max_length(self) -> bool:
        # SigLIP was trained on texts padded to the full length; shorter padding changes its embeddings.
        return "siglip" in self.model.config.model_type

    # ------------------------------------------------------------------ embedding
    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts into an ``(n, dim)`` float32 array of unit vectors.

        Texts longer than the model's limit are truncated to it and counted in ``texts_truncated``.
        """
        texts = check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokenizer = self.processor.tokenizer
        limit = self.max_text_tokens
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            lengths = [len(ids) for ids in tokenizer(batch, truncation=False)["input_ids"]]
            self.texts_truncated += sum(n > limit for n in lengths)
            padding = "max_length" if self._pads_to_max_length else True
            enc = tokenizer(batch, padding=padding, truncation=True, max_length=limit, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            out.append(self._normalise(_features(self.model.get_text_features(**enc))))
        return np.concatenate(out)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images into an ``(n, dim)`` float32 array of unit vectors."""
        images = check_images(images)
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im if im.mode == "RGB" else im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, self.dtype)
            out.append(self._normalise(_features(self.model.get_image_features(pixel_values=pixels))))
        return np.concatenate(out)

    @staticmethod
    def _normalise(features: torch.Tensor) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy().astype(np.float32, copy=False)
