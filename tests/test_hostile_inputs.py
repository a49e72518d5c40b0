"""Hostile inputs (issue "Hardening"), one class per section, each against real files on disk:

1. only regular files are read (FIFOs, sockets, devices are refused unopened, even when swapped in
   after the check), a folder source keeps to its folder as a manifest does, and no reason quotes
   a file outside the source or an unbounded piece of an item;
2. shape bombs (tiny files, few pixels, huge once an encoder resizes them) are refused from the
   header, and the peak memory of ingesting one is measured in a child process;
3. CSV manifests are parsed strictly: an unterminated quote is one reported row, not the silent
   end of the file;
4. query images get the checks ingested images get, and unknown keyword arguments of a pipeline
   are a typed error.

Then the hostile corpus end to end: 200 good records, every bad and hostile kind, nothing good lost.
Tests that could block forever on the unfixed code (a FIFO opened for reading) carry a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrag.retrievers import ConfigError, Query
from mmrag.retrievers.errors import InvalidItemError
from mmrag.retrievers.kb import images
from mmrag.retrievers.kb.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS, prepare_image
from mmrag.retrievers.kb.records import SourceItem
from mmrag.retrievers.kb.sources import count_source, iter_source, prepare_text
from tests.corpus import (
    BAD_CORPUS_MAX_PIXELS,
    HOSTILE_CSV,
    HOSTILE_JSONL,
    SECRET,
    WIDE_SIZE,
    drawn_image,
    encode,
    make_bad_corpus,
    make_good_images,
    make_hostile_corpus,
    make_hostile_manifests,
    png_bomb,
    unix_socket,
)

# A FIFO opened for reading blocks until a writer comes: on the unfixed code these tests hang, and
# the timeout turns the hang into a failure.
NO_HANG = pytest.mark.timeout(60)
# Longest reason any hostile item may get: a line of a report, not a copy of the item.
MAX_REASON_CHARS = 600


def outcome(item: SourceItem, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """What an ingestion concludes for one item (the knowledge base's order of checks)."""
    if item.error is not None:
        return "reject:" + item.error
    try:
        prepare_text(item.text)
        notes = prepare_image(item.image, max_pixels=max_pixels).notes
    except InvalidItemError as e:
        return "reject:" + e.reason
    return "accept:" + "; ".join(notes)


def assert_outcomes(got: dict[str, str], expected: dict[str, str]) -> None:
    assert set(got) == set(expected)
    for ref, want in expected.items():
        kind, part = want.split(":", 1)
        assert got[ref].startswith(kind + ":") and part in got[ref], (ref, want, got[ref])


def reason(image, **kw) -> str:
    with pytest.raises(InvalidItemError) as e:
        prepare_image(image, **kw)
    return e.value.reason


# ------------------------------------------------------------------------- 1. regular files only
@NO_HANG
def test_fifo_image_and_fifo_sidecar_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    (tmp_path / "x.txt").write_text("a FIFO posing as an image")
    (tmp_path / "y.png").write_bytes(encode(drawn_image(0)[0], "PNG"))
    os.mkfifo(tmp_path / "y.txt")
    got = {item.ref: outcome(item) for item in iter_source(tmp_path)}
    assert got.keys() == {"x.jpg", "y.png"}
    assert "x.jpg is a FIFO (named pipe), not a regular file" in got["x.jpg"]
    assert "sidecar" in got["y.png"] and "y.txt is a FIFO (named pipe)" in got["y.png"]


@NO_HANG
def test_a_file_swapped_for_a_fifo_after_the_check_cannot_block(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(encode(drawn_image(1)[0], "PNG"))
    checked = images.check_regular_file

    def check_then_swap(p, what):
        checked(p, what)  # passes: still a regular file
        os.unlink(p)
        os.mkfifo(p)  # the race: what open() meets is a FIFO nobody writes to

    monkeypatch.setattr(images, "check_regular_file", check_then_swap)
    # Without O_NONBLOCK this open() would hang; without the fstat re-check the FIFO would read as
    # an empty file instead of being named for what it is.
    assert "is a FIFO (named pipe), not a regular file" in reason(path)


def test_socket_is_refused_without_being_opened(tmp_path):
    unix_socket(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a socket posing as an image")
    (item,) = iter_source(tmp_path)
    assert "x.png is a socket, not a regular file" in outcome(item)  # not an ENXIO from open()


def test_character_device_is_refused_without_being_opened(tmp_path):
    # /dev/zero is the one device every Linux has; base_dir lets a manifest name it.
    assert "/dev/zero is a character device, not a regular file" in reason("/dev/zero")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "/dev/zero", "text": "endless zeros"}) + "\n")
    (item,) = iter_source(manifest, base_dir="/dev")
    assert "is a character device" in outcome(item)


@NO_HANG
@pytest.mark.parametrize("name", ["m.jsonl", "m.csv", "s.tar"])
def test_a_fifo_given_as_the_source_is_a_config_error_at_the_call(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with pytest.raises(ConfigError) as e:
        list(iter_source(tmp_path / name))
    assert "`source`" in str(e.value) and "is a FIFO (named pipe), not a regular file" in str(e.value)
    with pytest.raises(ConfigError):
        count_source(tmp_path / name)


def test_folder_symlinks_must_stay_inside_the_folder(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    outside.mkdir()
    (outside / "photo.png").write_bytes(encode(drawn_image(2)[0], "PNG"))
    (outside / "secret.txt").write_text(SECRET)
    make_good_images(outside / "dataset", 2, seed=4)
    good = make_good_images(root / "real", 1, seed=5)
    os.symlink(outside / "photo.png", root / "a.png")
    (root / "a.txt").write_text("an image that lives elsewhere")
    (root / "b.png").write_bytes(encode(drawn_image(3)[0], "PNG"))
    os.symlink(outside / "secret.txt", root / "b.txt")
    os.symlink(outside / "dataset", root / "c_linked")
    os.symlink(good[0][0], root / "d.jpg")  # a link inside the folder is fine
    (root / "d.txt").write_text("a link that stays inside")
    os.symlink(root / "real", root / "z_linked")  # so is a linked folder inside it (walked once)
    items = {item.ref: item for item in iter_source(root)}
    assert list(items) == ["a.png", "b.png", "d.jpg", "c_linked", "real/good_5_0000.jpg"]
    for ref in ("a.png", "b.png", "c_linked"):
        assert "is a symlink that resolves outside the source folder" in items[ref].error, ref
        assert "base_dir" in items[ref].error  # the fix: a manifest with base_dir
    assert items["b.png"].error.startswith("b.txt ")  # names the offending link, not its target
    assert items["d.jpg"].error is None and Path(items["d.jpg"].image) == root / "d.jpg"
    assert count_source(root) == len(items)


@NO_HANG
@pytest.mark.parametrize("max_pixels", [BAD_CORPUS_MAX_PIXELS, DEFAULT_MAX_IMAGE_PIXELS])
def test_hostile_corpus_every_kind_has_its_outcome(tmp_path, max_pixels):
    expected = make_hostile_corpus(tmp_path / "src", tmp_path / "outside")
    items = list(iter_source(tmp_path / "src"))
    got = {item.ref: outcome(item, max_pixels) for item in items}
    assert_outcomes(got, expected)
    assert count_source(tmp_path / "src") == len(items)
    for item in items:  # nothing read from outside the folder, nothing of it quoted
        text = item.text.encode() if isinstance(item.text, str) else item.text or b""
        assert SECRET not in got[item.ref] and SECRET.encode() not in text
        assert len(got[item.ref]) <= MAX_REASON_CHARS, item.ref


@NO_HANG
def test_hostile_manifests_every_line_has_its_outcome_and_a_short_reason(tmp_path):
    expected = make_hostile_manifests(tmp_path)
    got = {}
    for name in (HOSTILE_CSV, HOSTILE_JSONL):
        items = list(iter_source(tmp_path / name))
        assert count_source(tmp_path / name) == len(items)
        got.update({item.ref: outcome(item) for item in items})
    assert_outcomes(got, expected)
    # The JSONL lines quote megabyte-long values: their reasons quote the start, escaped, and say
    # how long the value was.
    for ref, text in got.items():
        assert len(text) <= MAX_REASON_CHARS, (ref, len(text))
    assert "(1,000,005 characters)" in got[f"{HOSTILE_JSONL}:1"]


def test_csv_header_is_quoted_bounded(tmp_path):
    (tmp_path / "m.csv").write_text(",".join(f"column{i}" + "y" * 5000 for i in range(1000)) + "\n")
    with pytest.raises(ConfigError) as e:
        iter_source(tmp_path / "m.csv")
    assert "'image'" in str(e.value) and "(1000 columns)" in str(e.value)
    assert len(str(e.value)) <= 1000


# ---------------------------------------------------------------------------------- 2. shape bombs
@pytest.mark.parametrize("size", [WIDE_SIZE, (1, 200_000), (400_000, 1), (30_000, 200)])
def test_shape_bombs_are_refused_from_the_header(size):
    r = reason(png_bomb(*size))
    assert f"image is {size[0]}x{size[1]}, an aspect ratio of" in r
    assert f"over the limit of {DEFAULT_MAX_ASPECT_RATIO}:1" in r and "crop or split it" in r


def test_aspect_ratio_limit_is_exactly_the_documented_constant():
    limit = DEFAULT_MAX_ASPECT_RATIO
    assert prepare_image(png_bomb(limit, 1)).image.size == (limit, 1)  # at the limit: accepted
    assert "aspect ratio" in reason(png_bomb(limit + 1, 1))
    assert prepare_image(png_bomb(limit + 1, 1), max_aspect_ratio=limit + 1).image.size == (limit + 1, 1)
    panorama = encode(Image.new("RGB", (600, 60), (90, 140, 200)), "JPEG")  # 10:1, a real panorama
    assert prepare_image(panorama).notes == []
    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        prepare_image(panorama, max_aspect_ratio=0.5)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_an_image_without_pixels_is_an_item_error_not_a_crash(size):
    # Before: Pillow's untyped ValueError("cannot write empty image") stopped the ingestion.
    assert reason(Image.new("RGB", size)) == f"image is {size[0]}x{size[1]}: it has no pixels"


# The child opens a KB with the tiny CLIP (shortest edge 30 px), ingests one good image so that
# every lazy allocation is made, then ingests a folder holding one shape bomb. The peak RSS before
# and after the second ingest bounds what the bomb cost, whatever the baseline (torch, Chroma).
_RSS_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from mmrag.retrievers import DualEncoder, KnowledgeBase
    tiny, work, warm, bomb = map(Path, sys.argv[1:5])
    kb = KnowledgeBase.open(work / "kb", DualEncoder(tiny, device="cpu"))
    kb.ingest(warm)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = kb.ingest(bomb)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    print(json.dumps({"growth": (after - before) * scale, "peak": after * scale, "added": report.added,
                      "reasons": [r.reason for r in report.rejected]}))
""")
# Measured with this child (ru_maxrss, Linux, tiny CLIP): on the unfixed code 200000x1 grew the peak
# by 1.76 GB (2.20 GB in all) and 400000x1 by 3.52 GB (3.96 GB), from a 435 MB baseline; with the
# shape limit the growth is 0.1 MB and 0 MB. The budget sits far from both.
RSS_BUDGET_BYTES = 256 * 2**20


@pytest.mark.timeout(600)
def test_ingesting_a_shape_bomb_stays_within_a_memory_budget(tmp_path, tiny_clip):
    make_good_images(tmp_path / "warm", 1)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    (bomb / "wide.png").write_bytes(png_bomb(*WIDE_SIZE))
    (bomb / "wide.txt").write_text("a picture 200000 pixels wide and 1 high")
    assert (bomb / "wide.png").stat().st_size < 1000  # a tiny file, 200,000 pixels
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tiny_clip), str(tmp_path), str(tmp_path / "warm"),
                          str(bomb)], check=False, capture_output=True, text=True, timeout=540, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    assert measured["growth"] < RSS_BUDGET_BYTES, measured
    assert measured["added"] == 0 and "aspect ratio" in measured["reasons"][0]


# ------------------------------------------------------------------------------------ 3. strict CSV
def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_unterminated_quote_is_one_reported_row_and_the_rest_is_read(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(encode(drawn_image(k)[0], "JPEG"))
    path = _csv(tmp_path / "m.csv", ["image,text", "0.jpg,first", '1.jpg,"never closed', "2.jpg,third", "0.jpg,fourth"])
    items = list(iter_source(path))
    assert [i.ref for i in items] == ["m.csv:2", "m.csv:3", "m.csv:4", "m.csv:5"]
    assert items[1].error == ("unterminated quote starting at line 3: the quoted field runs to the end of the file; "
                              "lines 4-5 were read again as rows")
    assert [(i.error, i.text) for i in (items[0], items[2], items[3])] == [(None, "first"), (None, "third"),
                                                                           (None, "fourth")]
    assert count_source(path) == 4


def test_a_stray_quote_closed_lines_later_costs_one_row(tmp_path):
    path = _csv(tmp_path / "m.csv", ["image,text", 'a.jpg,"opens here', "b.jpg,swallowed", 'c.jpg,closes" here',
                                     "d.jpg,after"])
    items = list(iter_source(path))
    assert [i.ref for i in items] == ["m.csv:2", "m.csv:3", "m.csv:4", "m.csv:5"]
    assert items[0].error.startswith("row starting at line 2 is not valid CSV (")
    assert "at line 4" in items[0].error and "lines 3-4 were read again as rows" in items[0].error
    assert [i.text for i in items[1:]] == ["swallowed", 'closes" here', "after"]  # read as rows of their own
    assert count_source(path) == 4


def test_quoted_multiline_captions_are_still_one_row(tmp_path):
    path = _csv(tmp_path / "m.csv", ["image,text", 'a.jpg,"two\nlines"', "b.jpg,next"])
    first, second = iter_source(path)
    assert (first.ref, first.error, first.text) == ("m.csv:2", None, "two\nlines")
    assert (second.ref, second.error) == ("m.csv:4", None)


def test_a_quote_out_of_place_is_reported_not_mended(tmp_path):
    # Lenient parsing reads this as 'quoted tail'; a strict one refuses what it cannot parse.
    (item,) = iter_source(_csv(tmp_path / "m.csv", ["image,text", 'a.jpg,"quoted" tail']))
    assert item.ref == "m.csv:2" and item.error.startswith("row is not valid CSV (")


# ------------------------------------------------------------------------------------ 4. query inputs
def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@NO_HANG
@pytest.mark.parametrize("make, message", [
    (lambda d: _write(d / "huge.png", _png_header_only(60_000, 60_000)), "decompression-bomb limit"),
    (lambda d: _write(d / "figure.png", _EPS), "is not JPEG, PNG, WebP, GIF, BMP or TIFF"),
    (lambda d: _write(d / "float.tif", encode(Image.new("F", (4, 4), 0.5), "TIFF")), "mode 'F'"),
    (lambda d: _write(d / "wide.png", png_bomb(*WIDE_SIZE)), "aspect ratio of 200,000:1"),
    (lambda d: Image.new("RGB", (0, 0)), "it has no pixels"),
    (lambda d: Image.new("F", (4, 4), 0.5), "mode 'F'"),
    (lambda d: _png_header_only(60_000, 60_000), "decompression-bomb limit"),
    (lambda d: _fifo(d / "pipe.jpg"), "is a FIFO (named pipe)"),
])
def test_query_images_get_the_ingestion_checks(tmp_path, make, message):
    image = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        Query.coerce(Query(image=image))
    text = str(e.value)
    assert text.startswith("`query.image` ") and message in text, text
    assert "is not a readable image" in text and "JPEG, PNG, WebP" in text  # what to pass instead


@NO_HANG
def test_a_query_string_naming_a_fifo_is_refused_not_searched_as_text(tmp_path):
    with pytest.raises(ConfigError, match="FIFO"):
        Query.coerce(str(_fifo(tmp_path / "pipe.jpg")))


def test_query_images_are_normalised_as_ingested_ones_are(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (200, 0, 0, 0))  # fully transparent: white, as ingestion makes it
    assert np.asarray(Query.coerce(Query(image=rgba)).image).min() == 255
    data = encode(drawn_image(0)[0], "PNG")
    from_bytes = Query.coerce(Query(image=data)).image
    from_path = Query.coerce(_write(tmp_path / "q.png", data)).image
    assert from_bytes.mode == from_path.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(from_path))
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(prepare_image(data).image))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_unknown_draw_keyword_is_a_config_error_listing_the_valid_ones():
    from mmrag.generators import ReferenceDiffusionGenerator
    from mmrag.pipelines.draw import EntityImagePipeline

    generator = ReferenceDiffusionGenerator("/no/model/needed", device="cpu")  # loads lazily: never here
    pipe = EntityImagePipeline(generator)
    with pytest.raises(ConfigError) as e:
        pipe("a dog", references=[Image.new("RGB", (8, 8))], num_images=2)
    text = str(e.value)
    assert "'num_images'" in text and "num_images_per_prompt" in text and "negative_prompt" in text
    assert "num_inference_steps" in text  # the pipeline's own arguments are listed too
    with pytest.raises(ConfigError, match="'reference_texts'"):  # the pipeline passes it itself
        pipe("a dog", references=[Image.new("RGB", (8, 8))], reference_texts=["x"])
    assert generator._pipeline is None  # refused before any work


# ------------------------------------------------------------------------------- the corpus, counted
@pytest.mark.timeout(600)
def test_200_good_with_every_bad_and_hostile_kind_loses_no_good_record(kb, tmp_path):
    src = tmp_path / "src"
    make_good_images(src, 200, seed=3)
    bad = make_bad_corpus(src / "bad")
    hostile = make_hostile_corpus(src / "hostile", tmp_path / "outside")
    expected = {f"bad/{k}": v for k, v in bad.items()} | {f"hostile/{k}": v for k, v in hostile.items()}
    kb.max_image_pixels = 100_000  # the bad corpus's decompression bomb is sized against this limit
    report = kb.ingest(src, batch_size=32)
    accepts = {k for k, v in expected.items() if v.startswith("accept:")}
    reasons = {r.ref: r.reason for r in report.rejected}
    assert set(reasons) == {k for k, v in expected.items() if v.startswith("reject:")}
    for ref, reason_text in reasons.items():
        assert expected[ref].split(":", 1)[1] in reason_text, (ref, reason_text)
        assert SECRET not in reason_text and len(reason_text) <= MAX_REASON_CHARS
    assert report.added == 200 + len(accepts)  # no good record lost
    assert not any(SECRET in r.text for r in kb.get(kb.vectors.all_ids()))
    manifests = make_hostile_manifests(tmp_path / "lists")
    csv_report = kb.ingest(tmp_path / "lists" / HOSTILE_CSV)
    csv_accepts = [k for k, v in manifests.items() if k.startswith(HOSTILE_CSV) and v.startswith("accept:")]
    assert csv_report.added == len(csv_accepts) == 3  # the rows around the unterminated quote
    assert {r.ref for r in csv_report.rejected} == {f"{HOSTILE_CSV}:3", f"{HOSTILE_CSV}:6"}


def test_references_given_to_the_pipelines_get_the_ingest_checks(tiny_sd, tiny_clip):
    """A user's reference reaches no decoder or encoder resize that ingestion would refuse."""
    from PIL import Image

    from mmrag.generators import ReferenceDiffusionGenerator
    from mmrag.pipelines.draw import EntityImagePipeline
    from mmrag.retrievers import ConfigError, Record

    sd, ip = tiny_sd
    pipe = EntityImagePipeline(ReferenceDiffusionGenerator(sd, ip_adapter=ip))
    for bad in (Image.new("RGB", (0, 0)), Image.new("RGB", (20000, 1))):
        with pytest.raises(ConfigError, match=r"`references\[0\]` cannot be used"):
            pipe("a thing", references=[bad], num_inference_steps=1)
    assert Record(text="t", image=Image.new("RGB", (5, 5), (1, 2, 3))).open_image().getpixel((0, 0)) == (1, 2, 3)
