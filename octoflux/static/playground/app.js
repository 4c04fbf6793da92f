// The playground page: builds OctoAI generate requests, follows async jobs, shows the results.
import { Api, ApiError, sleep, sseEvents } from "./api.js";
import { MaskPainter } from "./mask.js";

// FLUX.1-dev's supported resolutions (octoflux/api/octoai/protocol.py SUPPORTED_RESOLUTIONS), with aspect ratios.
export const SIZES = [
  [512, 512, "1:1"],
  [576, 1024, "9:16"],
  [640, 1536, "5:12"],
  [768, 1024, "3:4"],
  [768, 1344, "4:7"],
  [832, 1216, "≈2:3"],
  [896, 1152, "7:9"],
  [1024, 576, "16:9"],
  [1024, 768, "4:3"],
  [1024, 1024, "1:1"],
  [1152, 896, "9:7"],
  [1216, 832, "≈3:2"],
  [1344, 768, "7:4"],
  [1536, 640, "12:5"],
];
const TOKEN_KEY = "octoflux-token"; // sessionStorage: gone when the tab closes
const POLL_MS = 500;
const FINAL = new Set(["completed", "failed", "cancelled"]);
// Request fields -> the id of the control whose error slot shows a 422 about them.
const FIELD_CONTROLS = {
  prompt: "prompt",
  width: "size",
  height: "size",
  steps: "steps",
  cfg_scale: "guidance",
  num_images: "num-images",
  seed: "seed",
  image_encoding: "encoding",
  loras: "loras",
  init_image: "init-image",
  mask_image: "mask-image",
  strength: "strength",
};

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
const api = new Api(() => token);
const painter = new MaskPainter($("mask-canvas"));
let init = null; // {b64, dataUrl, width, height}
let job = null; // the running job: {id, pollUrl}
let bannerTimer = null;
let runs = 0; // numbers the gallery's runs, oldest 1

// ------------------------------------------------------------------ messages

function showBanner(text, { countdown = null } = {}) {
  const banner = $("banner");
  clearInterval(bannerTimer);
  banner.hidden = false;
  if (countdown === null) {
    banner.textContent = text;
    return;
  }
  let left = countdown;
  const render = () => {
    banner.textContent = left > 0 ? text.replace("{s}", String(left)) : "The server may have room now: retry.";
  };
  render();
  bannerTimer = setInterval(() => {
    left -= 1;
    render();
    if (left <= 0) clearInterval(bannerTimer);
  }, 1000);
}

function hideBanner() {
  clearInterval(bannerTimer);
  $("banner").hidden = true;
  $("banner").textContent = "";
}

function fieldError(control, message) {
  const slot = document.querySelector(`[data-error-for="${control}"]`);
  if (!slot) return false;
  slot.textContent = slot.textContent ? `${slot.textContent} ${message}` : message;
  const input = $(control);
  if (input) input.setAttribute("aria-invalid", "true");
  return true;
}

function clearErrors() {
  for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  hideBanner();
}

function setStatus(text) {
  $("status").textContent = text;
}

function describe(detail) {
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

/** Put an error where it belongs: by the token, by the field a 422 names, or in the banner. */
function showError(err, fields = FIELD_CONTROLS) {
  if (!(err instanceof ApiError)) {
    showBanner(`Could not reach the server: ${err.message}`);
    return;
  }
  if (err.status === 401) {
    fieldError("token", token ? "The server refused this token (401)." : "This server needs an API token.");
    $("token").focus();
  } else if (err.status === 422 && Array.isArray(err.detail)) {
    const unplaced = [];
    for (const item of err.detail) {
      const loc = item.loc || [];
      const field = loc[0] === "body" ? loc[1] : loc[0];
      if (!fieldError(fields[field] || "", item.msg)) unplaced.push(`${loc.join(".")}: ${item.msg}`);
    }
    if (unplaced.length) showBanner(`The server rejected the request: ${unplaced.join("; ")}`);
    const first = document.querySelector("[aria-invalid]");
    if (first) first.focus();
  } else if (err.status === 429) {
    const wait = err.retryAfter ?? 5;
    showBanner("The server is busy: retry in {s} s.", { countdown: wait });
  } else if (err.status === 503) {
    const wait = err.retryAfter ? ` Retry in ${err.retryAfter} s.` : "";
    showBanner(`The server is unavailable: ${describe(err.detail)}.${wait}`);
  } else {
    showBanner(`Error ${err.status}: ${describe(err.detail)}`);
  }
}

// ------------------------------------------------------------------ form

function fillSizes() {
  const select = $("size");
  for (const [width, height, ratio] of SIZES) {
    const option = new Option(`${width} × ${height} (${ratio})`, `${width}x${height}`);
    select.add(option);
  }
  select.value = "1024x1024";
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text); // the server validates; a 422 lands by the field
}

function buildBody() {
  const [width, height] = $("size").value.split("x").map(Number);
  const body = {
    prompt: $("prompt").value,
    width,
    height,
    steps: numberOf("steps"),
    cfg_scale: numberOf("guidance"),
    num_images: numberOf("num-images"),
    image_encoding: document.querySelector('input[name="encoding"]:checked').value,
  };
  if (!$("random-seed").checked) body.seed = numberOf("seed");
  const loras = {};
  for (const item of document.querySelectorAll(".lora-item")) {
    if (item.querySelector(".lora-use").checked) loras[item.dataset.name] = Number(item.querySelector(".lora-weight").value);
  }
  if (Object.keys(loras).length) body.loras = loras;
  if (mode() !== "text") {
    if (!init) throw new FieldError("init-image", "Choose or drop an init image first.");
    body.init_image = init.b64;
    body.strength = Number($("strength").value);
  }
  if (mode() === "inpaint") {
    if (painter.isEmpty()) throw new FieldError("mask-image", "Paint the area to repaint first.");
    body.mask_image = painter.toPngBase64();
  }
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

class FieldError extends Error {
  constructor(control, message) {
    super(message);
    this.control = control;
  }
}

function updateModeControls() {
  const current = mode();
  $("init-controls").hidden = current === "text";
  $("mask-tools").hidden = current !== "inpaint";
  $("mask-canvas").hidden = current !== "inpaint";
  // The server's defaults: 0.8 for image to image, 1.0 (repaint from scratch) for inpainting.
  $("strength").value = current === "inpaint" ? "1" : "0.8";
  $("strength-out").value = Number($("strength").value).toFixed(2);
}

// ------------------------------------------------------------------ init image and mask

function nearestSize(width, height) {
  const aspect = Math.log(width / height);
  const score = ([w, h]) => [Math.abs(Math.log(w / h) - aspect), Math.abs(w * h - 1024 * 1024)];
  return SIZES.reduce((best, size) => {
    const [a, b] = [score(size), score(best)];
    return a[0] < b[0] - 1e-9 || (Math.abs(a[0] - b[0]) < 1e-9 && a[1] < b[1]) ? size : best;
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the file is not an image this browser can read"));
    image.src = src;
  });
}

async function setInit(dataUrl) {
  const image = await loadImage(dataUrl);
  init = { dataUrl, b64: dataUrl.split(",")[1], width: image.naturalWidth, height: image.naturalHeight };
  $("init-preview").src = dataUrl;
  painter.reset(init.width, init.height);
  $("init-view").hidden = false;
  const [w, h] = nearestSize(init.width, init.height);
  $("size").value = `${w}x${h}`;
  if (mode() === "text") {
    document.querySelector('input[name="mode"][value="image"]').checked = true;
    updateModeControls();
  }
}

async function setInitFromFile(file) {
  if (!file) return;
  clearErrors();
  try {
    const dataUrl = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    await setInit(dataUrl);
  } catch (err) {
    fieldError("init-image", `Could not read ${file.name}: ${err.message}`);
  }
}

function clearInit() {
  init = null;
  $("init-preview").removeAttribute("src");
  $("init-view").hidden = true;
  $("init-file").value = "";
  document.querySelector('input[name="mode"][value="text"]').checked = true;
  updateModeControls();
}

// ------------------------------------------------------------------ generation

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  $("progress").hidden = !running;
  if (running) $("progress").removeAttribute("value");
  else $("preview").hidden = true;
}

function showProgress(event) {
  const progress = $("progress");
  progress.max = event.steps;
  progress.value = event.step;
  const eta = event.eta_s != null ? ` · about ${Math.ceil(event.eta_s)} s left` : "";
  const batch = event.image_batch != null ? ` · batch ${event.image_batch + 1}` : "";
  setStatus(`Step ${event.step} of ${event.steps}${batch}${eta}`);
}

/** Follow the job's events; fall back to polling where the server has no events endpoint. */
async function follow(current) {
  const query = $("previews").checked ? "?preview=1" : "";
  const response = await fetch(`/v1/responses/${encodeURIComponent(current.id)}/events${query}`, {
    headers: api.headers({ Accept: "text/event-stream" }),
  });
  if (response.status === 404 || response.status === 405) return poll(current);
  if (!response.ok) throw await ApiError.from(response);
  for await (const { event, data } of sseEvents(response.body)) {
    const payload = data ? JSON.parse(data) : {};
    if (event === "progress") showProgress(payload);
    else if (event === "preview") {
      $("preview").src = payload.image;
      $("preview").hidden = false;
    } else if (FINAL.has(event)) return { status: event, ...payload };
  }
  return poll(current); // the stream ended without a final event
}

async function poll(current) {
  for (;;) {
    const state = await api.json("GET", current.pollUrl);
    if (FINAL.has(state.status)) return state;
    setStatus(state.status === "running" ? "Running…" : "Waiting in the queue…");
    await sleep(POLL_MS);
  }
}

async function generate() {
  if (job) return;
  clearErrors();
  let body;
  try {
    body = buildBody();
  } catch (err) {
    if (!(err instanceof FieldError)) throw err;
    fieldError(err.control, err.message);
    return;
  }
  setRunning(true);
  setStatus("Submitting…");
  const started = performance.now();
  try {
    const accepted = await api.json("POST", "/generate/flux-dev", {
      json: body,
      headers: { "X-OctoAI-Async": "1" },
    });
    job = { id: accepted.response_id, pollUrl: accepted.poll_url };
    setStatus("Waiting in the queue…");
    const outcome = await follow(job);
    if (outcome.status === "completed") {
      const result = await api.json("GET", outcome.response_url);
      addResults(result, body);
      setStatus(`Done: ${result.images.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
    } else if (outcome.status === "cancelled") {
      setStatus("Cancelled.");
    } else {
      setStatus("");
      showBanner(`The job failed: ${outcome.error || "no reason given"}`);
    }
  } catch (err) {
    setStatus("");
    showError(err);
  } finally {
    job = null;
    setRunning(false);
  }
}

async function cancel() {
  if (!job) return;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  try {
    await api.request("DELETE", `/v1/responses/${encodeURIComponent(job.id)}`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 409)) showError(err); // 409: it finished first
  }
}

// ------------------------------------------------------------------ gallery

function mimeOf(b64) {
  return b64.startsWith("/9j/") ? "image/jpeg" : "image/png";
}

function button(text, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", onClick);
  return element;
}

function addResults(result, body) {
  const run = document.createElement("section");
  run.className = "run";
  runs += 1;
  run.dataset.run = String(runs);
  const heading = document.createElement("p");
  heading.className = "run-info";
  const mode = body.mask_image ? "inpaint" : body.init_image ? "image to image" : "text to image";
  heading.textContent = `${mode} · ${body.steps ?? 30} steps · ${Math.round(result.prediction_time_ms)} ms · “${body.prompt}”`;
  run.append(heading);
  for (const image of result.images) {
    const mime = mimeOf(image.image_b64);
    const dataUrl = `data:${mime};base64,${image.image_b64}`;
    const figure = document.createElement("figure");
    figure.className = "result";
    figure.dataset.seed = String(image.seed);
    const img = document.createElement("img");
    img.src = dataUrl;
    img.alt = `generated image, seed ${image.seed}`;
    const caption = document.createElement("figcaption");
    const seed = document.createElement("span");
    seed.className = "seed";
    seed.textContent = `seed ${image.seed}`;
    const size = document.createElement("span");
    size.className = "dims";
    img.addEventListener("load", () => {
      size.textContent = `${img.naturalWidth} × ${img.naturalHeight}`;
    });
    const download = document.createElement("a");
    download.href = dataUrl;
    download.download = `octoflux-${image.seed}.${mime === "image/jpeg" ? "jpg" : "png"}`;
    download.textContent = "Download";
    const reuse = button("Reuse seed", () => {
      $("random-seed").checked = false;
      $("seed").disabled = false;
      $("seed").value = String(image.seed);
      $("seed").focus();
    });
    reuse.className = "reuse-seed";
    const useInit = button("Use as init image", async () => {
      await setInit(dataUrl);
      $("init").scrollIntoView({ block: "nearest" });
      $("strength").focus();
    });
    useInit.className = "use-init";
    caption.append(seed, size, download, reuse, useInit);
    figure.append(img, caption);
    run.append(figure);
  }
  $("gallery").prepend(run);
  $("gallery-empty").hidden = true;
}

// ------------------------------------------------------------------ LoRAs

async function refreshLoras() {
  let assets;
  try {
    assets = (await api.json("GET", "/v1/assets?asset_type=lora&engine=image/flux-dev&limit=1000")).data;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) showError(err);
    return;
  }
  $("token-error").textContent = "";
  $("token").removeAttribute("aria-invalid");
  const list = $("lora-list");
  const chosen = new Map();
  for (const item of list.querySelectorAll(".lora-item")) {
    chosen.set(item.dataset.name, [item.querySelector(".lora-use").checked, item.querySelector(".lora-weight").value]);
  }
  list.replaceChildren();
  assets.forEach((asset, index) => list.append(loraItem(asset, index, chosen.get(asset.name))));
  $("lora-empty").hidden = assets.length > 0;
}

function loraItem(asset, index, [used, weight] = [false, "1"]) {
  const item = document.createElement("li");
  const label = document.createElement("label");
  label.textContent = asset.name;
  if (asset.status !== "ready") {
    item.className = "lora-other";
    const state = document.createElement("span");
    state.className = "lora-status";
    state.textContent = asset.status_details ? `${asset.status}: ${asset.status_details}` : asset.status;
    item.append(label, state);
    return item;
  }
  item.className = "lora-item";
  item.dataset.name = asset.name;
  const use = document.createElement("input");
  use.type = "checkbox";
  use.className = "lora-use";
  use.id = `lora-use-${index}`;
  use.checked = used;
  label.htmlFor = use.id;
  const slider = document.createElement("input");
  slider.type = "range";
  slider.className = "lora-weight";
  slider.min = "-2";
  slider.max = "2";
  slider.step = "0.05";
  slider.value = weight;
  slider.setAttribute("aria-label", `weight of ${asset.name}`);
  const shown = document.createElement("output");
  shown.value = Number(weight).toFixed(2);
  slider.addEventListener("input", () => {
    shown.value = Number(slider.value).toFixed(2);
    use.checked = true;
  });
  item.append(use, label, slider, shown);
  return item;
}

async function uploadLora() {
  const file = $("lora-file").files[0];
  const status = (text) => {
    $("lora-upload-status").textContent = text;
  };
  $("lora-name-error").textContent = "";
  if (!file) {
    status("Choose a .safetensors file first.");
    return;
  }
  const name = $("lora-name").value.trim() || file.name.replace(/\.safetensors$/i, "").replace(/[^A-Za-z0-9._-]/g, "_");
  $("lora-upload").disabled = true;
  try {
    status(`Creating “${name}”…`);
    const created = await api.json("POST", "/v1/assets", {
      json: {
        asset_type: "lora",
        name,
        description: "uploaded from the playground",
        data: { asset_type: "lora", engine: "image/flux-dev", file_format: "safetensors" },
      },
    });
    const id = created.asset.id;
    status(`Uploading ${(file.size / 2 ** 20).toFixed(1)} MB…`);
    // The upload URL carries its own capability token: no Authorization header.
    const put = await fetch(created.transfer_api.put_url, { method: "PUT", body: file });
    if (!put.ok) throw await ApiError.from(put);
    status("Checking the file against the model…");
    await api.json("POST", `/v1/assets/${encodeURIComponent(id)}/complete-upload`);
    for (;;) {
      const { asset } = await api.json("GET", `/v1/assets/${encodeURIComponent(id)}`);
      if (asset.status === "ready") {
        status(`“${name}” is ready.`);
        break;
      }
      if (asset.status === "rejected") {
        status(`“${name}” was rejected: ${asset.status_details || "no reason given"}`);
        break;
      }
      await sleep(POLL_MS);
    }
  } catch (err) {
    status("");
    if (err instanceof ApiError && err.status !== 401 && err.status !== 422) {
      status(`Upload failed: ${describe(err.detail)}`);
    } else {
      showError(err, { name: "lora-name" });
    }
  } finally {
    $("lora-upload").disabled = false;
    await refreshLoras();
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  fillSizes();
  $("token").value = token;
  $("token").addEventListener("input", () => {
    token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  });
  $("token").addEventListener("change", () => {
    clearErrors();
    refreshLoras();
  });
  $("random-seed").addEventListener("change", () => {
    $("seed").disabled = $("random-seed").checked;
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", updateModeControls);
  }
  $("strength").addEventListener("input", () => {
    $("strength-out").value = Number($("strength").value).toFixed(2);
  });
  $("brush-size").addEventListener("input", () => {
    painter.brushSize = Number($("brush-size").value);
    $("brush-size-out").value = $("brush-size").value;
  });
  $("brush-erase").addEventListener("change", () => {
    painter.erase = $("brush-erase").checked;
  });
  $("mask-clear").addEventListener("click", () => painter.clear());
  $("init-clear").addEventListener("click", clearInit);
  $("init-file").addEventListener("change", () => setInitFromFile($("init-file").files[0]));
  const dropzone = $("dropzone");
  dropzone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("init-file").click();
    }
  });
  dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropzone.classList.add("over");
  });
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("over");
    setInitFromFile(event.dataTransfer.files[0]);
  });
  $("lora-upload").addEventListener("click", uploadLora);
  $("lora-name").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.ctrlKey && !event.metaKey) {
      event.preventDefault(); // upload, not generate
      uploadLora();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      generate();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  updateModeControls();
  refreshLoras();
  document.body.dataset.ready = "true"; // the page's scripts have run
}

wire();
