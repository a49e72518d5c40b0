// DOM helpers. Every text the API sends (records' texts, metadata, answers, messages) goes into
// the page as text nodes or attribute values, never as HTML.

import { imageObjectUrl } from "./api.js";

/** An element: h("p", {class: "x", dataset: {id}}, "text", child, ...); strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  el.replaceChildren();
}

export const fmt = (x) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(4) : String(x));

// ---------------------------------------------------------------------------- the error line
export class ErrorLine {
  constructor(el) {
    this.el = el;
  }

  show(error) {
    const message = error && error.message ? error.message : String(error);
    const type = error && error.type && error.type !== "error" ? error.type : null;
    const status = error && error.status ? error.status : null;
    const label = [status, type].filter(Boolean).join(" ");
    this.el.replaceChildren(
      ...(label ? [h("span", { class: "error-type" }, label), " "] : []),
      h("span", { class: "error-message" }, message),
      ...(error && error.param ? [" ", h("span", { class: "error-param" }, `(${error.param})`)] : []),
    );
    this.el.hidden = false;
  }

  clear() {
    this.el.hidden = true;
    this.el.replaceChildren();
  }
}

// ---------------------------------------------------------------------------- images of records
/** Object URLs made for one result view, revoked together when the view is replaced. */
export class ImageSet {
  constructor() {
    this.urls = [];
    this.controller = new AbortController();
  }

  /** An <img> that shows the API image at `path` (fetched with the key). */
  img(path, alt, className = "thumb") {
    const img = h("img", { class: className, alt, decoding: "async" });
    if (!path) {
      img.classList.add("missing");
      return img;
    }
    imageObjectUrl(path, { signal: this.controller.signal }).then((url) => {
      if (this.controller.signal.aborted) {
        URL.revokeObjectURL(url);
        return;
      }
      this.urls.push(url);
      img.src = url;
    }).catch(() => img.classList.add("missing"));
    return img;
  }

  release() {
    this.controller.abort();
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }
}

// ---------------------------------------------------------------------------- the image drop zone
/**
 * An image picker on `zone` (a container holding an <input type=file>, a preview <img> and a clear
 * button): a file chosen or dropped becomes `.file`; `onchange(file|null)` is called on each change.
 */
export class DropZone {
  constructor(zone, { onchange = () => {}, onerror = () => {} } = {}) {
    this.zone = zone;
    this.input = zone.querySelector("input[type=file]");
    this.preview = zone.querySelector("img.preview");
    this.name = zone.querySelector(".file-name");
    this.clearButton = zone.querySelector("button.clear-image");
    this.onchange = onchange;
    this.onerror = onerror;
    this.file = null;
    this.url = null;

    this.input.addEventListener("change", () => this.set(this.input.files[0] || null));
    this.clearButton.addEventListener("click", () => this.set(null));
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (e) => {
        e.preventDefault();
        e.dataTransfer.dropEffect = "copy";
        zone.classList.add("dragging");
      });
    }
    zone.addEventListener("dragleave", (e) => {
      if (!zone.contains(e.relatedTarget)) zone.classList.remove("dragging");
    });
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      const file = [...(e.dataTransfer.files || [])][0];
      if (!file) return;
      try {
        const one = new DataTransfer(); // the input shows the dropped file too, as if it had been picked
        one.items.add(file);
        this.input.files = one.files;
      } catch {
        /* a browser that cannot set it: the zone still holds the file */
      }
      this.set(file);
    });
  }

  set(file) {
    if (file && file.type && !file.type.startsWith("image/")) {
      this.onerror(new Error(`${file.name} is not an image (${file.type}); choose a JPEG, PNG, WebP, GIF, BMP or TIFF file.`));
      file = null;
    }
    if (this.url) URL.revokeObjectURL(this.url);
    this.url = file ? URL.createObjectURL(file) : null;
    this.file = file;
    if (!file) this.input.value = "";
    this.preview.hidden = !file;
    if (file) {
      this.preview.src = this.url;
      this.preview.alt = `chosen image: ${file.name}`;
    } else {
      this.preview.removeAttribute("src");
      this.preview.alt = "";
    }
    this.name.textContent = file ? file.name : "no image";
    this.clearButton.hidden = !file;
    this.zone.classList.toggle("has-image", Boolean(file));
    this.onchange(file);
  }
}
