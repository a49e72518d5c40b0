"""Server-mode soak: 1 writer and 4 reader processes share one KB on a real `chroma run` server.

Readers query every channel (composed included) while the writer adds records batch by batch, so
they meet records that are half written (in the image collection, not yet in the text one). The
run must end with 0 reader errors and exactly the records the writer added. The duration is the
length of the workload, not an assertion: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mmrag.retrievers import KnowledgeBase
from tests.corpus import make_good_images
from tests.test_server_mode import chroma_url  # noqa: F401  (the server fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]

SECONDS = float(os.environ.get("MMRAG_SOAK_SECONDS", "60"))
READERS = 4

WRITER = textwrap.dedent("""
    import json, sys, time
    from mmrag.retrievers import KnowledgeBase
    from tests.corpus import make_good_images
    kb_path, url, work, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    kb = KnowledgeBase.open(kb_path, url=url, lock_timeout=60)
    added, batch, deadline = 0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        src = f"{work}/batch-{batch}"
        make_good_images(src, 8, seed=1000 + batch)
        added += kb.ingest(src, batch_size=4).added   # two writes per batch: readers see them land
        batch += 1
    print(json.dumps({"added": added, "batches": batch}), flush=True)
""")

READER = textwrap.dedent("""
    import json, sys, time, traceback
    from PIL import Image
    from mmrag.retrievers import KnowledgeBase, MultimodalRetriever, Query
    kb_path, url, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    kb = KnowledgeBase.open(kb_path, url=url)
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None)
    image = Image.new("RGB", (32, 32), (seed * 40 % 255, 90, 160))
    queries = [Query(text="a photo"), Query(image=image), Query(text="but blue", image=image)]
    ok, errors, deadline = 0, [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        for q in queries:
            try:
                retriever.retrieve(q, k=5)
                ok += 1
            except Exception:
                errors.append(traceback.format_exc(limit=3))
    print(json.dumps({"ok": ok, "errors": errors[:5], "n_errors": len(errors)}), flush=True)
""")


def test_one_writer_four_readers_on_a_server(tmp_path, chroma_url, clip_encoder):  # noqa: F811
    make_good_images(tmp_path / "seed", 8, seed=1)
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder, url=chroma_url)
    start = kb.ingest(tmp_path / "seed").added
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    args = [str(tmp_path / "kb"), chroma_url]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, *args, str(tmp_path / "work"), str(SECONDS)],
                              stdout=subprocess.PIPE, text=True, env=env)
    readers = [subprocess.Popen([sys.executable, "-c", READER, *args, str(SECONDS), str(i)],
                                stdout=subprocess.PIPE, text=True, env=env) for i in range(READERS)]
    results = [json.loads(r.communicate(timeout=SECONDS + 600)[0]) for r in readers]
    written = json.loads(writer.communicate(timeout=SECONDS + 600)[0])
    assert writer.returncode == 0 and all(r.returncode == 0 for r in readers)
    assert sum(r["n_errors"] for r in results) == 0, [e for r in results for e in r["errors"]]
    assert all(r["ok"] > 0 for r in results)
    kb = KnowledgeBase.open(tmp_path / "kb", url=chroma_url)
    assert kb.count() == start + written["added"]
    assert not any(kb.verify().values())
    print(f"soak: {SECONDS:.0f} s, {written['batches']} writer batches, {written['added']} records added, "
          f"{sum(r['ok'] for r in results)} reader queries, 0 errors")
