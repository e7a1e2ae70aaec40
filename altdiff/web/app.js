// The altdiff page: a form over the webui's /sdapi/v1 API. Plain ES modules, no build step.
import { API, HttpError, getJSON, postJSON, routes } from "./api.js";
import { clearInvalid, fillFromParameters, markInvalid, requestBody, restoreSettings, saveSettings } from "./form.js";
import { addResult, initLightbox, lastSeed } from "./gallery.js";
import { recall, remember } from "./history.js";
import { parseInfotext } from "./infotext.js";
import { chooseModel, loadLists } from "./lists.js";
import { clearInitImage, initImages, initMask, maskImage, setInitImage } from "./mask.js";
import { initPngInfo } from "./pnginfo.js";
import { announce, showError } from "./status.js";

const $ = (id) => document.getElementById(id);

let polling = null;  // the /progress timer while a request is in flight
let interrupted = false;

function stopPolling() {
  clearInterval(polling);
  polling = null;
  $("preview").hidden = true;
}

function setProgress(report) {
  if (polling === null) return;  // an answer that arrived after the images
  const bar = $("progress");
  bar.value = report.progress;
  bar.dataset.seen = Math.max(Number(bar.dataset.seen || 0), report.progress);
  const s = report.state;
  const eta = report.eta_relative > 0 ? ` · ETA ${Math.ceil(report.eta_relative)} s` : "";
  $("progress_text").textContent = s.job_count
    ? `batch ${s.job_no + 1}/${s.job_count} · step ${s.sampling_step}/${s.sampling_steps}${eta}`
    : "waiting…";
  if (report.current_image) {
    $("preview").src = `data:image/png;base64,${report.current_image}`;
    $("preview").hidden = false;
  }
}

function poll() {
  getJSON("progress?skip_current_image=false").then(setProgress).catch(() => {});
}

async function sendToImg2Img(url, infotext) {
  fillFromParameters(parseInfotext(infotext));
  await setInitImage(url);
  $("init_image").scrollIntoView({ block: "nearest" });
}

async function generate(event) {
  event.preventDefault();
  showError("");
  clearInvalid();
  saveSettings();
  const images = await initImages();
  const route = images ? "img2img" : "txt2img";
  const body = requestBody(Boolean(images));
  if (images) {
    body.init_images = images;
    const mask = maskImage();
    if (mask) body.mask = mask;
  }
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("skip").disabled = false;
  $("progress").value = 0;
  $("progress_text").textContent = "queued…";
  announce("Generating…");
  interrupted = false;
  const started = performance.now();
  polling = setInterval(poll, 250);
  try {
    const result = await postJSON(route, body);
    stopPolling();
    addResult(result, sendToImg2Img);
    remember(result);
    $("progress").value = 1;
    const n = result.images.length;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const done = `${n} image${n === 1 ? "" : "s"} in ${seconds} s`;
    announce(interrupted ? `Interrupted: ${done}` : done);
  } catch (e) {
    stopPolling();
    showError(e.message);
    announce(interrupted ? "Interrupted." : "Failed: see the error below.");
    if (e instanceof HttpError) markInvalid(e.fields);
  } finally {
    stopPolling();
    $("progress_text").textContent = "";
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("skip").disabled = true;
  }
}

function selectTab(tab) {
  for (const t of document.querySelectorAll("[role=tab]")) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
}

async function sendFromPngInfo(params, image) {
  fillFromParameters(params);
  if (image) await setInitImage(image);
  else await clearInitImage();
  selectTab($("tab_generate"));
  $("prompt").focus();
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("input", saveSettings);  // on every keystroke: a reload keeps what was typed
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        if (!$("generate").disabled) $("form").requestSubmit();
      }
    });
  }
  $("interrupt").addEventListener("click", () => {
    interrupted = true;
    postJSON("interrupt").catch(() => {});
  });
  $("skip").addEventListener("click", () => postJSON("skip").catch(() => {}));
  $("seed_random").addEventListener("click", () => { $("seed").value = "-1"; saveSettings(); });
  $("seed_reuse").addEventListener("click", () => {
    const seed = lastSeed();
    if (seed !== null) $("seed").value = seed;
    saveSettings();
  });
  $("model").addEventListener("change", chooseModel);
  const tabs = [...document.querySelectorAll("[role=tab]")];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {  // the ARIA tabs pattern: arrows move between tabs
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      selectTab(next);
      next.focus();
    });
  }
  initLightbox();
  initMask();
  initPngInfo(sendFromPngInfo, showError);
  for (const result of await recall()) addResult(result, sendToImg2Img, false);
  try {
    const has = await routes();
    $("skip").hidden = !has.has(`/${API}skip`);
    await loadLists((route) => has.has(route));
    restoreSettings();
    document.body.dataset.ready = "true";
  } catch (e) {
    showError(e.message);
  }
}

init();
