"""The page of `mmrag serve` (``/``), in a real headless Chromium against a real uvicorn server.

The page is driven as a user would (typing, choosing and dropping files, clicking); what it shows
is read from the DOM and checked against the HTTP API's own answers for the same inputs (the
independent reference): the same hits in the same order, the same answer (streamed into the page
one token event per DOM step), the same references and citations, the same pixels. Waits use
Playwright's auto-waiting with generous timeouts only against hangs; nothing is timed.

Needs Debian's ``chromium`` (``/usr/bin/chromium``, driven through ``executable_path``; no browser
is downloaded). Without it the module is skipped, unless ``MMRAG_REQUIRE_BROWSER=1``.
Screenshots go to the test's tmp_path (their paths are printed); with ``MMRAG_SCREENSHOT=FILE`` the
search results are also saved to FILE.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

pytest.importorskip("fastapi", reason='needs the serve extra: pip install "mmrag[serve]"')
pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra); no browser is downloaded")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from mmrag.pipelines.config import CONFIG_DIR  # noqa: E402
from mmrag.pipelines.dev.tiny_models import ensure_tiny_model  # noqa: E402
from mmrag.pipelines.serve.app import create_app  # noqa: E402
from mmrag.pipelines.serve.keys import KeyStore  # noqa: E402
from mmrag.retrievers import DualEncoder, KnowledgeBase, Record  # noqa: E402

COLOURS = ["red", "blue", "green", "black", "white"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
T = 120_000  # ms: a bound against hangs only (tiny models on a loaded CPU), never an assertion


def _shape(i: int) -> Image.Image:
    im = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((i, 2, 30, 28), fill=(40 * i % 255, 90, 200 - 30 * i))
    return im


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if found is None:
        reason = "needs Debian's chromium (apt-get install chromium); playwright never downloads one here"
        if os.environ.get("MMRAG_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (MMRAG_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return found


# ---------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models_dir, tiny_clip, tiny_sd):
    """A 5-record KB on the tiny preset (collapse off: the random encoder sees every image as one;
    2 draw steps), served by uvicorn in a thread on 127.0.0.1 and a free port."""
    root = tmp_path_factory.mktemp("serve-page")
    ensure_tiny_model("llava", tiny_models_dir)  # built here, not by the first request
    kb = KnowledgeBase.open(root / "kb", DualEncoder(tiny_clip))
    kb.add([Record(id=f"r{i}", text=f"a {c} thing number {i}", image=_shape(i), metadata={"colour": c},
                   source_path=f"shapes/{c}.png") for i, c in enumerate(COLOURS)])
    data = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    data["tiny_models"] = {"cache_dir": str(tiny_models_dir)}
    data["kb"] = {"path": str(root / "kb")}
    data.setdefault("retriever", {})["near_duplicate_threshold"] = None
    data.setdefault("draw", {})["num_inference_steps"] = 2
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    image = root / "query.png"
    _shape(1).save(image)

    app = create_app(config, kb_path=root / "kb")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no window for another process to take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for startup, not an assertion
    assert server.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=300) as client:
        yield {"url": url, "client": client, "image": image, "root": root, "kb": root / "kb",
               "image_b64": base64.b64encode(image.read_bytes()).decode("ascii")}
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    """A fresh tab (its own sessionStorage) on the page; it must fetch nothing but the server's
    own URLs and throw no uncaught error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(T)
    outside, thrown = [], []
    page.on("request", lambda r: None if r.url.startswith((served["url"] + "/", "blob:", "data:"))
            else outside.append(r.url))
    page.on("pageerror", lambda e: thrown.append(str(e)))
    page.goto(served["url"] + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    yield page
    context.close()
    assert outside == [], f"the page fetched resources from elsewhere: {outside}"
    assert thrown == [], f"uncaught errors in the page: {thrown}"


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _api(served, path: str, body: dict) -> dict:
    response = served["client"].post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_images_decoded(page, selector: str) -> None:
    page.wait_for_function(
        """sel => { const imgs = [...document.querySelectorAll(sel)];
                    return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
        arg=selector, timeout=T)


def _hit_ids(page) -> list[str]:
    return page.locator("#search-results li.hit").evaluate_all("els => els.map(e => e.dataset.id)")


# ---------------------------------------------------------------------------- search
def test_text_search_shows_the_apis_hits_and_a_record(page, served, tmp_path):
    expect(page.locator("#kb-info")).to_contain_text("5 records")
    query = "a blue thing number 1"
    page.get_by_label("Query text").fill(query)
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-status")).to_contain_text("hits")

    ref = _api(served, "/v1/search", {"text": query, "k": 10, "rerank": True})["hits"]
    cards = page.locator("#search-results li.hit")
    expect(cards).to_have_count(len(ref))
    assert _hit_ids(page) == [h["id"] for h in ref]
    first = cards.first
    expect(first.locator(".hit-open")).to_have_text(ref[0]["text"])
    expect(first.locator(".rank")).to_have_text("#1")
    expect(first.locator(".source")).to_have_text(ref[0]["source_path"])
    assert first.locator(".scores dt").all_text_contents() == list(ref[0]["scores"])
    _wait_images_decoded(page, "#search-results img.thumb")
    if os.environ.get("MMRAG_SCREENSHOT"):
        page.screenshot(path=os.environ["MMRAG_SCREENSHOT"], full_page=True)
        print(f"screenshot: {os.environ['MMRAG_SCREENSHOT']}")
    _shot(page, tmp_path, "search-text")

    # the record's detail, from GET /v1/records/{id}
    first.locator(".hit-open").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    record = served["client"].get(f"/v1/records/{ref[0]['id']}").json()
    expect(dialog.locator("#record-text")).to_have_text(record["text"])
    expect(dialog.locator("#record-id")).to_have_text(record["id"])
    expect(dialog.locator("#record-source")).to_have_text(record["source_path"])
    assert json.loads(dialog.locator("#record-metadata").text_content()) == record["metadata"]
    _wait_images_decoded(page, "#record-image")
    _shot(page, tmp_path, "record")

    # "search with this image": the record's stored image as the query (record_id)
    dialog.get_by_role("button", name="Search with this image").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#search-status")).to_contain_text(f"like record {ref[0]['id']}")
    similar = _api(served, "/v1/search", {"record_id": ref[0]["id"], "k": 10, "rerank": True})["hits"]
    assert _hit_ids(page) == [h["id"] for h in similar]


def test_every_control_has_a_label(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.textContent.trim())
        .map(el => el.id || el.outerHTML.slice(0, 80))""")
    assert unlabelled == []
    assert page.locator("html").get_attribute("lang") == "en"


def test_record_text_is_shown_as_text_never_as_html(page, served):
    """Texts from the KB go into the page as text: a hit whose text and source are markup (given
    to the page through the browser's routing of the real response) shows the markup literally."""
    markup = '<img src="x" id="injected" onerror="window.pwned = 1"><b>bold</b>'

    def poison(route):
        response = route.fetch()
        body = response.json()
        body["hits"][0]["text"] = markup
        body["hits"][0]["source_path"] = markup
        body["hits"][0]["scores"] = {markup: 1.0}
        route.fulfill(response=response, json=body)

    page.route("**/v1/search", poison)
    page.get_by_label("Query text").fill("a red thing")
    page.get_by_role("button", name="Search", exact=True).click()
    first = page.locator("#search-results li.hit").first
    expect(first.locator(".hit-open")).to_have_text(markup)
    expect(first.locator(".source")).to_have_text(markup)
    expect(first.locator(".scores dt")).to_have_text(markup)
    assert page.locator("#injected").count() == 0 and page.locator("#search-results b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_api_errors_show_the_librarys_message(page, served):
    error_line = page.get_by_role("alert")
    expect(error_line).to_be_hidden()
    # nothing to search for: the library's own message, not one the page made up
    page.get_by_role("button", name="Search", exact=True).click()
    expected = served["client"].post("/v1/search", json={"k": 10, "rerank": True})
    assert expected.status_code >= 400
    message = expected.json()["error"]["message"]
    expect(error_line).to_be_visible()
    expect(error_line.locator(".error-message")).to_have_text(message)
    expect(error_line).to_contain_text(str(expected.status_code))

    # a field the server validates (k over its bound): its 422 message
    page.locator("#panel-search summary").click()
    page.get_by_label("Hits (k)").fill("1000")
    page.get_by_label("Query text").fill("a red thing")
    page.get_by_role("button", name="Search", exact=True).click()
    expected = served["client"].post("/v1/search", json={"text": "a red thing", "k": 1000, "rerank": True})
    assert expected.status_code == 422
    expect(error_line.locator(".error-message")).to_have_text(expected.json()["error"]["message"])
    expect(error_line.locator(".error-param")).to_have_text("(k)")

    # the next request that works clears it
    page.get_by_label("Hits (k)").fill("3")
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-results li.hit")).to_have_count(3)
    expect(error_line).to_be_hidden()


def test_image_search_by_picker_and_by_drop_and_composed(page, served, tmp_path):
    modifier = page.get_by_label("Modifier")
    expect(modifier).to_be_disabled()
    page.get_by_label("Query image").set_input_files(str(served["image"]))
    expect(page.locator("#search-drop .file-name")).to_have_text("query.png")
    expect(modifier).to_be_enabled()
    expect(page.get_by_label("Query text")).to_be_disabled()
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-status")).to_contain_text("for the image")
    ref = _api(served, "/v1/search", {"image": served["image_b64"], "k": 10, "rerank": True})["hits"]
    expect(page.locator("#search-results li.hit")).to_have_count(len(ref))
    assert _hit_ids(page) == [h["id"] for h in ref]
    expect(page.locator("#search-results .hit-open").first).to_have_text(ref[0]["text"])
    _wait_images_decoded(page, "#search-results img.thumb")
    _wait_images_decoded(page, "#search-drop img.preview")

    # composed: the image + a modifier
    modifier.fill("but blue")
    page.get_by_role("button", name="Search", exact=True).click()
    composed = _api(served, "/v1/search", {"image": served["image_b64"], "text": "but blue", "k": 10, "rerank": True})
    page.wait_for_function("ids => JSON.stringify([...document.querySelectorAll('#search-results li.hit')]"
                           ".map(e => e.dataset.id)) === JSON.stringify(ids)", arg=[h["id"] for h in composed["hits"]])
    assert "composed" in composed["hits"][0]["scores"]
    assert page.locator("#search-results li.hit").first.locator(".scores dt").all_text_contents() == \
        list(composed["hits"][0]["scores"])
    _shot(page, tmp_path, "search-composed")

    # drag and drop: a file dropped on the zone replaces the chosen one
    page.get_by_role("button", name="Remove image").click()
    expect(page.get_by_label("Query text")).to_be_enabled()
    dropped = io.BytesIO()
    _shape(3).save(dropped, format="PNG")
    b64 = base64.b64encode(dropped.getvalue()).decode("ascii")
    page.locator("#search-drop").evaluate(
        """(zone, b64) => {
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const data = new DataTransfer();
             data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
             for (const type of ["dragenter", "dragover", "drop"])
               zone.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
           }""", b64)
    expect(page.locator("#search-drop .file-name")).to_have_text("dropped.png")
    modifier.fill("")
    page.get_by_role("button", name="Search", exact=True).click()
    ref = _api(served, "/v1/search", {"image": b64, "k": 10, "rerank": True})["hits"]
    page.wait_for_function("ids => JSON.stringify([...document.querySelectorAll('#search-results li.hit')]"
                           ".map(e => e.dataset.id)) === JSON.stringify(ids)", arg=[h["id"] for h in ref])

    # a file that is not an image is refused at once, with a message
    (served["root"] / "notes.txt").write_text("not an image")
    page.get_by_label("Query image").set_input_files(str(served["root"] / "notes.txt"))
    expect(page.get_by_role("alert")).to_contain_text("notes.txt is not an image")
    expect(page.locator("#search-drop .file-name")).to_have_text("no image")


# ---------------------------------------------------------------------------- ask
def _stream_tokens(served, body: dict) -> tuple[list[str], dict]:
    """The token texts and the done event of POST /v1/ask with stream: true, read with httpx."""
    tokens, done, event = [], None, None
    with served["client"].stream("POST", "/v1/ask", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1].strip())
                if event == "token":
                    tokens.append(data["text"])
                elif event == "done":
                    done = data
    assert done is not None
    return tokens, done


def test_ask_streams_the_answer_and_highlights_the_cited(page, served, tmp_path):
    page.get_by_role("tab", name="Ask").click()
    expect(page.get_by_role("tabpanel")).to_have_attribute("id", "panel-ask")
    question = "What is the name of this entity?"
    page.get_by_label("Question").fill(question)
    page.get_by_label("Image (optional)").set_input_files(str(served["image"]))
    expect(page.locator("#ask-drop .file-name")).to_have_text("query.png")
    # every DOM step that adds text to the answer, counted as it happens
    page.locator("#ask-answer").evaluate(
        """el => { window.answerSteps = 0;
                   new MutationObserver(records => { for (const r of records)
                       if (r.type === "characterData" || r.addedNodes.length) window.answerSteps++; })
                     .observe(el, {childList: true, characterData: true, subtree: true}); }""")
    page.get_by_role("button", name="Ask", exact=True).click()
    answer = page.locator("#ask-answer")
    expect(answer).to_have_attribute("data-state", "done")

    body = {"question": question, "image": served["image_b64"]}
    ref = _api(served, "/v1/ask", body)
    assert answer.text_content() == ref["answer"]
    tokens, done = _stream_tokens(served, body)
    assert "".join(tokens) == ref["answer"] == done["answer"]
    steps = page.evaluate("window.answerSteps")
    print(f"answer: {ref['answer']!r} in {len(tokens)} token events, {steps} DOM steps")
    assert steps == len([t for t in tokens if t])  # one DOM step per token event, none after
    if len([t for t in tokens if t]) > 1:
        assert steps > 1

    refs = page.locator("#ask-references li.reference")
    expect(refs).to_have_count(len(ref["references"]))
    assert refs.evaluate_all("els => els.map(e => e.dataset.id)") == [r["id"] for r in ref["references"]]
    cited = page.locator("#ask-references li.reference.cited")
    assert cited.evaluate_all("els => els.map(e => e.dataset.id)") == \
        [r["id"] for r in ref["references"] if r["id"] in ref["cited"]]
    expect(cited.locator(".badge")).to_have_count(len(cited.all()))
    expect(refs.first.locator(".ref-text")).to_have_text(ref["references"][0]["text"])
    _wait_images_decoded(page, "#ask-references img.thumb")
    _shot(page, tmp_path, "ask")


def test_cited_references_are_highlighted(page, served):
    """The highlight follows the done event's `cited` ids. The tiny VLM writes noise and cites
    nothing, so the browser's routing hands the page the server's real stream with one id put into
    the done event's `cited`: the page must mark exactly that reference."""
    question = "Which thing is this?"
    ref = _api(served, "/v1/ask", {"question": question, "image": served["image_b64"]})
    chosen = ref["references"][-1]["id"]

    def cite(route):
        response = route.fetch()
        text = response.text()
        head, sep, tail = text.rpartition("event: done")
        assert sep, text[:300]
        data_line = next(line for line in tail.splitlines() if line.startswith("data:"))
        done = json.loads(data_line[5:].strip())
        done["cited"] = [chosen]
        route.fulfill(response=response, body=head + sep + tail.replace(data_line, "data: " + json.dumps(done)))

    page.route("**/v1/ask", cite)
    page.get_by_role("tab", name="Ask").click()
    page.get_by_label("Question").fill(question)
    page.get_by_label("Image (optional)").set_input_files(str(served["image"]))
    page.get_by_role("button", name="Ask", exact=True).click()
    answer = page.locator("#ask-answer")
    expect(answer).to_have_attribute("data-state", "done")
    expect(answer).to_have_text(ref["answer"])
    expect(page.locator("#ask-references li.reference")).to_have_count(len(ref["references"]))
    cited = page.locator("#ask-references li.reference.cited")
    expect(cited).to_have_count(1)
    expect(cited).to_have_attribute("data-id", chosen)
    expect(cited.locator(".badge")).to_have_text("cited")
    expect(page.locator("#ask-references .badge")).to_have_count(1)


# ---------------------------------------------------------------------------- draw
def _pixels_of_img(page, selector: str) -> np.ndarray:
    b64 = page.locator(selector).first.evaluate(
        """async img => { const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
                          let s = ""; for (const b of buf) s += String.fromCharCode(b); return btoa(s); }""")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_draw_shows_the_drawing_beside_its_references(page, served, tmp_path):
    page.get_by_role("tab", name="Draw").click()
    prompt = "a red thing on a beach"
    page.get_by_label("Prompt").fill(prompt)
    page.locator("#panel-draw summary").click()
    page.get_by_label("Seed").fill("0")
    page.get_by_role("button", name="Draw", exact=True).click()
    _wait_images_decoded(page, "#draw-images img.drawing-image")
    ref = _api(served, "/v1/draw", {"prompt": prompt, "seed": 0})
    refs = page.locator("#draw-references li.reference")
    expect(refs).to_have_count(len(ref["references"]))
    assert refs.evaluate_all("els => els.map(e => e.dataset.id)") == [r["id"] for r in ref["references"]]
    expect(refs.first.locator(".ref-text")).to_have_text(ref["references"][0]["text"])
    _wait_images_decoded(page, "#draw-references img.thumb")
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(ref["images"][0]))).convert("RGB"))
    assert np.array_equal(_pixels_of_img(page, "#draw-images img.drawing-image"), expected)
    # beside it: the references' column is to the right of the drawing, at the same height
    drawing = page.locator("#draw-images img.drawing-image").bounding_box()
    column = page.locator("#draw-references").bounding_box()
    assert column["x"] >= drawing["x"] + drawing["width"] and column["y"] < drawing["y"] + drawing["height"]
    expect(page.locator("#draw-status")).to_contain_text(f"guidance {ref['guidance']['name']}")
    _shot(page, tmp_path, "draw")

    # a draw the server answers with 202 (here by asking it to): the page polls the job
    polls: list[int] = []
    page.on("response", lambda r: polls.append(r.status) if "/v1/jobs/" in r.url else None)
    page.route("**/v1/draw", lambda route: route.continue_(
        headers={**route.request.headers, "prefer": "respond-async"}))
    page.locator("#draw-images img.drawing-image").evaluate("img => { img.dataset.old = '1'; }")
    with page.expect_response(lambda r: r.url.endswith("/v1/draw")) as accepted:
        page.get_by_role("button", name="Draw", exact=True).click()
    assert accepted.value.status == 202
    page.wait_for_selector("#draw-images img.drawing-image:not([data-old])")
    _wait_images_decoded(page, "#draw-images img.drawing-image")
    assert polls and set(polls) == {200}
    assert np.array_equal(_pixels_of_img(page, "#draw-images img.drawing-image"), expected)


# ---------------------------------------------------------------------------- the key
def test_key_persists_across_a_reload_and_is_sent(page, served):
    key_field = page.get_by_label("API key")
    expect(key_field).to_have_attribute("type", "password")
    key_field.fill("mmrag_0000abcd_not-a-real-key")
    key_field.dispatch_event("change")
    assert page.evaluate("sessionStorage.getItem('mmrag.apiKey')") == "mmrag_0000abcd_not-a-real-key"
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.get_by_label("API key")).to_have_value("mmrag_0000abcd_not-a-real-key")
    page.get_by_label("Query text").fill("a green thing")
    with page.expect_request(lambda r: r.url.endswith("/v1/search")) as sent:
        page.get_by_role("button", name="Search", exact=True).click()
    assert sent.value.headers["authorization"] == "Bearer mmrag_0000abcd_not-a-real-key"
    # no key in the store on a loopback bind: the server lets it through
    expect(page.locator("#search-status")).to_contain_text("hits")
    # clearing the field forgets it
    page.get_by_label("API key").fill("")
    assert page.evaluate("sessionStorage.getItem('mmrag.apiKey')") is None


def test_a_server_with_keys_needs_one_and_the_page_shows_why(page, served, tmp_path):
    store = KeyStore.for_kb(served["kb"])
    key, secret = store.create("read", name="page test")
    try:
        error_line = page.get_by_role("alert")
        page.reload()  # the KB's info now needs the key
        missing = served["client"].get("/v1/kb")
        assert missing.status_code == 401
        expect(error_line.locator(".error-message")).to_have_text(missing.json()["error"]["message"])
        expect(page.locator("#kb-info")).to_have_text("knowledge base: not available")

        page.get_by_label("API key").fill("mmrag_0000abcd_" + "x" * 43)
        page.get_by_label("Query text").fill("a red thing")
        page.get_by_role("button", name="Search", exact=True).click()
        wrong = served["client"].post("/v1/search", json={"text": "a red thing"},
                                      headers={"Authorization": "Bearer mmrag_0000abcd_" + "x" * 43})
        assert wrong.status_code == 401
        expect(error_line.locator(".error-message")).to_have_text(wrong.json()["error"]["message"])

        key_field = page.get_by_label("API key")
        key_field.fill(secret)
        key_field.dispatch_event("change")
        expect(page.locator("#kb-info")).to_contain_text("5 records")
        page.get_by_role("button", name="Search", exact=True).click()
        expect(page.locator("#search-results li.hit")).to_have_count(5)
        expect(error_line).to_be_hidden()
        # the thumbnails too are fetched with the key (an <img src> could not send it)
        _wait_images_decoded(page, "#search-results img.thumb")
        _shot(page, tmp_path, "with-key")
    finally:
        store.revoke(key.id)
