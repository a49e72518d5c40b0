"""Every crash point recovers: a writer SIGKILLed just before or just after each file rename
(``os.replace``) of a creation and of an ingestion, or at a random moment, leaves a knowledge base
that the next open and a re-run bring to exactly the source's valid records, with no temporary file
left.

Trials run in processes forked from one driver (``python -m tests.test_crash_points PLAN``), which
loads the model once: a trial costs a fork, not an interpreter start and a model load. The driver
never opens Chroma itself, so every fork starts without Chroma's threads or files. Each trial is a
fork that writes and is killed, then a second fork that reopens, re-runs and reports what a plain
Chroma client and the file system see; the test asserts on those reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.corpus import make_good_images

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 3


# ---------------------------------------------------------------------------- the source
def make_source(folder: Path, n: int, seed: int) -> set[str]:
    """``n`` good items and one Chroma would refuse (a ``$and`` metadata key); returns the ids the
    good ones must get, computed independently (plain RGB files are stored byte for byte)."""
    good = make_good_images(folder, n, seed=seed)
    bad = folder / "zz_refused_by_chroma.png"  # sorts last: it shares the last batch with good items
    Image.new("RGB", (24, 24), (9, 99, 199)).save(bad)
    bad.with_suffix(".json").write_text(json.dumps({"text": "a refused item", "metadata": {"$and": 1}}))
    return {hashlib.sha256(f"{hashlib.sha256(p.read_bytes()).hexdigest()}\0{t}".encode()).hexdigest()[:32]
            for p, t in good}


def temp_files(kb: Path) -> list[str]:
    if not kb.exists():
        return []
    return sorted(str(p.relative_to(kb)) for p in kb.rglob("*")
                  if p.is_file() and (p.name.endswith(".tmp") or ".tmp" in p.relative_to(kb).parts))


# ---------------------------------------------------------------------------- driver (forked trials)
def _die_at_replace(nth: int, when: str) -> list[int]:
    """From now on, count ``os.replace`` calls and SIGKILL this process just before or just after
    the ``nth`` one (no cleanup of any kind: exactly what a power cut or the OOM killer does).
    Returns the counter (a dry run, ``nth=0``, reads how many renames its phase makes)."""
    real, calls = os.replace, [0]

    def replace(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    os.replace = replace
    return calls


def _write(trial: dict, models) -> None:
    """The forked writer: create the KB (and ingest into it), dying where the trial says."""
    from mmrag.retrievers import KnowledgeBase

    embedder, late_interaction = models
    kill, calls = trial.get("kill_at_replace"), [None]
    if kill and trial["phase"] == "create":
        calls = _die_at_replace(*kill)
    kb = KnowledgeBase.open(trial["kb"], embedder, late_interaction=late_interaction)
    if trial["phase"] != "create":
        if kill:
            calls = _die_at_replace(*kill)
        kb.ingest(trial["src"], batch_size=BATCH_SIZE)
    Path(trial["kb"] + ".replaces").write_text(json.dumps(calls[0]))


def _check(trial: dict, models) -> dict:
    """The forked checker: reopen (repairs), re-run the ingestion, report the raw state."""
    import chromadb
    from chromadb.config import Settings

    from mmrag.retrievers import KnowledgeBase

    embedder, late_interaction = models
    kb_path = Path(trial["kb"])
    out: dict = {"temp_after_kill": temp_files(kb_path)}
    kb = KnowledgeBase.open(kb_path, embedder, late_interaction=late_interaction)
    out["temp_after_open"] = temp_files(kb_path)
    report = kb.ingest(trial["src"], batch_size=BATCH_SIZE)
    out["rerun"] = {"added": report.added, "existing": report.existing, "updated": report.updated,
                    "rejected": sorted(r.ref for r in report.rejected)}
    names = json.loads((kb_path / "mmrag-kb.json").read_text())["collections"]
    raw = chromadb.PersistentClient(path=str(kb_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    texts = raw.get_collection(names["texts"], embedding_function=None).get(include=["metadatas", "documents"])
    out["text_ids"] = texts["ids"]
    out["image_ids"] = raw.get_collection(names["images"], embedding_function=None).get(include=[])["ids"]
    out["documents"] = texts["documents"]
    out["referenced"] = sorted({m["mmrag_image"] for m in texts["metadatas"]})
    out["on_disk"] = sorted(str(p.relative_to(kb_path / "images")) for p in (kb_path / "images").rglob("*")
                            if p.is_file())
    out["journal_left"] = [n for n in ("journal.json", "journal.npz") if (kb_path / n).exists()]
    out["verify"] = kb.verify()
    out["temp_after_rerun"] = temp_files(kb_path)
    if late_interaction is not None:  # every record's token vectors are the encoder's, read back from the sidecar
        import numpy as np

        stored = kb.multivector.tokens(texts["ids"])
        from PIL import Image as PILImage

        images = [PILImage.open(kb.get(i)[0].image).convert("RGB") for i in texts["ids"]]
        fresh = dict(zip(texts["ids"], late_interaction.embed_images(images)))
        out["tokens_differ"] = sorted(i for i in texts["ids"]
                                      if i not in stored or stored[i].shape != fresh[i].shape
                                      or not np.allclose(stored[i], fresh[i], atol=1e-5))
        out["fde_count"] = kb.multivector.count()
    return out


def _spawn(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:  # reported on stderr; the exit status says it failed
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)  # no atexit handlers, no flushing the driver's buffers twice
    return pid


def _wait(pid: int) -> int:
    """The child's exit status; negative: the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _trial(trial: dict, models) -> dict:
    start = time.monotonic()
    pid = _spawn(_write, trial, models)
    if "kill_after_seconds" in trial:  # a random moment: the driver kills the writer from outside
        time.sleep(trial["kill_after_seconds"])
        os.kill(pid, signal.SIGKILL)  # a writer that has finished is a zombie until waited: harmless
    writer = _wait(pid)
    seconds = time.monotonic() - start
    replaces = Path(trial["kb"] + ".replaces")
    result = {"name": trial["name"], "writer_status": writer, "writer_seconds": seconds,
              "replaces": json.loads(replaces.read_text()) if replaces.exists() else None}
    result_file = Path(trial["kb"] + ".check.json")
    result["checker_status"] = _wait(_spawn(lambda: result_file.write_text(json.dumps(_check(trial, models)))))
    result.update(json.loads(result_file.read_text()) if result_file.exists() else {})
    return result


def drive(plan: dict) -> None:
    """Run the plan's trials in order; print one JSON line per trial."""
    import torch

    from mmrag.retrievers import DualEncoder

    torch.set_num_threads(1)  # no thread pool in the driver: forks must not inherit a busy one
    embedder = DualEncoder(plan["model"], device="cpu").warm_up()
    late_interaction = None
    if plan.get("late_interaction"):
        from mmrag.retrievers.multivector import MultiVectorEncoder

        late_interaction = MultiVectorEncoder(plan["late_interaction"], device="cpu").warm_up()
    models = (embedder, late_interaction)
    for trial in plan["trials"]:
        if trial.get("calibrate"):  # a random moment within a run's duration, on this machine
            trial["kill_after_seconds"] = trial.pop("fraction") * plan["calibrated_seconds"]
        result = _trial(trial, models)
        if trial.get("dry_run"):
            plan["calibrated_seconds"] = result["writer_seconds"]
        print(json.dumps(result), flush=True)


def run_plan(tmp_path: Path, model: Path, trials: list[dict], timeout: float = 1800,
             late_interaction: Path | None = None) -> list[dict]:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"model": str(model), "trials": trials,
                                     "late_interaction": str(late_interaction) if late_interaction else None}))
    proc = subprocess.run([sys.executable, "-m", "tests.test_crash_points", str(plan_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in results] == [t["name"] for t in trials], proc.stderr[-3000:]
    return results


# ---------------------------------------------------------------------------- what every trial must end with
def assert_recovered(r: dict, expected: set[str], refused_ref: str) -> None:
    """Exactly the source's valid records, in both collections, their images and nothing else."""
    assert r["checker_status"] == 0, r
    name = r["name"]
    assert r["temp_after_open"] == [] and r["temp_after_rerun"] == [], (name, r["temp_after_open"])
    assert set(r["text_ids"]) == expected, (name, "lost", sorted(expected - set(r["text_ids"])))
    assert len(r["text_ids"]) == len(expected) == len(set(r["documents"])), (name, "duplicated")
    assert sorted(r["image_ids"]) == sorted(r["text_ids"]), name
    assert r["on_disk"] == r["referenced"], (name, "orphan or missing images")
    assert r["journal_left"] == [], name
    assert not any(r["verify"].values()), (name, r["verify"])
    assert r["rerun"]["added"] + r["rerun"]["existing"] == len(expected) and r["rerun"]["updated"] == 0, r["rerun"]
    assert r["rerun"]["rejected"] == [refused_ref], r["rerun"]  # the refused item never got in, nor poisoned


def kill_point_trials(tmp_path: Path, phase: str, src: Path, count: int) -> list[dict]:
    return [{"name": f"{phase}-{when}-{n}", "phase": phase, "src": str(src), "kb": str(tmp_path / f"{phase}-{when}-{n}"),
             "kill_at_replace": [n, when]}
            for n in range(1, count + 1) for when in ("before", "after")]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["create", "ingest"])
def test_kill_before_and_after_every_rename_then_rerun(tmp_path, tiny_clip, phase):
    src = tmp_path / "src"
    expected = make_source(src, 5, seed=21)  # two batches of 3, the second with the refused item
    # a dry run counts the renames of the phase (it is deterministic: a fresh KB, the same source)
    [dry] = run_plan(tmp_path, tiny_clip, [{"name": "dry", "phase": phase, "src": str(src), "kb": str(tmp_path / "dry"),
                                            "kill_at_replace": [0, "before"]}])
    assert dry["writer_status"] == 0 and dry["replaces"] >= (1 if phase == "create" else 10), dry
    assert_recovered(dry, expected, "zz_refused_by_chroma.png")

    results = run_plan(tmp_path, tiny_clip, kill_point_trials(tmp_path, phase, src, dry["replaces"]))
    for r in results:
        assert r["writer_status"] == -signal.SIGKILL, r  # every trial died at its rename
        assert_recovered(r, expected, "zz_refused_by_chroma.png")
    # the kills were where it hurts: some left temporary files for the open to clean
    assert any(r["temp_after_kill"] for r in results)


@pytest.mark.slow
def test_kill_at_every_rename_with_a_late_interaction_index(tmp_path, tiny_clip, tiny_colpali):
    """The token-vector sidecar and the FDE collection are written inside the records' journaled
    upsert: a writer killed before or after any rename (the sidecar's files included) leaves a KB
    whose index holds exactly its records, each with the encoder's own token vectors."""
    src = tmp_path / "src"
    expected = make_source(src, 5, seed=23)
    [dry] = run_plan(tmp_path, tiny_clip, [{"name": "dry", "phase": "ingest", "src": str(src),
                                            "kb": str(tmp_path / "dry"), "kill_at_replace": [0, "before"]}],
                     late_interaction=tiny_colpali)
    # the sidecar adds one rename per record to the plain ingestion's
    assert dry["writer_status"] == 0 and dry["replaces"] >= 10 + len(expected), dry
    assert_recovered(dry, expected, "zz_refused_by_chroma.png")
    results = run_plan(tmp_path, tiny_clip, kill_point_trials(tmp_path, "ingest", src, dry["replaces"]),
                       late_interaction=tiny_colpali)
    for r in [dry, *results]:
        assert r["writer_status"] in (0, -signal.SIGKILL), r
        assert_recovered(r, expected, "zz_refused_by_chroma.png")  # verify() includes the index's two checks
        assert "missing_multivectors" in r["verify"] and r["tokens_differ"] == [], (r["name"], r["verify"])
        assert r["fde_count"] == len(expected), r["name"]
    assert any(r["temp_after_kill"] for r in results)


@pytest.mark.slow
def test_sigkill_at_random_moments_20_trials(tmp_path, tiny_clip):
    src = tmp_path / "src"
    expected = make_source(src, 24, seed=22)
    trials = [{"name": "calibrate", "phase": "ingest", "src": str(src), "kb": str(tmp_path / "calibrate"), "dry_run": True}]
    for i in range(20):
        rng = random.Random(f"random-kill-trial-{i}")  # a seed per trial: a failing one reruns alone
        # up to 1.2x a whole run: some trials finish before the kill, and still count
        trials.append({"name": f"trial-{i}", "phase": "ingest", "src": str(src), "kb": str(tmp_path / f"trial-{i}"),
                       "calibrate": True, "fraction": rng.uniform(0.0, 1.2)})
    results = run_plan(tmp_path, tiny_clip, trials)
    assert results[0]["writer_status"] == 0
    assert_recovered(results[0], expected, "zz_refused_by_chroma.png")
    lost = duplicated = killed = 0
    for r in results[1:]:
        assert r["writer_status"] in (0, -signal.SIGKILL), r
        killed += r["writer_status"] == -signal.SIGKILL
        lost += len(expected - set(r["text_ids"]))
        duplicated += len(r["text_ids"]) - len(set(r["documents"])) + len(set(r["text_ids"]) - expected)
        assert_recovered(r, expected, "zz_refused_by_chroma.png")
    print(f"\n20 random-kill trials: {killed} killed mid-run, {20 - killed} finished first; "
          f"{lost} records lost, {duplicated} duplicated")


if __name__ == "__main__":
    drive(json.loads(Path(sys.argv[1]).read_text()))
