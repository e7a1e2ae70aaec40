// An infotext read as the webui's parse_generation_parameters reads it (modules/infotext_utils.py): the
// prompt lines, "Negative prompt: " lines, then a last line of `Key: value` pairs (values may be JSON-quoted)
// when it holds at least three of them; "Size: WxH" becomes Size-1 and Size-2.
const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
const SIZE = /^(\d+)x(\d+)$/;

export function parseInfotext(text) {
  const lines = text.trim().split("\n");
  let last = lines[lines.length - 1];
  if ([...last.matchAll(PARAM)].length < 3) {
    lines.push(last);
    last = "";
  }
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (let line of lines.slice(0, -1)) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      line = line.slice("Negative prompt:".length).trim();
    }
    (inNegative ? negative : prompt).push(line);
  }
  const params = { Prompt: prompt.join("\n"), "Negative prompt": negative.join("\n") };
  for (const [, key, raw] of last.matchAll(PARAM)) {
    let value = raw;
    if (value.length > 1 && value.startsWith('"') && value.endsWith('"')) value = JSON.parse(value);
    const size = SIZE.exec(value);
    if (size) {
      params[`${key}-1`] = size[1];
      params[`${key}-2`] = size[2];
    } else {
      params[key] = value;
    }
  }
  return params;
}
