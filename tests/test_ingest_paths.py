"""Where records come from: source paths kept through ingestion, manifests reaching images under
`base_dir`, counting a source for the progress bar's total, and an ingestion that rejects everything.
Real files on disk, a real embedded KB with the tiny CLIP."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from mmrag.retrievers import MultimodalRetriever, Record
from mmrag.retrievers.errors import ConfigError
from mmrag.retrievers.kb.ingest import progress_bar
from mmrag.retrievers.kb.sources import count_source, iter_source
from mmrag.retrievers.kb.store import SOURCE_PATH_KEY, decode_record
from tests.corpus import (
    drawn_image,
    img2dataset_samples,
    make_bad_corpus,
    make_bad_manifest,
    make_csv_manifest,
    make_jsonl_manifest,
    make_webdataset_tar,
)

def picture(path, index: int, text: str | None = None, sidecar: str | None = "txt") -> str:
    """Write a distinct drawn picture at ``path`` (and its sidecar); return its text."""
    im, caption = drawn_image(index, seed=7)
    text = caption if text is None else text
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90)
    if sidecar == "txt":
        path.with_suffix(".txt").write_text(text, encoding="utf-8")
    return text


def stored_by_text(kb) -> dict[str, Record]:
    """Every record as the store holds it (store.decode_record, the shared record builder)."""
    ids = kb.vectors.all_ids()
    return {rec.text: rec for rec in (decode_record(i, *kb.vectors.get([i])[i], kb.images) for i in ids)}


@pytest.fixture
def folder(tmp_path):
    """``red_ring.jpg``, ``sub/x.png`` with .txt sidecars only, and ``sub/deeper/y.jpg`` whose .json
    sidecar has a user key named ``source_path`` (user metadata and the system path stay apart)."""
    root = tmp_path / "photos"
    texts = {"red_ring.jpg": picture(root / "red_ring.jpg", 0, "a red ring"),
             "sub/x.png": picture(root / "sub" / "x.png", 1)}
    y = root / "sub" / "deeper" / "y.jpg"
    texts["sub/deeper/y.jpg"] = picture(y, 2, sidecar=None)
    y.with_suffix(".json").write_text(json.dumps({"text": texts["sub/deeper/y.jpg"], "source_path": "the user's own"}))
    return root, texts


# ------------------------------------------------------------------------------------ source paths
def test_folder_records_keep_their_path_relative_to_the_folder(kb, folder):
    root, texts = folder
    assert kb.ingest(root).added == 3
    stored = stored_by_text(kb)
    assert {rec.source_path: rec.text for rec in stored.values()} == texts
    assert stored[texts["sub/deeper/y.jpg"]].metadata == {"source_path": "the user's own"}
    assert stored["a red ring"].metadata == {}  # the system path is no user metadata
    # a system key in Chroma, so a filter can find a record by its file
    hit = kb.vectors.texts.get(where={SOURCE_PATH_KEY: "red_ring.jpg"}, include=["documents"])
    assert hit["documents"] == ["a red ring"]


def test_kb_get_and_retrieval_hits_carry_the_source_path(kb, folder):
    root, texts = folder
    kb.ingest(root)
    ids = kb.vectors.all_ids()
    assert {rec.source_path: rec.text for rec in kb.get(ids)} == texts
    hits = MultimodalRetriever(kb, near_duplicate_threshold=None).retrieve("a red ring", k=3)  # tiny CLIP: all alike
    assert len(hits) == 3 and {h.record.source_path: h.record.text for h in hits} == texts


def test_manifest_and_shard_source_paths(kb, tmp_path):
    data = tmp_path / "data"
    t_jsonl = picture(data / "imgs" / "a.jpg", 3, sidecar=None)
    t_csv = picture(data / "imgs" / "b.png", 4, sidecar=None)
    make_jsonl_manifest(data / "m.jsonl", [{"image": "./imgs/../imgs/a.jpg", "text": t_jsonl}])
    make_csv_manifest(data / "m.csv", [{"image": str(data / "imgs" / "b.png"), "text": t_csv}])
    ((key, members),) = img2dataset_samples(1, seed=3)
    shard = make_webdataset_tar(tmp_path / "00000.tar", [(f"part/{key}", members)])
    for source in (data / "m.jsonl", data / "m.csv", shard):
        assert kb.ingest(source).added == 1
    stored = stored_by_text(kb)
    # manifests: the image field as written (what the user's own rows join on); shards: name:key
    assert stored[t_jsonl].source_path == "./imgs/../imgs/a.jpg"
    assert stored[t_csv].source_path == str(data / "imgs" / "b.png")
    assert stored[members["txt"]].source_path == f"00000.tar:part/{key}"


def test_records_keep_their_own_source_path_or_none(kb):
    im_a, im_b = drawn_image(5)[0], drawn_image(6)[0]
    kb.add([Record(text="given", image=im_a, source_path="s3://bucket/a.jpg"), Record(text="none", image=im_b)])
    stored = stored_by_text(kb)
    assert (stored["given"].source_path, stored["none"].source_path) == ("s3://bucket/a.jpg", None)
    report = kb.add([Record(text="bad path", image=im_a, source_path="")])
    assert [r.reason for r in report.rejected] == ["`source_path` must be a non-empty string or None, got ''"]


def test_reingesting_every_kind_adds_and_updates_nothing(kb, tmp_path, folder):
    root, _ = folder
    (root / "copy").mkdir()  # the same content at a second path: a duplicate of the first, both times
    for name in ("red_ring.jpg", "red_ring.txt"):
        (root / "copy" / name).write_bytes((root / name).read_bytes())
    data = tmp_path / "data"
    text = picture(data / "a.jpg", 8, sidecar=None)
    manifest = make_jsonl_manifest(data / "m.jsonl", [{"image": "a.jpg", "text": text}])
    shard = make_webdataset_tar(tmp_path / "s.tar", img2dataset_samples(2, seed=4))
    records = [Record(text="direct", image=drawn_image(9)[0], source_path="mine/9.png")]
    first = [kb.ingest(s) for s in (root, manifest, shard, records)]
    assert [(r.added, r.duplicates, len(r.rejected)) for r in first] == [(3, 1, 0), (1, 0, 0), (2, 0, 0), (1, 0, 0)]
    again = [kb.ingest(s) for s in (root, manifest, shard, records)]
    assert [(r.added, r.updated, r.existing, r.duplicates, len(r.rejected)) for r in again] == [
        (0, 0, 3, 1, 0), (0, 0, 1, 0, 0), (0, 0, 2, 0, 0), (0, 0, 1, 0, 0)]
    assert stored_by_text(kb)["a red ring"].source_path == "red_ring.jpg"  # the first path met is kept


# ----------------------------------------------------------------------------------------- base_dir
@pytest.fixture
def outside_layout(tmp_path):
    """A manifest in ``lists/`` naming images in ``store/`` (inside and through a link to outside)
    and in ``elsewhere/``."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    inside = picture(store / "cats" / "c.jpg", 10, sidecar=None)
    relative = picture(store / "d.png", 11, sidecar=None)
    outside = picture(elsewhere / "e.jpg", 12, sidecar=None)
    os.symlink(elsewhere, store / "link")
    rows = [
        {"image": str(store / "cats" / "c.jpg"), "text": inside},   # absolute, inside store
        {"image": "d.png", "text": relative},                        # relative: against base_dir
        {"image": str(elsewhere / "e.jpg"), "text": outside},        # absolute, outside store
        {"image": "../elsewhere/e.jpg", "text": outside + " again"},  # relative, escaping store
        {"image": "link/e.jpg", "text": outside + " linked"},        # inside by name, outside by link
    ]
    return make_jsonl_manifest(tmp_path / "lists" / "m.jsonl", rows), store, [inside, relative]


def test_base_dir_allows_paths_inside_it_and_rejects_the_rest(kb, outside_layout):
    manifest, store, accepted = outside_layout
    report = kb.ingest(manifest, base_dir=store)
    assert report.added == 2 and {r.text for r in stored_by_text(kb).values()} == set(accepted)
    reasons = {r.ref: r.reason for r in report.rejected}
    assert sorted(reasons) == ["m.jsonl:3", "m.jsonl:4", "m.jsonl:5"]
    assert all(f"is outside base_dir {store.resolve()} (paths must stay inside it)" in r for r in reasons.values())


def test_without_base_dir_paths_must_stay_in_the_manifest_folder(kb, outside_layout):
    manifest, store, _ = outside_layout
    report = kb.ingest(manifest)
    assert report.added == 0 and len(report.rejected) == 5 and report.all_rejected
    folder = manifest.parent.resolve()
    first = report.rejected[0].reason
    assert first == (f"image path {str(store / 'cats' / 'c.jpg')!r} is outside the manifest's folder {folder} "
                     "(paths must stay inside it; pass base_dir / --base-dir to allow another folder)")


def test_base_dir_applies_to_csv_too(tmp_path, outside_layout):
    _, store, _ = outside_layout
    text = picture(store / "f.jpg", 13, sidecar=None)
    csv_path = make_csv_manifest(tmp_path / "lists" / "m.csv", [{"image": "f.jpg", "text": text}])
    (item,) = iter_source(csv_path, base_dir=store)
    assert (item.error, item.image, item.source_path) == (None, str((store / "f.jpg").resolve()), "f.jpg")
    (item,) = iter_source(csv_path)  # without it: against the manifest's folder, as before
    assert (item.error, item.image) == (None, str((csv_path.parent / "f.jpg").resolve()))


@pytest.mark.parametrize("source, base_dir, message", [
    ("lists/m.jsonl", "missing", "`base_dir` must be an existing folder, got '{tmp}/missing'."),
    ("lists/m.jsonl", "lists/m.jsonl", "`base_dir` must be an existing folder"),
    ("store", "store", "`base_dir` applies to the image paths of .jsonl/.csv manifests"),
])
def test_bad_base_dir_is_a_config_error_at_the_call(tmp_path, outside_layout, source, base_dir, message):
    with pytest.raises(ConfigError) as e:
        iter_source(tmp_path / source, base_dir=tmp_path / base_dir)
    assert message.format(tmp=tmp_path) in str(e.value)


def test_base_dir_for_records_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="`base_dir` applies .* `source` \\(records\\) has no manifest"):
        iter_source([Record(text="t")], base_dir=tmp_path)


# ---------------------------------------------------------------------------------------- counting
def _scattered_shard(path):
    image = img2dataset_samples(1)[0][1]["jpg"]
    make_webdataset_tar(path, [("a", {"jpg": image}), ("b", {"jpg": image, "txt": "b"}), ("a", {"txt": "late"}),
                               ("c", {"jpg": image, "txt": "c", "json": b"{broken"})])
    with tarfile.open(path, "a") as tar:  # a folder entry and a hidden member are no items
        for name, kind in (("dir", tarfile.DIRTYPE), ("sub/.hidden", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
    return path


def _messy_csv(path):
    make_csv_manifest(path, [{"image": "a.jpg", "text": "t"}, {"image": "../x.jpg", "text": "t"}])
    with open(path, "ab") as f:
        f.write(b"\n\nonly-one-field\na.jpg,caf\xe9\n\"unterminated," + b"x" * 10 + b"\n")
    return path


@pytest.mark.parametrize("make", [
    lambda d: (make_bad_corpus(d), d)[1],                    # every folder item error, nested
    lambda d: (make_bad_manifest(d), d / "bad.jsonl")[1],    # bad lines, a blank line
    lambda d: _messy_csv(d / "m.csv"),                       # blank lines, short rows, bad UTF-8
    lambda d: _scattered_shard(d / "s.tar"),                 # scattered keys, dirs, hidden members
    lambda d: [make_webdataset_tar(d / f"s{n}.tar", img2dataset_samples(2, seed=n)) for n in range(2)],
    lambda d: [Record(text="a"), Record(text="b"), {"not": "a record"}],
])
def test_count_source_equals_the_items_given(tmp_path, make):
    source = make(tmp_path)
    n = count_source(source)
    assert n is not None and n > 0 and n == len(list(iter_source(source)))


def test_count_source_edge_cases(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf\n  \n\xe3\x80\x80\n{"image": "a.jpg", "text": "t"}\n\xff\n')
    assert count_source(tmp_path / "m.jsonl") == len(list(iter_source(tmp_path / "m.jsonl"))) == 2
    assert count_source(Record(text=str(i)) for i in range(3)) is None  # a generator is not counted
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    assert count_source(tmp_path / "bad.tar") is None
    with pytest.raises(ConfigError, match="does not exist"):
        count_source(tmp_path / "missing")


def test_progress_bar_has_the_total(kb, folder, capsys):
    root, _ = folder
    kb.ingest(root, progress=True)
    err = capsys.readouterr().err
    assert "3/3 [" in err and "100%" in err  # a total makes tqdm show a percentage and an ETA
    bar = progress_bar(True)
    bar(2)
    bar(None)
    assert "2item [" in capsys.readouterr().err  # without one: a bare count


# ------------------------------------------------------------------------------------ all rejected
def test_all_rejected(kb, tmp_path, folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, data in (("x.jpg", b"not an image"), ("x.txt", b"t"), ("y.jpg", b"no sidecar")):
        (bad / name).write_bytes(data)
    report = kb.ingest(bad)
    assert (report.seen, report.all_rejected, report.to_dict()["all_rejected"]) == (2, True, True)
    root, _ = folder
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "broken.txt").write_text("t")
    mixed = kb.ingest(root)
    assert (mixed.added, len(mixed.rejected), mixed.all_rejected) == (3, 1, False)
    assert kb.ingest(root).all_rejected is False  # all already present is not all rejected
    (tmp_path / "empty").mkdir()
    empty = kb.ingest(tmp_path / "empty")
    assert (empty.seen, empty.all_rejected) == (0, False)  # nothing seen is not all rejected


def test_search_shows_where_each_hit_came_from(tmp_path, tiny_models_dir, tiny_clip, capsys):
    """`mmrag search` prints the source-relative path in its table, JSON and HTML gallery."""
    import json

    from mmrag.pipelines.cli import main

    src = tmp_path / "photos"
    picture(src / "red_ring.jpg", 1, "a red ring")
    picture(src / "sub" / "blue_star.jpg", 2, "a blue star")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n"
                   "retriever:\n  near_duplicate_threshold: null\n")
    kb = tmp_path / "kb"
    assert main(["ingest", str(src), "--kb", str(kb), "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["search", "a red ring", "--kb", str(kb), "--config", str(cfg), "--channels", "lexical",
                 "--json", "--html", str(tmp_path / "hits.html")]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["source_path"] == "red_ring.jpg"
    assert "red_ring.jpg" in (tmp_path / "hits.html").read_text()
    assert main(["search", "a blue star", "--kb", str(kb), "--config", str(cfg), "--channels", "lexical"]) == 0
    assert capsys.readouterr().out.splitlines()[0].rstrip().endswith("sub/blue_star.jpg")


def test_ingest_of_only_rejected_items_exits_non_zero(tmp_path, tiny_models_dir, tiny_clip, capsys):
    from mmrag.pipelines.cli import main

    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"not an image")
    (src / "a.txt").write_text("a broken picture")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n")
    assert main(["ingest", str(src), "--kb", str(tmp_path / "kb"), "--config", str(cfg)]) == 2
    assert "all 1 items were rejected" in capsys.readouterr().err
