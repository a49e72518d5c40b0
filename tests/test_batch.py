"""`mmrag batch ask|draw`: serial output against the in-process pipelines item by item, the Ray
Data path against the serial one (same answers, same pixels), resuming after a kill (a torn last
line), error rows for items that fail at run time, and file:line errors for bad input."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from mmrag.pipelines.cli import _add_kb, _common, main
from mmrag.pipelines.scale.batch import (
    ASK_OUTPUT,
    DRAW_OUTPUT,
    add_batch_parser,
    cmd_batch,
    load_ask_items,
    load_draw_items,
    run_batch_ask,
    run_batch_draw,
    safe_name,
)
from mmrag.retrievers import ConfigError
from PIL import Image

from .serve_fixtures import build_kb, shape_image, tiny_config

ASK_LINES = [
    {"id": "q-red", "question": "What colour is this?", "image": "images/red.png"},
    {"question": "Which shape is number 3?"},  # id: line-2
    {"id": "q-choice", "question": "Which colour?", "image": "images/blue.png", "choices": ["red", "blue", "green"]},
    {"id": "Q/Upper", "question": "Is it round?", "image": "images/red.png", "k": 2, "seed": 5},
    {"id": "q-corrupt", "question": "What is this?", "image": "images/corrupt.png"},  # exists, does not decode
    {"id": "q-star", "question": "Describe the star.", "k": 1},
]
DRAW_LINES = [
    {"id": "d-circle", "prompt": "a red circle", "steps": 2, "height": 32, "width": 32},
    {"prompt": "a blue square", "steps": 2, "height": 32, "width": 32, "seed": 3, "guidance": "joint"},
    {"id": "d/star", "prompt": "a purple star", "steps": 2, "height": 32, "width": 32, "seed": 1, "k": 2},
]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in rows]


# CPU float sums depend on the thread count: the serial runs and each Ray actor use the same number.
THREADS = 2


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def kb_path(tmp_path_factory, tiny_clip):
    return build_kb(tmp_path_factory.mktemp("batch") / "kb", tiny_clip)


@pytest.fixture(scope="module")
def config(tiny_models_dir, tiny_clip, tiny_sd, kb_path) -> dict:
    return tiny_config(tiny_models_dir, kb_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-data")
    (root / "images").mkdir()
    shape_image("red", "circle").save(root / "images" / "red.png")
    shape_image("blue", "square").save(root / "images" / "blue.png")
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    _write_jsonl(root / "ask.jsonl", ASK_LINES)
    _write_jsonl(root / "draw.jsonl", DRAW_LINES)
    return root


@pytest.fixture(scope="module")
def serial_ask(config, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial-ask")
    report = run_batch_ask(config, data / "ask.jsonl", out, batch_size=4)
    return report, _rows(out / ASK_OUTPUT)


@pytest.fixture(scope="module")
def serial_draw(config, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial-draw")
    report = run_batch_draw(config, data / "draw.jsonl", out, batch_size=2)
    return report, _rows(out / DRAW_OUTPUT), out


@pytest.fixture(scope="module")
def ray_local():
    from mmrag.pipelines.scale.ray_runtime import init_ray

    ray = init_ray(None, num_cpus=THREADS)
    yield ray
    ray.shutdown()


def _pixels(out_dir: Path, row: dict) -> list[np.ndarray]:
    return [np.array(Image.open(out_dir / name)) for name in row["images"]]


# ---------------------------------------------------------------------------- serial
def test_serial_ask_equals_the_pipeline_item_by_item(serial_ask, vqa_ref, data):
    report, rows = serial_ask
    assert (report.done, report.failed, report.skipped) == (5, 1, 0)
    assert [r["id"] for r in rows] == [line.get("id", f"line-{n}") for n, line in enumerate(ASK_LINES, start=1)]
    for line, row in zip(ASK_LINES, rows):
        image = data / line["image"] if "image" in line else None
        if line.get("id") == "q-corrupt":
            with pytest.raises(ConfigError) as e:
                vqa_ref(line["question"], image=image)
            assert row == {"id": "q-corrupt", "question": line["question"], "error": str(e.value)}
            assert report.errors == [{"id": "q-corrupt", "error": str(e.value)}]
            continue
        ref = vqa_ref(line["question"], image=image, k=line.get("k"), choices=line.get("choices"))
        assert row["answer"] == ref.answer and row["choice"] == ref.choice
        assert row["choice_scores"] == ref.choice_scores
        assert row["references"] == [h.id for h in ref.references]
        assert row["cited"] == [h.id for h in ref.cited]
        assert row["no_retrieval"] == ref.no_retrieval
        assert len(row["references"]) == line.get("k", 3)  # the item's k reached the pipeline


def test_serial_draw_equals_the_pipeline_item_by_item(serial_draw, draw_ref):
    report, rows, out = serial_draw
    assert (report.done, report.failed, report.skipped) == (3, 0, 0)
    assert [r["id"] for r in rows] == ["d-circle", "line-2", "d/star"]
    for line, row in zip(DRAW_LINES, rows):
        ref = draw_ref(line["prompt"], k=line.get("k"), guidance=line.get("guidance"), num_inference_steps=2,
                       seed=line.get("seed", 0), height=32, width=32)
        assert row["references"] == [h.id for h in ref.references]
        assert row["guidance"] == ref.guidance and row["fallback"] == ref.fallback
        assert [p.shape for p in _pixels(out, row)] == [(32, 32, 3)]
        assert np.array_equal(_pixels(out, row)[0], np.array(ref.images[0]))
    # the ids become distinct, safe file names; one with a slash is renamed with a hash suffix
    assert rows[0]["images"] == ["images/d-circle-0.png"]
    assert rows[2]["images"][0].startswith("images/d_star-") and "/" not in rows[2]["images"][0][len("images/"):]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["images"][0]).name for r in rows)


# ---------------------------------------------------------------------------- Ray
def test_ray_ask_equals_serial(ray_local, serial_ask, config, data, tmp_path):
    report = run_batch_ask(config, data / "ask.jsonl", tmp_path, use_ray=True, batch_size=2, concurrency=1,
                           num_cpus=THREADS)
    assert (report.done, report.failed, report.skipped, report.ray) == (5, 1, 0, True)
    assert _without_timings(_rows(tmp_path / ASK_OUTPUT)) == _without_timings(serial_ask[1])


def test_ray_draw_equals_serial_pixel_for_pixel(ray_local, serial_draw, config, data, tmp_path):
    report = run_batch_draw(config, data / "draw.jsonl", tmp_path, use_ray=True, batch_size=2,
                            num_cpus=THREADS)
    assert (report.done, report.failed) == (3, 0)
    _, serial_rows, serial_out = serial_draw
    rows = _rows(tmp_path / DRAW_OUTPUT)
    assert _without_timings(rows) == _without_timings(serial_rows)
    for row, serial_row in zip(rows, serial_rows):
        assert all(np.array_equal(a, b) for a, b in zip(_pixels(tmp_path, row), _pixels(serial_out, serial_row)))


VQA_LINES = [  # an `mmrag eval vqa` dataset: free-text answers, gold references, multiple choice
    {"question": "What colour is this?", "image": "images/red.png", "answers": ["red"], "gold_ids": ["r0"],
     "category": "colour"},
    {"question": "Which shape?", "image": "images/blue.png", "choices": ["circle", "square", "star"],
     "answer": "square", "gold_ids": ["r1", "r0"]},
    {"question": "Is there a star?", "answers": ["yes", "no"], "category": "count"},
]


def test_eval_vqa_on_ray_equals_evaluate_vqa_and_resumes(ray_local, config, data, vqa_ref, tmp_path):
    from mmrag.pipelines.evaluation import evaluate_vqa, load_vqa_dataset

    from mmrag.pipelines.scale.batch_eval import evaluate_vqa_batch

    items = load_vqa_dataset(_write_jsonl(data / "vqa.jsonl", VQA_LINES))
    expected = evaluate_vqa(vqa_ref, items, predictions_path=tmp_path / "serial.jsonl")
    assert expected["overall"]["gold"]["n"] == 2 and expected["overall"]["retrieved"]["n"] == 3
    got = evaluate_vqa_batch(config, items, tmp_path / "runs", predictions_path=tmp_path / "ray.jsonl",
                             batch_size=2, num_cpus=THREADS)
    assert got == expected
    assert _rows(tmp_path / "ray.jsonl") == _rows(tmp_path / "serial.jsonl")  # every prediction, in order
    gold = [r for r in _rows(tmp_path / "ray.jsonl") if r["setting"] == "gold"]
    assert [r["references"] for r in gold] == [["r0"], ["r1", "r0"]]  # the gold ids, in their order
    assert all(r["references"] == [] for r in _rows(tmp_path / "ray.jsonl") if r["setting"] == "no_retrieval")
    # a re-run answers nothing again and scores the same
    assert evaluate_vqa_batch(config, items, tmp_path / "runs", batch_size=2, num_cpus=THREADS) == expected
    missing = load_vqa_dataset(_write_jsonl(data / "vqa-missing.jsonl", [{**VQA_LINES[0], "gold_ids": ["nope"]}]))
    with pytest.raises(ConfigError, match=r"gold_ids \['nope'\] are not in the knowledge base"):
        evaluate_vqa_batch(config, missing, tmp_path / "runs-missing", num_cpus=THREADS)


def test_cli_eval_vqa_ray_prints_the_serial_summary(ray_local, config, data, kb_path, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    dataset = _write_jsonl(data / "vqa-cli.jsonl", VQA_LINES)
    argv = ["eval", "vqa", "--kb", str(kb_path), "--config", str(config_file), "--dataset", str(dataset), "--json",
            "--predictions", str(tmp_path / "p.jsonl")]
    assert main(argv) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(argv + ["--ray", "--num-cpus", str(THREADS), "--runs", str(tmp_path / "runs")]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert (tmp_path / "runs" / ASK_OUTPUT).exists()


def test_cli_eval_generation_ray_prints_the_serial_scores(ray_local, config, data, kb_path, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({**config, "draw": {**config["draw"], "height": 32, "width": 32}}))
    prompts = _write_jsonl(data / "generation.jsonl", [
        {"prompt": "a red circle", "entity": "red circle", "images": ["images/red.png"], "bucket": "rare"},
        {"prompt": "a blue square", "entity": "blue square", "images": ["images/blue.png"]},
    ])
    argv = ["eval", "generation", "--kb", str(kb_path), "--config", str(config_file), "--prompts", str(prompts),
            "--json", "--steps", "2"]
    assert main(argv) == 0
    expected = json.loads(capsys.readouterr().out)
    assert set(expected["per_guidance"]) == {"cfg", "joint", "interleaved"}
    runs = tmp_path / "runs"
    assert main(argv + ["--ray", "--num-cpus", str(THREADS), "--runs", str(runs)]) == 0
    assert json.loads(capsys.readouterr().out) == expected  # the same drawings, scored the same
    first, rest = _rows(runs / "first" / DRAW_OUTPUT), _rows(runs / "rest" / DRAW_OUTPUT)
    assert len(first) == 2 and len(rest) == 4  # cfg retrieved; joint and interleaved reuse its references
    by_line = {r["id"].split(":")[0]: r["references"] for r in first}
    assert all(r["references"] == by_line[r["id"].split(":")[0]] for r in rest)


def test_ray_actor_error_is_the_mmrag_error_itself(ray_local, config, data, tmp_path):
    from mmrag.generators.errors import GeneratorLoadError

    broken = {**config, "vlm": {**config["vlm"], "model": str(tmp_path / "no-such-model")}}
    with pytest.raises(GeneratorLoadError) as e:  # raised in the actors; the driver gets it, not Ray's wrapper
        run_batch_ask(broken, data / "ask.jsonl", tmp_path / "out", use_ray=True, num_cpus=THREADS)
    assert type(e.value) is GeneratorLoadError and "no-such-model" in str(e.value) and "ray::" not in str(e.value)
    assert not (tmp_path / "out" / ASK_OUTPUT).exists()  # no rows: the job failed, no item did


def test_a_model_that_cannot_load_stops_the_job_instead_of_failing_every_item(config, data, tmp_path):
    from mmrag.generators.errors import GeneratorLoadError

    broken = {**config, "vlm": {**config["vlm"], "model": str(tmp_path / "no-such-model")}}
    with pytest.raises(GeneratorLoadError, match="no-such-model"):
        run_batch_ask(broken, data / "ask.jsonl", tmp_path / "out")
    assert not (tmp_path / "out" / ASK_OUTPUT).exists()


# ---------------------------------------------------------------------------- resume
def test_resume_after_a_kill_redoes_exactly_the_missing_items(serial_ask, config, data, tmp_path):
    full = (serial_ask[0].output).read_text(encoding="utf-8").splitlines(keepends=True)
    kept, lost = full[:-2], full[-2:]
    # what a kill mid-batch leaves: the finished batches, then part of a line
    (tmp_path / ASK_OUTPUT).write_text("".join(kept) + lost[0][:25], encoding="utf-8")
    report = run_batch_ask(config, data / "ask.jsonl", tmp_path, batch_size=4)
    assert report.skipped == len(kept) and report.done + report.failed == len(lost)
    assert [e["id"] for e in report.errors] == [r["id"] for r in map(json.loads, lost) if "error" in r]
    rows = _rows(tmp_path / ASK_OUTPUT)
    assert len({r["id"] for r in rows}) == len(rows) == len(ASK_LINES)
    assert _without_timings(rows) == _without_timings(serial_ask[1])
    again = run_batch_ask(config, data / "ask.jsonl", tmp_path)  # nothing left: no model loads
    assert (again.done, again.failed, again.skipped) == (0, 0, len(ASK_LINES))


def test_resume_draw_rewrites_the_lost_drawing(serial_draw, config, data, tmp_path):
    _, serial_rows, serial_out = serial_draw
    shutil.copytree(serial_out / "images", tmp_path / "images")
    lines = (serial_out / DRAW_OUTPUT).read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / DRAW_OUTPUT).write_text(lines[0] + lines[1][:-1], encoding="utf-8")  # torn: no newline
    (tmp_path / serial_rows[2]["images"][0]).write_bytes(b"half a png")  # its PNG was being written
    report = run_batch_draw(config, data / "draw.jsonl", tmp_path, batch_size=2, progress=True)
    assert (report.skipped, report.done) == (1, 2)
    rows = _rows(tmp_path / DRAW_OUTPUT)
    assert _without_timings(rows) == _without_timings(serial_rows)
    assert np.array_equal(_pixels(tmp_path, rows[2])[0], _pixels(serial_out, serial_rows[2])[0])


def test_a_damaged_line_before_the_last_is_an_error_not_a_resume(data, config, tmp_path):
    _write_jsonl(tmp_path / ASK_OUTPUT, ['{"id": "q-red", "answer": "x"}', "garbage", '{"id": "line-2"}'])
    with pytest.raises(ConfigError, match=f"{ASK_OUTPUT}:2 is not an output row"):
        run_batch_ask(config, data / "ask.jsonl", tmp_path)


# ---------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("bad, message", [
    ("{not json", "is not valid JSON"),
    ({"id": "x"}, "`question` must be a non-empty string"),
    ({"question": "q", "k": 0}, "`k` must be a positive integer"),
    ({"question": "q", "seed": "1"}, "`seed` must be a non-negative integer"),
    ({"question": "q", "questoin": "a"}, "unknown key"),
    ({"question": "q", "image": "images/missing.png"}, "is not a file"),
    ({"question": "q", "choices": ["only one"]}, "`choices` must be a list of at least 2"),
    ({"question": "q", "id": 7}, "`id` must be a non-empty string"),
    ([1, 2], "must be a JSON object"),
])
def test_structural_ask_errors_name_file_and_line(data, bad, message):
    path = _write_jsonl(data / "bad-ask.jsonl", [ASK_LINES[0], bad])
    with pytest.raises(ConfigError, match=message) as e:
        load_ask_items(path)
    assert f"{path}:2" in str(e.value)


def test_a_duplicate_id_names_both_lines(data, config, tmp_path):
    path = _write_jsonl(data / "dup.jsonl", [{"id": "a", "question": "q"}, {"question": "q"}, {"id": "a", "question": "r"}])
    with pytest.raises(ConfigError, match=rf"{path}:3: duplicate id 'a', already used on line {path}:1"):
        run_batch_ask(config, path, tmp_path)
    assert not (tmp_path / ASK_OUTPUT).exists()  # failed before any work
    clash = _write_jsonl(data / "dup2.jsonl", [{"id": "line-2", "question": "q"}, {"question": "q"}])
    with pytest.raises(ConfigError, match="duplicate id 'line-2'"):  # an explicit id against a default one
        load_ask_items(clash)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": " "}, "`prompt` must be a non-empty string"),
    ({"prompt": "p", "guidance": "fancy"}, "`guidance` 'fancy' is not one of"),
    ({"prompt": "p", "guidance": {"name": "joint", "colour": 1}}, "has no parameter 'colour'"),
    ({"prompt": "p", "steps": 1.5}, "`steps` must be a positive integer"),
])
def test_structural_draw_errors_name_file_and_line(data, bad, message):
    path = _write_jsonl(data / "bad-draw.jsonl", [DRAW_LINES[0], bad])
    with pytest.raises(ConfigError, match=message) as e:
        load_draw_items(path)
    assert f"{path}:2" in str(e.value)


def test_job_options_are_checked(config, data, tmp_path):
    with pytest.raises(ConfigError, match="`batch_size` must be a positive integer, got 0"):
        run_batch_ask(config, data / "ask.jsonl", tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="`ray_address` .auto. is for Ray but `use_ray` is False"):
        run_batch_ask(config, data / "ask.jsonl", tmp_path, ray_address="auto")
    with pytest.raises(ConfigError, match="`num_cpus` must be a number > 0"):
        run_batch_ask(config, data / "ask.jsonl", tmp_path, use_ray=True, num_cpus=0)
    with pytest.raises(ConfigError, match="does not exist"):
        run_batch_ask(config, data / "nope.jsonl", tmp_path)


def test_safe_names_are_distinct_and_plain_when_they_can_be():
    assert safe_name("q-1.b_2") == "q-1.b_2"
    hashed = safe_name("a/b")
    names = [safe_name(i) for i in ("a/b", "a_b", "A_b", "a\\b", "..", "x" * 300, hashed)]
    assert len(set(names)) == len(names) and names[1] == "a_b"
    assert all(len(n) <= 90 and "/" not in n and "\\" not in n and n != ".." for n in names)


# ---------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrag")
    add_batch_parser(parser.add_subparsers(dest="command", required=True), _common(), _add_kb)
    return parser


def test_cli_needs_the_input_and_the_output(capsys):
    for argv in (["batch", "ask", "--kb", "kb", "--out", "o"], ["batch", "draw", "--kb", "kb", "--out", "o"],
                 ["batch", "ask", "--kb", "kb", "--dataset", "d.jsonl"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    assert "--out" in capsys.readouterr().err
    args = _parser().parse_args(["batch", "ask", "--kb", "k", "--dataset", "d", "--out", "o", "--ray"])
    assert (args.ray, args.concurrency, args.batch_size) == ("local", 1, 8)
    assert _parser().parse_args(["batch", "ask", "--kb", "k", "--dataset", "d", "--out", "o"]).ray is None


def test_cli_batch_ask_writes_the_serial_answers(config, kb_path, data, serial_ask, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    argv = ["batch", "ask", "--dataset", str(data / "ask.jsonl"), "--kb", str(kb_path), "--config", str(config_file),
            "--out", str(tmp_path / "out"), "--batch-size", "3", "--json", "--no-progress"]
    assert cmd_batch(_parser().parse_args(argv)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["done"], printed["failed"], printed["skipped"]) == (5, 1, 0)
    assert _without_timings(_rows(tmp_path / "out" / ASK_OUTPUT)) == _without_timings(serial_ask[1])
    assert cmd_batch(_parser().parse_args(argv[:-2] + ["--no-progress"])) == 0  # resumed: all skipped
    assert "0 done, 0 failed, 6 skipped" in capsys.readouterr().out
    for flag, value in (("--num-gpus", "1"), ("--num-cpus", "1"), ("--concurrency", "2")):
        with pytest.raises(ConfigError, match=f"`{flag}` applies to Ray runs only"):
            cmd_batch(_parser().parse_args(argv + [flag, value]))
    assert main(argv[:-2] + ["--no-progress"]) == 0  # wired into `mmrag`
    assert "0 done, 0 failed, 6 skipped" in capsys.readouterr().out
