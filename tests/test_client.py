"""`mmrag.client.Client` and `mmrag search|ask|draw --server` against a real uvicorn server on a
tiny-preset KB: each result equals what the library answers in process for the same inputs (the
independent reference), errors come back as the library's typed classes, and the CLI prints what
the local command prints."""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmrag.client import (APIError, AuthenticationError, Client, NotFoundError, PermissionDeniedError,
                          ServerUnreachableError)
from mmrag.errors import MMRAGError
from mmrag.pipelines import make_sample_set
from mmrag.pipelines.cli import _cmd_ask, _cmd_draw, _cmd_search, build_parser
from mmrag.pipelines.client_cli import add_server_arguments, ask_via_server, draw_via_server, search_via_server
from mmrag.pipelines.serve.app import create_app
from mmrag.pipelines.serve.keys import KeyStore
from mmrag.retrievers import (ConfigError, DualEncoder, Hits, KnowledgeBase, KnowledgeBaseError, ModelLoadError, Query,
                              Record)
from tests.serve_fixtures import build_kb, live_server, png_bytes, shape_image, tiny_config

QUESTION = "What is this shape called?"
QUERY_IMAGE = shape_image("red", "circle", shift=1)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kb_path(tmp_path_factory, tiny_clip) -> Path:
    return build_kb(tmp_path_factory.mktemp("client") / "kb", tiny_clip)


@pytest.fixture(scope="module")
def config(tiny_models_dir, tiny_clip, tiny_sd, kb_path) -> dict:
    return tiny_config(tiny_models_dir, kb_path)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, config) -> Path:
    path = tmp_path_factory.mktemp("client-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def keys(kb_path) -> dict[str, str]:
    store = KeyStore.for_kb(kb_path)
    return {scope: store.create(scope, name=f"client test {scope}")[1] for scope in ("read", "write")}


@pytest.fixture(scope="module")
def server(config, kb_path, keys) -> str:
    """Keys in the store, so auth is on. Nothing here writes to this KB: the equality tests need it as built."""
    with live_server(create_app(config, kb_path=kb_path)) as url:
        yield url


@pytest.fixture(scope="module")
def job_server(config, kb_path, keys) -> str:
    """request_timeout_s=0: every draw answers 202 with a job to follow."""
    with live_server(create_app(config, kb_path=kb_path, request_timeout_s=0)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server, keys) -> Client:
    with Client(server, api_key=keys["read"], timeout=600) as c:  # a bound on a hang
        yield c


@pytest.fixture(scope="module")
def query_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("client-query") / "query.png"
    QUERY_IMAGE.save(path)
    return path


def same_hits(got: Hits, expected: Hits, server: str) -> None:
    assert isinstance(got, Hits) and got.requested == expected.requested and got.collapsed == expected.collapsed
    assert [h.id for h in got] == [h.id for h in expected]
    assert [h.rank for h in got] == [h.rank for h in expected]
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], rel=1e-6)
    for g, e in zip(got, expected):
        assert g.scores == pytest.approx(e.scores, rel=1e-6)
        assert (g.record.id, g.record.text, g.record.metadata, g.record.source_path) == (
            e.record.id, e.record.text, e.record.metadata, e.record.source_path)
        assert g.record.image == f"{server}/v1/records/{g.id}/image"


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------- retrieve
@pytest.mark.parametrize("name", ["text", "pil", "path", "composed", "filtered", "channels", "record_id", "fusion",
                                  "hubness", "composed_method"])
def test_retrieve_equals_the_in_process_pipeline(client, search_ref, server, kb_path, query_png, name):
    stored = KnowledgeBase.open(kb_path).get("r2")[0].image
    cases = {  # name -> (client call kwargs, in-process query, k, where, overrides)
        "text": ({"query": "a red circle"}, "a red circle", 4, None, {}),
        "pil": ({"query": QUERY_IMAGE}, QUERY_IMAGE, 3, None, {}),
        "path": ({"query": str(query_png)}, str(query_png), 3, None, {}),
        "composed": ({"query": Query(text="but blue", image=query_png)}, Query(text="but blue", image=QUERY_IMAGE),
                     3, None, {}),
        "filtered": ({"query": "a shape"}, "a shape", 5, {"shape": "circle"}, {}),
        "channels": ({"query": "a star"}, "a star", 3, None, {"channels": ("text_to_text", "lexical")}),
        "record_id": ({"record_id": "r2"}, Query(image=stored), 3, None, {}),
        "fusion": ({"query": "a red circle"}, "a red circle", 4, None, {"fusion": "weighted"}),
        "hubness": ({"query": "a red circle"}, "a red circle", 4, None, {"hubness": "qbnorm"}),
        "composed_method": ({"query": Query(text="but blue", image=QUERY_IMAGE, reference_text="a red circle")},
                            Query(text="but blue", image=QUERY_IMAGE, reference_text="a red circle"), 3, None,
                            {"composed_method": "pdv"}),
    }
    kwargs, query, k, where, overrides = cases[name]
    timings: dict[str, float] = {}
    got = client.retrieve(k=k, where=where, timings=timings, **kwargs, **overrides)
    same_hits(got, search_ref(query, k=k, where=where, **overrides), server)
    assert "retrieve" in timings
    if name in ("fusion", "hubness", "composed_method"):  # the override reached the server's retriever
        default = client.retrieve(k=k, where=where, **kwargs)
        assert [h.score for h in got] != pytest.approx([h.score for h in default], rel=1e-3)
    if where is not None:
        assert got and all(h.record.metadata["shape"] == "circle" for h in got)


def test_image_is_the_stored_picture(client, kb_path):
    hit = client.retrieve("a red circle", k=1)[0]
    stored = KnowledgeBase.open(kb_path).get(hit.id)[0]
    assert np.array_equal(pixels(client.image(hit)), pixels(stored.open_image()))
    assert client.image(hit.id).size == client.image(hit.record).size
    assert client.image_bytes(hit) == Path(stored.image).read_bytes()


# ---------------------------------------------------------------------------- ask
def test_ask_equals_the_in_process_pipeline_and_the_stream_joins_to_it(client, vqa_ref, server):
    expected = vqa_ref(QUESTION, image=QUERY_IMAGE, k=2)  # greedy decoding: deterministic
    out = client.ask(QUESTION, image=QUERY_IMAGE, k=2)
    assert out.answer == expected.answer and out.no_retrieval == expected.no_retrieval
    assert [h.id for h in out.references] == [h.id for h in expected.references]
    assert [h.score for h in out.references] == pytest.approx([h.score for h in expected.references], rel=1e-6)
    assert [h.id for h in out.cited] == [h.id for h in expected.cited]
    assert all(h.record.image == f"{server}/v1/records/{h.id}/image" for h in out.references)
    for g, e in zip(out.references, expected.references):
        assert (g.rank, g.record.metadata, g.record.source_path) == (e.rank, e.record.metadata, e.record.source_path)
        assert g.scores == pytest.approx(e.scores, rel=1e-6)
    assert out.prompt == expected.prompt and "<image>" in out.prompt

    stream = client.ask(QUESTION, image=QUERY_IMAGE, k=2, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 1 and "".join(chunks) == expected.answer
    assert stream.result.answer == expected.answer
    assert [h.id for h in stream.result.cited] == [h.id for h in expected.cited]


# The tiny VLM's byte-level tokens split a character here: the library's stream yields "É" where its
# final decode has U+FFFD (found by tests/test_serve_load.py).
SPLIT_CHARACTER = ("Which colour?", shape_image("red", "circle"), 1)


def test_the_stream_carries_the_library_s_chunks_exactly(client, vqa_ref):
    question, image, k = SPLIT_CHARACTER
    expected = vqa_ref(question, image=image, k=k, stream=True)
    expected_chunks = list(expected)
    stream = client.ask(question, image=image, k=k, stream=True)
    assert list(stream) == expected_chunks  # the transport adds, drops and re-decodes nothing
    assert stream.result.answer == expected.result.answer


def test_the_library_s_stream_joins_to_its_answer_even_when_a_character_is_split(vqa_ref):
    question, image, k = SPLIT_CHARACTER
    stream = vqa_ref(question, image=image, k=k, stream=True)
    assert "".join(stream) == stream.result.answer


def test_ask_multiple_choice_and_record_id(client, vqa_ref, kb_path):
    choices = ["circle", "square", "star"]
    image = KnowledgeBase.open(kb_path).get("r0")[0].image
    expected = vqa_ref("Which shape?", image=image, choices=choices)
    out = client.ask("Which shape?", record_id="r0", choices=choices)
    assert out.choice == expected.choice
    assert out.choice_scores == pytest.approx(expected.choice_scores, rel=1e-5)
    with pytest.raises(ConfigError, match="choices") as error:  # the library refuses stream + choices
        client.ask("q", choices=choices, stream=True)
    assert error.value.status == 400 and error.value.param == "choices"


# ---------------------------------------------------------------------------- draw
def test_draw_equals_the_in_process_drawing(client, draw_ref):
    expected = draw_ref("a red circle", seed=0)
    out = client.draw("a red circle", seed=0)
    assert np.array_equal(pixels(out.images[0]), pixels(expected.images[0]))
    assert [h.id for h in out.references] == [h.id for h in expected.references]
    assert out.guidance == expected.guidance and "generate" in out.timings

    given = client.draw("a thing", seed=1, references=[QUERY_IMAGE])
    expected = draw_ref("a thing", seed=1, references=[QUERY_IMAGE])
    assert np.array_equal(pixels(given.images[0]), pixels(expected.images[0]))
    assert [h.id for h in given.references] == ["given-1"]
    assert np.array_equal(pixels(client.image(given.references[0])), pixels(QUERY_IMAGE))


def test_a_draw_that_becomes_a_job_is_followed_to_the_end(job_server, keys, draw_ref):
    steps = []
    with Client(job_server, api_key=keys["read"], timeout=600) as c:
        out = c.draw("a red circle", seed=0)  # 202, then polled
        assert np.array_equal(pixels(out.images[0]), pixels(draw_ref("a red circle", seed=0).images[0]))
        c.draw("a red circle", seed=0, progress=lambda step, of: steps.append((step, of)))
        assert steps and all(1 <= s <= of == 2 for s, of in steps)  # draw.num_inference_steps of the test config
        with pytest.raises(ConfigError) as error:  # the library's refusal, inside the job
            c.draw("x", where={"n": {"$gt": "not a number"}})
        assert error.value.param == "where"
        with pytest.raises(NotFoundError):
            c.job("no-such-job")


# ---------------------------------------------------------------------------- errors
def test_bad_input_raises_the_library_s_typed_errors(client):
    with pytest.raises(ConfigError, match="`k` must be a positive integer"):
        client.retrieve("x", k=0)
    with pytest.raises(ConfigError, match="not a readable image"):  # checked here, before any upload
        client.retrieve(Query(image=b"just some text"))
    with pytest.raises(ConfigError) as error:  # checked by the server
        client.retrieve("x", where={"a": {"$gt": "b"}})
    assert (error.value.status, error.value.type, error.value.param) == (400, "invalid_request", "where")
    with pytest.raises(ConfigError) as error:
        client.retrieve("x", channels=["no_such_channel"])
    assert error.value.status == 422
    with pytest.raises(ConfigError, match="`mmr_lambda` cannot be set per request"):
        client.retrieve("x", mmr_lambda=0.5)
    with pytest.raises(ConfigError) as error:  # a setting the request takes, checked by the server's schema
        client.retrieve("x", fusion="nope")
    assert (error.value.status, error.value.param) == (422, "fusion")
    with pytest.raises(NotFoundError, match="nope") as error:
        client.retrieve(record_id="nope")
    assert isinstance(error.value, APIError) and error.value.status == 404
    with pytest.raises(ConfigError, match="`num_inference_steps`"):
        client.draw("x", num_inference_steps=0)
    with pytest.raises(ConfigError, match="guidance"):
        client.draw("x", guidance="no-such-guidance")
    with pytest.raises(ConfigError, match="gold references"):
        client.ask("q", references=[])
    with pytest.raises(ConfigError, match="`url`"):
        Client("127.0.0.1:8000")


def test_auth_errors_are_api_errors(server, keys, monkeypatch):
    monkeypatch.delenv("MMRAG_API_KEY", raising=False)
    with Client(server) as anonymous, pytest.raises(AuthenticationError, match="--api-key") as error:
        anonymous.retrieve("x")
    assert isinstance(error.value, APIError) and isinstance(error.value, MMRAGError) and error.value.status == 401
    with Client(server, api_key="mmrag_deadbeef_" + "A" * 43) as wrong, pytest.raises(AuthenticationError):
        wrong.info()
    monkeypatch.setenv("MMRAG_API_KEY", keys["read"])  # the default key, as the CLI's --api-key
    with Client(server) as reader:
        assert reader.count() == 6
        with pytest.raises(PermissionDeniedError, match="'write'") as error:
            reader.add([Record(text="a blue star", image=shape_image("blue", "star"))])
        assert error.value.status == 403 and error.value.type == "permission_denied"
        assert reader.count() == 6


def test_an_unreachable_server_is_one_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with Client(f"http://127.0.0.1:{port}") as c, pytest.raises(ServerUnreachableError, match="mmrag serve"):
        c.health()


def test_a_model_that_cannot_load_is_model_load_error(config, kb_path, keys, tmp_path):
    broken = {**config, "vlm": {**config["vlm"], "model": str(tmp_path / "no-such-model")}}
    with live_server(create_app(broken, kb_path=kb_path)) as url, Client(url, api_key=keys["read"]) as c:
        with pytest.raises(ModelLoadError) as error:
            c.ask(QUESTION, image=QUERY_IMAGE)
        assert error.value.status == 503 and error.value.type == "model_unavailable"


# ---------------------------------------------------------------------------- records
@pytest.fixture(scope="module")
def writable(tmp_path_factory, tiny_models_dir, tiny_clip, tiny_sd):
    """A KB of its own (the equality tests need theirs unchanged) and a server on it, with a write key."""
    path = build_kb(tmp_path_factory.mktemp("client-write") / "kb", tiny_clip)
    key = KeyStore.for_kb(path).create("write", name="writer")[1]
    with live_server(create_app(tiny_config(tiny_models_dir, path), kb_path=path)) as url:
        yield url, key, path


def upload_records(tmp_path: Path) -> list[Record]:
    path = tmp_path / "green.png"
    shape_image("green", "star", shift=3).save(path)
    jpeg = io.BytesIO()
    shape_image("orange", "square", shift=4).save(jpeg, format="JPEG")
    return [Record(text="an uploaded blue star", image=shape_image("blue", "star", shift=5), metadata={"up": 1}),
            Record(text="an uploaded green star", image=path, source_path="green.png"),
            Record(text="an uploaded orange square", image=jpeg.getvalue(), id="mine/1"),
            Record(text="   ", image=shape_image("red", "star")),  # rejected: empty text
            Record(text="not an image", image=b"GIF89a?")]  # rejected: truncated


def test_add_get_delete_equal_the_in_process_kb(writable, tmp_path, tiny_clip):
    url, key, path = writable
    records = upload_records(tmp_path)
    reference = KnowledgeBase.open(tmp_path / "ref-kb", DualEncoder(tiny_clip)).add(upload_records(tmp_path))
    with Client(url, api_key=key, max_request_bytes=1) as c:  # one record per request: refs remapped
        before = c.count()
        report = c.add(records)
        assert (report.added, report.existing, report.seen) == (3, 0, 5)
        assert (report.added, report.existing, report.seen) == (reference.added, reference.existing, reference.seen)
        assert [(r.ref, r.reason) for r in report.rejected] == [(r.ref, r.reason) for r in reference.rejected]
        assert c.count() == before + 3
        again = c.add(records)
        assert (again.added, again.existing) == (0, 3)  # ids derived from the content, as in process

    ref_kb = KnowledgeBase.open(tmp_path / "ref-kb")
    ids = sorted(ref_kb.vectors.all_ids())
    with Client(url, api_key=key) as c:
        got = c.get([ids[1], "no-such-id", ids[0]])
        assert [r.id for r in got] == [ids[1], ids[0]]  # the given order; unknown ids left out
        for record in got:
            expected = ref_kb.get(record.id)[0]
            assert (record.text, record.metadata, record.source_path) == (expected.text, expected.metadata,
                                                                          expected.source_path)
            assert c.image_bytes(record) == Path(expected.image).read_bytes()  # the same stored bytes
        listed = {r.id for r in c.records()}
        assert set(ids) <= listed and len(listed) == c.count()
        assert c.delete([ids[0], "no-such-id"]) == 1
        assert c.get(ids[0]) == [] and c.count() == before + 2


def test_ingest_a_folder_equals_the_in_process_ingest(writable, tmp_path, tiny_clip):
    url, key, _ = writable
    folder = make_sample_set(tmp_path / "sample", n_entities=3)
    (folder / "orphan.png").write_bytes(png_bytes(shape_image("black", "circle")))  # no sidecar: rejected
    expected = KnowledgeBase.open(tmp_path / "ref-kb", DualEncoder(tiny_clip)).ingest(folder)
    with Client(url, api_key=key) as c:
        report = c.ingest(folder)
        assert (report.added, report.seen) == (expected.added, expected.seen)
        assert [(r.ref, r.reason) for r in report.rejected] == [(r.ref, r.reason) for r in expected.rejected]
        ids = sorted(KnowledgeBase.open(tmp_path / "ref-kb").vectors.all_ids())
        assert [r.id for r in c.get(ids)] == ids
        in_process = KnowledgeBase.open(tmp_path / "ref-kb").get(ids)
        assert {r.source_path for r in c.get(ids)} == {r.source_path for r in in_process}


def test_a_held_writer_lock_is_knowledge_base_error(writable):
    url, key, path = writable
    kb = KnowledgeBase.open(path)
    with kb.journal.write_lock(), Client(url, api_key=key) as c:
        with pytest.raises(KnowledgeBaseError, match="being written") as error:
            c.add([Record(text="a purple ring", image=shape_image("purple", "circle", shift=9))])
        assert error.value.status == 409


# ---------------------------------------------------------------------------- the CLI
def cli_args(argv: list[str]) -> argparse.Namespace:
    """``mmrag ARGV`` parsed by the real parser; until pipelines/cli.py wires --server/--api-key,
    they are added here the way the wiring adds them (and --kb made optional)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[argv[0]]
    if not any("--server" in a.option_strings for a in command._actions):
        add_server_arguments(command)
        for action in command._actions:
            if "--kb" in action.option_strings:
                action.required = False
    return parser.parse_args(argv)


def test_search_via_server_prints_what_the_local_command_prints(server, keys, kb_path, config_file, capsys, tmp_path):
    local = ["--kb", str(kb_path), "--config", str(config_file)]
    remote = ["--server", server, "--api-key", keys["read"]]
    for query in (["a red circle", "-k", "4"], ["red", "--image", str(tmp_path / "q.png"), "-k", "3"],
                  ["a shape", "--where", '{"shape": "square"}']):
        QUERY_IMAGE.save(tmp_path / "q.png")
        assert _cmd_search(cli_args(["search", *query, *local])) == 0
        expected = capsys.readouterr().out
        assert search_via_server(cli_args(["search", *query, *remote])) == 0
        assert capsys.readouterr().out == expected and expected.count("\n") >= 1

    _cmd_search(cli_args(["search", "a red circle", "--json", "--html", str(tmp_path / "local.html"), *local]))
    expected = json.loads(capsys.readouterr().out)
    search_via_server(cli_args(["search", "a red circle", "--json", "--html", str(tmp_path / "remote.html"), *remote]))
    got = json.loads(capsys.readouterr().out)
    assert [h["image"] for h in got] == [f"{server}/v1/records/{h['id']}/image" for h in expected]  # a URL, not a path
    assert [{k: v for k, v in h.items() if k != "image"} for h in got] == [
        {k: v for k, v in h.items() if k != "image"} for h in expected]
    assert (tmp_path / "remote.html").read_text() == (tmp_path / "local.html").read_text()  # same thumbnails

    _cmd_search(cli_args(["search", "a red circle", "--json", "--fusion", "weighted", "--hubness", "qbnorm", *local]))
    expected = json.loads(capsys.readouterr().out)
    search_via_server(cli_args(["search", "a red circle", "--json", "--fusion", "weighted", "--hubness", "qbnorm",
                                *remote]))
    got = json.loads(capsys.readouterr().out)  # the settings travel with the request
    assert [(h["id"], h["score"]) for h in got] == [(h["id"], h["score"]) for h in expected]
    with pytest.raises(ConfigError, match="`--rerank` cannot be used with `--server`"):
        search_via_server(cli_args(["search", "x", "--rerank", "dual_encoder", *remote]))
    with pytest.raises(ConfigError, match="Give a query"):
        search_via_server(cli_args(["search", *remote]))


def test_ask_via_server_prints_what_the_local_command_prints(server, keys, kb_path, config_file, capsys, query_png):
    local = ["--kb", str(kb_path), "--config", str(config_file)]
    remote = ["--server", server, "--api-key", keys["read"]]
    for question in ([QUESTION, "--image", str(query_png), "-k", "2"],
                     ["Which shape?", "--image", str(query_png), "--choices", "circle;square;star"]):
        assert _cmd_ask(cli_args(["ask", *question, *local])) == 0
        expected = capsys.readouterr().out
        assert ask_via_server(cli_args(["ask", *question, *remote])) == 0
        assert capsys.readouterr().out == expected
    _cmd_ask(cli_args(["ask", QUESTION, "--image", str(query_png), "--json", *local]))
    expected = json.loads(capsys.readouterr().out)
    ask_via_server(cli_args(["ask", QUESTION, "--image", str(query_png), "--json", *remote]))
    got = json.loads(capsys.readouterr().out)
    for d in (got, expected):
        d.pop("timings")
        for ref in d["references"]:
            ref.pop("image")
    assert got == expected


def test_draw_via_server_writes_and_prints_what_the_local_command_does(server, keys, kb_path, config_file, capsys,
                                                                       tmp_path):
    common = ["draw", "a red circle", "--seed", "0"]
    assert _cmd_draw(cli_args([*common, "--kb", str(kb_path), "--config", str(config_file),
                               "-o", str(tmp_path / "local" / "out.png")])) == 0
    expected = capsys.readouterr().out
    assert draw_via_server(cli_args([*common, "--server", server, "--api-key", keys["read"],
                                     "-o", str(tmp_path / "remote" / "out.png")])) == 0
    assert capsys.readouterr().out == expected.replace(str(tmp_path / "local"), str(tmp_path / "remote"))
    for name in ("out.png", "out.sheet.png"):
        remote, local = Image.open(tmp_path / "remote" / name), Image.open(tmp_path / "local" / name)
        assert np.array_equal(pixels(remote), pixels(local))


def test_the_server_path_loads_no_model_in_the_cli_process(server, keys):
    """`search --server` and `ask --server` in a fresh process: no modeling code of transformers
    (or diffusers) is imported beyond what the CLI imports to parse its arguments."""
    code = ("import argparse, sys\n"
            "from mmrag.pipelines.cli import _quiet_libraries, build_parser\n"
            "from mmrag.pipelines.client_cli import add_server_arguments, ask_via_server, search_via_server\n"
            + inspect.getsource(cli_args) +
            "build_parser(); _quiet_libraries()  # what `mmrag` imports before it runs a command\n"
            "before = set(sys.modules)\n"
            f"remote = ['--server', {server!r}, '--api-key', {keys['read']!r}]\n"
            "search_via_server(cli_args(['search', 'a red circle', *remote]))\n"
            "ask_via_server(cli_args(['ask', 'q', '--json', *remote]))\n"
            "heavy = [m for m in sys.modules if m not in before and (m.startswith('diffusers') or 'modeling' in m)]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


def test_the_cli_under_server_imports_no_model_stack():
    # What `mmrag search|ask|draw --server` loads: the parser, the client, the output classes. The
    # command's speed (benchmarks/serve.py: >= 10x a cold search) rests on none of them importing torch.
    code = ("import sys; from mmrag.pipelines.cli import build_parser; build_parser(); import mmrag.client; "
            "from mmrag.retrievers import Hit, Hits, Query, Record, ConfigError; "
            "from mmrag.pipelines.outputs import ImageOutput, VQAOutput, VQAStream; "
            "print(sorted(m for m in ('torch', 'chromadb', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
