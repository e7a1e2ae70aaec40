// The form: what it sends, what fills it (an infotext's parameters, saved settings) and which field a
// refused request names.
const $ = (id) => document.getElementById(id);
const NUMBERS = ["width", "height", "steps", "cfg_scale", "batch_size", "n_iter", "denoising_strength",
                 "hr_scale", "hr_second_pass_steps"];
const TEXTS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "hr_upscaler"];
const SAVED = [...NUMBERS, ...TEXTS, "seed", "enable_hr"];
const STORAGE = "altdiff.form";

// The body of a request (app.js adds img2img's images). A blank seed is -1, a random one; txt2img sends
// the hires settings only with enable_hr, as the webui's own page does.
export function requestBody(img2img) {
  const body = { seed: $("seed").value.trim() === "" ? -1 : Number($("seed").value) };
  for (const id of TEXTS) body[id] = $(id).value;
  for (const id of NUMBERS) body[id] = Number($(id).value);
  const hires = ["enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps"];
  body.enable_hr = $("enable_hr").checked;
  if (img2img || !body.enable_hr) for (const id of hires) delete body[id];
  if (!img2img && !body.enable_hr) delete body.denoising_strength;
  if ($("styles").value) body.styles = [$("styles").value];
  return body;
}

// The infotext keys the webui's "↙️" button and "send to txt2img" fill the form from.
const INFOTEXT_FIELDS = {
  Prompt: "prompt", "Negative prompt": "negative_prompt", Steps: "steps", Sampler: "sampler_name",
  "Schedule type": "scheduler", "CFG scale": "cfg_scale", Seed: "seed", "Size-1": "width", "Size-2": "height",
  "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps",
  "Hires upscaler": "hr_upscaler",
};

function setValue(element, value) {
  if (element.type === "checkbox") {
    element.checked = Boolean(value);
  } else if (element.tagName === "SELECT" && ![...element.options].some((o) => o.value === value)) {
    return;  // a name this server does not list keeps the current choice
  } else {
    element.value = value;
  }
}

export function fillFromParameters(params) {
  for (const [key, id] of Object.entries(INFOTEXT_FIELDS)) {
    if (params[key] !== undefined) setValue($(id), String(params[key]));
  }
  if (params.Sampler !== undefined && params["Schedule type"] === undefined) $("scheduler").value = "Automatic";
  $("enable_hr").checked = params["Hires upscale"] !== undefined || params["Hires steps"] !== undefined;
  saveSettings();
}

export function saveSettings() {
  const values = {};
  for (const id of SAVED) values[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  localStorage.setItem(STORAGE, JSON.stringify(values));
}

export function restoreSettings() {
  let values;
  try {
    values = JSON.parse(localStorage.getItem(STORAGE) || "{}");
  } catch {
    return;
  }
  for (const id of SAVED) if (values[id] !== undefined) setValue($(id), values[id]);
}

// The request fields a 422 names: the field gets aria-invalid, its message beside it, and the first one focus.
export function markInvalid(fields) {
  let first = null;
  for (const { field, msg } of fields) {
    const element = $(field.split(".")[0]);
    if (!element) continue;
    const note = document.createElement("p");
    note.className = "field-error";
    note.id = `${element.id}-error`;
    note.textContent = msg;
    (element.closest("label, fieldset") || element).after(note);
    element.setAttribute("aria-invalid", "true");
    element.setAttribute("aria-describedby", note.id);
    first = first || element;
  }
  if (first) first.focus();
}

export function clearInvalid() {
  for (const note of document.querySelectorAll(".field-error")) note.remove();
  for (const element of document.querySelectorAll("[aria-invalid]")) {
    element.removeAttribute("aria-invalid");
    element.removeAttribute("aria-describedby");
  }
}
