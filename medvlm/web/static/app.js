"use strict";
// The page's behaviour: model info and label sets on load, classify and similarity forms, results.
// File names never leave the browser: every file is sent under a fixed name.

const $ = (id) => document.getElementById(id);
let limits = { max_image_bytes: 20 * 1024 * 1024, max_images: 16 };
let previewUrl = null;

class PageError extends Error {}

async function api(path, form) {
  let response;
  try {
    response = await fetch(path, form ? { method: "POST", body: form } : {});
  } catch (e) {
    throw new PageError("UNAVAILABLE: the page's server could not be reached");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const err = body && body.error;
    if (!err) throw new PageError(`HTTP ${response.status}`);
    throw new PageError(`${err.code}: ${err.message}` + (err.request_id ? ` (request id ${err.request_id})` : ""));
  }
  return body;
}

function showError(box, message) {
  box.textContent = message;
  box.hidden = !message;
}

function engineLine(engines) {
  return (engines || []).map((e) => `${e.tower}: ${e.engine} ${e.precision}`).join(" · ");
}

function checkSize(file) {
  if (file.size > limits.max_image_bytes) {
    throw new PageError(`TOO_LARGE: the image is ${file.size} bytes; the gateway accepts at most ${limits.max_image_bytes}`);
  }
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    const m = info.model;
    limits = info.limits;
    $("model").textContent = `Model ${m.model} ${m.version} (${m.kind}), bundle ${m.bundle_id}. ${engineLine(m.engines)}`;
    if (m.synthetic) {
      const title = document.createElement("strong");
      title.textContent = `Synthetic, not for clinical use: this is a ${m.kind} model.`;
      const detail = document.createElement("span");
      detail.textContent = m.description;
      $("banner").replaceChildren(title, detail);
      $("banner").hidden = false;
    }
    const note = $("label-set-note");
    if (info.label_sets && info.label_sets.length) {
      const select = $("label-set");
      for (const name of info.label_sets) select.add(new Option(name, name));
      $("label-set-row").hidden = false;
      // A label set brings its own labels and prompt templates: the typed ones are set aside.
      select.addEventListener("change", () => {
        $("labels").disabled = $("template").disabled = Boolean(select.value);
      });
      note.hidden = true;
    } else {
      note.textContent = info.label_sets ? "The gateway serves no label sets: type labels."
        : `No label sets (${info.label_sets_note}): type labels.`;
      note.hidden = false;
    }
  } catch (e) {
    $("model").textContent = `The gateway did not answer: ${e.message}`;
  }
}

function setupDrop() {
  const zone = $("drop");
  const input = $("image");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) input.files = event.dataTransfer.files;
  });
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  const img = $("preview");
  if (file.type === "image/png" || file.type === "image/jpeg") {
    previewUrl = URL.createObjectURL(file);
    img.src = previewUrl;
    img.hidden = false;
    $("preview-note").textContent = "";
  } else {
    img.hidden = true;
    $("preview-note").textContent = "No preview for this file type; the gateway decoded it.";
  }
}

function renderRanking(result) {
  const body = $("ranking").tBodies[0];
  body.replaceChildren();
  result.ranked.forEach((score, i) => {
    const row = body.insertRow();
    row.insertCell().textContent = String(i + 1);
    const label = document.createElement("th");
    label.scope = "row";
    label.className = "label";
    label.textContent = score.code ? `${score.label} (${score.code})` : score.label;
    row.appendChild(label);
    const prob = row.insertCell();
    prob.className = "probability";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${(100 * score.probability).toFixed(1)}%`;
    bar.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = score.probability.toFixed(3);
    prob.append(bar, value);
    const cos = row.insertCell();
    cos.className = "cosine num";
    cos.textContent = score.cosine.toFixed(3);
  });
  const shown = result.ranked.length;
  const more = result.total === null ? ` (the ${shown} most probable of the set)`
    : result.total > shown ? ` (the ${shown} most probable of ${result.total})` : "";
  $("ranking").caption.textContent = `Labels, most probable first${more}: probability (softmax over all the labels) and cosine similarity`;
  const engines = result.engines ? ` · ${engineLine(result.engines)}` : "";
  $("answered-by").textContent = `Answered by bundle ${result.bundle_id}${engines} · image sha256 ${result.image_sha256}`;
}

async function submitClassify(event) {
  event.preventDefault();
  const box = $("classify-error");
  const button = $("classify-submit");
  showError(box, "");
  const file = $("image").files[0];
  try {
    if (!file) throw new PageError("Choose an image file first.");
    checkSize(file);
    const form = new FormData();
    form.append("image", file, "image");
    const labelSet = $("label-set-row").hidden ? "" : $("label-set").value;
    if (labelSet) form.append("label_set", labelSet);
    else form.append("labels", $("labels").value);
    form.append("template", $("template").value);
    button.disabled = true;
    $("classify-result").setAttribute("aria-busy", "true");
    const result = await api("/api/classify", form);
    showPreview(file);
    renderRanking(result);
    $("classify-result").hidden = false;
    $("result-title").focus();
  } catch (e) {
    $("classify-result").hidden = true;
    showError(box, e.message);
  } finally {
    button.disabled = false;
    $("classify-result").removeAttribute("aria-busy");
  }
}

function renderHeatmap(result) {
  const table = $("heatmap");
  const head = table.tHead;
  head.replaceChildren();
  const top = head.insertRow();
  const corner = document.createElement("th");
  corner.scope = "col";
  corner.textContent = "Image";
  top.appendChild(corner);
  for (const text of result.texts) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = text;
    top.appendChild(th);
  }
  const all = result.cosine.flat();
  const lo = Math.min(...all);
  const span = Math.max(...all) - lo || 1;
  const body = table.tBodies[0];
  body.replaceChildren();
  result.cosine.forEach((row, i) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = `Image ${i + 1}`;
    tr.appendChild(th);
    row.forEach((value, j) => {
      const td = tr.insertCell();
      const t = (value - lo) / span;
      td.textContent = value.toFixed(3);
      td.title = `probability ${result.probabilities[i][j].toFixed(3)}`;
      td.style.backgroundColor = `hsl(212, 90%, ${Math.round(95 - 60 * t)}%)`;
      td.style.color = t > 0.6 ? "#fff" : "#1b1f24";
    });
  });
  $("similarity-by").textContent = `Answered by bundle ${result.bundle_id}`;
}

async function submitSimilarity(event) {
  event.preventDefault();
  const box = $("similarity-error");
  const button = $("similarity-submit");
  showError(box, "");
  const files = Array.from($("sim-images").files);
  try {
    if (!files.length) throw new PageError("Choose one or more image files first.");
    if (files.length > limits.max_images) throw new PageError(`At most ${limits.max_images} images at once.`);
    files.forEach(checkSize);
    const form = new FormData();
    files.forEach((file) => form.append("images", file, "image"));
    form.append("texts", $("sim-texts").value);
    button.disabled = true;
    renderHeatmap(await api("/api/similarity", form));
    $("similarity-result").hidden = false;
  } catch (e) {
    $("similarity-result").hidden = true;
    showError(box, e.message);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupDrop();
  $("classify-form").addEventListener("submit", submitClassify);
  $("similarity-form").addEventListener("submit", submitSimilarity);
  loadInfo();
});
