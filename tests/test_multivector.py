"""MultiVectorEncoder against the raw transformers ColPali (conftest's `tiny_colpali`: built offline,
reloaded from disk)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ColPaliForRetrieval, ColPaliProcessor

from mmrag.retrievers.errors import ConfigError, ModelLoadError
from mmrag.retrievers.multivector import MultiVectorEncoder

# Our vectors (batches of 1, 2 and 3, threads 1 and 2) vs the raw model on one item at a time: float32
# noise measured at most 2.1e-7 per component; MaxSim scores (5 to 20 here) at most 3.8e-6 apart.
# The tolerances sit ~50x and ~25x above that noise.
VECTOR_ATOL = 1e-5
SCORE_ATOL = 1e-4

QUERIES = ["a cat", "The Zorblax, a striped teal star over the quiet lake at night", "x"]


@pytest.fixture(scope="module")
def reference(tiny_colpali):
    """The transformers model and processor, loaded on their own from the directory, offline."""
    model = ColPaliForRetrieval.from_pretrained(tiny_colpali, local_files_only=True, use_safetensors=True).eval()
    return model, ColPaliProcessor.from_pretrained(tiny_colpali, local_files_only=True)


@pytest.fixture(scope="module")
def encoder(tiny_colpali) -> MultiVectorEncoder:
    return MultiVectorEncoder(tiny_colpali, device="cpu", batch_size=3).warm_up()


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # not square and not 30 px, so the processor must resize
    return [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(n)]


def _raw(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).embeddings


def test_vectors_are_unit_float32_with_one_row_per_attended_position(encoder, reference):
    model, processor = reference
    image_vectors, query_vectors = encoder.embed_images(_images()), encoder.embed_queries(QUERIES)
    assert encoder.dim == model.config.embedding_dim == 32
    assert model.config.vlm_config.text_config.hidden_size != encoder.dim  # the projected width, not the decoder's

    # An image: its patches, then "<bos>Describe the image.\n" (ColPali scores every attended position).
    one_image = processor.process_images(_images(1))
    assert one_image["attention_mask"].all()
    n_image = one_image["input_ids"].shape[1]
    assert n_image > processor.image_seq_length == (30 // 6) ** 2
    assert len(image_vectors) == 3 and all(v.shape == (n_image, 32) for v in image_vectors)
    # A query: one vector per token of its own prompt, whatever it was batched with.
    assert [v.shape for v in query_vectors] == [
        (processor.process_queries([q])["input_ids"].shape[1], 32) for q in QUERIES]

    for vectors in image_vectors + query_vectors:
        assert type(vectors) is np.ndarray and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=VECTOR_ATOL)
    # the inputs reach the vectors
    assert np.abs(image_vectors[0] - image_vectors[1]).max() > 1e-3
    assert np.abs(query_vectors[0][:8] - query_vectors[2][:8]).max() > 1e-3


def test_padding_is_removed_by_the_attention_mask(encoder, reference):
    model, processor = reference
    batch = processor.process_queries(QUERIES)  # one padded batch: the short queries get padding
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] and min(lengths) < batch["input_ids"].shape[1]  # padding is really there
    raw = _raw(model, batch)
    vectors = encoder.embed_queries(QUERIES)
    assert [len(v) for v in vectors] == lengths
    for ours, row, keep in zip(vectors, raw, mask):
        np.testing.assert_allclose(ours, row[keep].numpy(), atol=VECTOR_ATOL)


def test_batching_does_not_change_the_vectors(tiny_colpali, encoder, reference):
    model, processor = reference
    images = _images()
    one_at_a_time = MultiVectorEncoder(tiny_colpali, device="cpu", batch_size=1)
    for ours, alone, image in zip(encoder.embed_images(images), one_at_a_time.embed_images(images), images):
        np.testing.assert_allclose(ours, alone, atol=VECTOR_ATOL)
        np.testing.assert_allclose(ours, _raw(model, processor.process_images([image]))[0].numpy(), atol=VECTOR_ATOL)
    for ours, alone, query in zip(encoder.embed_queries(QUERIES), one_at_a_time.embed_queries(QUERIES), QUERIES):
        np.testing.assert_allclose(ours, alone, atol=VECTOR_ATOL)
        np.testing.assert_allclose(ours, _raw(model, processor.process_queries([query]))[0].numpy(), atol=VECTOR_ATOL)


def test_maxsim_of_our_vectors_equals_colpali_score_retrieval(encoder, reference):
    model, processor = reference
    images = _images()
    # MaxSim with numpy from our (batched, unpadded) vectors: sum over query vectors of the best dot product.
    ours = np.array([[(q @ d.T).max(axis=1).sum() for d in encoder.embed_images(images)]
                     for q in encoder.embed_queries(QUERIES)])
    # transformers' own scorer on the raw model's embeddings, one item per forward pass
    query_embeddings = [_raw(model, processor.process_queries([q]))[0] for q in QUERIES]
    image_embeddings = [_raw(model, processor.process_images([im]))[0] for im in images]
    expected = processor.score_retrieval(query_embeddings, image_embeddings).numpy()
    assert ours.shape == expected.shape == (3, 3)
    np.testing.assert_allclose(ours, expected, atol=SCORE_ATOL)
    assert np.ptp(expected) > 0.1  # the scores tell the pairs apart


def test_remote_code_never_runs(tiny_colpali, tmp_path):
    """A repository carrying code (auto_map) loads through transformers' own ColPali classes; its code
    would write a marker file on import."""
    repo = tmp_path / "with-code"
    shutil.copytree(tiny_colpali, repo)
    marker = tmp_path / "remote-code-ran"
    (repo / "remote.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import ColPaliConfig\n\nclass RemoteConfig(ColPaliConfig):\n    pass\n")
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoConfig": "remote.RemoteConfig"}}))

    encoder = MultiVectorEncoder(repo, device="cpu")
    assert encoder.trust_remote_code is False
    assert encoder.embed_queries(["a cat"])[0].shape[1] == encoder.dim
    assert type(encoder.model) is ColPaliForRetrieval and not marker.exists()
    assert MultiVectorEncoder(repo, trust_remote_code=True).trust_remote_code is True  # stored for loading


def test_constructor_is_light_and_bad_input_is_typed(tiny_colpali, tiny_clip, tmp_path):
    encoder = MultiVectorEncoder(tiny_colpali)
    assert encoder._model is None  # nothing loads until first use
    assert encoder.embed_images([]) == [] and encoder.embed_queries([]) == [] and encoder._model is None
    with pytest.raises(ConfigError, match="list"):
        encoder.embed_queries("a single string")
    with pytest.raises(ConfigError, match=r"texts\[1\]"):
        encoder.embed_queries(["a cat", 3])
    with pytest.raises(ConfigError, match=r"images\[1\]"):
        encoder.embed_images([Image.new("RGB", (8, 8)), "not an image"])
    with pytest.raises(ConfigError, match="batch_size"):
        MultiVectorEncoder(tiny_colpali, batch_size=0)
    with pytest.raises(ConfigError, match="device"):
        MultiVectorEncoder(tiny_colpali, device="tpu")

    missing = tmp_path / "no-model"
    with pytest.raises(ModelLoadError, match="Could not load") as error:
        MultiVectorEncoder(missing).warm_up()
    assert repr(str(missing)) in str(error.value)
    with pytest.raises(ModelLoadError, match="'clip' model") as error:  # loads, but is no late-interaction model
        MultiVectorEncoder(tiny_clip).warm_up()
    assert repr(str(tiny_clip)) in str(error.value) and "'colpali'" in str(error.value)
