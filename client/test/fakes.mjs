// Stand-ins the client's tests drive by hand: an EventSource, fetch, and the files feed's events.

// A stand-in for the browser's EventSource that a test drives by hand.
export function fakeEventSource() {
  class FakeEventSource {
    static instances = [];

    constructor(url, init = {}) {
      this.url = new URL(url, "http://app.test");
      this.withCredentials = Boolean(init.withCredentials);
      this.readyState = 0;
      this.onerror = null;
      this.listeners = new Map();
      this.lastEventId = "";
      FakeEventSource.instances.push(this);
    }

    addEventListener(type, listener) {
      if (!this.listeners.has(type)) this.listeners.set(type, []);
      this.listeners.get(type).push(listener);
    }

    close() {
      this.readyState = 2;
    }

    get closed() {
      return this.readyState === 2;
    }

    // Deliver `event: <type>` with JSON data, as the browser does (the id persists).
    emit(type, data, id) {
      this.readyState = 1;
      if (id !== undefined) this.lastEventId = id;
      const event = { type, data: JSON.stringify(data), lastEventId: this.lastEventId };
      for (const listener of this.listeners.get(type) ?? []) listener(event);
    }

    fail(readyState) {
      this.readyState = readyState;
      this.onerror?.({ type: "error" });
    }

    static get last() {
      return FakeEventSource.instances.at(-1);
    }
  }
  return FakeEventSource;
}

// Let pending promises (an awaited getToken) settle.
export async function settle() {
  for (let i = 0; i < 10; i += 1) await Promise.resolve();
}

export function file(id, version, fields = {}) {
  return {
    id,
    filename: `${id}.pdf`,
    file_type: "application/pdf",
    status: "processing",
    progress: 10,
    processing_stage: "scanning",
    error_message: null,
    created_at: "2024-05-01T10:00:00Z",
    updated_at: "2024-05-01T10:00:00Z",
    version,
    ...fields,
  };
}

export const update = (f) => ({ eventType: "file-update", timestamp: "2024-05-01T10:00:00Z", file: f });
export const deleted = (id) => ({
  eventType: "file-deleted",
  timestamp: "2024-05-01T10:00:00Z",
  file: { id },
});
export const plain = (eventType) => ({ eventType, timestamp: "2024-05-01T10:00:00Z" });

// A stand-in for fetch that answers every request with `answer` (a status and a JSON body,
// or an Error to reject with) and records what was asked.
export function fakeFetch(answer) {
  const calls = [];
  async function fetchImpl(url, init = {}) {
    calls.push({ url: new URL(url, "http://app.test"), init });
    if (answer instanceof Error) throw answer;
    const { status, body } = answer;
    return {
      ok: status >= 200 && status < 300,
      status,
      json: async () => (typeof body === "string" ? JSON.parse(body) : body),
    };
  }
  fetchImpl.calls = calls;
  return fetchImpl;
}
