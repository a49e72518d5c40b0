"""Ingestion sources and prepare_text: every source kind, every item error, streaming tar reads,
remote fetching against a real HTTP server, and the bad corpus end to end."""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import os
import queue
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mmrag.retrievers.errors import ConfigError, InvalidItemError
from mmrag.retrievers.kb.images import DEFAULT_MAX_IMAGE_PIXELS, prepare_image
from mmrag.retrievers.kb import sources
from mmrag.retrievers.kb.records import Record, SourceItem
from mmrag.retrievers.kb.sources import describe_source, iter_source, prepare_text
from tests.corpus import (
    BAD_CORPUS_MAX_PIXELS,
    img2dataset_samples,
    make_bad_corpus,
    make_bad_manifest,
    make_csv_manifest,
    make_good_images,
    make_jsonl_manifest,
    make_webdataset_tar,
)


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


# ------------------------------------------------------------------------------------- prepare_text
@pytest.mark.parametrize("text, expected", [
    ("  a caption\n", "a caption"),
    (b"caf\xc3\xa9", "café"),
    (b"\xef\xbb\xbfwith a byte-order mark", "with a byte-order mark"),
    ("x" * 8192, "x" * 8192),
])
def test_prepare_text_accepts(text, expected):
    assert prepare_text(text) == expected


@pytest.mark.parametrize("text, max_chars, message", [
    (None, 10, "empty text"),
    ("", 10, "empty text"),
    (" \n\t", 10, "empty text"),
    (b"caf\xe9", 10, "text is not valid UTF-8 (byte 0xe9 at position 3)"),
    ("a\0b", 10, "text contains a NUL character (at position 1)"),
    ("x" * 11, 10, "text has 11 characters, over the limit of 10 (raise max_text_chars)"),
    (42, 10, "text must be a string, got int"),
])
def test_prepare_text_rejects(text, max_chars, message):
    with pytest.raises(InvalidItemError) as e:
        prepare_text(text, max_chars=max_chars)
    assert e.value.reason == message


# ---------------------------------------------------------------------------------- bad corpora
@pytest.mark.parametrize("max_pixels", [BAD_CORPUS_MAX_PIXELS, DEFAULT_MAX_IMAGE_PIXELS])
def test_bad_corpus_every_case_has_its_outcome(tmp_path, max_pixels):
    expected = make_bad_corpus(tmp_path)
    got = {item.ref: outcome(item, max_pixels) for item in iter_source(tmp_path)}
    assert_outcomes(got, expected)


def test_bad_corpus_conversions_are_the_real_ones(tmp_path):
    make_bad_corpus(tmp_path)
    items = {item.ref: item for item in iter_source(tmp_path)}
    gray = np.asarray(prepare_image(items["gray16.png"].image).image)[..., 0]
    assert gray.min() == 0 and gray.max() == 255 and 100 < np.median(gray) < 155  # scaled, not clipped
    gif = np.asarray(prepare_image(items["animated.gif"].image).image, dtype=int)
    assert np.abs(gif - (220, 40, 40)).max() <= 2  # the first frame's colour
    assert prepare_image(items["rotated.jpg"].image).image.size == (24, 40)


def test_bad_manifest_every_case_has_its_outcome(tmp_path):
    expected = make_bad_manifest(tmp_path)
    got = {item.ref: outcome(item) for item in iter_source(tmp_path / "bad.jsonl")}
    assert_outcomes(got, expected)
    assert "bad.jsonl:2" not in got  # the blank line


# ------------------------------------------------------------------------------------------ folder
def test_folder_walk_is_recursive_sorted_and_skips_hidden(tmp_path):
    sub = make_good_images(tmp_path / "b", 2, seed=1)
    top = make_good_images(tmp_path, 3, seed=2, sidecar="json")
    make_good_images(tmp_path / ".cache", 1, seed=3)  # hidden folder
    make_good_images(tmp_path / "a", 1, seed=4)
    (tmp_path / ".hidden.jpg").write_bytes(b"skipped")
    (tmp_path / "README.md").write_text("neither an image nor a sidecar")
    items = list(iter_source(tmp_path))
    assert all(i.error is None for i in items)
    assert [i.ref for i in items] == [p.name for p, _ in top] + ["a/good_4_0000.jpg"] + [f"b/{p.name}" for p, _ in sub]
    by_ref = {i.ref: i for i in items}
    for p, text in top:  # .json sidecars: text as str, metadata as written, no implicit metadata
        item = by_ref[p.name]
        assert (Path(item.image), item.text, item.id) == (p, text, None)
        assert item.metadata == {"seed": 2, "index": int(p.stem[-4:])}
    for p, text in sub:  # .txt sidecars: the raw bytes, so that prepare_text reports bad encodings
        item = by_ref[f"b/{p.name}"]
        assert (Path(item.image), item.text, item.metadata) == (p, text.encode(), {})
    assert {i.source for i in items} == {str(tmp_path.resolve())}
    assert [i.ref for i in iter_source(tmp_path)] == [i.ref for i in items]


def test_folder_follows_links_inside_it_once_and_refuses_links_outside(tmp_path):
    """One containment rule for folders and manifests: a link may point anywhere inside the source
    (walked once; a loop back up the tree does not walk forever), not outside it."""
    make_good_images(tmp_path / "elsewhere", 1, seed=5)
    root = tmp_path / "root"
    inner = make_good_images(root / "real", 1, seed=7)
    make_good_images(root, 1, seed=6)
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root / "real", root / "alias")  # inside: the same files, walked once
    os.symlink(root, root / "loop")
    items = list(iter_source(root))
    good = [i.ref for i in items if i.error is None]
    assert len(good) == 2 and "good_6_0000.jpg" in good  # the inner folder's image once, by either name
    assert {g for g in good if g != "good_6_0000.jpg"} <= {f"real/{inner[0][0].name}", f"alias/{inner[0][0].name}"}
    (outside,) = [i for i in items if i.ref == "linked"]
    assert "outside the source folder" in outside.error


def test_folder_json_sidecar_fields_and_txt_precedence(tmp_path):
    (tmp_path / "x.png").write_bytes(b"image bytes are not read by the source")
    (tmp_path / "x.txt").write_bytes(b"text from txt")
    sidecar = {"id": 7, "text": "text from json", "metadata": {"a": 1}, "license": "cc0"}
    (tmp_path / "x.json").write_text(json.dumps(sidecar))
    (item,) = iter_source(tmp_path)
    assert (item.text, item.id) == (b"text from txt", "7")
    assert item.metadata == {"text": "text from json", "license": "cc0", "a": 1}  # nothing written is dropped


@pytest.mark.parametrize("files, ref, message", [
    ({"x.jpg": b"i"}, "x.jpg", "no sidecar text (x.txt or x.json)"),
    ({"x.txt": b"t"}, "x.txt", "no image for this sidecar"),
    ({"x.json": b"{}"}, "x.json", "no image for this sidecar"),
    ({"x.jpg": b"i", "x.json": b"{not json"}, "x.jpg", "x.json is not valid JSON"),
    ({"x.jpg": b"i", "x.json": b"[1, 2]"}, "x.jpg", "x.json must hold a JSON object, got list"),
    ({"x.jpg": b"i", "x.json": b'{"text": "t", "metadata": 3}'}, "x.jpg", "'metadata' must be a JSON object"),
    ({"x.jpg": b"i", "x.json": b'{"text": 3}'}, "x.jpg", "'text' must be a string, got int"),
    ({"x.jpg": b"i", "x.png": b"i", "x.txt": b"t"}, "x.jpg", "ambiguous files share the stem 'x'"),
])
def test_folder_item_errors(tmp_path, files, ref, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (item,) = iter_source(tmp_path)
    assert item.ref == ref and message in item.error


# --------------------------------------------------------------------------------------- manifests
def test_jsonl_manifest_fields_and_paths(tmp_path):
    good = make_good_images(tmp_path / "imgs", 3, sidecar=None)
    rows = [
        {"image": f"imgs/{good[0][0].name}", "text": good[0][1], "id": "a", "metadata": {"m": 1}, "extra": "x"},
        {"image": str(good[1][0]), "text": good[1][1]},  # absolute, inside the folder
        {"image": f"imgs/../imgs/{good[2][0].name}", "text": good[2][1], "id": 12},
    ]
    items = list(iter_source(make_jsonl_manifest(tmp_path / "m.jsonl", rows)))
    assert [i.ref for i in items] == ["m.jsonl:1", "m.jsonl:2", "m.jsonl:3"]
    assert [i.error for i in items] == [None] * 3
    assert [Path(i.image) for i in items] == [p.resolve() for p, _ in good]
    assert [i.text for i in items] == [t for _, t in good]
    assert [i.id for i in items] == ["a", None, "12"]
    assert [i.metadata for i in items] == [{"extra": "x", "m": 1}, {}, {}]


@pytest.mark.parametrize("line, message", [
    ('{"image": "ftp://host/x.jpg", "text": "t"}', "unsupported URL scheme 'ftp'"),
    ('{"image": "file:///etc/hostname", "text": "t"}', "unsupported URL scheme 'file'"),
    ('{"image": 5, "text": "t"}', "the 'image' field must be a path or an http(s) URL"),
    ('{"image": "x.jpg"}', "missing the 'text' field"),
    ('{"image": "x.jpg", "text": ["a"]}', "'text' must be a string, got list"),
    ('{"image": "x.jpg", "text": "t", "id": [1]}', "'id' must be a string, got list"),
])
def test_jsonl_line_errors(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text(line + "\n")
    (item,) = iter_source(tmp_path / "m.jsonl")
    assert item.ref == "m.jsonl:1" and message in item.error


def test_jsonl_byte_order_mark_and_a_line_that_is_not_utf8(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf{"image": "a.jpg", "text": "first"}\n'
                                       b'{"image": "a.jpg", "text": "caf\xe9"}\n{"image": "b.jpg", "text": "ok"}\n')
    first, bad, last = iter_source(tmp_path / "m.jsonl")
    assert (first.error, first.text) == (None, "first")
    assert "not valid UTF-8" in bad.error and (last.error, last.text) == (None, "ok")


def test_csv_manifest(tmp_path):
    good = make_good_images(tmp_path / "imgs", 2, sidecar=None)
    rows = [
        {"image": f"imgs/{good[0][0].name}", "text": good[0][1], "id": "a", "license": "cc0", "year": "2020"},
        {"image": f"imgs/{good[1][0].name}", "text": good[1][1], "id": "", "license": "", "year": "1999"},
        {"image": "../escape.jpg", "text": "t", "id": "c", "license": "", "year": ""},
        {"image": "", "text": "t", "id": "d", "license": "", "year": ""},
    ]
    path = make_csv_manifest(tmp_path / "m.csv", rows)
    with open(path, "ab") as f:
        f.write(b"\n")  # blank lines are skipped
        f.write(b"imgs/x.jpg,short row\n")
        f.write(b"imgs/x.jpg,caf\xe9,e,,\n")
    items = list(iter_source(path))
    assert [i.ref for i in items] == ["m.csv:2", "m.csv:3", "m.csv:4", "m.csv:5", "m.csv:7", "m.csv:8"]
    ok = items[:2]
    assert [i.error for i in ok] == [None, None]
    assert [(Path(i.image), i.text, i.id) for i in ok] == [(good[0][0].resolve(), good[0][1], "a"),
                                                            (good[1][0].resolve(), good[1][1], None)]
    assert [i.metadata for i in ok] == [{"license": "cc0", "year": "2020"}, {"license": "", "year": "1999"}]
    assert "outside the manifest's folder" in items[2].error
    assert "the 'image' field must be" in items[3].error
    assert items[4].error == "row has 2 fields, the header has 5"
    assert items[5].error == "row is not valid UTF-8"


def test_csv_row_the_parser_refuses_does_not_stop_the_rest(tmp_path):
    good = make_good_images(tmp_path, 1, sidecar=None)
    huge = "x" * (csv.field_size_limit() + 1)
    path = make_csv_manifest(tmp_path / "m.csv", [{"image": good[0][0].name, "text": huge},
                                                  {"image": good[0][0].name, "text": good[0][1]}])
    bad, ok = iter_source(path)
    assert bad.ref == "m.csv:2" and "row is not valid CSV (field larger than field limit" in bad.error
    assert ok.ref == "m.csv:3" and (ok.error, ok.text) == (None, good[0][1])


def test_csv_without_image_and_text_columns_is_a_config_error(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption\na.jpg,hello\n")
    with pytest.raises(ConfigError) as e:
        iter_source(tmp_path / "m.csv")  # raised at the call, before iteration
    assert "`source`" in str(e.value) and "'image'" in str(e.value) and "['path', 'caption']" in str(e.value)


# ------------------------------------------------------------------------------------ remote images
TRICKLE_CHUNKS = 3000  # of 100 bytes, one every 0.02 s: at least 60 s to download in full


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        if self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.jpg")
            self.end_headers()
        elif self.path == "/slow.jpg":
            # Trickles bytes: each read is quick, the whole download (a minute) is not. Reports how
            # many chunks went out before the client hung up.
            self.send_response(200)
            self.send_header("Content-Length", str(100 * TRICKLE_CHUNKS))
            self.end_headers()
            sent = 0
            try:
                for _ in range(TRICKLE_CHUNKS):
                    self.wfile.write(b"x" * 100)
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.02)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                self.server.trickled.put(sent)
        else:
            super().do_GET()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.trickled = queue.Queue()  # chunks /slow.jpg sent before its client went away, per request
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()
    thread.join()


def test_remote_images_are_fetched_only_when_allowed(tmp_path, http_server):
    root, url, _ = http_server
    ((image, text),) = make_good_images(root, 1, sidecar=None)
    manifest = make_jsonl_manifest(tmp_path / "m.jsonl", [
        {"image": f"{url}/{image.name}", "text": text},
        {"image": f"{url}/missing.jpg", "text": "t"},
        {"image": f"{url}/to-ftp", "text": "t"},
    ])
    off = list(iter_source(manifest))
    assert all(i.error == "remote image URL but remote fetching is off (set allow_remote=True / --allow-remote)"
               for i in off)
    fetched, missing, redirected = iter_source(manifest, allow_remote=True)
    assert fetched.error is None and fetched.image == image.read_bytes() and fetched.text == text
    assert prepare_image(fetched.image).sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert "HTTP 404" in missing.error
    assert "could not fetch" in redirected.error and "non-http(s)" in redirected.error


def test_remote_size_and_time_limits(tmp_path, http_server):
    root, url, server = http_server
    ((image, text),) = make_good_images(root, 1, sidecar=None)
    manifest = make_jsonl_manifest(tmp_path / "m.jsonl", [{"image": f"{url}/{image.name}", "text": text},
                                                          {"image": f"{url}/slow.jpg", "text": "t"}])
    big, _ = iter_source(manifest, allow_remote=True, max_remote_bytes=100)
    assert "over the limit of 100 bytes" in big.error
    # The whole-download deadline, shown by what happened rather than by a clock: the server's own
    # pace makes the download last a minute, so only the deadline explains this message, and the
    # server saw the client hang up with most of the image still unsent.
    _, slow = iter_source(manifest, allow_remote=True, fetch_timeout=1.0)
    assert "took longer than 1.0 s" in slow.error, slow.error
    assert server.trickled.get(timeout=600) < TRICKLE_CHUNKS


# -------------------------------------------------------------------------------------- WebDataset
def test_img2dataset_shard(tmp_path):
    samples = img2dataset_samples(3, seed=1)
    shard = make_webdataset_tar(tmp_path / "00000.tar", samples)
    items = list(iter_source(shard))
    assert [i.ref for i in items] == [f"00000.tar:{key}" for key, _ in samples]
    for item, (key, members) in zip(items, samples):
        assert item.error is None and item.id is None
        assert item.image == members["jpg"] and item.text == members["txt"].encode()
        assert item.metadata == members["json"]
        assert item.source == str(shard.resolve())


def test_shard_without_txt_takes_the_json_caption(tmp_path):
    samples = img2dataset_samples(2, with_txt=False)
    items = list(iter_source(make_webdataset_tar(tmp_path / "s.tar", samples)))
    for item, (_, members) in zip(items, samples):
        assert item.text == members["json"]["caption"]
        assert "caption" not in item.metadata and item.metadata["url"] == members["json"]["url"]


def test_shard_keys_keep_their_folder_and_bad_keys_are_errors(tmp_path):
    image = img2dataset_samples(1)[0][1]["jpg"]
    shard = make_webdataset_tar(tmp_path / "s.tar", [
        ("part1/000", {"jpg": image, "txt": "in a folder"}),
        ("part2/000", {"seg.png": image, "txt": "no image, only a segmentation map"}),
        ("part2/001", {"jpg": image, "png": image, "txt": "two images"}),
        ("part2/002", {"jpg": image}),
        ("part2/003", {"jpg": image, "json": b"{broken"}),
    ])
    items = list(iter_source(shard))
    assert [i.ref for i in items] == ["s.tar:part1/000", "s.tar:part2/000", "s.tar:part2/001", "s.tar:part2/002",
                                      "s.tar:part2/003"]
    assert items[0].error is None and items[0].text == b"in a folder"
    assert "no image for key 'part2/000' (members: 000.seg.png, 000.txt)" in items[1].error
    assert "several images" in items[2].error
    assert "no text for key 'part2/002'" in items[3].error
    assert "003.json is not valid JSON" in items[4].error


def test_oversized_tar_member_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_MAX_MEMBER_BYTES", 1000)  # instead of writing a 50 MiB member
    shard = make_webdataset_tar(tmp_path / "s.tar", [("a", {"jpg": b"x" * 1001, "txt": "t"}),
                                                     ("b", {"jpg": b"x" * 1000, "txt": "t"})])
    big, fits = iter_source(shard)
    assert big.error == "member 'a.jpg' is 1,001 bytes, over the limit of 1,000" and big.image is None
    assert fits.error is None and fits.image == b"x" * 1000


def test_repeated_tar_member_is_reported(tmp_path):
    shard = make_webdataset_tar(tmp_path / "s.tar", [("a", {"jpg": b"first"}), ("a", {"jpg": b"second", "txt": "t"})])
    (item,) = iter_source(shard)
    assert item.ref == "s.tar:a" and item.error == "member 'a.jpg' appears twice"


def test_scattered_key_members_are_reported(tmp_path):
    image = img2dataset_samples(1)[0][1]["jpg"]
    shard = make_webdataset_tar(tmp_path / "s.tar", [("a", {"jpg": image}), ("b", {"jpg": image, "txt": "b"}),
                                                     ("a", {"txt": "a, written late"})])
    first_a, b, late_a = iter_source(shard)
    assert "no text for key 'a'" in first_a.error and b.error is None
    assert late_a.ref == "s.tar:a" and "not adjacent" in late_a.error


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar}


# damage -> the sample being read when it is met. Damage at a header is only noticed once the
# previous sample's members are all read, so that sample is the one reported.
@pytest.mark.parametrize("damage, reading", [
    ("mid-data", 2), ("mid-header", 1), ("at-boundary", 1), ("garbage-header", 1), ("no-end-marker", 3),
])
def test_damaged_tar_yields_the_items_before_the_damage_then_one_error(tmp_path, damage, reading):
    samples = img2dataset_samples(4)
    shard = make_webdataset_tar(tmp_path / "s.tar", samples)
    data = shard.read_bytes()
    header, body = _member_offsets(shard)[f"{samples[2][0]}.jpg"]
    last_end = max(o for o, _ in _member_offsets(shard).values()) + 512 + len(json.dumps(samples[3][1]["json"]))
    shard.write_bytes({
        "mid-data": data[: body + 100],
        "mid-header": data[: header + 200],
        "at-boundary": data[:header],
        "garbage-header": data[:header] + b"\xff" * 512 + data[header + 512:],
        "no-end-marker": data[: (last_end + 511) // 512 * 512],
    }[damage])
    items = list(iter_source(shard))
    *good, error = items
    assert [i.ref for i in good] == [f"s.tar:{k}" for k, _ in samples[:reading]]
    assert all(i.error is None for i in good)
    assert error.ref == f"s.tar:{samples[reading][0]}"
    assert "truncated or corrupt" in error.error and "the rest of the shard was not read" in error.error


def test_not_a_tar_is_one_error_item(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"this is not a tar archive" * 40)
    (item,) = iter_source(tmp_path / "s.tar")
    assert item.ref == "s.tar:?" and "truncated or corrupt" in item.error


def test_tar_is_streamed_one_key_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"{i:03d}", {"jpg": rng.bytes(300_000), "txt": f"sample {i}"}) for i in range(3)]
    shard = make_webdataset_tar(tmp_path / "s.tar", samples)
    _, second_body = _member_offsets(shard)["001.jpg"]
    items = iter_source(shard)
    first = next(items)
    assert first.ref == "s.tar:000" and first.error is None
    # Cut the file under the open reader. A reader that had already read the shard would still
    # give out both remaining samples; a streaming one meets the cut.
    os.truncate(shard, second_body + 100_000)
    rest = list(items)
    assert len(rest) == 1 and rest[0].ref == "s.tar:001" and "truncated" in rest[0].error


def test_glob_and_list_of_shards(tmp_path):
    for n in range(2):
        make_webdataset_tar(tmp_path / f"shard-{n}.tar", img2dataset_samples(2, seed=n))
    by_glob = list(iter_source(str(tmp_path / "shard-*.tar")))
    by_list = list(iter_source([tmp_path / "shard-0.tar", str(tmp_path / "shard-1.tar")]))
    refs = ["shard-0.tar:000000000", "shard-0.tar:000000001", "shard-1.tar:000010000", "shard-1.tar:000010001"]
    assert [i.ref for i in by_glob] == [i.ref for i in by_list] == refs
    assert [i.source for i in by_glob] == [str((tmp_path / f"shard-{n}.tar").resolve()) for n in (0, 0, 1, 1)]


# ------------------------------------------------------------------------------------------ records
def test_records_and_source_items():
    meta = {"k": "v"}
    passthrough = SourceItem(ref="mine", source="elsewhere", text="t", image=b"x")
    items = list(iter_source([Record(text="a", image=b"img", id="r1", metadata=meta), Record(text="b"),
                              passthrough, {"text": "a dict"}]))
    assert [(i.ref, i.text, i.id) for i in items[:2]] == [("records[0]", "a", "r1"), ("records[1]", "b", None)]
    assert items[0].image == b"img" and items[0].metadata == meta and items[0].metadata is not meta
    assert items[2] is passthrough
    assert items[3].ref == "records[3]" and items[3].error == "expected a Record or SourceItem, got dict"


def test_record_iterables_are_consumed_lazily():
    endless = (Record(text=f"r{i}", image=b"x") for i in itertools.count())
    assert [i.text for i in itertools.islice(iter_source(endless), 3)] == ["r0", "r1", "r2"]


# ------------------------------------------------------------------------------- unreadable sources
@pytest.mark.parametrize("source, message", [
    ("{tmp}/does-not-exist", "`source` does not exist: '{tmp}/does-not-exist'"),
    ("{tmp}/data.parquet", "`source` has an unsupported extension '.parquet'"),
    ("{tmp}/*.tar", "`source` glob '{tmp}/*.tar' matches no files"),
])
def test_unreadable_source_paths_are_config_errors(tmp_path, source, message):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError) as e:
        iter_source(source.format(tmp=tmp_path))  # at the call, not at the first item
    assert message.format(tmp=tmp_path) in str(e.value)
    assert ".jsonl or .csv manifest" in str(e.value)  # what is accepted instead


@pytest.mark.parametrize("source", [42, b"bytes", {"image": "x"}])
def test_wrong_source_types_are_config_errors(source):
    with pytest.raises(ConfigError, match="`source` must be"):
        iter_source(source)


def test_describe_source(tmp_path):
    assert describe_source(tmp_path) == str(tmp_path.resolve())
    assert describe_source([tmp_path / "a.tar", tmp_path / "b.tar"]) == f"{(tmp_path / 'a.tar').resolve()} (+1 more)"
    assert describe_source(str(tmp_path / "*.tar")) == str(tmp_path / "*.tar")
    assert describe_source([Record(text="t")]) == "records"
