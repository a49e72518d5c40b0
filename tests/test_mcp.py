"""`mmrag mcp`: the knowledge base served over MCP stdio, driven by the official SDK's own client.

Every tool's result is checked against the in-process pipeline built ``from_config`` on the same
config (the independent reference): the same hits, the same greedy answer, the same pixels for the
same seed. Bad calls come back as error results carrying the library's own message, and the
server keeps answering after them; stdout carries nothing but the protocol.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import anyio
import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

pytest.importorskip("mcp.server.mcpserver", reason='needs the MCP SDK 2.x: pip install "mmrag[mcp]"')

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from mmrag.errors import MMRAGError  # noqa: E402
from mmrag.pipelines import EntityImagePipeline, RAGVQAPipeline, load_config  # noqa: E402
from mmrag.pipelines.config import CONFIG_DIR  # noqa: E402
from mmrag.pipelines.dev.tiny_models import ensure_tiny_model  # noqa: E402
from mmrag.pipelines.search import SearchPipeline  # noqa: E402
from mmrag.retrievers import DualEncoder, KnowledgeBase, Query, Record  # noqa: E402
from mmrag.retrievers.retriever import CHANNELS  # noqa: E402

COLOURS = ["red", "blue", "green", "black", "white"]


def _shape(i: int) -> Image.Image:
    im = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((i, 2, 30, 28), fill=(40 * i % 255, 90, 200 - 30 * i))
    return im


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models_dir, tiny_clip, tiny_sd):
    """A 5-record KB, a tiny.yaml on this session's tiny models (collapse off: the random encoder
    sees every image as one; 2 draw steps) and a query image, as a file and as base64."""
    root = tmp_path_factory.mktemp("mcp")
    ensure_tiny_model("llava", tiny_models_dir)  # built here, before the server could race to build it
    kb = KnowledgeBase.open(root / "kb", DualEncoder(tiny_clip))
    kb.add([Record(id=f"r{i}", text=f"a {c} thing number {i}", image=_shape(i), metadata={"colour": c})
            for i, c in enumerate(COLOURS)])
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["tiny_models"] = {"cache_dir": str(tiny_models_dir)}
    data["kb"] = {"path": str(root / "kb")}
    data.setdefault("retriever", {})["near_duplicate_threshold"] = None
    data.setdefault("draw", {})["num_inference_steps"] = 2
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    image = root / "query.png"
    _shape(1).save(image)
    return {"kb": root / "kb", "config": config, "image": image, "root": root,
            "image_b64": base64.b64encode(image.read_bytes()).decode("ascii"), "count": kb.count()}


def _hit(h) -> dict:
    """A hit as the tools promise it, from the Hit itself."""
    return {"id": h.id, "rank": h.rank, "score": h.score, "scores": dict(h.scores), "text": h.record.text,
            "source_path": h.record.source_path, "metadata": h.record.metadata, "image_path": h.record.image}


def _message(fn) -> str:
    with pytest.raises(MMRAGError) as e:
        fn()
    return str(e.value)


@pytest.fixture(scope="module")
def expected(setup):
    """Every answer the server must give, computed in this process by the pipelines' from_config."""
    cfg = load_config(setup["config"])
    search = SearchPipeline.from_config(cfg)
    vqa = RAGVQAPipeline.from_config(cfg)
    draw = EntityImagePipeline.from_config(cfg)
    image = setup["image"]
    ask = vqa("What is this thing?", image=image, k=2)
    choose = vqa("Which colour is it?", image=image, choices=["red", "blue", "green"])
    drawing = draw("a blue thing on a beach", seed=3)
    return {
        "text": [_hit(h) for h in search("a red thing", k=3)],
        "image": [_hit(h) for h in search(Query(image=image), k=2, channels=["image_to_image"])],
        "composed": [_hit(h) for h in search(Query(text="but green", image=image), k=4)],
        "filtered": [_hit(h) for h in search("a thing", k=5, where={"colour": {"$in": ["red", "black"]}})],
        "ask": ask, "choose": choose, "drawing": np.asarray(drawing.images[0]),
        "draw_refs": [h.id for h in drawing.references],
        "k0": _message(lambda: search("a red thing", k=0)),
        "channel": _message(lambda: search("a red thing", k=3, channels=["telepathy"])),
        "where": _message(lambda: search("a red thing", k=3, where={"colour": {"$like": "r%"}})),
        "ask_k0": _message(lambda: vqa("What is it?", image=image, k=0)),
        "choices1": _message(lambda: vqa("What is it?", image=image, choices=["only"])),
        "steps0": _message(lambda: draw("a thing", num_inference_steps=0)),
        "guidance": _message(lambda: draw("a thing", guidance="sideways")),
    }


async def _session(setup, errlog, calls):
    """Run ``calls(session)`` against a fresh ``python -m mmrag.pipelines.mcp_server``; return the
    transport-level faults the client saw (a stray line on stdout is one)."""
    faults: list[Exception] = []

    async def on_message(message):
        if isinstance(message, Exception):
            faults.append(message)

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mmrag.pipelines.mcp_server", "--kb", str(setup["kb"]),
                                      "--config", str(setup["config"])],
        # unbuffered: a stray print reaches the client during the session, not at the server's exit
        env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, cwd=str(setup["root"]))
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write, message_handler=on_message) as session:
            await session.initialize()
            await calls(session)
    return faults


def _json(result) -> object:
    assert not result.is_error, result.content
    texts = [c.text for c in result.content if c.type == "text"]
    assert len(texts) == 1
    return json.loads(texts[0])


def _error_text(result) -> str:
    assert result.is_error
    assert [c.type for c in result.content] == ["text"]
    return result.content[0].text


@pytest.mark.timeout(1200)
def test_tools_over_stdio_match_the_in_process_pipelines(setup, expected):
    got: dict = {}

    async def calls(session: ClientSession) -> None:
        got["tools"] = (await session.list_tools()).tools
        call = session.call_tool
        got["text"] = await call("search", {"text": "a red thing", "k": 3})
        got["image"] = await call("search", {"image_base64": setup["image_b64"], "k": 2,
                                             "channels": ["image_to_image"]})
        got["composed"] = await call("search", {"text": "but green", "image_path": str(setup["image"]), "k": 4})
        got["filtered"] = await call("search", {"text": "a thing", "k": 5,
                                                "where": {"colour": {"$in": ["red", "black"]}}})
        got["k0"] = await call("search", {"text": "a red thing", "k": 0})
        got["channel"] = await call("search", {"text": "a red thing", "k": 3, "channels": ["telepathy"]})
        got["where"] = await call("search", {"text": "a red thing", "k": 3, "where": {"colour": {"$like": "r%"}}})
        got["empty"] = await call("search", {})
        got["bad_b64"] = await call("search", {"image_base64": "not base64!"})
        got["missing"] = await call("search", {"image_path": str(setup["root"] / "nope.png")})
        got["ask"] = await call("ask", {"question": "What is this thing?", "image_path": str(setup["image"]), "k": 2})
        got["choose"] = await call("ask", {"question": "Which colour is it?", "image_base64": setup["image_b64"],
                                           "choices": ["red", "blue", "green"]})
        got["ask_k0"] = await call("ask", {"question": "What is it?", "image_path": str(setup["image"]), "k": 0})
        got["choices1"] = await call("ask", {"question": "What is it?", "image_path": str(setup["image"]),
                                             "choices": ["only"]})
        got["draw"] = await call("draw", {"prompt": "a blue thing on a beach", "seed": 3})
        got["steps0"] = await call("draw", {"prompt": "a thing", "steps": 0})
        got["guidance"] = await call("draw", {"prompt": "a thing", "guidance": "sideways"})
        got["info"] = await call("kb_info", {})
        got["after"] = await call("search", {"text": "a red thing", "k": 3})  # still answering after the errors

    with open(setup["root"] / "server.log", "w") as errlog:
        faults = anyio.run(_session, setup, errlog, calls)
    log = (setup["root"] / "server.log").read_text()
    assert faults == [], faults  # nothing but JSON-RPC on the server's stdout
    assert "Traceback" not in log, log  # every failure was a typed, anticipated one

    # the four tools, with their input schemas and descriptions
    tools = {t.name: t for t in got["tools"]}
    assert set(tools) == {"search", "ask", "draw", "kb_info"}
    props = {name: set(t.input_schema["properties"]) for name, t in tools.items()}
    assert props == {"search": {"text", "image_path", "image_base64", "k", "where", "channels"},
                     "ask": {"question", "image_path", "image_base64", "k", "choices"},
                     "draw": {"prompt", "k", "guidance", "steps", "seed"}, "kb_info": set()}
    assert {n: t.input_schema.get("required", []) for n, t in tools.items()} == {
        "search": [], "ask": ["question"], "draw": ["prompt"], "kb_info": []}
    for t in tools.values():
        assert len(t.description) > 80 and t.annotations.read_only_hint
        assert all(len(p.get("description", "")) > 20 for p in t.input_schema["properties"].values()), t.name
    assert tools["search"].input_schema["properties"]["channels"]["anyOf"][0]["items"]["enum"] == list(CHANNELS)
    assert tools["search"].input_schema["properties"]["k"]["default"] == 10

    # search: the in-process SearchPipeline's hits, for each kind of query
    assert [len(expected[n]) for n in ("text", "image", "composed", "filtered")] == [3, 2, 4, 2]
    for name in ("text", "image", "composed", "filtered"):
        assert _json(got[name]) == expected[name], name
        assert got[name].structured_content == {"hits": expected[name]}, name
    assert {h["metadata"]["colour"] for h in expected["filtered"]} == {"red", "black"}
    assert _json(got["after"]) == expected["text"]

    # ask: the greedy answer, its references and citations; multiple choice with its scores
    ask, out = _json(got["ask"]), expected["ask"]
    assert ask["answer"] == out.answer and ask["message"] == out.message
    assert ask["references"] == [_hit(h) for h in out.references] and len(out.references) == 2
    assert ask["cited"] == [h.id for h in out.cited]
    assert set(ask["timings"]) == set(out.timings) and ask["choice_scores"] is None
    choose = _json(got["choose"])
    assert choose["answer"] == expected["choose"].choice in ("red", "blue", "green")
    assert choose["choice_scores"] == pytest.approx(expected["choose"].choice_scores, abs=1e-5)

    # draw: a PNG of exactly the in-process drawing for the same seed, and the references it used
    images = [c for c in got["draw"].content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    png = base64.b64decode(images[0].data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert expected["drawing"].std() > 1  # not a blank image, which any two would equal
    assert drawn.shape == expected["drawing"].shape and np.array_equal(drawn, expected["drawing"])
    meta = _json(got["draw"])
    assert [r["id"] for r in meta["references"]] == expected["draw_refs"] and len(expected["draw_refs"]) == 2  # draw.k
    assert meta["guidance"]["name"] == "interleaved" and (meta["width"], meta["height"]) == drawn.shape[1::-1]

    # kb_info: the KB's own numbers
    info = _json(got["info"])
    assert info["count"] == setup["count"] == 5 and info["path"] == str(Path(setup["kb"]).resolve())

    # errors: the library's one-line message, as an error result
    for name in ("k0", "channel", "where", "ask_k0", "choices1", "steps0", "guidance"):
        assert _error_text(got[name]) == expected[name], name
    assert "telepathy" in expected["channel"] and "`k`" in expected["k0"]
    assert _error_text(got["empty"]).startswith("Give a query: `text`, an image")
    assert _error_text(got["bad_b64"]).startswith("`image_base64` is not valid base64")
    assert _error_text(got["missing"]).startswith("`image_path` ") and "does not exist" in _error_text(got["missing"])


@pytest.mark.timeout(300)
def test_a_missing_kb_fails_at_start_with_one_line(tmp_path):
    """Before serving: exit 2, one line on stderr, nothing on stdout (the client's protocol stream)."""
    res = subprocess.run([sys.executable, "-m", "mmrag.pipelines.mcp_server", "--kb", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmrag mcp: error: ") and "knowledge base" in lines[0].lower()


def test_a_bug_is_an_error_result_and_the_server_keeps_serving(setup):
    """Not a typed error: one line naming the exception for the agent, the traceback in the log."""
    from mcp import Client

    from mmrag.pipelines.mcp_server import ToolBackend, build_server

    class Broken(ToolBackend):
        def search(self):
            raise RuntimeError("index exploded")

    server = build_server(load_config(setup["config"]), backend=Broken(load_config(setup["config"])))

    async def calls():
        async with Client(server) as client:
            return (await client.call_tool("search", {"text": "a red thing"}),
                    await client.call_tool("kb_info", {}))

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # on the server's own logger: the CLI may have set `mmrag` not to propagate
    logger = logging.getLogger("mmrag.mcp")
    logger.addHandler(handler)
    try:
        broken, info = anyio.run(calls)
    finally:
        logger.removeHandler(handler)
    text = _error_text(broken)
    assert text.startswith("unexpected RuntimeError in mmrag: index exploded") and "\n" not in text
    assert any(r.exc_info and "index exploded" in str(r.exc_info[1]) for r in records)
    assert _json(info)["count"] == setup["count"]
