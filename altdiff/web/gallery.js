// The results: each image with its generation info, a copy button, "send to img2img", a download link and
// a larger view on click. The newest batch goes first.
import { announce } from "./status.js";

const $ = (id) => document.getElementById(id);

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard permission (plain http from another host): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  announce("Copied the generation info.");
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "small";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function enlarge(url, alt) {
  $("lightbox-image").src = url;
  $("lightbox-image").alt = alt;
  $("lightbox").showModal();
}

// result: {images: [base64 PNG], info: the API's info JSON string}; send(url, infotext) goes to img2img.
// A new result scrolls into view on a narrow screen, where it sits below the form.
export function addResult(result, send, scroll = true) {
  const info = JSON.parse(result.info);
  const batch = document.createDocumentFragment();
  result.images.forEach((b64, k) => {
    const i = k - info.index_of_first_image;
    const name = i < 0 ? "grid" : `seed ${info.all_seeds[i]}`;
    const text = info.infotexts[k];
    const url = `data:image/png;base64,${b64}`;
    const figure = document.createElement("figure");
    if (i >= 0) figure.dataset.seed = info.all_seeds[i];
    const open = document.createElement("button");
    open.type = "button";
    open.className = "enlarge";
    open.setAttribute("aria-label", `Enlarge image, ${name}`);
    const img = document.createElement("img");
    img.src = url;
    img.alt = `Generated image, ${name}`;
    open.append(img);
    open.addEventListener("click", () => enlarge(url, img.alt));
    const caption = document.createElement("figcaption");
    const actions = document.createElement("div");
    actions.className = "actions";
    const link = document.createElement("a");
    link.href = url;
    link.download = `altdiff-${i < 0 ? "grid" : info.all_seeds[i]}.png`;
    link.textContent = "download";
    link.setAttribute("aria-label", `download image, ${name}`);
    const copyButton = button("Copy", null, () => copy(text, copyButton));
    copyButton.setAttribute("aria-label", `Copy generation info, ${name}`);
    actions.append(name, link, copyButton,
                   button("→ img2img", `Send image to img2img, ${name}`, () => send(url, text)));
    const pre = document.createElement("pre");
    pre.className = "info";
    pre.textContent = text;
    caption.append(actions, pre);
    figure.append(open, caption);
    batch.append(figure);
  });
  const newest = batch.firstElementChild;
  $("gallery").prepend(batch);
  // Once its image has a height, so the layout no longer moves under the scroll.
  if (scroll && newest && matchMedia("(max-width: 720px)").matches) {
    newest.querySelector("img").decode().finally(() => newest.scrollIntoView());
  }
}

// The seed of the newest image, for the ♻️ button (null before any).
export function lastSeed() {
  const figure = $("gallery").querySelector("figure[data-seed]");
  return figure ? figure.dataset.seed : null;
}

export function initLightbox() {
  $("lightbox-close").addEventListener("click", () => $("lightbox").close());
  $("lightbox").addEventListener("click", (e) => { if (e.target === $("lightbox")) $("lightbox").close(); });
}
