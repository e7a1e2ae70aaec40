// The PNG Info tab: a PNG's infotext read by POST /png-info (or one pasted), its parameters listed, and
// "send to txt2img / img2img" filling the form from them. A pasted infotext is parsed here, as the webui's
// "↙️" button parses the prompt box, so it needs no round trip.
import { postJSON } from "./api.js";
import { parseInfotext } from "./infotext.js";

const $ = (id) => document.getElementById(id);
let image = null;  // the PNG last read, as a data: URL

function show(params) {
  const list = $("png_params");
  list.replaceChildren();
  for (const [key, value] of Object.entries(params)) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
}

async function read(file, report) {
  image = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(file);
  });
  try {
    const answer = await postJSON("png-info", { image });
    $("png_text").value = answer.info;
    show(answer.parameters);
    report(answer.info ? "" : "This PNG has no generation info.");
  } catch (e) {
    report(e.message);
  }
}

// send(params, image or null) fills the form (and the img2img image) and returns to the Generate tab.
export function initPngInfo(send, report) {
  $("png_file").addEventListener("change", () => $("png_file").files[0] && read($("png_file").files[0], report));
  const drop = $("png_drop");
  drop.addEventListener("dragover", (e) => e.preventDefault());
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files[0]) read(e.dataTransfer.files[0], report);
  });
  $("png_text").addEventListener("input", () => {
    image = null;
    show(parseInfotext($("png_text").value));
  });
  $("png_to_txt2img").addEventListener("click", () => send(parseInfotext($("png_text").value), null));
  $("png_to_img2img").addEventListener("click", () => send(parseInfotext($("png_text").value), image));
}
