// The playground page: builds OctoAI generate requests for the served models, follows async jobs, shows
// the results.
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
// FLUX.1 Kontext's training resolutions (octoflux/core/models.py KONTEXT_RESOLUTIONS): sent without a size,
// a Kontext edit comes back at the one nearest the picture's aspect.
export const KONTEXT_SIZES = [
  [672, 1568], [688, 1504], [720, 1456], [752, 1392], [800, 1328], [832, 1248],
  [880, 1184], [944, 1104], [1024, 1024], [1104, 944], [1184, 880], [1248, 832],
  [1328, 800], [1392, 752], [1456, 720], [1504, 688], [1568, 672],
];
// Each model's defaults (octoflux/pipelines/family.py FAMILIES; guidance null: it takes none) and the
// modes the page offers for it. Written as JSON so that the tests can compare it with the server's.
export const MODELS = {
  "flux-dev": {"title": "FLUX.1-dev", "steps": 30, "guidance": 3.5, "modes": ["text", "image", "inpaint"]},
  "flux-schnell": {"title": "FLUX.1-schnell", "steps": 4, "guidance": null, "modes": ["text"]},
  "flux-kontext-dev": {"title": "FLUX.1-Kontext-dev", "steps": 28, "guidance": 2.5, "modes": ["edit"]},
  "flux-fill-dev": {"title": "FLUX.1-Fill-dev", "steps": 50, "guidance": 30.0, "modes": ["inpaint", "outpaint"]}
};
const MODE_NAMES = {
  text: "text to image",
  image: "image to image",
  inpaint: "inpaint",
  edit: "edit by instruction",
  outpaint: "outpaint",
};
const AUTO = "auto"; // the size select's "the server picks" value
const SIDES = ["left", "right", "top", "bottom"];
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
  outpaint: "outpaint",
};

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
const api = new Api(() => token);
const painter = new MaskPainter($("mask-canvas"));
let init = null; // {b64, dataUrl, width, height}
let job = null; // the running job: {id, pollUrl}
let bannerTimer = null;
let runs = 0; // numbers the gallery's runs, oldest 1
let model = "flux-dev"; // until GET /v1/models says what the server serves
let sizeList = null; // which list the size select holds: "flux", "kontext" or "outpaint"

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

function modelInfo(id = model) {
  return MODELS[id] || { title: id, steps: null, guidance: undefined, modes: ["text"] };
}

/** The size select's options for the mode: FLUX.1's sizes; Kontext's (and "from the picture"); or none. */
function fillSizes() {
  const select = $("size");
  const current = mode();
  const list = current === "edit" ? "kontext" : current === "outpaint" ? "outpaint" : "flux";
  select.disabled = list === "outpaint";
  if (list === sizeList) {
    showAutoSize();
    return;
  }
  sizeList = list;
  select.replaceChildren();
  const flux = SIZES.map(([width, height, ratio]) => new Option(`${width} × ${height} (${ratio})`, `${width}x${height}`));
  if (list === "outpaint") {
    select.add(new Option("auto: picture + outpaint", AUTO));
  } else if (list === "kontext") {
    select.add(new Option("", AUTO));
    const trained = document.createElement("optgroup");
    trained.label = "Kontext's training sizes";
    trained.append(...KONTEXT_SIZES.map(([width, height]) => new Option(`${width} × ${height}`, `${width}x${height}`)));
    const others = document.createElement("optgroup");
    others.label = "FLUX.1 sizes";
    others.append(...flux.filter((option) => !KONTEXT_SIZES.some(([w, h]) => option.value === `${w}x${h}`)));
    select.append(trained, others);
  } else {
    for (const option of flux) select.add(option);
  }
  if (list !== "flux") select.value = AUTO;
  else if (init) select.value = nearestSize(init.width, init.height).slice(0, 2).join("x");
  else select.value = "1024x1024";
  showAutoSize();
}

/** The size Kontext picks for the picture: its training size nearest in aspect (as the server does). */
export function kontextSize(width, height) {
  const aspect = width / height;
  return KONTEXT_SIZES.reduce((best, size) =>
    Math.abs(aspect - size[0] / size[1]) < Math.abs(aspect - best[0] / best[1]) ? size : best,
  );
}

function outpaintSides() {
  return Object.fromEntries(SIDES.map((side) => [side, Math.max(0, Math.trunc(Number($(`outpaint-${side}`).value) || 0))]));
}

function outpaintSize() {
  if (!init) return null;
  const sides = outpaintSides();
  return [init.width + sides.left + sides.right, init.height + sides.top + sides.bottom];
}

/** In outpaint mode the picture is shown inside a hatched frame of the result's proportions. */
function frameOutpaint(size) {
  const view = $("init-view");
  const framed = mode() === "outpaint" && size !== null;
  view.classList.toggle("outpainting", framed);
  // Padding percentages are of the width: each side's pixels over the result's width.
  const sides = outpaintSides();
  for (const side of SIDES) {
    view.style[`padding${side[0].toUpperCase()}${side.slice(1)}`] = framed ? `${(100 * sides[side]) / size[0]}%` : "";
  }
}

/** The size the server will pick where the page sends none: Kontext's choice, or the outpainted size. */
function showAutoSize() {
  const auto = [...$("size").options].find((option) => option.value === AUTO);
  if (auto && sizeList === "kontext") {
    auto.text = init
      ? `auto: ${kontextSize(init.width, init.height).join(" × ")}`
      : "auto (from the picture's aspect)";
  }
  const shown = $("outpaint-size");
  const size = outpaintSize();
  frameOutpaint(size);
  shown.classList.remove("bad");
  if (!size) {
    shown.textContent = "Choose a picture to see the size.";
    delete shown.dataset.size;
    return;
  }
  const [width, height] = size;
  const supported = SIZES.some(([w, h]) => w === width && h === height);
  const added = width !== init.width || height !== init.height;
  shown.dataset.size = `${width}x${height}`;
  shown.textContent = `Result: ${width} × ${height}`;
  if (!added) shown.textContent += " (nothing added yet)";
  else if (!supported) {
    shown.textContent += ", not a supported size: see the Size list";
    shown.classList.add("bad");
  }
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text); // the server validates; a 422 lands by the field
}

function buildBody() {
  const current = mode();
  const [width, height] = $("size").value === AUTO ? [] : $("size").value.split("x").map(Number);
  const body = {
    prompt: $("prompt").value,
    width,
    height,
    steps: numberOf("steps"),
    cfg_scale: $("guidance").disabled ? undefined : numberOf("guidance"),
    num_images: numberOf("num-images"),
    image_encoding: document.querySelector('input[name="encoding"]:checked').value,
  };
  if (!$("random-seed").checked) body.seed = numberOf("seed");
  const loras = {};
  for (const item of document.querySelectorAll(".lora-item")) {
    if (item.querySelector(".lora-use").checked) loras[item.dataset.name] = Number(item.querySelector(".lora-weight").value);
  }
  if (Object.keys(loras).length) body.loras = loras;
  if (current !== "text") {
    if (!init) throw new FieldError("init-image", "Choose or drop an init image first.");
    body.init_image = init.b64;
  }
  if (current === "image" || current === "inpaint") body.strength = Number($("strength").value);
  if (current === "inpaint") {
    if (painter.isEmpty()) throw new FieldError("mask-image", "Paint the area to repaint first.");
    body.mask_image = painter.toPngBase64();
  }
  if (current === "outpaint") {
    body.outpaint = outpaintSides();
    // The size is the picture's plus the border; sent, so that the server renders exactly that.
    [body.width, body.height] = outpaintSize();
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

const PROMPT_PLACEHOLDER = "a lighthouse on a cliff at dawn, oil painting";
const INSTRUCTION_PLACEHOLDER = "make the sky stormy and keep everything else";

function updateModeControls() {
  const current = mode();
  $("init-controls").hidden = current === "text";
  $("mask-tools").hidden = current !== "inpaint";
  $("mask-canvas").hidden = current !== "inpaint";
  $("outpaint-tools").hidden = current !== "outpaint";
  $("strength-tools").hidden = current !== "image" && current !== "inpaint";
  // The server's defaults: 0.8 for image to image, 1.0 (repaint from scratch) for inpainting.
  $("strength").value = current === "inpaint" ? "1" : "0.8";
  $("strength-out").value = Number($("strength").value).toFixed(2);
  $("prompt-label").textContent = current === "edit" ? "Instruction" : "Prompt";
  $("prompt").placeholder = current === "edit" ? INSTRUCTION_PLACEHOLDER : PROMPT_PLACEHOLDER;
  fillSizes();
}

function checkMode(value) {
  document.querySelector(`input[name="mode"][value="${value}"]`).checked = true;
}

// ------------------------------------------------------------------ models

/** Show the model's modes only, keeping the current one where it has it; set its defaults. */
function selectModel(id) {
  model = id;
  const info = modelInfo();
  if ([...$("model").options].some((option) => option.value === id)) $("model").value = id;
  if (info.steps !== null) $("steps").value = String(info.steps);
  $("guidance").disabled = info.guidance === null;
  if (info.guidance === null) $("guidance").value = "";
  else if (info.guidance !== undefined) $("guidance").value = String(info.guidance);
  const guidance = info.guidance === null ? "; it takes no guidance" : info.guidance ? `, guidance ${info.guidance}` : "";
  $("defaults-hint").textContent = info.steps !== null ? `${info.title} defaults: ${info.steps} steps${guidance}.` : "";
  $("model-hint").textContent = `${info.modes.map((m) => MODE_NAMES[m]).join(", ")}; POST /generate/${id}`;
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.closest("label").hidden = !info.modes.includes(radio.value);
  }
  $("init").hidden = info.modes.every((m) => m === "text");
  if (!info.modes.includes(mode())) checkMode((init && info.modes.find((m) => m !== "text")) || info.modes[0]);
  updateModeControls();
}

/** The picker lists what the server serves (GET /v1/models); it is hidden when that is one model. */
async function refreshModels() {
  let ids;
  try {
    ids = (await api.json("GET", "/v1/models")).data.map((card) => card.id);
  } catch {
    return; // a 401 without a token (refreshLoras reports it): the page stays on flux-dev until then
  }
  if (!ids.length) return;
  $("model").replaceChildren(...ids.map((id) => new Option(`${modelInfo(id).title} (${id})`, id)));
  $("model-group").hidden = ids.length < 2;
  // The current model's defaults are not put back: the user may have changed them already.
  if (ids.includes(model)) $("model").value = model;
  else selectModel(ids[0]);
  document.body.dataset.models = ids.join(" ");
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
  if (sizeList === "flux") {
    const [w, h] = nearestSize(init.width, init.height);
    $("size").value = `${w}x${h}`;
  }
  const imageMode = modelInfo().modes.find((m) => m !== "text");
  if (mode() === "text" && imageMode) {
    checkMode(imageMode);
    updateModeControls();
  }
  showAutoSize();
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
  if (modelInfo().modes.includes("text")) checkMode("text");
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
  const run = { model, mode: mode() };
  setRunning(true);
  setStatus("Submitting…");
  const started = performance.now();
  try {
    const accepted = await api.json("POST", `/generate/${encodeURIComponent(run.model)}`, {
      json: body,
      headers: { "X-OctoAI-Async": "1" },
    });
    job = { id: accepted.response_id, pollUrl: accepted.poll_url };
    setStatus("Waiting in the queue…");
    const outcome = await follow(job);
    if (outcome.status === "completed") {
      const result = await api.json("GET", outcome.response_url);
      addResults(result, body, run);
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

function addResults(result, body, { model: used, mode: usedMode }) {
  const run = document.createElement("section");
  run.className = "run";
  runs += 1;
  run.dataset.run = String(runs);
  const heading = document.createElement("p");
  heading.className = "run-info";
  const info = modelInfo(used);
  const steps = body.steps ?? info.steps;
  const time = `${Math.round(result.prediction_time_ms)} ms`;
  heading.textContent = `${info.title} · ${MODE_NAMES[usedMode]} · ${steps} steps · ${time} · “${body.prompt}”`;
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

// ------------------------------------------------------------------ the key in use

/** One line under the token: which key the server took it for, its scopes and its limits. */
async function refreshKey() {
  const line = $("key-info");
  try {
    const key = await api.json("GET", "/v1/whoami");
    if (!key.auth) {
      line.textContent = "This server needs no key: every request may do everything.";
      return;
    }
    const limits = [
      key.max_queued != null ? `at most ${key.max_queued} queued` : null,
      key.images_per_minute != null ? `${key.images_per_minute} images a minute` : null,
    ].filter(Boolean);
    line.textContent = `Key “${key.name}” · ${key.scopes.join(", ")} · ${limits.join(" · ") || "no limits"}`;
  } catch (err) {
    line.textContent = err instanceof ApiError && err.status === 401 ? "No key in use." : "";
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("token").value = token;
  $("token").addEventListener("input", () => {
    token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  });
  $("token").addEventListener("change", () => {
    clearErrors();
    refreshKey();
    refreshLoras();
    refreshModels();
  });
  $("model").addEventListener("change", () => {
    clearErrors();
    selectModel($("model").value);
  });
  for (const side of SIDES) $(`outpaint-${side}`).addEventListener("input", showAutoSize);
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
  selectModel(model);
  refreshKey();
  refreshLoras();
  refreshModels();
  document.body.dataset.ready = "true"; // the page's scripts have run
}

wire();
