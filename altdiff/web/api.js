// The API client: JSON in and out of the webui's /sdapi/v1 routes, with errors a person can read.
export const API = "sdapi/v1/";

// The request never reached a server (stopped, restarted, network down): fetch's own TypeError says
// only "Failed to fetch".
export class ServerGone extends Error {
  constructor() {
    super("The server is not answering: is `altdiff serve` still running? Start it again, then retry.");
  }
}

// An answer other than 2xx; `fields` lists the request fields FastAPI's 422 blames.
export class HttpError extends Error {
  constructor(status, body) {
    const detail = body && body.detail;
    const fields = Array.isArray(detail) ? detail.map((d) => ({
      field: d.loc.filter((p) => p !== "body").join("."), msg: d.msg,
    })) : [];
    super(fields.length ? fields.map((f) => `${f.field}: ${f.msg}`).join("\n")
      : `HTTP ${status}: ${detail || (body && body.error) || "request failed"}`);
    this.status = status;
    this.fields = fields;
  }
}

async function call(path, init) {
  let response;
  try {
    response = await fetch(API + path, init);
  } catch {
    throw new ServerGone();
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new HttpError(response.status, body);
  return body;
}

export const getJSON = (path) => call(path);

export const postJSON = (path, body) => call(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body ?? {}),
});

// The routes this server has (its OpenAPI schema), so the page hides controls for the ones it lacks.
export async function routes() {
  try {
    const response = await fetch("openapi.json");
    return new Set(Object.keys((await response.json()).paths));
  } catch {
    return new Set();
  }
}
