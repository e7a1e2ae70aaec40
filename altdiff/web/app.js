// The altdiff page: a form over the webui's /sdapi/v1 API. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "sdapi/v1/";
const NUMBERS = ["width", "height", "steps", "cfg_scale", "seed", "batch_size", "n_iter"];

async function getJSON(path) {
  const response = await fetch(API + path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// FastAPI's 422 lists {loc, msg}; other errors carry a string detail.
function errorText(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${d.loc.filter((p) => p !== "body").join(".")}: ${d.msg}`).join("\n");
  }
  return `HTTP ${status}: ${detail || (body && body.error) || "request failed"}`;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

let polling = null;  // the /progress timer while a request is in flight

function stopPolling() {
  clearInterval(polling);
  polling = null;
}

function setProgress(report) {
  if (polling === null) return;  // an answer that arrived after the images
  const bar = $("progress");
  bar.value = report.progress;
  bar.dataset.seen = Math.max(Number(bar.dataset.seen || 0), report.progress);
  const s = report.state;
  $("status").textContent = s.job_count
    ? `batch ${s.job_no + 1}/${s.job_count} · step ${s.sampling_step}/${s.sampling_steps}`
    : "waiting…";
}

// The newest batch goes first, its images in order.
function addImages(result) {
  const info = JSON.parse(result.info);
  const batch = document.createDocumentFragment();
  result.images.forEach((b64, k) => {
    const i = k - info.index_of_first_image;
    const label = i < 0 ? "grid" : `seed ${info.all_seeds[i]}`;
    const url = `data:image/png;base64,${b64}`;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = info.infotexts[k];
    img.title = info.infotexts[k];
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = url;
    link.download = `altdiff-${i < 0 ? "grid" : info.all_seeds[i]}.png`;
    link.textContent = "download";
    caption.append(label, link);
    figure.append(img, caption);
    batch.append(figure);
  });
  $("gallery").prepend(batch);
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
                 sampler_name: $("sampler_name").value };
  for (const id of NUMBERS) body[id] = Number($(id).value);
  let route = "txt2img";
  const file = $("init_image").files[0];
  if (file) {
    route = "img2img";
    body.init_images = [await readFile(file)];
    body.denoising_strength = Number($("denoising_strength").value);
  }
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  $("status").textContent = "queued…";
  const started = performance.now();
  polling = setInterval(() => getJSON("progress").then(setProgress).catch(() => {}), 250);
  try {
    const response = await fetch(API + route, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const result = await response.json().catch(() => null);
    stopPolling();
    if (!response.ok) {
      showError(errorText(response.status, result));
      $("status").textContent = "";
      return;
    }
    addImages(result);
    $("progress").value = 1;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("status").textContent = `${result.images.length} image${result.images.length === 1 ? "" : "s"} in ${seconds} s`;
  } catch (e) {
    showError(String(e));
  } finally {
    stopPolling();
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => fetch(API + "interrupt", { method: "POST" }));
  try {
    const samplers = await getJSON("samplers");
    for (const s of samplers) $("sampler_name").add(new Option(s.name, s.name, false, s.name === "Euler a"));
    const options = await getJSON("options");
    $("model").textContent = options.sd_model_checkpoint;
  } catch (e) {
    showError(String(e));
  }
}

init();
