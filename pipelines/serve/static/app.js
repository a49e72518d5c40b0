// The page of `mmrag serve`: search, ask and draw against the HTTP API (see api.js for how).

import { ApiError, askStream, errorFromBody, fileToDataUrl, getJSON, getKey, pause, postJSON, setKey } from "./api.js";
import { DropZone, ErrorLine, ImageSet, clear, fmt, h } from "./dom.js";

const $ = (id) => document.getElementById(id);
const errors = new ErrorLine($("error"));
const CHANNELS = ["text_to_image", "text_to_text", "image_to_image", "image_to_text", "composed", "lexical"];
const JOB_POLL_MS = 1000;

/** Run `work` with the button disabled and the error line cleared; an error goes to the error line. */
async function busy(button, work) {
  errors.clear();
  button.disabled = true;
  document.body.classList.add("busy");
  try {
    return await work();
  } catch (error) {
    if (error && error.name === "AbortError") return undefined;
    errors.show(error);
    return undefined;
  } finally {
    button.disabled = false;
    document.body.classList.remove("busy");
  }
}

/** A number field's value, or undefined when it is empty; a bad one is an ApiError naming it. */
function intField(input, param) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n)) throw new ApiError(0, "invalid_request", `\`${param}\` must be a whole number, got ${JSON.stringify(raw)}.`, param);
  return n;
}

function jsonField(input, param) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  try {
    return JSON.parse(raw);
  } catch (e) {
    throw new ApiError(0, "invalid_request", `\`${param}\` is not valid JSON (${e.message}).`, param);
  }
}

/** "0.1234 s": the timings' total (their sum when the server gives no `total`), or "". */
function took(timings) {
  const values = Object.values(timings || {}).filter((v) => typeof v === "number");
  if (!values.length) return "";
  const total = typeof timings.total === "number" ? timings.total : values.reduce((a, b) => a + b, 0);
  return `${total.toFixed(2)} s`;
}

const textOrUndefined = (input) => (input.value.trim() === "" ? undefined : input.value.trim());

// ---------------------------------------------------------------------------- tabs
const tabs = [...document.querySelectorAll("[role=tab]")];

function selectTab(tab, { focus = false } = {}) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  const name = tab.id.replace(/^tab-/, "");
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length], { focus: true });
  });
}
selectTab(tabs.find((t) => `#${t.id.replace(/^tab-/, "")}` === location.hash) || tabs[0]);

// ---------------------------------------------------------------------------- the key and the KB
const keyInput = $("api-key");
keyInput.value = getKey();
keyInput.addEventListener("input", () => setKey(keyInput.value));
keyInput.addEventListener("change", () => {
  setKey(keyInput.value);
  loadInfo();
});

async function loadInfo() {
  const info = $("kb-info");
  try {
    const kb = await getJSON("/v1/kb");
    info.textContent = `knowledge base: ${kb.count} record${kb.count === 1 ? "" : "s"} · ${kb.embedder} (dim ${kb.dim})`;
    errors.clear();
  } catch (error) {
    info.textContent = "knowledge base: not available";
    errors.show(error);
  }
}

// ---------------------------------------------------------------------------- shared views
function scoresList(scores) {
  const entries = Object.entries(scores || {});
  if (!entries.length) return null;
  return h("dl", { class: "scores" }, entries.map(([name, value]) => [h("dt", {}, name), h("dd", {}, fmt(value))]));
}

/** One reference (of an answer or a drawing): [n], thumbnail, text, score, source. */
function referenceItem(ref, index, images, { cited = false } = {}) {
  return h("li", { class: cited ? "reference cited" : "reference", dataset: { id: ref.id } },
    h("span", { class: "ref-number" }, `[${index + 1}]`),
    images.img(ref.image_url, `image of reference ${index + 1}`),
    h("div", { class: "ref-body" },
      h("p", { class: "ref-text" }, ref.text),
      h("p", { class: "ref-meta" },
        `score ${fmt(ref.score)}`,
        ref.source_path ? ` · ${ref.source_path}` : "",
        cited ? h("span", { class: "badge" }, "cited") : null)));
}

// ---------------------------------------------------------------------------- search
const searchForm = $("search-form");
const searchText = $("search-text");
const searchModifier = $("search-modifier");
const searchResults = $("search-results");
const searchStatus = $("search-status");
let searchImages = new ImageSet();

const searchDrop = new DropZone($("search-drop"), {
  onerror: (e) => errors.show(e),
  onchange: (file) => {
    searchModifier.disabled = !file;
    searchText.disabled = Boolean(file);
  },
});

const channelBox = $("search-channels");
for (const name of CHANNELS) {
  const id = `channel-${name}`;
  channelBox.append(h("span", { class: "check" },
    h("input", { type: "checkbox", id, name: "channels", value: name }), h("label", { for: id }, name)));
}

async function searchBody() {
  const body = { k: intField($("search-k"), "k"), rerank: $("search-rerank").checked };
  if (searchDrop.file) {
    body.image = await fileToDataUrl(searchDrop.file);
    body.text = textOrUndefined(searchModifier);
  } else {
    body.text = textOrUndefined(searchText);
  }
  const channels = [...channelBox.querySelectorAll("input:checked")].map((c) => c.value);
  if (channels.length) body.channels = channels;
  body.where = jsonField($("search-where"), "where");
  body.reference_text = textOrUndefined($("search-reference-text"));
  return body;
}

async function search(body, what) {
  searchStatus.textContent = "searching…";
  searchResults.setAttribute("aria-busy", "true");
  try {
    const { body: out } = await postJSON("/v1/search", body);
    showHits(out, what);
  } catch (error) {
    searchStatus.textContent = "";
    throw error;
  } finally {
    searchResults.removeAttribute("aria-busy");
  }
}

function showHits(out, what) {
  searchImages.release();
  searchImages = new ImageSet();
  clear(searchResults);
  const n = out.hits.length;
  const seconds = took(out.timings);
  searchStatus.textContent = `${n} hit${n === 1 ? "" : "s"}${what ? ` ${what}` : ""}${seconds ? ` in ${seconds}` : ""}` +
    (out.collapsed ? ` (${out.collapsed} near-duplicate${out.collapsed === 1 ? "" : "s"} left out)` : "");
  for (const hit of out.hits) {
    const open = h("button", { type: "button", class: "hit-open" }, hit.text || hit.id);
    open.addEventListener("click", () => busy(open, () => showRecord(hit.id)));
    searchResults.append(h("li", { class: "hit", dataset: { id: hit.id, rank: hit.rank } },
      searchImages.img(hit.image_url, `image of hit ${hit.rank}`),
      h("div", { class: "hit-body" },
        h("p", { class: "hit-head" }, h("span", { class: "rank" }, `#${hit.rank}`), " ",
          h("span", { class: "score" }, `score ${fmt(hit.score)}`)),
        open,
        scoresList(hit.scores),
        h("p", { class: "source" }, hit.source_path || "(no source path)"))));
  }
}

searchForm.addEventListener("submit", (e) => {
  e.preventDefault();
  busy($("search-submit"), async () => {
    const body = await searchBody();
    const what = body.image === undefined ? "" : body.text ? `for the image + “${body.text}”` : "for the image";
    return search(body, what);
  });
});

// ---------------------------------------------------------------------------- a record's detail
const dialog = $("record-dialog");
let recordImages = new ImageSet();
let shownRecord = null;

async function showRecord(id) {
  const record = await getJSON(`/v1/records/${encodeURIComponent(id)}`);
  recordImages.release();
  recordImages = new ImageSet();
  shownRecord = record;
  $("record-title").textContent = `Record ${record.id}`;
  $("record-image").replaceWith(Object.assign(recordImages.img(record.image_url, `image of record ${record.id}`, "record-image"),
    { id: "record-image" }));
  $("record-text").textContent = record.text;
  $("record-id").textContent = record.id;
  $("record-source").textContent = record.source_path || "(none)";
  $("record-metadata").textContent = JSON.stringify(record.metadata || {}, null, 2);
  if (!dialog.open) dialog.showModal();
}

dialog.addEventListener("close", () => {
  recordImages.release();
  recordImages = new ImageSet();
});

$("record-similar").addEventListener("click", () => {
  if (!shownRecord) return;
  const id = shownRecord.id;
  dialog.close();
  selectTab($("tab-search"));
  busy($("search-submit"), async () => {
    const body = { record_id: id, k: intField($("search-k"), "k"), rerank: $("search-rerank").checked };
    return search(body, `like record ${id}`);
  });
});

// ---------------------------------------------------------------------------- ask
const askAnswer = $("ask-answer");
const askNote = $("ask-note");
const askRefs = $("ask-references");
let askImages = new ImageSet();
const askDrop = new DropZone($("ask-drop"), { onerror: (e) => errors.show(e) });

async function askBody() {
  const body = { question: $("ask-question").value, k: intField($("ask-k"), "k") };
  if (askDrop.file) body.image = await fileToDataUrl(askDrop.file);
  const choices = $("ask-choices").value.split(";").map((c) => c.trim()).filter(Boolean);
  if (choices.length) body.choices = choices;
  return body;
}

function showAnswer(out) {
  if (askAnswer.textContent !== out.answer) askAnswer.textContent = out.answer;
  const notes = [];
  if (out.choice !== null && out.choice !== undefined) {
    notes.push(`choice: ${out.choice}` + (out.choice_scores ? ` (scores ${out.choice_scores.map(fmt).join(", ")})` : ""));
  }
  if (out.no_retrieval) notes.push("answered without references");
  if (out.message) notes.push(out.message);
  if (out.dropped && out.dropped.length) notes.push(`left out to fit the model: ${out.dropped.join(", ")}`);
  if (took(out.timings)) notes.push(`answered in ${took(out.timings)}`);
  askNote.textContent = notes.join(" · ");
  const cited = new Set(out.cited || []);
  clear(askRefs);
  out.references.forEach((ref, i) => askRefs.append(referenceItem(ref, i, askImages, { cited: cited.has(ref.id) })));
}

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  busy($("ask-submit"), async () => {
    const body = await askBody();
    askImages.release();
    askImages = new ImageSet();
    askAnswer.replaceChildren();
    askNote.textContent = "";
    clear(askRefs);
    askAnswer.dataset.state = "streaming";
    askAnswer.setAttribute("aria-busy", "true");
    try {
      let out;
      if (body.choices) { // multiple choice is scored, not streamed
        out = (await postJSON("/v1/ask", body)).body;
      } else {
        out = await askStream(body, (text) => {
          if (text) askAnswer.append(document.createTextNode(text));
        });
      }
      showAnswer(out);
      askAnswer.dataset.state = "done";
    } catch (error) {
      askAnswer.dataset.state = "failed";
      throw error;
    } finally {
      askAnswer.removeAttribute("aria-busy");
    }
  });
});

// ---------------------------------------------------------------------------- draw
const drawStatus = $("draw-status");
let drawImages = new ImageSet();
let drawnUrls = [];

function pngUrl(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

async function drawJob(accepted) {
  for (;;) {
    await pause(JOB_POLL_MS);
    const job = await getJSON(accepted.status_url);
    if (job.status === "done") return job.result;
    if (job.status === "failed") throw errorFromBody(0, { error: job.error }, "The drawing failed.");
    drawStatus.textContent = job.progress ? `drawing: step ${job.progress.step} of ${job.progress.of}…` : `drawing (${job.status})…`;
  }
}

function showDrawing(out, prompt) {
  drawImages.release();
  drawImages = new ImageSet();
  for (const url of drawnUrls) URL.revokeObjectURL(url);
  drawnUrls = out.images.map(pngUrl);
  const box = $("draw-images");
  clear(box);
  drawnUrls.forEach((url, i) => box.append(h("figure", { class: "drawn-image" },
    h("img", { src: url, alt: `drawing ${i + 1} of ${JSON.stringify(prompt)}`, class: "drawing-image" }),
    h("figcaption", {}, h("a", { href: url, download: `drawing-${i + 1}.png` }, "download PNG")))));
  const refs = $("draw-references");
  clear(refs);
  out.references.forEach((ref, i) => refs.append(referenceItem(ref, i, drawImages)));
  const guidance = out.guidance && out.guidance.name ? `guidance ${out.guidance.name}` : "";
  drawStatus.textContent = [guidance, out.fallback ? `(${out.fallback})` : "", took(out.timings)].filter(Boolean).join(" · ");
  $("draw-result").hidden = false;
}

$("draw-form").addEventListener("submit", (e) => {
  e.preventDefault();
  busy($("draw-submit"), async () => {
    const prompt = $("draw-prompt").value;
    const body = {
      prompt, k: intField($("draw-k"), "k"), steps: intField($("draw-steps"), "steps"),
      seed: intField($("draw-seed"), "seed"), guidance: $("draw-guidance").value || undefined,
    };
    drawStatus.textContent = "drawing…";
    try {
      const { status, body: out } = await postJSON("/v1/draw", body);
      showDrawing(status === 202 ? await drawJob(out) : out, prompt);
    } catch (error) {
      drawStatus.textContent = "";
      throw error;
    }
  });
});

document.body.dataset.ready = "true";
loadInfo();
