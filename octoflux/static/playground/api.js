// A small client of the server's public API: bearer auth, typed errors, Server-Sent Events.

/** An HTTP error answer, with the server's `detail` (a string, or FastAPI's list for a 422). */
export class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }

  static async from(response) {
    let detail = response.statusText || `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.detail !== undefined) detail = body.detail;
    } catch {
      // not JSON: keep the status text
    }
    const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
    return new ApiError(response.status, detail, Number.isFinite(retry) ? retry : null);
  }
}

export class Api {
  /** `getToken` returns the current token ("" for none); it is read on every call. */
  constructor(getToken) {
    this.getToken = getToken;
  }

  headers(extra = {}) {
    const headers = { ...extra };
    const token = this.getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    return headers;
  }

  /** fetch() with the token; resolves to the Response when it is 2xx, else throws ApiError. */
  async request(method, url, { json, body, headers = {}, signal } = {}) {
    const extra = json === undefined ? headers : { "Content-Type": "application/json", ...headers };
    const response = await fetch(url, {
      method,
      headers: this.headers(extra),
      body: json === undefined ? body : JSON.stringify(json),
      signal,
    });
    if (!response.ok) throw await ApiError.from(response);
    return response;
  }

  async json(method, url, options) {
    return (await this.request(method, url, options)).json();
  }
}

/**
 * Parse a `text/event-stream` body into `{event, data}` objects.
 *
 * EventSource cannot send an Authorization header, so the stream is read with fetch(). Lines end
 * in \n, \r\n or \r; a \r at the end of a chunk waits for the next one, which may start with \n.
 */
export async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (;;) {
        const end = buffer.search(/[\r\n]/);
        if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break;
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
