"""`mmrag serve` against a real uvicorn server on a tiny-preset KB: every endpoint answers what the
library answers in process for the same inputs (the independent reference), auth, limits, CORS,
the CLI's refusals, and the OpenAI endpoint driven by the official `openai` client."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

for _module in ("fastapi", "uvicorn", "sse_starlette", "httpx", "openai"):  # the dev extra
    pytest.importorskip(_module, reason='needs the serve and dev extras: pip install "mmrag[dev]"')

import httpx  # noqa: E402
import openai  # noqa: E402

import mmrag  # noqa: E402
from mmrag.errors import MMRAGError  # noqa: E402
from mmrag.pipelines.cli import _common  # noqa: E402
from mmrag.pipelines.serve import require_serve_extra  # noqa: E402
from mmrag.pipelines.serve.app import create_app  # noqa: E402
from mmrag.pipelines.serve.commands import add_keys_parser, add_serve_parser, cmd_keys, cmd_serve, is_loopback  # noqa: E402
from mmrag.pipelines.serve.keys import SCOPES, KeyStore  # noqa: E402
from mmrag.retrievers import DualEncoder, KnowledgeBase, MissingExtraError, Query  # noqa: E402
from tests.serve_fixtures import (SHAPES, b64, bomb_header_png, build_kb, live_server, png_bytes, shape_image,  # noqa: E402
                                  sse_events, tiny_config)

ALLOWED_ORIGIN = "http://app.example"
MAX_UPLOAD = 1 * 2**20
QUESTION = "What is this shape called?"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kb_path(tmp_path_factory, tiny_clip):
    return build_kb(tmp_path_factory.mktemp("serve") / "kb", tiny_clip)


@pytest.fixture(scope="module")
def config(tiny_models_dir, tiny_clip, tiny_sd, kb_path) -> dict:
    return tiny_config(tiny_models_dir, kb_path)


@pytest.fixture(scope="module")
def keys(kb_path) -> dict[str, str]:
    store = KeyStore.for_kb(kb_path)
    return {scope: store.create(scope, name=f"test {scope}")[1] for scope in SCOPES}


@pytest.fixture(scope="module")
def server(config, kb_path, keys) -> str:
    """Keys in the store (auth on), one allowed origin, a 1 MiB body limit."""
    app = create_app(config, kb_path=kb_path, allow_origins=[ALLOWED_ORIGIN], max_upload_bytes=MAX_UPLOAD)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def job_server(config, kb_path) -> str:
    """request_timeout_s=0: every draw answers 202 with a job; no CORS origins (the default); the same
    KB, so the same keys."""
    with live_server(create_app(config, kb_path=kb_path, request_timeout_s=0)) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(server, keys):
    with httpx.Client(base_url=server, headers=bearer(keys["write"]), timeout=600) as c:  # a bound on a hang
        yield c


QUERY_IMAGE = shape_image("red", "circle", shift=1)


def assert_envelope(response: httpx.Response, status: int, kind: str, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"type", "message", "param"} <= set(body["error"])
    assert body["error"]["type"] == kind and body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param
    return body["error"]


def same_hits(served: list[dict], hits) -> None:
    assert [h["id"] for h in served] == [h.id for h in hits]
    assert [h["rank"] for h in served] == [h.rank for h in hits]
    assert [h["score"] for h in served] == pytest.approx([h.score for h in hits], rel=1e-6)
    for s, h in zip(served, hits, strict=True):
        assert s["scores"] == pytest.approx(h.scores, rel=1e-6)
        assert (s["text"], s["metadata"], s["source_path"]) == (h.record.text, h.record.metadata, h.record.source_path)
        assert s["image_url"] == f"/v1/records/{h.id}/image"


# ---------------------------------------------------------------------------- service endpoints
def test_healthz_is_open_and_the_page_is_served(server):
    r = httpx.get(f"{server}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "version": mmrag.__version__}
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()  # the page (static/index.html) is built separately


def test_kb_info_is_the_kb_s_own(client, kb_path):
    info = client.get("/v1/kb").json()
    expected = KnowledgeBase.open(kb_path).info()
    assert info["count"] == expected["count"] == len(SHAPES)
    assert {k: info[k] for k in ("path", "embedder", "dim", "schema_version")} == {
        k: expected[k] for k in ("path", "embedder", "dim", "schema_version")}


def test_openapi_schema_declares_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/search", "/v1/ask", "/v1/draw", "/v1/jobs/{job_id}", "/v1/records", "/v1/records/{record_id}",
                 "/v1/records/{record_id}/image", "/v1/kb", "/v1/chat/completions", "/healthz"):
        assert path in schema["paths"], path
    search = schema["paths"]["/v1/search"]["post"]
    assert set(search["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert search["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SearchResponse")
    assert search["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    assert "SearchForm" in schema["components"]["schemas"] and "HTTPBearer" in schema["components"]["securitySchemes"]


# ---------------------------------------------------------------------------- search
@pytest.mark.parametrize("name, body, query, k, where, channels", [
    ("text", {"text": "a red circle"}, Query(text="a red circle"), 4, None, None),
    ("image", {"image": b64(png_bytes(QUERY_IMAGE))}, Query(image=QUERY_IMAGE), 3, None, None),
    ("composed", {"text": "but blue", "image": b64(png_bytes(QUERY_IMAGE))}, Query(text="but blue", image=QUERY_IMAGE),
     3, None, None),
    ("filtered", {"text": "a shape"}, Query(text="a shape"), 5, {"shape": "circle"}, None),
    ("channels", {"text": "a star"}, Query(text="a star"), 3, None, ["text_to_text", "lexical"]),
], ids=["text", "image", "composed", "filtered", "channels"])
def test_search_equals_the_in_process_pipeline(client, search_ref, name, body, query, k, where, channels):
    r = client.post("/v1/search", json={**body, "k": k, "where": where, "channels": channels})
    assert r.status_code == 200, r.text
    served = r.json()
    expected = search_ref(query, k=k, where=where, **({"channels": tuple(channels)} if channels else {}))
    same_hits(served["hits"], expected)
    assert served["collapsed"] == expected.collapsed
    assert "retrieve" in served["timings"]
    if where is not None:
        assert served["hits"] and all(h["metadata"]["shape"] == "circle" for h in served["hits"])


def test_search_multipart_and_record_id_equal_the_in_process_pipeline(client, search_ref, kb_path):
    form = client.post("/v1/search", data={"k": "3", "text": "red"},
                       files={"image": ("q.png", png_bytes(QUERY_IMAGE), "image/png")})
    assert form.status_code == 200, form.text
    same_hits(form.json()["hits"], search_ref(Query(text="red", image=QUERY_IMAGE), k=3))

    stored = KnowledgeBase.open(kb_path).get("r2")[0]
    by_id = client.post("/v1/search", json={"record_id": "r2", "k": 3})
    assert by_id.status_code == 200, by_id.text
    same_hits(by_id.json()["hits"], search_ref(Query(image=stored.image), k=3))
    own = client.post("/v1/search", json={"record_id": "r2", "k": 1, "channels": ["image_to_image"]}).json()
    assert own["hits"][0]["id"] == "r2" and own["hits"][0]["scores"]["image_to_image"] == pytest.approx(1.0, abs=1e-5)

    assert_envelope(client.post("/v1/search", json={"record_id": "nope"}), 404, "not_found", "record_id")
    assert_envelope(client.post("/v1/search", json={"record_id": "r1", "image": b64(png_bytes(QUERY_IMAGE))}),
                    400, "invalid_request", "record_id")


def test_concurrent_searches_each_get_their_own_answer(server, keys, search_ref):
    """Many requests at once (one embedder, one retriever, the model lock) each get the answer the
    in-process pipeline gives for their own query: no request sees another's state."""
    texts = [f"a {colour} {shape}" for colour, shape in SHAPES] * 2

    def one(text: str) -> tuple[str, dict]:
        r = httpx.post(f"{server}/v1/search", json={"text": text, "k": 3}, headers=bearer(keys["read"]), timeout=600)
        assert r.status_code == 200, r.text
        return text, r.json()

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, texts))
    for text, served in answers:
        same_hits(served["hits"], search_ref(Query(text=text), k=3))


def test_search_request_errors_have_the_envelope(client):
    assert_envelope(client.post("/v1/search", json={}), 400, "invalid_request")  # the library's "query is empty"
    assert_envelope(client.post("/v1/search", json={"text": "x", "k": 0}), 422, "invalid_request", "k")
    assert_envelope(client.post("/v1/search", json={"text": "x", "kk": 1}), 422, "invalid_request", "kk")
    assert_envelope(client.post("/v1/search", json={"text": "x", "where": {"a": {"$gt": "b"}}}), 400,
                    "invalid_request", "where")
    assert_envelope(client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}),
                    400, "invalid_request")
    assert_envelope(client.post("/v1/search", content=b"text", headers={"content-type": "text/plain"}),
                    415, "unsupported_media_type")
    assert_envelope(client.get("/v1/nothing-here"), 404, "not_found")


# ---------------------------------------------------------------------------- ask
def test_ask_equals_the_in_process_pipeline_and_the_stream_joins_to_it(client, vqa_ref):
    body = {"question": QUESTION, "image": b64(png_bytes(QUERY_IMAGE)), "k": 2}
    r = client.post("/v1/ask", json=body)
    assert r.status_code == 200, r.text
    served = r.json()
    expected = vqa_ref(QUESTION, image=QUERY_IMAGE, k=2)  # greedy decoding: deterministic
    assert served["answer"] == expected.answer
    assert [ref["id"] for ref in served["references"]] == [h.id for h in expected.references]
    assert served["cited"] == [h.id for h in expected.cited]
    assert all(ref["image_url"] == f"/v1/records/{ref['id']}/image" for ref in served["references"])

    streamed = client.post("/v1/ask", json={**body, "stream": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"} and len(kinds) > 1
    tokens = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    done = json.loads(events[-1][1])
    assert tokens == served["answer"] == done["answer"]
    assert done["references"] == served["references"] and done["cited"] == served["cited"]


def test_ask_multiple_choice_and_errors(client, vqa_ref, kb_path):
    choices = ["circle", "square", "star"]
    r = client.post("/v1/ask", json={"question": "Which shape?", "record_id": "r0", "choices": choices})
    assert r.status_code == 200, r.text
    image = KnowledgeBase.open(kb_path).get("r0")[0].image
    expected = vqa_ref("Which shape?", image=image, choices=choices)
    assert r.json()["choice"] == expected.choice
    assert r.json()["choice_scores"] == pytest.approx(expected.choice_scores, rel=1e-5)
    # the library's refusal, before any stream starts: a plain HTTP error
    assert_envelope(client.post("/v1/ask", json={"question": "q", "choices": choices, "stream": True}), 400,
                    "invalid_request", "choices")
    assert_envelope(client.post("/v1/ask", json={"question": " "}), 400, "invalid_request", "question")


# ---------------------------------------------------------------------------- draw and jobs
def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_draw_equals_the_in_process_drawing(client, draw_ref):
    r = client.post("/v1/draw", json={"prompt": "a red circle", "seed": 0})
    assert r.status_code == 200, r.text
    served = r.json()
    expected = draw_ref("a red circle", seed=0)
    assert np.array_equal(decode_png(base64.b64decode(served["images"][0])), np.asarray(expected.images[0]))
    assert [ref["id"] for ref in served["references"]] == [h.id for h in expected.references]
    assert served["guidance"] == expected.guidance and "generate" in served["timings"]

    for kwargs in ({"headers": {"Accept": "image/png"}}, {"params": {"format": "png"}}):
        png = client.post("/v1/draw", json={"prompt": "a red circle", "seed": 0}, **kwargs)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert np.array_equal(decode_png(png.content), np.asarray(expected.images[0]))

    given = client.post("/v1/draw", json={"prompt": "a thing", "seed": 1, "references": [b64(png_bytes(QUERY_IMAGE))]})
    assert given.status_code == 200, given.text
    assert [ref["image_url"] for ref in given.json()["references"]] == [None]
    expected = draw_ref("a thing", seed=1, references=[QUERY_IMAGE])
    assert np.array_equal(decode_png(base64.b64decode(given.json()["images"][0])), np.asarray(expected.images[0]))
    assert_envelope(client.post("/v1/draw", json={"prompt": "x", "references": ["%%%"]}), 400, "invalid_request",
                    "references[0]")


def poll(c: httpx.Client, url: str) -> dict:
    for _ in range(3000):  # a generous bound on a hang (the tiny draw takes a second or two)
        status = c.get(url).json()
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {url} never finished")


def test_a_draw_past_the_request_timeout_becomes_a_job(job_server, draw_ref, client, keys):
    with httpx.Client(base_url=job_server, headers=bearer(keys["read"]), timeout=600) as c:
        r = c.post("/v1/draw", json={"prompt": "a red circle", "seed": 0})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["status_url"] == f"/v1/jobs/{accepted['job']}" == r.headers["location"]
        status = poll(c, accepted["status_url"])
        assert status["status"] == "done" and status["error"] is None, status
        assert status["progress"] == {"step": 2, "of": 2}  # draw.num_inference_steps of the test config
        expected = draw_ref("a red circle", seed=0)
        drawn = decode_png(base64.b64decode(status["result"]["images"][0]))
        assert np.array_equal(drawn, np.asarray(expected.images[0]))

        # a request the schema lets through and the library refuses, inside the job
        failed = c.post("/v1/draw", json={"prompt": "x", "where": {"n": {"$gt": "not a number"}}})
        assert failed.status_code == 202
        status = poll(c, failed.json()["status_url"])
        assert status["status"] == "failed" and status["result"] is None, status
        assert status["error"]["type"] == "invalid_request" and status["error"]["param"] == "where", status
        assert_envelope(c.get("/v1/jobs/no-such-job"), 404, "not_found", "job_id")
    # RFC 7240 on a server that would wait: answer at once
    r = client.post("/v1/draw", json={"prompt": "a red circle", "seed": 0}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202 and poll(client, r.json()["status_url"])["status"] == "done"


# ---------------------------------------------------------------------------- auth
def test_auth_matrix(server, keys, kb_path):
    url = server
    get = lambda key=None, path="/v1/kb": httpx.get(url + path, headers=bearer(key) if key else {})
    r0 = b64(png_bytes(shape_image("red", "circle")))
    upload = {"records": [{"id": "r0", "text": "a red circle, number 0", "image": r0,
                           "metadata": {"shape": "circle", "colour": "red", "n": 0}}]}  # r0 as it is: nothing changes
    post = lambda key: httpx.post(url + "/v1/records", json=upload, headers=bearer(key), timeout=600)

    no_key = get()
    assert_envelope(no_key, 401, "authentication_error")
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert_envelope(get("mmrag_deadbeef_" + "A" * 43), 401, "authentication_error")  # well-formed, unknown
    assert_envelope(get(keys["read"][:-1] + ("A" if keys["read"][-1] != "A" else "B")), 401, "authentication_error")
    assert_envelope(get("not-a-key"), 401, "authentication_error")
    for scope in SCOPES:
        assert get(keys[scope]).status_code == 200
    assert_envelope(post(keys["read"]), 403, "permission_denied")
    assert_envelope(httpx.delete(url + "/v1/records/r0", headers=bearer(keys["read"])), 403, "permission_denied")
    assert post(keys["write"]).status_code == 200 and post(keys["admin"]).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200

    store = KeyStore.for_kb(kb_path)
    key, token = store.create("read", name="to revoke")
    assert get(token).status_code == 200
    store.revoke(key.id)  # another process (mmrag keys revoke) would do the same to the file
    assert_envelope(get(token), 401, "authentication_error")


def test_key_store_keeps_hashes_only_and_the_cli_shows_keys_once(tmp_path, tiny_clip, capsys):
    KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    parser = argparse.ArgumentParser()
    add_keys_parser(parser.add_subparsers(dest="command"), [_common(models=False)])
    run = lambda *argv: cmd_keys(parser.parse_args(["keys", *argv, "--kb", str(tmp_path / "kb")]))

    assert run("create", "--scope", "write", "--name", "ci", "--json") == 0
    created = json.loads(capsys.readouterr().out)
    secret = created["key"].split("_", 2)[2]
    stored = (tmp_path / "kb" / "keys.json").read_text()
    assert secret not in stored and created["id"] in stored
    assert (tmp_path / "kb" / "keys.json").stat().st_mode & 0o077 == 0
    assert KeyStore.for_kb(tmp_path / "kb").authenticate(created["key"]).scope == "write"

    assert run("list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"id": created["id"], "scope": "write", "name": "ci", "created": created["created"]}]
    assert run("revoke", created["id"]) == 0 and created["id"] in capsys.readouterr().out
    assert KeyStore.for_kb(tmp_path / "kb").keys() == []
    with pytest.raises(MMRAGError, match="No API key with id"):
        run("revoke", created["id"])
    with pytest.raises(MMRAGError, match="No knowledge base"):
        KeyStore.for_kb(tmp_path / "not-a-kb")


# ---------------------------------------------------------------------------- limits, uploads, CORS
def test_bad_uploads_get_the_typed_envelope(client):
    not_image = assert_envelope(client.post("/v1/search", json={"image": b64(b"just some text")}), 400,
                                "invalid_request", "image")
    assert "not an image" in not_image["message"]
    bomb = assert_envelope(client.post("/v1/search", json={"image": b64(bomb_header_png())}), 400,
                           "invalid_request", "image")
    assert "decompression" in bomb["message"]
    form = client.post("/v1/search", files={"image": ("bomb.png", bomb_header_png(), "image/png")})
    assert "decompression" in assert_envelope(form, 400, "invalid_request", "image")["message"]
    bad64 = assert_envelope(client.post("/v1/search", json={"image": "not*base64"}), 400, "invalid_request", "image")
    assert "base64" in bad64["message"]

    big = json.dumps({"image": "A" * (MAX_UPLOAD + 10)}).encode()
    assert_envelope(client.post("/v1/search", content=big, headers={"content-type": "application/json"}), 413,
                    "payload_too_large")
    chunks = (b"A" * 65536 for _ in range(MAX_UPLOAD // 65536 + 4))  # no Content-Length: counted as it streams
    assert_envelope(client.post("/v1/search", content=chunks, headers={"content-type": "application/json"}), 413,
                    "payload_too_large")

    rejected = assert_envelope(client.post("/v1/records", json={"records": [{"text": "t", "image": b64(b"GIF89a?")}]}),
                               422, "all_rejected", "records")
    assert rejected["report"]["rejected"] == 1 and rejected["report"]["rejections"][0]["reason"]
    assert_envelope(client.post("/v1/records", json={"records": [{"text": "t", "image": "@@"}]}), 400,
                    "invalid_request", "records[0].image")


def test_cors_is_off_by_default_and_exact_when_configured(server, job_server):
    allowed = httpx.get(f"{server}/healthz", headers={"Origin": ALLOWED_ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = httpx.options(f"{server}/v1/search", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.get(f"{server}/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{job_server}/healthz", headers={"Origin": ALLOWED_ORIGIN})
    assert default.status_code == 200 and "access-control-allow-origin" not in default.headers


# ---------------------------------------------------------------------------- the CLI
def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"), [_common()])
    return parser.parse_args(["serve", *argv])


def test_serve_refuses_a_public_bind_without_keys(tmp_path, tiny_clip):
    KnowledgeBase.open(tmp_path / "kb", DualEncoder(tiny_clip))
    for host in ("0.0.0.0", "192.168.1.20", "example.com"):
        with pytest.raises(MMRAGError, match="mmrag keys create") as error:
            cmd_serve(serve_args("--kb", str(tmp_path / "kb"), "--host", host))
        assert "\n" not in str(error.value)
    with pytest.raises(MMRAGError, match="No knowledge base"):
        cmd_serve(serve_args("--kb", str(tmp_path / "nothing")))
    with pytest.raises(MMRAGError, match="--port"):
        cmd_serve(serve_args("--kb", str(tmp_path / "kb"), "--port", "70000"))
    assert all(map(is_loopback, ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.1", "example.com")))


def test_mmrag_serve_runs_uvicorn_with_its_flags(tmp_path, config, kb_path, keys):
    """The command itself, in a subprocess: flags reach the app (body limit, CORS, auth from the
    KB's key store), and SIGTERM stops it cleanly."""
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve_fixtures", "serve", "--kb", str(kb_path),
                             "--config", str(config_file), "--port", str(port), "--max-upload-mb", "0.01",
                             "--allow-origin", ALLOWED_ORIGIN], cwd=Path(__file__).parent.parent,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(6000):  # a bound on a hang: the subprocess imports torch first
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/kb", headers=bearer(keys["read"])).json()["count"] >= len(SHAPES)
        assert_envelope(httpx.get(f"{url}/v1/kb"), 401, "authentication_error")
        too_big = httpx.post(f"{url}/v1/search", json={"text": "x" * 20000}, headers=bearer(keys["read"]))
        assert_envelope(too_big, 413, "payload_too_large")
        assert httpx.get(f"{url}/healthz", headers={"Origin": ALLOWED_ORIGIN}).headers[
            "access-control-allow-origin"] == ALLOWED_ORIGIN
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    # uvicorn shuts down gracefully, then re-raises the signal it caught, so the exit status is SIGTERM's
    assert code in (0, -signal.SIGTERM)
    err = proc.stderr.read()
    assert f"mmrag serve: http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sse_starlette" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r'pip install "mmrag\[serve\]"') as error:
        require_serve_extra()
    assert "sse-starlette" in str(error.value)


# ---------------------------------------------------------------------------- records
def test_records_upload_list_get_image_delete(client, kb_path):
    images = [shape_image("blue", "star", shift=s) for s in (5, 7)]
    body = {"records": [{"text": f"uploaded blue star {i}", "image": b64(png_bytes(im)), "metadata": {"batch": "json"}}
                        for i, im in enumerate(images)]}
    first = client.post("/v1/records", json=body)
    assert first.status_code == 200, first.text
    assert (first.json()["added"], first.json()["rejected"]) == (2, 0)
    again = client.post("/v1/records", json=body).json()
    assert (again["added"], again["existing"]) == (0, 2)  # idempotent: ids derived from the content

    fields = {"texts": ["an uploaded green square"], "metadata": '[{"batch": "form"}]'}
    green = [("files", ("green.png", png_bytes(shape_image("green", "square", shift=8)), "image/png"))]
    form = client.post("/v1/records", data=fields, files=green)
    assert form.status_code == 200 and form.json()["added"] == 1, form.text
    assert client.post("/v1/records", data=fields, files=green).json()["added"] == 0

    kb = KnowledgeBase.open(kb_path)
    count = kb.count()
    assert count == len(SHAPES) + 3
    pages, offset = [], 0
    while offset is not None:
        page = client.get("/v1/records", params={"offset": offset, "limit": 4}).json()
        assert len(page["records"]) <= 4 and page["offset"] == offset
        pages.append(page["records"])
        offset = page["next_offset"]
    listed = [r for p in pages for r in p]
    assert len(pages) == -(-count // 4) and sorted(r["id"] for r in listed) == sorted(kb.vectors.all_ids())
    uploaded = next(r for r in listed if r["metadata"].get("batch") == "form")
    assert uploaded["source_path"] == "green.png" and uploaded["text"] == "an uploaded green square"
    filtered = client.get("/v1/records", params={"where": json.dumps({"batch": "json"})}).json()
    assert len(filtered["records"]) == 2 and filtered["next_offset"] is None

    record = client.get(f"/v1/records/{uploaded['id']}").json()
    assert record == uploaded
    wanted = [listed[3]["id"], "no-such-id", listed[0]["id"], listed[3]["id"], listed[1]["id"]]
    many = client.get("/v1/records", params={"ids": json.dumps(wanted)}).json()  # many in one request, in the order asked
    assert many["records"] == [listed[3], listed[0], listed[1]] and many["next_offset"] is None
    paged = client.get("/v1/records", params={"ids": json.dumps(wanted), "limit": 2, "offset": 2}).json()
    assert paged["records"] == [listed[0], listed[1]] and paged["next_offset"] is None  # the unique ids[2:4]
    first_two = client.get("/v1/records", params={"ids": json.dumps(wanted), "limit": 2}).json()
    assert first_two["records"] == [listed[3]] and first_two["next_offset"] == 2
    only_json = client.get("/v1/records", params={"ids": json.dumps(wanted), "where": json.dumps({"batch": "json"})}).json()
    assert only_json["records"] == []  # the filter applies too
    assert_envelope(client.get("/v1/records", params={"ids": '"r0"'}), 400, "invalid_request", "ids")
    stored = kb.get(uploaded["id"])[0]
    image = client.get(record["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == open(stored.image, "rb").read()

    deleted = client.delete(f"/v1/records/{uploaded['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"deleted": 1}
    assert client.get("/v1/kb").json()["count"] == count - 1 == kb.count()
    assert_envelope(client.get(f"/v1/records/{uploaded['id']}"), 404, "not_found", "record_id")
    assert_envelope(client.delete(f"/v1/records/{uploaded['id']}"), 404, "not_found", "record_id")
    assert_envelope(client.get("/v1/records", params={"where": "{bad"}), 400, "invalid_request", "where")


def test_record_ids_with_slashes_are_addressable(client):
    r = client.post("/v1/records", json={"records": [{"id": "cats/001", "text": "a slashed id",
                                                      "image": b64(png_bytes(shape_image("black", "star", shift=6)))}]})
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    got = client.get("/v1/records/cats%2F001").json()
    assert got["id"] == "cats/001" and got["image_url"] == "/v1/records/cats%2F001/image"
    assert client.get(got["image_url"]).status_code == 200
    assert client.delete("/v1/records/cats%2F001").json() == {"deleted": 1}


# ---------------------------------------------------------------------------- OpenAI compatibility
def data_url(im: Image.Image) -> str:
    return "data:image/png;base64," + b64(png_bytes(im))


def test_openai_client_chat_completions(server, keys, vqa_ref):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=keys["read"], max_retries=0, timeout=600)
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": data_url(QUERY_IMAGE)}}]}]
    expected = vqa_ref(QUESTION, image=QUERY_IMAGE, k=2)

    completion = client.chat.completions.create(model="anything-goes", messages=messages,
                                                extra_body={"mmrag": {"k": 2}})
    assert completion.model == "anything-goes" and completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected.answer
    assert completion.choices[0].finish_reason == "stop"
    citations = completion.model_extra["mmrag"]
    assert [r["id"] for r in citations["references"]] == [h.id for h in expected.references]
    assert citations["cited"] == [h.id for h in expected.cited]

    chunks = list(client.chat.completions.create(model="m", messages=messages, stream=True,
                                                 extra_body={"mmrag": {"k": 2}}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.answer
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["mmrag"]["references"] == citations["references"]

    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "q"}])
