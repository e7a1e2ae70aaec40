// The img2img image: its preview, a clear button, and an inpaint mask painted over it (white = repaint),
// sent as the webui's `mask` field.
const $ = (id) => document.getElementById(id);
let painted = false;

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  painted = false;
}

async function showInit() {
  const file = $("init_image").files[0];
  $("init_panel").hidden = !file;
  clearMask();
  if (!file) return;
  const img = $("init_preview");
  img.src = await readFile(file);
  await img.decode();
  $("mask").width = img.naturalWidth;
  $("mask").height = img.naturalHeight;
}

// Puts an image (a data: URL) into the file input, as if the user had chosen it.
export async function setInitImage(url) {
  const blob = await (await fetch(url)).blob();
  const files = new DataTransfer();
  files.items.add(new File([blob], "init.png", { type: blob.type }));
  $("init_image").files = files.files;
  await showInit();
}

export function clearInitImage() {
  $("init_image").value = "";
  return showInit();
}

export async function initImages() {
  const file = $("init_image").files[0];
  return file ? [await readFile(file)] : null;
}

// The mask as a black PNG with the painted strokes in white, or null when nothing was painted.
export function maskImage() {
  if (!painted) return null;
  const source = $("mask");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(source, 0, 0);
  return out.toDataURL("image/png");
}

function invert() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  for (let p = 0; p < pixels.data.length; p += 4) {
    const on = pixels.data[p + 3] > 127;
    pixels.data.set(on ? [0, 0, 0, 0] : [255, 255, 255, 255], p);
  }
  ctx.putImageData(pixels, 0, 0);
  painted = true;
}

function paint(event) {
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
          Number($("brush").value) * scale / 2, 0, 2 * Math.PI);
  ctx.fill();
  painted = true;
}

export function initMask() {
  $("init_image").addEventListener("change", showInit);
  $("init_clear").addEventListener("click", clearInitImage);
  $("mask_clear").addEventListener("click", clearMask);
  $("mask_invert").addEventListener("click", invert);
  const canvas = $("mask");
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    paint(e);
  });
  canvas.addEventListener("pointermove", (e) => { if (e.buttons) paint(e); });
}
