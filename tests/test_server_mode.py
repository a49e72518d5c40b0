"""The same KnowledgeBase API against a real `chroma run` server on 127.0.0.1, started here."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import chromadb
import pytest
from chromadb.config import Settings
from PIL import Image

from mmrag.retrievers import ConfigError, KnowledgeBase, KnowledgeBaseError, Record
from tests.corpus import make_good_images

pytestmark = pytest.mark.server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_chroma(exe: str, data: Path, log) -> tuple[subprocess.Popen, int] | None:
    """A `chroma run` on a free port, once it answers; None if it exited first (e.g. another
    process took the port between our probe and its bind)."""
    port = _free_port()
    proc = subprocess.Popen([exe, "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(data / "db")],
                            stdout=log, stderr=subprocess.STDOUT)
    # Readiness is the server's own answer, not a clock. The bound only stops a hung start from
    # holding the suite; a slow machine is nowhere near it.
    give_up = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < give_up:
        try:
            chromadb.HttpClient(host="127.0.0.1", port=port, settings=Settings(anonymized_telemetry=False)).heartbeat()
            return proc, port
        except Exception:
            time.sleep(0.3)
    proc.kill()
    proc.wait()
    return None


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    exe = Path(sys.executable).with_name("chroma")
    exe = str(exe) if exe.exists() else shutil.which("chroma")
    assert exe, "the chroma CLI comes with the chromadb dependency"
    data = tmp_path_factory.mktemp("chroma-server")
    with open(data / "server.log", "w") as log:
        for _ in range(3):
            started = _start_chroma(exe, data, log)
            if started is not None:
                break
        else:
            pytest.fail(f"chroma run did not start: {(data / 'server.log').read_text()[-2000:]}")
        proc, port = started
        yield f"http://127.0.0.1:{port}"
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_server_kb_ingest_get_delete_reopen(tmp_path, chroma_url, clip_encoder):
    make_good_images(tmp_path / "src", 10, seed=11)
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder, url=chroma_url)
    assert kb.ingest(tmp_path / "src").added == 10
    assert kb.ingest(tmp_path / "src").added == 0

    # the vectors live on the server, in collections named after this KB
    manifest = json.loads((tmp_path / "kb" / "mmrag-kb.json").read_text())
    assert manifest["backend"] == "server" and manifest["url"] == chroma_url
    port = int(chroma_url.rsplit(":", 1)[1])
    client = chromadb.HttpClient(host="127.0.0.1", port=port, settings=Settings(anonymized_telemetry=False))
    for name in manifest["collections"].values():
        assert client.get_collection(name, embedding_function=None).count() == 10
    assert not (tmp_path / "kb" / "chroma").exists()

    ids = kb.vectors.all_ids()
    assert kb.delete(ids[:3]) == 3
    reopened = KnowledgeBase.open(tmp_path / "kb")  # url comes from the manifest
    assert reopened.count() == 7 and [r.id for r in reopened.get(ids[3:5])] == ids[3:5]
    assert reopened.verify() == {"only_in_texts": [], "only_in_images": [], "missing_images": [], "orphan_images": [],
                                 "unsafe_paths": []}


def test_two_kbs_share_one_server_without_mixing(tmp_path, chroma_url, clip_encoder):
    a = KnowledgeBase.open(tmp_path / "a", clip_encoder, url=chroma_url)
    b = KnowledgeBase.open(tmp_path / "b", clip_encoder, url=chroma_url)
    a.add([Record(text="only in a", image=Image.new("RGB", (16, 16), (1, 1, 1)))])
    assert (a.count(), b.count()) == (1, 0)


def test_server_errors_are_clear(tmp_path, clip_encoder, chroma_url):
    with pytest.raises(KnowledgeBaseError, match="chroma run"):
        KnowledgeBase.open(tmp_path / "x", clip_encoder, url=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ConfigError, match="url"):
        KnowledgeBase.open(tmp_path / "y", clip_encoder, url="127.0.0.1:8000")
    embedded = KnowledgeBase.open(tmp_path / "emb", clip_encoder)
    with pytest.raises(ConfigError, match="embedded"):
        KnowledgeBase.open(embedded.path, url=chroma_url)
