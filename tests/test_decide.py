"""Retrieve or generate (``decide``): the score is the stored-vector cosine, a retrieved decision
draws nothing, and the calibrated threshold is the brute-force optimum. Tiny random models: the
plumbing, not the quality of the decision (that is measured with toy:clip, see the report)."""

from __future__ import annotations

import contextlib
import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from mmrag.generators import ReferenceDiffusionGenerator
from mmrag.pipelines.cli import main
from mmrag.pipelines.config import load_config
from mmrag.pipelines.dev.sample_data import make_sample_set
from mmrag.pipelines.draw import EntityImagePipeline
from mmrag.pipelines.evaluation import best_decide_threshold, decide_accuracy, evaluate_decide, load_decide_labels
from mmrag.retrievers import ConfigError, DualEncoder, KnowledgeBase, MultimodalRetriever

STEPS = 2
CHANNELS = ["text_to_image", "lexical"]  # the pipeline's default channels


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_clip):
    """A KB of 4 sample-data entities and a labels file: their captions are "retrieve", captions of
    4 entities left out of the KB are "generate"."""
    root = tmp_path_factory.mktemp("decide")
    samples = make_sample_set(root / "samples", n_entities=8, size=32, seed=3)
    sidecars = sorted(samples.glob("*.json"))
    entities = list(dict.fromkeys(json.loads(p.read_text())["metadata"]["entity"] for p in sidecars))
    inside = set(entities[:4])
    lines, labels = [], []
    for p in sidecars:
        side = json.loads(p.read_text())
        if side["metadata"]["entity"] in inside:
            lines.append({"id": f"rec-{p.stem}", "image": f"{p.stem}.png", "text": side["text"], "metadata": side["metadata"]})
            labels.append({"prompt": side["text"], "label": "retrieve"})
        elif side["metadata"]["view"] == 0:
            labels.append({"prompt": side["text"], "label": "generate"})
    (samples / "kb.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    kb = KnowledgeBase.open(root / "kb", DualEncoder(tiny_clip))
    assert kb.ingest(samples / "kb.jsonl").added == len(lines)
    (root / "labels.jsonl").write_text("".join(json.dumps(line) + "\n" for line in labels))
    return kb, root / "labels.jsonl"


@pytest.fixture(scope="module")
def generator(tiny_sd):
    sd, ip = tiny_sd
    return ReferenceDiffusionGenerator(sd, ip_adapter=ip, guidance="interleaved").warm_up()


@pytest.fixture(scope="module")
def retriever(labelled):
    return MultimodalRetriever(labelled[0], near_duplicate_threshold=None)


@contextlib.contextmanager
def unet_calls(generator):
    """Counts the UNet's forward calls (the real module, hooked; nothing replaced)."""
    calls = []
    handle = generator.pipeline.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def reference_best(kb, retriever, prompt, k):
    """The independent reference: the retriever's own hits, cosines by numpy from the vectors Chroma stores."""
    hits = retriever.retrieve(prompt, k=k, channels=CHANNELS)
    got = kb.vectors.images.get(ids=[h.id for h in hits], include=["embeddings"])
    stored = dict(zip(got["ids"], np.asarray(got["embeddings"], dtype=np.float64)))
    t = np.asarray(kb.embedder.embed_texts([prompt])[0], dtype=np.float64)
    cosines = [float(stored[h.id] @ t / (np.linalg.norm(stored[h.id]) * np.linalg.norm(t))) for h in hits]
    best = int(np.argmax(cosines))
    return hits, hits[best], cosines[best]


def tiny_config(tmp_path, tiny_models_dir, extra: str = "") -> str:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ndiffusion:\n  model: tiny:sd\n  ip_adapter: tiny:ip-adapter\n"
                   f"retriever:\n  near_duplicate_threshold: null\n{extra}tiny_models:\n  cache_dir: {tiny_models_dir}\n")
    return str(cfg)


# ---------------------------------------------------------------------------- the score
def test_decision_score_is_the_prompt_to_stored_image_cosine(labelled, generator, retriever):
    kb, labels = labelled
    pipe = EntityImagePipeline(generator, retriever)
    for item in load_decide_labels(labels)[:6]:
        hits, expected, cosine = reference_best(kb, retriever, item.prompt, 3)
        best, score = pipe.best_reference(item.prompt, k=3)
        assert best.id == expected.id and score == pytest.approx(cosine, abs=1e-6)
        # where the text -> image channel scored the hit, Chroma's 1 - distance is the same cosine
        if "text_to_image" in expected.scores:
            assert score == pytest.approx(expected.scores["text_to_image"], abs=1e-5)
    # a hit found only by the lexical channel still gets its cosine
    lexical = EntityImagePipeline(generator, retriever, channels=["lexical"])
    prompt = load_decide_labels(labels)[0].prompt
    best, score = lexical.best_reference(prompt, k=2)
    hits = retriever.retrieve(prompt, k=2, channels=["lexical"])
    vecs = np.asarray(kb.vectors.images.get(ids=[best.id], include=["embeddings"])["embeddings"][0], dtype=np.float64)
    t = np.asarray(kb.embedder.embed_texts([prompt])[0], dtype=np.float64)
    assert best.id in {h.id for h in hits} and "text_to_image" not in best.scores
    assert score == pytest.approx(float(vecs @ t / (np.linalg.norm(vecs) * np.linalg.norm(t))), abs=1e-6)


# ---------------------------------------------------------------------------- the decision
def test_retrieved_returns_the_stored_image_and_runs_no_diffusion(labelled, generator, retriever):
    kb, labels = labelled
    prompt = load_decide_labels(labels)[0].prompt
    hits, expected, cosine = reference_best(kb, retriever, prompt, 2)
    pipe = EntityImagePipeline(generator, retriever, k=2, num_inference_steps=STEPS, decide=True, decide_threshold=-1.0)
    score = pipe(prompt).decision_score
    assert score == pytest.approx(cosine, abs=1e-6)
    with unet_calls(generator) as calls:
        out = pipe(prompt, seed=0, num_images_per_prompt=2, decide_threshold=score)  # exactly the score: ">=" retrieves
    assert calls == []  # no denoising step ran
    assert out.decision == "retrieved" and out.decision_threshold == score and out.decision_score == score
    assert [h.id for h in out.references] == [expected.id] and out.generation is None and out.guidance == {}
    stored = kb.get(expected.id)[0].open_image()
    assert len(out.images) == 1 and np.array_equal(np.asarray(out.images[0]), np.asarray(stored))
    assert f"{expected.id!r}" in out.decision_reason and ">= threshold" in out.decision_reason
    assert "decide" in out.timings and "generate" not in out.timings


def test_generated_below_the_threshold_draws_as_without_deciding(labelled, generator, retriever):
    kb, labels = labelled
    prompt = load_decide_labels(labels)[-1].prompt
    hits, expected, cosine = reference_best(kb, retriever, prompt, 2)
    pipe = EntityImagePipeline(generator, retriever, k=2, num_inference_steps=STEPS)
    above = cosine + 1e-4  # the pipeline's score agrees with the reference to 1e-6
    with unet_calls(generator) as calls:
        out = pipe(prompt, seed=4, decide=True, decide_threshold=above)  # per call, on a pipeline that does not decide
    assert len(calls) == STEPS  # one batched denoiser call per step
    assert out.decision == "generated" and out.decision_threshold == above
    assert out.decision_score == pytest.approx(cosine, abs=1e-6)
    assert "< threshold" in out.decision_reason and f"{expected.id!r}" in out.decision_reason
    assert [h.id for h in out.references] == [h.id for h in hits]  # every retrieved reference grounds the drawing
    plain = pipe(prompt, seed=4)
    assert plain.decision is None and plain.decision_score is None and plain.decision_reason is None
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(plain.images[0]))


def test_decide_inputs_are_checked(labelled, generator, retriever, tiny_models_dir, tmp_path):
    kb, _ = labelled
    ref = [Image.new("RGB", (32, 32), (200, 10, 10))]
    with pytest.raises(ConfigError, match="decide_threshold"):
        EntityImagePipeline(generator, retriever, decide=True)
    for bad in (1.5, True, float("nan"), "0.3"):
        with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
            EntityImagePipeline(generator, retriever, decide_threshold=bad)
    pipe = EntityImagePipeline(generator, retriever, decide_threshold=0.2)  # kept for calls that decide
    with pytest.raises(ConfigError, match="references"):
        pipe("a red ball", references=ref, decide=True)
    with pytest.raises(ConfigError, match="applies only when deciding"):
        pipe("a red ball", decide_threshold=0.1)
    with pytest.raises(ConfigError, match="`decide` must be True or False"):
        pipe("a red ball", decide="yes")
    with pytest.raises(ConfigError, match="needs `decide_threshold`"):
        EntityImagePipeline(generator, retriever)("a red ball", decide=True)
    # a configured decision does not apply to given references, which skip retrieval
    deciding = EntityImagePipeline(generator, retriever, decide=True, decide_threshold=-1.0, num_inference_steps=STEPS)
    given = deciding("a red ball", references=ref, seed=0)
    assert given.decision is None and [h.id for h in given.references] == ["given-1"]
    with pytest.raises(ConfigError, match="no generator"):
        EntityImagePipeline(None, retriever)("a red ball")
    # the config: draw.decide needs draw.decide_threshold, a cosine
    with pytest.raises(ConfigError, match="`decide: true` needs `decide_threshold`"):
        load_config(None, {"draw.decide": True})
    with pytest.raises(ConfigError, match=r"draw.decide_threshold.*\[-1, 1\]"):
        load_config(None, {"draw.decide_threshold": True})
    cfg = tiny_config(tmp_path, tiny_models_dir, "draw:\n  decide: true\n  decide_threshold: 0\n")
    configured = EntityImagePipeline.from_config(cfg, kb_path=str(kb.path), with_generator=False)
    assert configured.decide is True and configured.decide_threshold == 0.0 and configured.generator is None


# ---------------------------------------------------------------------------- calibration
def brute_accuracy(scores, labels, t):
    return sum((s >= t) == (lab == "retrieve") for s, lab in zip(scores, labels)) / len(scores)


def brute_balanced(scores, labels, t):
    recalls = []
    for want in ("retrieve", "generate"):
        group = [(s, lab) for s, lab in zip(scores, labels) if lab == want]
        if group:
            recalls.append(sum((s >= t) == (want == "retrieve") for s, _ in group) / len(group))
    return sum(recalls) / len(recalls)


def test_best_threshold_by_hand():
    # separable: the midpoint of the gap between the highest "generate" and the lowest "retrieve"
    assert best_decide_threshold([0.1, 0.2, 0.4, 0.5], ["generate", "generate", "retrieve", "retrieve"]) == (
        pytest.approx(0.3), 1.0)
    # G R G R at 0.1 0.3 0.5 0.7: thresholds 0.2 and 0.6 both get 3/4 right with balanced accuracy
    # 0.75 each (0.2: recall 1 and 1/2; 0.6: 1/2 and 1): the tie goes to the lower threshold
    t, acc = best_decide_threshold([0.1, 0.3, 0.5, 0.7], ["generate", "retrieve", "generate", "retrieve"])
    assert (t, acc) == (pytest.approx(0.2), 0.75)
    # same accuracy, better balanced accuracy: R G R R at 1..4 -> 3/4 right at threshold 1 (retrieve
    # all: recalls 1 and 0, balanced 0.5) and at 2.5 (recalls 2/3 and 1, balanced 0.833): 2.5 wins
    # although it is the higher one
    t, acc = best_decide_threshold([1, 2, 3, 4], ["retrieve", "generate", "retrieve", "retrieve"])
    assert (t, acc) == (2.5, 0.75)
    # everything "retrieve": the lowest score retrieves it all; everything reversed: draw it all
    assert best_decide_threshold([0.3, 0.1], ["retrieve", "retrieve"]) == (0.1, 1.0)
    t, acc = best_decide_threshold([0.3, 0.1], ["generate", "generate"])
    assert t > 0.3 and acc == 1.0 and decide_accuracy([0.3, 0.1], ["generate", "generate"], t) == (1.0, 1.0)
    # ties in the scores: a threshold never splits equal scores. G R R at 0.2 0.2 0.6: 2/3 right at 0.2
    # (balanced (1 + 0) / 2) and at the midpoint 0.4 (balanced (1/2 + 1) / 2): 0.4
    assert best_decide_threshold([0.2, 0.2, 0.6], ["generate", "retrieve", "retrieve"]) == (pytest.approx(0.4), 2 / 3)
    with pytest.raises(ConfigError, match="labels"):
        best_decide_threshold([0.1], ["maybe"])
    with pytest.raises(ConfigError, match="one length"):
        best_decide_threshold([0.1, 0.2], ["retrieve"])


def test_best_threshold_equals_brute_force_over_every_threshold():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 12)
        scores = [round(rng.uniform(-0.2, 0.6), 1 if trial % 2 else 3) for _ in range(n)]  # odd trials: many ties
        labels = [rng.choice(["retrieve", "generate"]) for _ in range(n)]
        t, acc = best_decide_threshold(scores, labels)
        # every threshold that can matter: each score, each midpoint of any two, and beyond both ends
        grid = set(scores) | {(a + b) / 2 for a, b in itertools.combinations(scores, 2)} | {min(scores) - 1, max(scores) + 1}
        best = max(brute_accuracy(scores, labels, g) for g in grid)
        assert acc == pytest.approx(best) and brute_accuracy(scores, labels, t) == pytest.approx(acc)
        assert decide_accuracy(scores, labels, t) == (pytest.approx(acc), pytest.approx(brute_balanced(scores, labels, t)))
        # the rule's choice among the optimal gaps: one threshold per gap between adjacent distinct
        # scores (its midpoint), the lowest score, or just above the highest; then balanced
        # accuracy, then the lower threshold
        values = sorted(set(scores))
        gaps = [values[0]] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [max(values) + 1]
        key = lambda g: (brute_accuracy(scores, labels, g), brute_balanced(scores, labels, g), -g)  # noqa: E731
        chosen = max(gaps, key=key)
        if chosen == max(values) + 1:  # "draw everything": the library's threshold is the next float up
            assert t > max(values) and t == pytest.approx(max(values))
        else:
            assert t == pytest.approx(chosen)


def test_evaluate_decide_scores_each_prompt_and_picks_the_best_threshold(labelled, generator, retriever):
    kb, labels = labelled
    items = load_decide_labels(labels)
    pipe = EntityImagePipeline(None, retriever, k=2)  # scoring needs no generator
    summary = evaluate_decide(pipe, items, threshold=0.0)
    expected = [reference_best(kb, retriever, item.prompt, 2) for item in items]
    assert [r["best"] for r in summary["rows"]] == [e[1].id for e in expected]
    scores = [r["score"] for r in summary["rows"]]
    assert scores == pytest.approx([e[2] for e in expected], abs=1e-6)
    lab = [i.label for i in items]
    t, acc = best_decide_threshold(scores, lab)
    assert summary["best"] == {"threshold": t, "accuracy": acc, "balanced_accuracy": brute_balanced(scores, lab, t)}
    assert summary["at_threshold"] == {"threshold": 0.0, "accuracy": brute_accuracy(scores, lab, 0.0),
                                       "balanced_accuracy": brute_balanced(scores, lab, 0.0)}
    assert (summary["n_retrieve"], summary["n_generate"]) == (lab.count("retrieve"), lab.count("generate"))


def test_labels_file_is_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat", "label": "maybe"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: `label` must be one of 'retrieve', 'generate'"):
        load_decide_labels(bad)
    bad.write_text(json.dumps({"prompt": "a cat", "label": "retrieve"}) + "\n")
    with pytest.raises(ConfigError, match="no 'generate' lines"):
        load_decide_labels(bad)


# ---------------------------------------------------------------------------- the command line and the service
def test_cli_draw_retrieve_or_generate(labelled, tmp_path, tiny_models_dir, capsys):
    kb, labels = labelled
    cfg = tiny_config(tmp_path, tiny_models_dir)
    prompt = load_decide_labels(labels)[0].prompt
    out = tmp_path / "got.png"
    base = ["draw", prompt, "--kb", str(kb.path), "--config", cfg, "--steps", "2", "-o", str(out)]
    # -1: every cosine reaches it, so the best reference comes back as the image
    assert main(base + ["--retrieve-or-generate", "--decide-threshold", "-1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["decision"] == "retrieved" and res["decision_threshold"] == -1.0 and len(res["images"]) == 1
    best = res["references"][0]["id"]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(kb.get(best)[0].open_image()))
    # 1: none reaches it (one line says so), so it draws
    assert main(base + ["--retrieve-or-generate", "--decide-threshold", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("generated: best reference ") and "< threshold 1.0000" in lines[0]
    assert lines[1].startswith("guidance: ")  # it drew
    # mistakes are one line and exit 2
    for extra, message in ((["--retrieve-or-generate"], "needs a threshold"),
                           (["--decide-threshold", "0.2"], "applies only when deciding"),
                           (["--retrieve-or-generate", "--decide-threshold", "2"], r"`--decide-threshold` must be"),
                           (["--retrieve-or-generate", "--decide-threshold", "0", "--reference", str(out)], "--reference")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    # a config that decides: the flag is not needed, --no-retrieve-or-generate turns it off
    deciding = tiny_config(tmp_path, tiny_models_dir, "draw:\n  decide: true\n  decide_threshold: -1.0\n")
    base[base.index(cfg)] = deciding
    assert main(base + ["--json"]) == 0 and json.loads(capsys.readouterr().out)["decision"] == "retrieved"
    assert main(base + ["--no-retrieve-or-generate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] is None


def test_cli_eval_decide(labelled, tmp_path, tiny_models_dir, capsys):
    kb, labels = labelled
    # the diffusion model is not needed to calibrate: a config naming one that does not exist still works
    cfg = tmp_path / "no-sd.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ndiffusion:\n  model: /nonexistent/sd\nretriever:\n"
                   f"  near_duplicate_threshold: null\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    args = ["eval", "decide", "--labels", str(labels), "--kb", str(kb.path), "--config", str(cfg), "-k", "2"]
    assert main(args + ["--json", "--decide-threshold", "0.1"]) == 0
    res = json.loads(capsys.readouterr().out)
    scores, lab = [r["score"] for r in res["rows"]], [r["label"] for r in res["rows"]]
    t, acc = best_decide_threshold(scores, lab)
    assert res["best"]["threshold"] == t and res["best"]["accuracy"] == acc == brute_accuracy(scores, lab, t)
    assert res["at_threshold"]["accuracy"] == brute_accuracy(scores, lab, 0.1)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert f"| {t:.4f} (best on this file) | {acc:.3f} |" in table
    assert main(args + ["--decide-threshold", "nan"]) == 2 and "--decide-threshold" in capsys.readouterr().err


def test_service_and_client_carry_the_decision(labelled, generator, retriever):
    from mmrag.pipelines.client import Client
    from mmrag.pipelines.serve.views import draw_out

    kb, labels = labelled
    pipe = EntityImagePipeline(generator, retriever, decide=True, decide_threshold=-1.0)
    out = pipe(load_decide_labels(labels)[0].prompt)
    body = json.loads(draw_out(out, given_references=False).model_dump_json())
    assert (body["decision"], body["decision_threshold"], body["decision_reason"]) == (
        "retrieved", -1.0, out.decision_reason)
    back = Client("http://127.0.0.1:9")._image_output(body, None)
    assert (back.decision, back.decision_score, back.decision_threshold, back.decision_reason) == (
        out.decision, pytest.approx(out.decision_score), out.decision_threshold, out.decision_reason)
    assert np.array_equal(np.asarray(back.images[0]), np.asarray(out.images[0]))
