// The HTTP API of `mmrag serve`, as the page uses it: the key from sessionStorage as a Bearer
// token, JSON bodies, the {"error": {"type", "message", "param"}} envelope as an ApiError, the
// server-sent events of POST /v1/ask read from a fetch() body (EventSource cannot POST), and the
// records' images fetched with the key (an <img src> cannot send an Authorization header).

const KEY_STORAGE = "mmrag.apiKey";

// The app's root: this module lives at ROOT/static/api.js, wherever ROOT is mounted.
export const ROOT = new URL("../", import.meta.url);

/** A URL of the API: `path` ("/v1/search", "v1/kb") resolved against the app's root. */
export function apiUrl(path) {
  return new URL(String(path).replace(/^\/+/, ""), ROOT);
}

// ---------------------------------------------------------------------------- the key
export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: the key lives only in the field
  }
}

export function setKey(value) {
  const key = String(value || "").trim();
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
}

function headers(extra = {}) {
  const h = new Headers(extra);
  const key = getKey();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

// ---------------------------------------------------------------------------- errors
export class ApiError extends Error {
  constructor(status, type, message, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.param = param;
  }
}

/** An ApiError from an error envelope (`{"error": {...}}`) or from any other error body. */
export function errorFromBody(status, body, fallback) {
  const e = body && typeof body === "object" ? body.error : null;
  if (e && typeof e === "object" && typeof e.message === "string") {
    return new ApiError(status, e.type || "error", e.message, e.param ?? null);
  }
  if (body && body.detail !== undefined) { // a framework error that did not go through the envelope
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ")
      : String(body.detail);
    return new ApiError(status, "error", detail);
  }
  return new ApiError(status, "error", fallback);
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  const fallback = `The server answered ${response.status} ${response.statusText}`.trim() + ".";
  return errorFromBody(response.status, body, fallback);
}

// ---------------------------------------------------------------------------- requests
/** fetch() with the key; a non-2xx answer becomes an ApiError with the server's message. */
export async function call(method, path, { json, accept = "application/json", signal } = {}) {
  const init = { method, headers: headers({ Accept: accept }), signal };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(apiUrl(path), init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", `The server could not be reached (${err && err.message ? err.message : err}).`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, options = {}) {
  return (await call("GET", path, options)).json();
}

export async function postJSON(path, json, options = {}) {
  const response = await call("POST", path, { ...options, json });
  return { status: response.status, body: await response.json() };
}

// ---------------------------------------------------------------------------- server-sent events
/**
 * The events of a text/event-stream body, as {event, data} (data: the data lines joined by "\n").
 * Lines end with CRLF, LF or CR (sse-starlette sends CRLF); comments (": ping") are skipped.
 */
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const eol = /\r\n|\r|\n/;
  let buffer = "";
  let event = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return; // an event without its blank line is incomplete: dropped, as EventSource does
      buffer += value;
      for (let m = eol.exec(buffer); m; m = eol.exec(buffer)) {
        if (m[0] === "\r" && m.index === buffer.length - 1) break; // its "\n" may be in the next chunk
        const line = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * POST /v1/ask with `stream: true`: calls onToken(text) per `token` event and resolves with the
 * `done` event's AskResponse; an `error` event (or an HTTP error) rejects with an ApiError.
 */
export async function askStream(body, onToken, { signal } = {}) {
  const response = await call("POST", "/v1/ask", { json: { ...body, stream: true }, accept: "text/event-stream", signal });
  const type = (response.headers.get("content-type") || "").toLowerCase();
  if (!type.startsWith("text/event-stream")) return response.json(); // a server that answered at once
  for await (const { event, data } of readEvents(response)) {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      throw new ApiError(response.status, "bad_stream", `The answer stream sent an event that is not JSON: ${data.slice(0, 80)}`);
    }
    if (event === "token") onToken(String(payload.text ?? ""));
    else if (event === "done") return payload;
    else if (event === "error") throw errorFromBody(response.status, payload, "The answer failed.");
  }
  throw new ApiError(response.status, "bad_stream", "The answer stream ended before its `done` event.");
}

// ---------------------------------------------------------------------------- images
/** An object URL of an image the API serves (fetched with the key); revoke it when done. */
export async function imageObjectUrl(path, { signal } = {}) {
  const response = await call("GET", path, { accept: "image/*", signal });
  return URL.createObjectURL(await response.blob());
}

/** A File as a data: URL (the API takes base64 or a data: URL for `image`). */
export function fileToDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(0, "file_error", `Could not read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

/** Wait `ms` milliseconds (between polls of a draw job). */
export function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}
