"use strict";
// The page's behaviour: model info and label sets on load, classify and similarity forms, results.
// File names never leave the browser: every file is sent under a fixed name.

const $ = (id) => document.getElementById(id);
let limits = { max_image_bytes: 20 * 1024 * 1024, max_images: 16 };
let previewUrl = null;
let isDicom = false; // the chosen file is DICOM: the window controls are shown and sent
let frames = 1; // frames of the chosen DICOM object, from its preview
let presetsFilled = false;
let previewSeq = 0; // answers to older preview requests are dropped
let presetValues = {};

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
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      fileChosen();
    }
  });
  input.addEventListener("change", fileChosen);
}

async function sniffDicom(file) {
  // Part 10: a 128-byte preamble, then "DICM". The content decides, never the name.
  if (file.size < 132) return false;
  const head = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  return String.fromCharCode(...head) === "DICM";
}

async function fileChosen() {
  const file = $("image").files[0];
  isDicom = Boolean(file) && await sniffDicom(file);
  $("dicom-controls").hidden = !isDicom;
  if (!isDicom) return;
  frames = 1;
  $("window-preset").value = "";
  $("window-center").value = "";
  $("window-width").value = "";
  $("frame").value = "0";
  $("frame-row").hidden = true;
  $("window-preview").hidden = true;
  $("window-caption").textContent = "";
  updatePreview();
}

function appendWindow(form, forPreview) {
  // A preset, or a center and width, or neither (the file's own window); the frame of a multi-frame object.
  const preset = $("window-preset").value;
  const center = $("window-center").value.trim();
  const width = $("window-width").value.trim();
  if (preset) form.append("window_preset", preset);
  else if (center || width) {
    form.append("window_center", center);
    form.append("window_width", width);
  }
  if (forPreview || frames > 1) form.append("frame", $("frame").value.trim() || "0");
}

const WINDOW_SOURCES = {
  "request": "the center and width given here", "preset": "the preset", "file window": "the file's own window",
  "VOI LUT": "the file's VOI LUT", "data range": "the image's value range", "colour": "no window (a colour image)",
};

async function updatePreview() {
  const file = $("image").files[0];
  if (!file || !isDicom) return;
  const seq = ++previewSeq;
  const box = $("window-error");
  showError(box, "");
  try {
    checkSize(file);
    const form = new FormData();
    form.append("image", file, "image");
    appendWindow(form, true);
    const body = await api("/api/preview", form);
    if (seq !== previewSeq) return;
    if (!presetsFilled) {
      presetValues = body.presets;
      for (const [name, w] of Object.entries(body.presets)) {
        $("window-preset").add(new Option(`${name} (${w.center} / ${w.width})`, name));
      }
      presetsFilled = true;
    }
    const ct = body.modality === "CT";
    $("window-preset").disabled = !ct;
    $("window-note").textContent = ct ? "" : "Presets are in Hounsfield units and apply to CT only; give a center and width instead.";
    frames = body.frames;
    $("frame-row").hidden = frames <= 1;
    $("frame").max = String(frames - 1);
    const img = $("window-preview");
    img.src = body.image;
    img.hidden = false;
    $("window-caption").textContent = `Windowed by ${WINDOW_SOURCES[body.window_source] || body.window_source}, ` +
      `resized and centre-cropped to ${body.size} px as the model sees it` +
      (body.modality ? ` · modality ${body.modality}` : "") + (frames > 1 ? ` · ${frames} frames` : "");
  } catch (e) {
    if (seq !== previewSeq) return;
    $("window-preview").hidden = true;
    showError(box, e.message);
  }
}

function setupWindow() {
  $("window-preset").addEventListener("change", () => {
    const w = presetValues[$("window-preset").value];
    if (w) {
      $("window-center").value = String(w.center);
      $("window-width").value = String(w.width);
    }
    updatePreview();
  });
  for (const id of ["window-center", "window-width"]) {
    $(id).addEventListener("change", () => {
      $("window-preset").value = ""; // typed values are a window of their own
      updatePreview();
    });
  }
  $("frame").addEventListener("change", updatePreview);
  $("preview-update").addEventListener("click", updatePreview);
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  const img = $("preview");
  if (isDicom && !$("window-preview").hidden) {
    img.src = $("window-preview").src;
    img.hidden = false;
    $("preview-note").textContent = "As the model sees it (windowed, resized and cropped).";
  } else if (file.type === "image/png" || file.type === "image/jpeg") {
    previewUrl = URL.createObjectURL(file);
    img.src = previewUrl;
    img.hidden = false;
    $("preview-note").textContent = "";
  } else {
    img.hidden = true;
    $("preview-note").textContent = "No preview for this file type; the gateway decoded it.";
  }
}

const ABSTAIN_REASONS = {
  out_of_distribution: "Out of distribution: this image is unlike the images these labels were calibrated on " +
    "(another modality, a photograph, noise).",
  low_confidence: "Low confidence: no label reaches the calibrated probability threshold.",
};

function renderTrust(result) {
  const box = $("abstain");
  if (result.abstain) {
    const title = document.createElement("strong");
    title.textContent = "Answer withheld: do not act on it.";
    const reason = document.createElement("span");
    reason.textContent = (ABSTAIN_REASONS[result.abstain_reason] || `Reason: ${result.abstain_reason || "not given"}.`) +
      " The ranking below is shown for reference only.";
    box.replaceChildren(title, reason);
  }
  box.hidden = !result.abstain;
  $("ranking").classList.toggle("withheld", result.abstain);
  const t = result.trust;
  $("trust").textContent = t
    ? `Calibrated: calibration ${t.calibration_id}, scope ${t.scope}. Out-of-distribution score ` +
      `${t.ood_score.toFixed(2)} (threshold ${t.ood_threshold.toFixed(2)}); answers whose best calibrated ` +
      `probability is below ${t.min_probability.toFixed(2)} are withheld; temperature ${t.temperature.toFixed(2)}.`
    : "Not calibrated: the gateway serves without a calibration, so nothing says whether to trust this answer.";
}

function renderRanking(result) {
  renderTrust(result);
  const calibrated = Boolean(result.trust);
  $("probability-head").textContent = calibrated ? "Calibrated probability" : "Probability";
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
    const p = calibrated && score.calibrated_probability !== null ? score.calibrated_probability : score.probability;
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = p.toFixed(3);
    if (calibrated) value.title = `raw ${score.probability.toFixed(3)}`;
    prob.append(bar, value);
    const cos = row.insertCell();
    cos.className = "cosine num";
    cos.textContent = score.cosine.toFixed(3);
  });
  const shown = result.ranked.length;
  const more = result.total === null ? ` (the ${shown} most probable of the set)`
    : result.total > shown ? ` (the ${shown} most probable of ${result.total})` : "";
  const what = calibrated ? "calibrated probability (softmax over all the labels at the calibration's temperature)"
    : "probability (softmax over all the labels)";
  $("ranking").caption.textContent = `Labels, most probable first${more}: ${what} and cosine similarity`;
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
    if (isDicom) appendWindow(form, false);
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
  setupWindow();
  $("classify-form").addEventListener("submit", submitClassify);
  $("similarity-form").addEventListener("submit", submitSimilarity);
  loadInfo();
});
