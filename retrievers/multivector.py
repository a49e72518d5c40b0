"""Multi-vector (late-interaction) encoders: one unit vector per query token and per image position.

ColPali (Faysse et al. 2024, arXiv:2407.01449) embeds a page image as the PaliGemma decoder's output
at every image patch and prompt token, and a query as its output at every token; a query scores a page
by ColBERT's MaxSim, sum over query vectors of the best dot product with any page vector. The vectors
come back as plain numpy arrays, one ``(n, dim)`` array per item, with padding removed, so that any
scorer (exact MaxSim, MUVERA's fixed-size encodings) can use them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .encoders import LazyEncoder, check_images, check_texts
from .errors import ModelLoadError

logger = logging.getLogger(__name__)

# model_type -> the transformers class; each pairs with a processor that has `process_images`,
# `process_queries` and `score_retrieval`, and returns per-position `embeddings`.
_MODEL_CLASSES = {"colpali": "ColPaliForRetrieval"}

DEFAULT_MULTIVECTOR_MODEL = "vidore/colpali-v1.3-hf"


class MultiVectorEncoder(LazyEncoder):
    """Embeds images and queries with a ColPali-family model into lists of L2-normalised vectors.

    The constructor only stores parameters; weights load on first use (or :meth:`warm_up`).

    An image gives one vector per position the model attends to: its patches (the processor's
    ``image_seq_length``) and the tokens of the prompt that follows them, as ColPali scores pages. A query
    gives one vector per token of ``"<bos>Question: {text}"`` plus ColPali's ten query-augmentation
    tokens; the padding a batch adds is dropped by the attention mask, so an item's vectors do not
    depend on what it was batched with.

    Args:
        model_id: Hugging Face id or local directory of a ColPali checkpoint (``ColPaliForRetrieval``
            and ``ColPaliProcessor``), e.g. :data:`DEFAULT_MULTIVECTOR_MODEL`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when present.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"``; ``None`` picks float16 on CUDA, else float32.
        batch_size: items per forward pass (a ColPali page is over a thousand positions: keep it small).
        trust_remote_code: allow code from the model repository to run (off by default).
    """

    def __init__(self, model_id: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 8, trust_remote_code: bool = False):
        super().__init__(model_id, device=device, dtype=dtype, batch_size=batch_size,
                         trust_remote_code=trust_remote_code)

    def _load(self):
        import transformers

        kwargs = {"trust_remote_code": self.trust_remote_code}
        try:
            config = transformers.AutoConfig.from_pretrained(self.model_id, **kwargs)
            if config.model_type not in _MODEL_CLASSES:
                raise ModelLoadError(
                    f"{self.model_id!r} is a {config.model_type!r} model; the multi-vector encoder needs one of "
                    f"{', '.join(map(repr, _MODEL_CLASSES))}, such as {DEFAULT_MULTIVECTOR_MODEL!r}."
                )
            model_class = getattr(transformers, _MODEL_CLASSES[config.model_type])
            processor = transformers.AutoProcessor.from_pretrained(self.model_id, **kwargs)
            model = model_class.from_pretrained(self.model_id, dtype=self.dtype, use_safetensors=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"Could not load the multi-vector encoder {self.model_id!r}: {str(e).splitlines()[0]} "
                "Check the model id or path; Hub models need network access (offline, use configs/tiny.yaml)."
            ) from e
        return model, processor

    @property
    def dim(self) -> int:
        """Dimension of each vector."""
        return int(self.model.config.embedding_dim)

    # ------------------------------------------------------------------ embedding
    def embed_images(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Embed PIL images: one ``(n_positions, dim)`` float32 array of unit vectors per image."""
        images = check_images(images)
        batches = (
            self.processor.process_images([im if im.mode == "RGB" else im.convert("RGB") for im in batch])
            for batch in self._batches(images)
        )
        return self._embed(batches)

    def embed_queries(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embed query texts: one ``(n_tokens, dim)`` float32 array of unit vectors per text."""
        texts = check_texts(texts)
        return self._embed(self.processor.process_queries(batch) for batch in self._batches(texts))

    def _batches(self, items: list) -> list[list]:
        return [items[start : start + self.batch_size] for start in range(0, len(items), self.batch_size)]

    @torch.inference_mode()
    def _embed(self, batches) -> list[np.ndarray]:
        out = []
        for batch in batches:
            # `labels` marks the image prompt's tokens for training; the forward pass does not use it.
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
            embeddings = self.model(**inputs).embeddings.float()  # (batch, seq, dim), zero where masked
            keep = inputs["attention_mask"].bool()  # (batch, seq)
            for row, mask in zip(embeddings, keep):
                vectors = row[mask]  # (n, dim): padding positions dropped
                # ColPali normalises in the model's dtype; again in float32 for exact unit vectors.
                vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                out.append(vectors.cpu().numpy().astype(np.float32, copy=False))
        return out
