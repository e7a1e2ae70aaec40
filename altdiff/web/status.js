// The status region is polite and live: it speaks on start, finish and error only. The per-poll
// step and ETA go to #progress_text, which is not live.
const $ = (id) => document.getElementById(id);

export function announce(text) {
  $("status").textContent = text;
}

export function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}
