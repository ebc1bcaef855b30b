// The /v1 API, the page's only way to the server. Errors are one line, with the field they name.

export class ApiError extends Error {
  constructor(message, field) { super(message); this.field = field; }
}

// Absolute on this origin: a page opened as http://user:pass@host/ must not pass the credentials to fetch.
const url = (path) => new URL(path, window.location.origin).href;

export async function request(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url(path), init);
  } catch (e) {
    throw new ApiError(`the server is unreachable (${e.message})`);
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(data.error || `HTTP ${response.status}`, data.field);
  return data;
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body);

// Server-Sent Events of one job; `on[event](data)` for each; the browser sends any basic-auth credentials.
export function follow(jobId, on) {
  const source = new EventSource(url(`/v1/jobs/${jobId}/events`));
  for (const [name, handler] of Object.entries(on)) {
    source.addEventListener(name, (e) => handler(JSON.parse(e.data)));
  }
  const close = () => source.close();
  for (const end of ["done", "failed", "cancelled"]) source.addEventListener(end, close);
  return close;
}

export function fileBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export async function imageBlob(path) {
  const response = await fetch(url(path));
  if (!response.ok) throw new ApiError(`cannot read ${path} (HTTP ${response.status})`);
  return response.blob();
}
