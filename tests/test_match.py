"""Set matching (`mmrag match`, `match_sets`) against brute-force assignments computed here.

The references enumerate every assignment with itertools; the end-to-end ones recompute the
similarity matrix with numpy from the tiny CLIP's own vectors.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.pipelines import MatchResult, match_sets
from mmrag.pipelines.cli import main
from mmrag.pipelines.dev.sample_data import make_sample_set
from mmrag.pipelines.match import assign, candidate_mask, read_images, read_texts
from mmrag.retrievers.errors import ConfigError, MissingExtraError


# ---------------------------------------------------------------------------- brute-force references
def brute_force(s: np.ndarray, max_per_text: int = 1, allowed: np.ndarray | None = None) -> set[tuple[int, int]]:
    """The best assignment by enumeration, as ``linear_sum_assignment`` defines it on a rectangular
    matrix: the most pairs possible (min(n, m * N); every image takes at most one text, a text at
    most ``max_per_text`` images), and among those the largest summed similarity. With ``allowed``,
    the best is the one with the most allowed pairs, then the largest sum over them; only the
    allowed pairs are returned."""
    n, m = s.shape
    allowed = np.ones(s.shape, dtype=bool) if allowed is None else allowed
    best = max(_assignments(n, m, max_per_text), key=lambda pairs: (
        sum(allowed[i, t] for i, t in pairs), sum(s[i, t] for i, t in pairs if allowed[i, t])))
    return {(i, t) for i, t in best if allowed[i, t]}


def _assignments(n: int, m: int, max_per_text: int):
    """Every assignment with min(n, m * max_per_text) pairs, as lists of (image, text)."""
    if max_per_text == 1:  # permutations: fast enough for 7 x 7
        if n <= m:
            yield from ([(i, p[i]) for i in range(n)] for p in itertools.permutations(range(m), n))
        else:
            yield from ([(p[t], t) for t in range(m)] for p in itertools.permutations(range(n), m))
        return
    size = min(n, m * max_per_text)
    for choice in itertools.product(range(-1, m), repeat=n):  # each image: a text, or none (-1)
        used = [t for t in choice if t >= 0]
        if len(used) == size and all(used.count(t) <= max_per_text for t in set(used)):
            yield [(i, t) for i, t in enumerate(choice) if t >= 0]


def as_set(pairs) -> set[tuple[int, int]]:
    return {(i, t) for i, t, _ in pairs}


# ---------------------------------------------------------------------------- the assignment
@pytest.mark.parametrize("shape, seed", [((6, 6), 0), ((5, 7), 1), ((7, 5), 2), ((1, 4), 3), ((4, 1), 4)])
def test_one_to_one_equals_brute_force(shape, seed):
    s = np.random.default_rng(seed).uniform(-1, 1, shape)
    pairs = assign(s)
    assert as_set(pairs) == brute_force(s)
    assert len(pairs) == min(shape)  # a rectangular matrix leaves the surplus unmatched
    assert all(score == s[i, t] for i, t, score in pairs) and [p[0] for p in pairs] == sorted(p[0] for p in pairs)


@pytest.mark.parametrize("shape, n, seed", [((5, 3), 2, 0), ((6, 2), 2, 1), ((4, 3), 3, 2), ((6, 3), 2, 3)])
def test_one_to_many_equals_brute_force(shape, n, seed):
    s = np.random.default_rng(seed).uniform(-1, 1, shape)
    pairs = assign(s, max_per_text=n)
    assert as_set(pairs) == brute_force(s, max_per_text=n)
    counts = np.bincount([t for _, t, _ in pairs], minlength=shape[1])
    assert counts.max() <= n and len(pairs) == min(shape[0], shape[1] * n)


def test_candidate_mask_is_the_union_of_the_top_n_per_image_and_per_text():
    s = np.random.default_rng(5).normal(size=(6, 8))
    for k in (1, 2, 3, 8, 20):
        rows = np.argsort(-s, axis=1)[:, :k]
        cols = np.argsort(-s, axis=0)[:k, :]
        expected = np.zeros(s.shape, dtype=bool)
        for i in range(6):
            expected[i, rows[i]] = True
        for t in range(8):
            expected[cols[:, t], t] = True
        assert (candidate_mask(s, k) == expected).all()


@pytest.mark.parametrize("shape, seed", [((6, 6), 10), ((5, 7), 11), ((7, 5), 12)])
def test_candidates_as_large_as_the_sets_give_the_full_assignment(shape, seed):
    s = np.random.default_rng(seed).uniform(-1, 1, shape)
    mask = candidate_mask(s, max(shape))
    assert mask.all()
    assert assign(s, candidates=mask) == assign(s)
    assert as_set(assign(s, candidates=mask)) == brute_force(s)


@pytest.mark.parametrize("shape, k, seed", [((6, 6), 1, 20), ((6, 6), 2, 21), ((5, 7), 1, 22), ((7, 5), 1, 23)])
def test_small_candidate_sets_never_give_a_pair_outside_them(shape, k, seed):
    s = np.random.default_rng(seed).uniform(-1, 1, shape)
    mask = candidate_mask(s, k)
    pairs = assign(s, candidates=mask)
    assert all(mask[i, t] for i, t, _ in pairs)
    assert as_set(pairs) == brute_force(s, allowed=mask)


def test_candidates_that_forbid_the_global_optimum_change_the_assignment():
    # the optimum pairs image 1 with text 1 (0.1); a candidate set without that pair must not take it
    s = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert as_set(assign(s)) == {(0, 1), (1, 0)}  # 1.65 > 1.0
    mask = np.array([[True, False], [True, True]])
    assert as_set(assign(s, candidates=mask)) == {(0, 0), (1, 1)}


def test_threshold_applies_after_the_assignment():
    s = np.array([[0.9, 0.2, 0.1],
                  [0.8, 0.3, 0.05]])
    # optimum: (0, 0) + (1, 1) = 1.2; text 2 is the rectangular surplus
    assert as_set(assign(s)) == {(0, 0), (1, 1)}
    # 0.3 < 0.5 drops (1, 1): image 1 stays unmatched although its 0.8 with text 0 is above the
    # threshold (text 0 went to image 0 in the optimum)
    assert assign(s, threshold=0.5) == [(0, 0, 0.9)]
    assert assign(s, threshold=0.3) == [(0, 0, 0.9), (1, 1, 0.3)]  # at the threshold: kept
    assert assign(s, threshold=0.95) == []
    assert assign(s, threshold=0) == assign(s, threshold=None)  # 0 is a threshold, not "none"
    assert assign(-s, threshold=0) == []  # every score negative


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_per_text": 0}, "`max_per_text` must be a positive integer, got 0"),
    ({"threshold": float("nan")}, "`threshold` must be a finite number"),
    ({"candidates": np.ones((3, 2), dtype=bool)}, "`candidates` must be a boolean matrix"),
])
def test_bad_options_name_the_argument(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        assign(np.zeros((2, 2)), **kwargs)


def test_missing_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # what an install without scipy raises
    with pytest.raises(MissingExtraError, match=r'pip install "mmrag\[match\]"'):
        assign(np.zeros((2, 2)))


# ---------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("lines, needle", [
    (['{"id": "a", "text": "x"}', "{not json"], ":2 is not valid JSON"),
    (['{"id": "a", "text": "x"}', '{"id": "b"}'], ":2: missing `text`"),
    (['{"text": "x"}'], ":1: missing `id`"),
    (['{"id": "a", "text": "x"}', "", '{"id": "a", "text": "y"}'], ":3: duplicate id 'a', already used on"),
    (['{"id": 3, "text": "x"}'], ":1: `id` must be a non-empty string"),
    (['{"id": "a", "text": "  "}'], ":1: `text` is unusable: empty text"),
    (['["a", "x"]'], ":1: each line must be a JSON object"),
])
def test_bad_text_lines_name_file_and_line(tmp_path, lines, needle):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        read_texts(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value)


def test_image_folder_ids_and_errors(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for rel in ("b.png", "sub/a.jpg", ".hidden/c.png"):
        Image.new("RGB", (8, 8)).save(folder / rel)
    (folder / "notes.txt").write_text("not an image")
    assert read_images(folder) == {"b": folder / "b.png", "sub/a": folder / "sub" / "a.jpg"}
    Image.new("RGB", (8, 8)).save(folder / "b.jpg")
    with pytest.raises(ConfigError, match="both have the id 'b'"):
        read_images(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        read_images(tmp_path / "empty")
    with pytest.raises(ConfigError, match="is not a folder"):
        read_images(tmp_path / "missing")


# ---------------------------------------------------------------------------- end to end, tiny CLIP
@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, Path]:
    """6 sample images (one in a subfolder), their 6 sidecar texts and one distractor text."""
    root = tmp_path_factory.mktemp("match")
    folder = make_sample_set(root / "images", n_entities=3, images_per_entity=(2, 2), size=48, seed=3)
    # both views of an entity share their sidecar text: the stem in front (the tiny CLIP reads 32
    # tokens) makes every text distinct, so that the optimum has no ties
    lines = [{"id": f"t-{p.stem}", "text": f"{p.stem}. " + json.loads(p.read_text())["text"]}
             for p in sorted(folder.glob("*.json"))]
    lines.append({"id": "t-distractor", "text": "A plain grey square on a white background."})
    first = min(folder.glob("*.png"))
    (folder / "sub").mkdir()
    shutil.move(first, folder / "sub" / first.name)
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder, texts


def reference_similarity(encoder, folder: Path, texts: Path):
    image_ids = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.png"))
    images = [Image.open(folder / f"{i}.png").convert("RGB") for i in image_ids]
    rows = [json.loads(line) for line in texts.read_text().splitlines()]
    s = encoder.embed_images(images).astype(np.float64) @ encoder.embed_texts([r["text"] for r in rows]).astype(np.float64).T
    return s, image_ids, [r["id"] for r in rows]


def named(pairs_idx, image_ids, text_ids) -> set[tuple[str, str]]:
    return {(image_ids[i], text_ids[t]) for i, t in pairs_idx}


def test_match_sets_equals_brute_force_on_clip_vectors(sample, clip_encoder):
    folder, texts = sample
    s, image_ids, text_ids = reference_similarity(clip_encoder, folder, texts)
    assert s.shape == (6, 7) and "sub/" in " ".join(image_ids)

    result = match_sets(folder, texts, encoder=clip_encoder)  # 10 candidates >= 7: the full assignment
    assert isinstance(result, MatchResult)
    best = brute_force(s)
    assert {(i, t) for i, t, _ in result.pairs} == named(best, image_ids, text_ids)
    for i, t, score in result.pairs:
        assert score == pytest.approx(s[image_ids.index(i), text_ids.index(t)], abs=1e-5)
    assert result.unmatched_images == [] and len(result.unmatched_texts) == 1
    rows = [json.loads(line) for line in result.to_jsonl().splitlines()]
    assert sorted(r["image"] for r in rows if r["image"]) == image_ids
    assert sorted(r["text"] for r in rows if r["text"]) == sorted(text_ids)

    # one candidate per image and per text: the candidates recomputed here, then the brute force over them
    narrow = match_sets(folder, texts, encoder=clip_encoder, n_candidates=1)
    order = np.argsort(-s, axis=1)[:, :1], np.argsort(-s, axis=0)[:1, :]
    allowed = np.zeros(s.shape, dtype=bool)
    allowed[np.arange(6)[:, None], order[0]] = True
    allowed[order[1], np.arange(7)[None, :]] = True
    assert {(i, t) for i, t, _ in narrow.pairs} == named(brute_force(s, allowed=allowed), image_ids, text_ids)
    assert len(narrow.pairs) < len(result.pairs)  # the narrowing bites: items whose candidates were taken


# ---------------------------------------------------------------------------- command line
def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_jsonl(sample, tiny_config, clip_encoder, tmp_path, capsys):
    folder, texts = sample
    expected = match_sets(folder, texts, encoder=clip_encoder, max_per_text=2)
    out = tmp_path / "out" / "matches.jsonl"
    code, stdout, err = _run(capsys, "match", "--images", folder, "--texts", texts, "--config", tiny_config,
                             "--device", "cpu", "--max-per-text", "2", "--out", out)
    assert code == 0 and stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["image"], r["text"], r["score"]) for r in rows if r["image"] and r["text"]]
    assert [(i, t) for i, t, _ in got] == [(i, t) for i, t, _ in expected.pairs]
    assert np.allclose([s for *_, s in got], [s for *_, s in expected.pairs], atol=1e-6)
    assert len(err.strip().splitlines()) == 1 and f"matched {len(expected.pairs)} pair(s)" in err

    code, stdout, err = _run(capsys, "match", "--images", folder, "--texts", texts, "--config", tiny_config,
                             "--device", "cpu", "--threshold", "1.5")  # above any cosine: nothing kept
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and len(rows) == 13 and all(r["score"] is None for r in rows)
    assert "matched 0 pair(s), mean score n/a; unmatched: 6 image(s), 7 text(s)" in err


@pytest.mark.parametrize("bad, needle", [("texts", "texts.jsonl:2 is not valid JSON"), ("images", "holds no images")])
def test_cli_bad_input_is_one_line_and_non_zero(sample, tiny_config, tmp_path, capsys, bad, needle):
    folder, texts = sample
    if bad == "texts":
        texts = tmp_path / "texts.jsonl"
        texts.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    else:
        folder = tmp_path / "empty"
        folder.mkdir()
    code, stdout, err = _run(capsys, "match", "--images", folder, "--texts", texts, "--config", tiny_config)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
