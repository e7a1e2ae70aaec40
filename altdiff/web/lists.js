// The server's lists: models (chosen by POST /options), samplers, schedule types, and the LoRA, embedding and
// style pickers, hidden when the server has none (or lacks the route).
import { API, getJSON, postJSON } from "./api.js";
import { announce, showError } from "./status.js";

const $ = (id) => document.getElementById(id);

function fill(select, items, selected) {
  select.replaceChildren(...items.map(([value, text]) => new Option(text, value, false, value === selected)));
}

// A picker: choosing an entry inserts its text into the prompt at the caret, then the picker resets.
function picker(id, entries) {
  const select = $(id);
  $(`${id}_label`).hidden = entries.length === 0;
  fill(select, [["", select.dataset.placeholder], ...entries.map((e) => [e, e])], "");
  select.addEventListener("change", () => {
    if (!select.value) return;
    const prompt = $("prompt");
    const text = id === "lora_picker" ? `<lora:${select.value}:1>` : select.value;
    const at = prompt.selectionEnd ?? prompt.value.length;
    const before = prompt.value.slice(0, at);
    const space = before && !/\s$/.test(before) ? " " : "";
    prompt.value = before + space + text + prompt.value.slice(at);
    select.value = "";
    prompt.focus();
  });
}

export async function loadLists(has) {
  const [samplers, schedulers, models, options] = await Promise.all(
    ["samplers", "schedulers", "sd-models", "options"].map((p) => getJSON(p)));
  fill($("sampler_name"), samplers.map((s) => [s.name, s.name]), "Euler a");
  fill($("scheduler"), schedulers.map((s) => [s.label, s.label]), "Automatic");
  fill($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  const optional = (name, fallback) => (has(`/${API}${name}`) ? getJSON(name) : fallback);
  const [loras, embeddings, styles] = await Promise.all([
    optional("loras", []), optional("embeddings", { loaded: {} }), optional("prompt-styles", [])]);
  picker("lora_picker", loras.map((l) => l.name));
  picker("embedding_picker", Object.keys(embeddings.loaded));
  $("styles_label").hidden = styles.length === 0;
  fill($("styles"), [["", "None"], ...styles.map((s) => [s.name, s.name])], "");
}

export async function chooseModel() {
  const select = $("model");
  select.disabled = true;
  announce(`Loading ${select.value}…`);
  try {
    await postJSON("options", { sd_model_checkpoint: select.value });
    announce(`Model: ${select.selectedOptions[0].text}`);
  } catch (e) {
    showError(e.message);
    announce("Failed: see the error below.");
  } finally {
    select.disabled = false;
  }
}
