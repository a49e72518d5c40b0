"""The `mmrag` command line: ingest, kb info/verify, env, errors as one line with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmrag.pipelines.cli import main
from tests.corpus import make_bad_corpus, make_good_images


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


def test_search_table_json_html_and_eval(tmp_path, tiny_config, capsys):
    from PIL import Image

    from mmrag.retrievers import Record

    kb_path = tmp_path / "kb"
    code, _, _ = _run(capsys, "ingest", tmp_path / "none.jsonl", "--kb", kb_path, "--config", tiny_config)
    assert code == 2  # a missing source fails before anything is created
    from mmrag.pipelines.builders import open_knowledge_base
    from mmrag.pipelines.config import load_config

    kb = open_knowledge_base(load_config(tiny_config, {"kb.path": str(kb_path)}))
    kb.add([Record(id="x1", text="the Picarones <script>alert(1)</script>", image=Image.new("RGB", (20, 20), (200, 0, 0)),
                   metadata={"kind": "church"}),
            Record(id="x2", text="a plain dog", image=Image.new("RGB", (20, 20), (0, 0, 200)), metadata={"kind": "dog"})])
    del kb
    code, out, _ = _run(capsys, "search", "Picarones", "--kb", kb_path, "--channels", "lexical", "--json",
                        "--html", tmp_path / "r.html")
    hits = json.loads(out)
    assert code == 0 and [h["id"] for h in hits] == ["x1"] and hits[0]["scores"]["lexical"] > 0
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/jpeg;base64,") == 1 and "tiny" in page

    code, out, _ = _run(capsys, "search", "anything", "--kb", kb_path, "--where", '{"kind": "dog"}', "-k", "5")
    assert code == 0 and len(out.strip().splitlines()) == 1 and "x2" in out
    code, _, err = _run(capsys, "search", "anything", "--kb", kb_path, "--where", "{kind: dog}")
    assert code == 2 and "`--where` must be JSON" in err

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"text": "Picarones", "relevant": ["x1"], "category": "rare"}) + "\n")
    code, out, _ = _run(capsys, "eval", "retrieval", "--kb", kb_path, "--queries", queries, "--json")
    report = json.loads(out)
    assert code == 0 and report["n_queries"] == 1 and report["per_channel"]["lexical"]["recall@1"] == 1.0
    assert set(report["per_channel"]) == {"text_to_image", "text_to_text", "lexical"}


def test_done_when_200_good_20_bad_then_rerun(tmp_path, tiny_config, capsys):
    """Issue #2's acceptance: 200 good + 20 bad files -> 200 added, 20 rejected with reasons; again -> 0 added."""
    src = tmp_path / "src"
    make_good_images(src, 200, seed=9)
    rejects = []
    for copy in ("bad1", "bad2"):
        for rel, outcome in make_bad_corpus(src / copy).items():
            if outcome.startswith("accept:"):  # tricky-but-valid images: not part of this count
                (src / copy / rel).unlink()
                for side in (".txt", ".json"):
                    (src / copy / rel).with_suffix(side).unlink(missing_ok=True)
            else:
                rejects.append(f"{copy}/{rel}")
    assert len(rejects) == 20
    kb = tmp_path / "kb"
    code, out, _ = _run(capsys, "ingest", src, "--kb", kb, "--config", tiny_config, "--json")
    first = json.loads(out)
    assert code == 0 and (first["added"], first["rejected"]) == (200, 20)
    reasons = [json.loads(x) for x in Path(first["report"]).read_text().splitlines()[1:]]
    assert sorted(r["ref"] for r in reasons) == sorted(rejects) and all(r["reason"] for r in reasons)
    code, out, _ = _run(capsys, "ingest", src, "--kb", kb, "--config", tiny_config, "--json")
    again = json.loads(out)
    assert (again["added"], again["existing"], again["rejected"]) == (0, 200, 20)
    code, out, _ = _run(capsys, "kb", "info", "--kb", kb, "--json")
    info = json.loads(out)
    assert (info["count"], info["image_vectors"], info["text_vectors"], info["images_stored"]) == (200, 200, 200, 200)
