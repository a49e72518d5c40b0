"""The `mmrag` command line: ingest, kb info/verify, env, errors as one line with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from tests.corpus import make_bad_corpus, make_good_images


@pytest.fixture
def tiny_config(tmp_path, tiny_models_dir, tiny_clip) -> Path:
    """tiny.yaml pointed at the session's tiny-model folder (already built: no rebuild)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    return cfg


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ingest_then_info_then_reingest(tmp_path, tiny_config, tiny_models_dir, capsys):
    src = tmp_path / "src"
    make_good_images(src, 30, seed=5)
    expected = make_bad_corpus(src / "bad")
    n_bad = sum(v.startswith("reject:") for v in expected.values())
    kb = tmp_path / "kb"
    code, out, _ = _run(capsys, "ingest", src, "--kb", kb, "--config", tiny_config, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["rejected"] >= n_bad and summary["added"] == summary["count"] >= 30
    lines = Path(summary["report"]).read_text().splitlines()
    assert len(lines) == 1 + summary["rejected"] and all(json.loads(x)["reason"] for x in lines[1:])

    code, out, _ = _run(capsys, "kb", "info", "--kb", kb, "--json")  # no config: the KB's own embedder
    info = json.loads(out)
    assert code == 0 and info["count"] == summary["count"] and info["dim"] == 32
    assert info["embedder"] == str((tiny_models_dir / "clip").resolve())
    assert info["bytes_on_disk"] > 0

    code, out, _ = _run(capsys, "ingest", src, "--kb", kb, "--json")
    assert code == 0 and json.loads(out)["added"] == 0
    code, out, _ = _run(capsys, "kb", "verify", "--kb", kb)
    assert code == 0 and "orphan_images: 0" in out


@pytest.mark.parametrize("argv, needle", [
    (["kb", "info", "--kb", "{tmp}/nothing"], "No knowledge base"),
    (["ingest", "{tmp}/missing-source", "--kb", "{tmp}/kb", "--config", "{cfg}"], "source"),
    (["ingest", "{tmp}", "--kb", "{tmp}/kb", "--config", "no-such-preset"], "presets"),
    (["ingest", "{tmp}", "--kb", "{tmp}/kb", "--config", "{tmp}/typo.yaml"], "unknown key `embeder`"),
])
def test_errors_are_one_line_and_non_zero(tmp_path, tiny_config, capsys, argv, needle):
    (tmp_path / "typo.yaml").write_text("embeder: {}\n")
    code, out, err = _run(capsys, *[a.format(tmp=tmp_path, cfg=tiny_config) for a in argv])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_console_script_and_env():
    exe = Path(sys.executable).with_name("mmrag")
    res = subprocess.run([str(exe), "env"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "transformers" in res.stdout and "chromadb" in res.stdout
    res = subprocess.run([str(exe), "kb", "info", "--kb", "/nonexistent/kb"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
