"""Interleaved multi-image documents (issue #13): a JSONL line with `parts` is one record whose vector
is the normalised mean of its parts' vectors, its parts kept in the `<prefix>-parts` collection; a
hit says which part matched; RAG-VQA puts a document's best parts in the prompt.

References are independent: vectors read back from Chroma with a plain client, a fresh embedding
with the encoder, numpy for every mean, cosine and ranking, the image store folder as listed on disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from mmrag.pipelines.cli import main
from mmrag.retrievers import KnowledgeBase, MultimodalRetriever, Query
from mmrag.retrievers.kb.parts import PartStore
from PIL import Image

# Float32 noise, measured on this corpus: the stored document vector against numpy's mean-then-
# normalise of the part vectors read back from Chroma differs by at most 2.1e-8 per component; against
# a fresh embedding of the parts (other batches, other float32 rounding) by at most 8.1e-8, the part
# vectors themselves by 1.2e-7; passage scores against numpy's cosines by at most 9.0e-8. The
# tolerances sit 10-50x above that noise; the closest best-vs-second part scores differ by 8.7e-3.
STORED_ATOL = 1e-6
FRESH_ATOL = 2e-6
SCORE_ATOL = 1e-6

TEXTS = {"A": "A red fox crosses the frozen river at dawn.", "B": "Foxes hunt voles under the snow.",
         "C": "The old stone tower stands on the hill.", "D": "Bells ring in the tower every hour.",
         "E": "A plain record about a grey cat."}


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def src(tmp_path) -> Path:
    """im0..im5 (distinct PNGs) and a manifest: documents d1 [A, im0, B, im1, im2] and d3 [D, im4, im1]
    (im1 a middle part of both), d2 [im3, C], and a plain record p1 (im0, E)."""
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(6):
        _image(i).save(folder / f"im{i}.png")
    lines = [
        {"id": "d1", "parts": [{"text": TEXTS["A"]}, {"image": "im0.png"}, {"text": TEXTS["B"]}, {"image": "im1.png"},
                               {"image": "im2.png"}], "metadata": {"topic": "fox"}},
        {"id": "d2", "parts": [{"image": "im3.png"}, {"text": TEXTS["C"]}], "metadata": {"topic": "tower"}},
        {"id": "d3", "parts": [{"text": TEXTS["D"]}, {"image": "im4.png"}, {"image": "im1.png"}]},
        {"id": "p1", "image": "im0.png", "text": TEXTS["E"]},
    ]
    (folder / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.fixture
def kb(tmp_path, clip_encoder, src) -> KnowledgeBase:
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    report = kb.ingest(src / "docs.jsonl")
    assert report.added == 4 and not report.rejected, report.summary()
    return kb


def _raw(kb: KnowledgeBase, which: str):
    """A collection through a plain Chroma client: the independent view of what is stored."""
    client = chromadb.PersistentClient(path=str(kb.path / "chroma"), settings=Settings(anonymized_telemetry=False))
    names = {**kb.manifest["collections"], "parts": f"{kb.manifest['collections']['images'][:-len('-images')]}-parts"}
    return client.get_collection(names[which], embedding_function=None)


def _raw_parts(kb: KnowledgeBase, doc_id: str) -> dict:
    res = _raw(kb, "parts").get(where={"mmrag_doc": doc_id}, include=["embeddings", "metadatas", "documents"])
    order = np.argsort([m["mmrag_part"] for m in res["metadatas"]])
    return {k: [res[k][i] for i in order] for k in ("ids", "embeddings", "metadatas", "documents")}


def _stored_images(kb: KnowledgeBase) -> set[str]:
    root = kb.path / "images"
    return {p.name.split(".")[0] for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}


def _healthy(kb: KnowledgeBase) -> None:
    problems = kb.verify()
    assert {"missing_parts", "orphan_parts"} <= set(problems)  # the parts are checked
    assert not any(problems.values()), problems


# ---------------------------------------------------------------------------- ingestion and storage
def test_document_record_vector_and_parts(kb, src, clip_encoder):
    _healthy(kb)
    images, texts = _raw(kb, "images"), _raw(kb, "texts")
    [iv] = images.get(ids=["d1"], include=["embeddings"])["embeddings"]
    got = texts.get(ids=["d1"], include=["embeddings", "metadatas", "documents"])
    [tv], [meta], [doc] = got["embeddings"], got["metadatas"], got["documents"]
    # the record: passages joined, the first image part as its image, marked as a document
    assert doc == TEXTS["A"] + "\n\n" + TEXTS["B"]
    assert meta["mmrag_parts"] == 5 and meta["topic"] == "fox" and meta["mmrag_sha256"] == _sha(src / "im0.png")
    assert meta["mmrag_source_path"] == "im0.png"
    [record] = kb.get("d1")
    assert _sha(Path(record.image)) == _sha(src / "im0.png") and record.metadata == {"topic": "fox"}

    # the parts, read back with a plain client: ids <doc>#<index>, kinds, texts, images
    parts = _raw_parts(kb, "d1")
    assert parts["ids"] == [f"d1#{i}" for i in range(5)]
    assert [m["mmrag_kind"] for m in parts["metadatas"]] == ["text", "image", "text", "image", "image"]
    assert parts["documents"] == [TEXTS["A"], "", TEXTS["B"], "", ""]
    assert [m.get("mmrag_sha256") for m in parts["metadatas"]] == [
        None, _sha(src / "im0.png"), None, _sha(src / "im1.png"), _sha(src / "im2.png")]
    assert all(m["mmrag_doc"] == "d1" for m in parts["metadatas"])

    # the document vector: numpy's mean-then-normalise of the stored part vectors, in both collections
    stored_parts = np.array(parts["embeddings"], dtype=np.float64)
    mean = stored_parts.mean(axis=0)
    expected = mean / np.linalg.norm(mean)
    np.testing.assert_allclose(iv, expected, atol=STORED_ATOL)
    np.testing.assert_allclose(tv, expected, atol=STORED_ATOL)
    # ... and of a fresh embedding of the parts, each with the encoder of its kind
    fresh = np.stack([clip_encoder.embed_texts([TEXTS["A"]])[0], clip_encoder.embed_images([_image(0)])[0],
                      clip_encoder.embed_texts([TEXTS["B"]])[0], clip_encoder.embed_images([_image(1)])[0],
                      clip_encoder.embed_images([_image(2)])[0]]).astype(np.float64)
    np.testing.assert_allclose(stored_parts, fresh, atol=FRESH_ATOL)
    fresh_mean = fresh.mean(axis=0)
    np.testing.assert_allclose(iv, fresh_mean / np.linalg.norm(fresh_mean), atol=FRESH_ATOL)
    # not the first image's vector, nor the first passage's: the parts really are merged
    assert np.abs(np.asarray(iv) - fresh[1]).max() > 1e-3 and np.abs(np.asarray(tv) - fresh[0]).max() > 1e-3

    # the plain record is unchanged: its own image and text vectors, no parts
    [p_iv] = images.get(ids=["p1"], include=["embeddings"])["embeddings"]
    np.testing.assert_allclose(p_iv, clip_encoder.embed_images([_image(0)])[0], atol=FRESH_ATOL)
    assert _raw(kb, "parts").get(where={"mmrag_doc": "p1"})["ids"] == []
    # every image once in the store, part images included
    assert _stored_images(kb) == {_sha(src / f"im{i}.png") for i in range(5)}
    assert kb.info()["document_parts"] == 5 + 2 + 3


def test_bad_part_rejects_the_whole_document(tmp_path, clip_encoder, src):
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (tmp_path / "outside.png").write_bytes((src / "im0.png").read_bytes())
    good = [{"text": TEXTS["A"]}, {"image": "im0.png"}]
    bad = {
        "missing file": good + [{"image": "nope.png"}],
        "outside": good + [{"image": "../outside.png"}],
        "corrupt": [{"image": "im1.png"}, {"image": "broken.png"}, {"text": "x"}],
        "empty text": good + [{"text": "   "}],
        "not a string": good + [{"text": 3}],
        "two keys": good + [{"text": "a", "image": "im2.png"}],
        "unknown key": good + [{"caption": "a"}],
        "no image": [{"text": "a"}, {"text": "b"}],
        "no text": [{"image": "im0.png"}],
        "empty": [],
        "image too": good,  # with a top-level "image" field as well
    }
    lines = [{"id": name, "parts": parts, **({"image": "im3.png"} if name == "image too" else {})}
             for name, parts in bad.items()]
    (src / "bad.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    report = kb.ingest(src / "bad.jsonl")
    reasons = {r.ref: r.reason for r in report.rejected}
    assert report.all_rejected and len(reasons) == len(bad), report.summary()
    by_name = dict(zip(bad, (reasons[f"bad.jsonl:{i}"] for i in range(1, len(bad) + 1))))
    assert by_name["missing file"].startswith("part 2 (image): ") and "not found" in by_name["missing file"]
    assert by_name["outside"].startswith("part 2 (image): ") and "outside" in by_name["outside"]
    assert by_name["corrupt"].startswith("part 1 (image): ")
    assert by_name["empty text"] == "part 2 (text): empty text"
    assert by_name["not a string"] == "part 2: 'text' must be a string, got int"
    assert "part 2 must be an object with one key" in by_name["two keys"]
    assert "part 2 must be an object with one key" in by_name["unknown key"]
    assert by_name["no image"].endswith("no image part") and by_name["no text"].endswith("no text part")
    assert "non-empty list" in by_name["empty"] and "cannot also have 'image'" in by_name["image too"]
    # nothing of any of them is stored: no record, no part, no image (their good images neither)
    assert kb.count() == 0 and kb.parts.count() == 0 and _stored_images(kb) == set()

    # the same limits as records: an image part over max_image_pixels rejects its document
    small = KnowledgeBase.open(tmp_path / "kb", max_image_pixels=32 * 32 - 1)
    report = small.ingest(src / "docs.jsonl")
    assert report.added == 0 and len(report.rejected) == 4
    assert all("over the limit" in r.reason for r in report.rejected)
    assert [r.reason.split(":")[0] for r in report.rejected[:3]] == ["part 1 (image)", "part 0 (image)", "part 1 (image)"]
    assert small.count() == 0 and _stored_images(small) == set()


def test_reingest_adds_nothing_and_an_edit_replaces_the_parts(kb, src):
    before = {d: _raw_parts(kb, d)["ids"] for d in ("d1", "d2", "d3")}
    images_before = _stored_images(kb)
    report = kb.ingest(src / "docs.jsonl")
    assert (report.added, report.updated, report.existing) == (0, 0, 4)
    assert {d: _raw_parts(kb, d)["ids"] for d in ("d1", "d2", "d3")} == before
    assert kb.count() == 4 and _raw(kb, "parts").count() == 10 and _stored_images(kb) == images_before

    # d1 loses its last two parts (im2 was only its own): an update, old parts and im2 gone
    lines = [json.loads(x) for x in (src / "docs.jsonl").read_text().splitlines()]
    lines[0]["parts"] = lines[0]["parts"][:3]
    (src / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = kb.ingest(src / "docs.jsonl")
    assert (report.added, report.updated, report.existing) == (0, 1, 3)
    assert _raw_parts(kb, "d1")["ids"] == ["d1#0", "d1#1", "d1#2"]
    assert _raw(kb, "texts").get(ids=["d1"])["metadatas"][0]["mmrag_parts"] == 3
    assert _stored_images(kb) == images_before - {_sha(src / "im2.png")}  # im1 stays: d3 uses it
    _healthy(kb)


def test_delete_removes_parts_and_releases_only_unused_images(kb, src):
    assert kb.delete("d1") == 1
    assert _raw(kb, "parts").get(where={"mmrag_doc": "d1"})["ids"] == []
    assert [m["mmrag_doc"] for m in _raw(kb, "parts").get(include=["metadatas"])["metadatas"]].count("d3") == 3
    # im2 was d1's alone; im0 is p1's image, im1 a middle part of d3: both stay
    assert _stored_images(kb) == {_sha(src / f"im{i}.png") for i in (0, 1, 3, 4)}
    _healthy(kb)
    assert kb.delete(["d3", "p1"]) == 2
    assert _stored_images(kb) == {_sha(src / "im3.png")}
    assert sorted(_raw(kb, "parts").get()["ids"]) == ["d2#0", "d2#1"]
    _healthy(kb)


def test_verify_sees_a_missing_and_an_orphan_part(kb):
    parts = _raw(kb, "parts")
    parts.delete(ids=["d2#1"])
    row = parts.get(ids=["d3#0"], include=["embeddings", "metadatas", "documents"])
    parts.add(ids=["gone#0"], embeddings=row["embeddings"], metadatas=[{**row["metadatas"][0], "mmrag_doc": "gone"}],
              documents=row["documents"])
    problems = kb.verify()
    assert problems["missing_parts"] == ["d2"] and problems["orphan_parts"] == ["gone"]


def test_a_write_killed_between_records_and_parts_is_completed(tmp_path, clip_encoder, src, monkeypatch):
    """The parts are written by the records' own journaled upsert: a writer dying after the records
    and before the parts leaves a journal that the next open completes."""
    def die(self, *args, **kwargs):
        raise SystemExit("killed")  # not a write Chroma refuses: the journal stays for the next open

    with monkeypatch.context() as m:
        m.setattr(PartStore, "write", die)
        kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
        with pytest.raises(SystemExit):
            kb.ingest(src / "docs.jsonl")
        assert kb.count() == 4 and (tmp_path / "kb" / "journal.json").exists()  # records in, no parts yet
        del kb
    kb = KnowledgeBase.open(tmp_path / "kb")  # recovers
    assert not (tmp_path / "kb" / "journal.json").exists()
    assert [len(_raw_parts(kb, d)["ids"]) for d in ("d1", "d2", "d3")] == [5, 2, 3]
    _healthy(kb)
    assert kb.ingest(src / "docs.jsonl").existing == 4


def test_a_refused_parts_write_rolls_the_documents_back(tmp_path, clip_encoder, src, monkeypatch):
    """Chroma refusing the parts (after their records landed) rolls the documents back whole: no
    record without its parts, their images released; the plain record of the batch is kept."""
    from chromadb.errors import InvalidArgumentError

    write = PartStore.write

    def refuse(self, rows, vectors, replace):
        if any(rows):
            raise InvalidArgumentError("refused for the test")
        return write(self, rows, vectors, replace)

    monkeypatch.setattr(PartStore, "write", refuse)
    kb = KnowledgeBase.open(tmp_path / "kb", clip_encoder)
    report = kb.ingest(src / "docs.jsonl")
    assert report.added == 1 and sorted(r.ref for r in report.rejected) == ["docs.jsonl:1", "docs.jsonl:2",
                                                                            "docs.jsonl:3"]
    assert all("Chroma refused" in r.reason for r in report.rejected)
    assert kb.vectors.all_ids() == ["p1"] and kb.vectors.all_ids("images") == ["p1"]
    assert kb.parts.count() == 0 and _stored_images(kb) == {_sha(src / "im0.png")}
    assert not any(kb.verify().values())


# ---------------------------------------------------------------------------- retrieval
def _numpy_parts(kb: KnowledgeBase, doc_id: str, query: Query) -> tuple[np.ndarray, list[int]]:
    """Each part's score as numpy computes it (mean cosine with the query's fresh vectors) and the
    part indices best first."""
    emb = kb.embedder
    qs = ([emb.embed_texts([query.text])[0]] if query.text else []) + ([emb.embed_images([query.image])[0]]
                                                                        if query.image is not None else [])
    vectors = np.array(_raw_parts(kb, doc_id)["embeddings"], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q = np.array(qs, dtype=np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = (vectors @ q.T).mean(axis=1)
    return scores, sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@pytest.mark.parametrize("query, best", [
    (Query(text=TEXTS["B"]), 2),  # the passage itself
    (Query(image=_image(1)), 3),  # the image itself
    (Query(text="fox at dawn", image=_image(2)), None),  # mixed: whatever numpy says
])
def test_passage_selection_matches_numpy(kb, query, best):
    retriever = MultimodalRetriever(kb, near_duplicate_threshold=None, document_parts=5)
    [hit] = retriever.retrieve(query, k=1, where={"topic": "fox"})
    scores, order = _numpy_parts(kb, "d1", Query.coerce(query))
    assert [p.index for p in hit.parts] == order and hit.matched_part.index == order[0]
    if best is not None:
        assert order[0] == best
    np.testing.assert_allclose([p.score for p in hit.parts], scores[order], atol=SCORE_ATOL)
    by_index = {p.index: p for p in hit.parts}
    assert by_index[0].kind == "text" and by_index[0].text == TEXTS["A"] and by_index[0].image is None
    assert by_index[3].kind == "image" and by_index[3].source_path == "im1.png"
    assert Image.open(by_index[3].image).tobytes() == _image(1).tobytes()
    # document_parts=1 (the default) keeps the best one; 0 none; plain records never have parts
    assert [p.index for p in MultimodalRetriever(kb, near_duplicate_threshold=None).retrieve(
        query, k=1, where={"topic": "fox"})[0].parts] == order[:1]
    assert retriever.retrieve(query, k=1, where={"topic": "fox"}, document_parts=0)[0].parts == []
    hits = retriever.retrieve(query, k=4)
    assert {h.id for h in hits} == {"d1", "d2", "d3", "p1"}
    assert all(bool(h.parts) == (h.id != "p1") for h in hits)


def test_search_cli_shows_the_matched_part(kb, src, tmp_path, tiny_models_dir, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"embedder:\n  model: tiny:clip\ntiny_models:\n  cache_dir: {tiny_models_dir}\n"
                   "retriever:\n  near_duplicate_threshold: null\n")
    kb_path = kb.path
    expected = MultimodalRetriever(kb, near_duplicate_threshold=None).retrieve(TEXTS["C"], k=4)
    del kb
    search = ["search", "--kb", str(kb_path), "--config", str(cfg), "-k", "4"]
    assert main(search + [TEXTS["C"], "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in hits] == [h.id for h in expected]
    by_id = {h["id"]: h for h in hits}
    assert by_id["p1"]["parts"] == []
    [part] = by_id["d2"]["parts"]
    assert {k: v for k, v in part.items() if k != "score"} == {"index": 1, "kind": "text", "text": TEXTS["C"],
                                                               "image": None, "source_path": None}
    assert part["score"] == pytest.approx(next(h for h in expected if h.id == "d2").parts[0].score, abs=SCORE_ATOL)
    assert main(search + [TEXTS["C"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    d2 = next(i for i, line in enumerate(lines) if " d2 " in line)
    assert "part 1 (text)" in lines[d2 + 1] and TEXTS["C"] in lines[d2 + 1]
    # an image part is shown by its path as the manifest wrote it: d3's im1, the query image itself
    assert main(search + ["--image", str(src / "im1.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    d3 = next(i for i, line in enumerate(lines) if " d3 " in line)
    assert "part 2 (image)" in lines[d3 + 1] and lines[d3 + 1].rstrip().endswith("im1.png")


def test_service_and_client_carry_the_parts(kb, tiny_models_dir):
    pytest.importorskip("fastapi", reason='needs the serve extra: pip install "mmrag[serve]"')
    from mmrag.pipelines.client import Client
    from mmrag.pipelines.serve.app import create_app

    from tests.serve_fixtures import live_server, tiny_config

    expected = MultimodalRetriever(kb, near_duplicate_threshold=None).retrieve(TEXTS["C"], k=4)
    with live_server(create_app(tiny_config(tiny_models_dir, kb.path), kb_path=kb.path)) as url:
        hits = Client(url).retrieve(TEXTS["C"], k=4)
    assert [h.id for h in hits] == [h.id for h in expected]
    for got, want in zip(hits, expected):
        assert [(p.index, p.kind, p.text, p.source_path) for p in got.parts] == [
            (p.index, p.kind, p.text, p.source_path) for p in want.parts]
        np.testing.assert_allclose([p.score for p in got.parts], [p.score for p in want.parts], atol=SCORE_ATOL)


# ---------------------------------------------------------------------------- RAG-VQA
def test_vqa_prompt_holds_the_best_parts_in_document_order(kb, tiny_models_dir, src):
    from mmrag.generators import VLMAnswerer
    from mmrag.pipelines.dev.tiny_models import ensure_tiny_model
    from mmrag.pipelines.vqa import RAGVQAPipeline

    answerer = VLMAnswerer(ensure_tiny_model("llava", tiny_models_dir), max_new_tokens=2).warm_up()
    seen: list[list[Image.Image]] = []
    process = answerer._process

    def recording(texts, images, *args, **kwargs):  # the real processor; what it is given is kept
        seen.append(images[0])
        return process(texts, images, *args, **kwargs)

    answerer._process = recording
    pipe = RAGVQAPipeline(answerer, MultimodalRetriever(kb, near_duplicate_threshold=None, document_parts=3),
                          channels=["text_to_text"])
    query_image = _image(9)
    out = pipe("Where do foxes hunt voles?", image=query_image, k=1, where={"topic": "fox"})
    [hit] = out.references
    assert hit.id == "d1" and len(hit.parts) == 3
    _, order = _numpy_parts(kb, "d1", Query(text="Where do foxes hunt voles?", image=query_image))
    chosen = sorted(order[:3])  # the best three of d1's five parts, in document order
    assert sorted(p.index for p in hit.parts) == chosen
    part_texts = {0: TEXTS["A"], 2: TEXTS["B"]}
    part_images = {1: _image(0), 3: _image(1), 4: _image(2)}

    # the images given to the processor: the query image, then the chosen image parts in order
    given = seen[-1]
    assert [im.tobytes() for im in given] == [query_image.tobytes()] + [part_images[i].tobytes()
                                                                        for i in chosen if i in part_images]
    # the rendered prompt: each chosen passage labelled [1], each chosen image in its place, in order
    prompt = out.prompt
    token = answerer.processor.image_token
    start = prompt.index(token) + len(token)  # after the query image
    positions, cursor = [], start
    for i in chosen:
        needle = f"[1] {part_texts[i]}" if i in part_texts else token
        cursor = prompt.index(needle, cursor)
        positions.append(cursor)
        cursor += len(needle)
    assert positions == sorted(positions) and prompt.count(token) == 1 + sum(i in part_images for i in chosen)
    for i, text in part_texts.items():  # the part left out is not in the prompt
        assert (text in prompt) == (i in chosen)
    assert prompt.index("[1] ") > start and "Where do foxes hunt voles?" in prompt[positions[-1]:]
