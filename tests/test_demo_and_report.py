"""`mmrag demo` end to end, and its report in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mmrag.pipelines.config import load_config
from mmrag.pipelines.dev.demo import run_demo
from mmrag.pipelines.dev.report import render_hits, write_report
from mmrag.retrievers import Hit, Record

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, tiny_models_dir) -> Path:
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config("tiny", {"tiny_models.cache_dir": str(tiny_models_dir)})
    return run_demo(cfg, out, log=lambda m: None)


def test_demo_report_shows_every_job(demo_report):
    page = demo_report.read_text()
    for title in ("text search", "image search", "composed search", "question", "answer", "references",
                  "generated", "guidance: name=interleaved"):
        assert title in page, title
    assert "tiny, randomly initialised" in page
    assert page.count('id="ref-') == 3  # three references for the question, each an anchor for [n] links
    assert len(re.findall(r"data:image/jpeg;base64,", page)) >= 3 * 7 + 4  # every thumbnail inlined


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MMRAG_REQUIRE_BROWSER"),
                    reason="chromium is not installed (.ci/run installs it and sets MMRAG_REQUIRE_BROWSER)")
def test_report_in_headless_chromium(demo_report, tmp_path):
    assert CHROMIUM, "MMRAG_REQUIRE_BROWSER is set but chromium is missing"
    # a record whose text tries to run a script must show as text, never run
    evil = Hit(id="evil", record=Record(id="evil", text="<script>document.body.setAttribute('data-pwned','1')</script>",
                                        image=str(next((demo_report.parent / "sample").glob("*.png")))), score=1.0, rank=1)
    evil_page = write_report(tmp_path / "evil.html", "escape test", [render_hits([evil])])
    for page in (demo_report, evil_page):
        shot = tmp_path / f"{page.stem}.png"
        res = _chromium("--window-size=1280,2400", f"--screenshot={shot}", page.as_uri(), user_dir=tmp_path / "u1")
        assert shot.is_file() and shot.stat().st_size > 10_000, res.stderr[-2000:]
        dom = _chromium("--dump-dom", page.as_uri(), user_dir=tmp_path / "u2").stdout
        body = re.search(r"<body[^>]*>", dom).group(0)
        images = int(re.search(r'data-images="(\d+)"', body).group(1))
        assert images > 0 and 'data-broken="0"' in body, body  # every image decoded
        assert "data-pwned" not in body
    assert "&lt;script&gt;document.body" in _chromium("--dump-dom", evil_page.as_uri(), user_dir=tmp_path / "u3").stdout
