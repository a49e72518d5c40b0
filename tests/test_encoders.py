"""DualEncoder against the raw transformers models, for both families (CLIP and SigLIP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from mmrag.retrievers import ConfigError, DualEncoder, ModelLoadError

# Unit vectors from the embedder (its own batches) vs the raw model on every input at once: float32
# noise measured at most 1.5e-7 (CLIP and SigLIP, batch sizes 1, 2, 3 and 5, threads 1 and 2,
# AVX-512 and AVX2 kernels); real bugs (pixels not normalised, another resampling filter) move them
# by 6.7e-2 or more. 1e-5 sits 65x above the noise and 6,700x below the smallest bug.
VECTOR_ATOL = 1e-5

TEXTS = ["a red circle", "the Zorblax, a striped teal star", "x"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(5)]


@pytest.fixture(params=["clip", "siglip"])
def family(request, tiny_clip, tiny_siglip):
    return {"clip": tiny_clip, "siglip": tiny_siglip}[request.param], request.param


def test_vectors_equal_raw_model_normalised(family):
    path, name = family
    enc = DualEncoder(path, batch_size=2)  # batches of 2 over 5 images: batching must not change results
    model = AutoModel.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    padding = "max_length" if name == "siglip" else True
    with torch.no_grad():
        ref_t = model.get_text_features(**proc.tokenizer(TEXTS, padding=padding, truncation=True, return_tensors="pt")).pooler_output.numpy()
        ref_i = model.get_image_features(**proc.image_processor(_images(), return_tensors="pt")).pooler_output.numpy()
    t, i = enc.embed_texts(TEXTS), enc.embed_images(_images())
    assert t.dtype == i.dtype == np.float32 and t.shape == (3, enc.dim) and i.shape == (5, enc.dim)
    np.testing.assert_allclose(t, ref_t / np.linalg.norm(ref_t, axis=1, keepdims=True), atol=VECTOR_ATOL)
    np.testing.assert_allclose(i, ref_i / np.linalg.norm(ref_i, axis=1, keepdims=True), atol=VECTOR_ATOL)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, atol=VECTOR_ATOL)


def test_long_texts_are_truncated_and_counted(family):
    path, name = family
    enc = DualEncoder(path)
    limit = enc.max_text_tokens
    long = " ".join(f"word{i}" for i in range(limit * 2))
    vec = enc.embed_texts([long, "short"])
    assert enc.texts_truncated == 1
    # truncation keeps the first `limit` tokens: the raw model on exactly those gives the same vector
    padding = "max_length" if name == "siglip" else False
    enc_in = enc.processor.tokenizer([long], truncation=True, max_length=limit, padding=padding, return_tensors="pt")
    assert enc_in["input_ids"].shape[1] == limit
    with torch.no_grad():
        ref = AutoModel.from_pretrained(path).eval().get_text_features(**enc_in).pooler_output[0].numpy()
    np.testing.assert_allclose(vec[0], ref / np.linalg.norm(ref), atol=VECTOR_ATOL)


def test_constructor_is_light_and_bad_input_is_typed(tiny_clip, tmp_path):
    enc = DualEncoder(tiny_clip)
    assert enc._model is None  # nothing loads until first use
    with pytest.raises(ConfigError, match="list"):
        enc.embed_texts("a single string")
    with pytest.raises(ConfigError, match=r"images\[1\]"):
        enc.embed_images([Image.new("RGB", (8, 8)), "not an image"])
    with pytest.raises(ConfigError, match="batch_size"):
        DualEncoder(tiny_clip, batch_size=0)
    with pytest.raises(ModelLoadError, match="Could not load"):
        DualEncoder(tmp_path / "no-model").warm_up()
    assert enc.embed_texts([]).shape == (0, enc.dim)
