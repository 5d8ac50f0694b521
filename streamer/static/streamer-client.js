// streamer-client.js: follow a user's files over Server-Sent Events.
//
// A plain ES module with no dependencies. Each function returns a readable store that
// honours the Svelte store contract (subscribe calls back at once and returns an
// unsubscribe function), so it also works with React's useSyncExternalStore, Vue, or
// by hand. The connection opens with the first subscriber and closes with the last.
//
//   import { connectFiles } from "/static/streamer-client.js";
//   const files = connectFiles({ getToken: () => fetchMyJwt() });
//   const stop = files.subscribe(({ files, status, error }) => render(files, status));

const CONNECTING = 0;
const CLOSED = 2;
const TERMINAL = new Set(["ready", "failed"]);
// Enough to stop a late repeat from resurrecting a deleted file, without growing forever.
const TOMBSTONES = 1000;

export const DEFAULT_BACKOFF = Object.freeze({ initial: 1000, max: 30000 });

/**
 * Every file of the caller, kept current.
 * Value: { files, status, error, lastEventId, lastSeen }, where `files` is a plain
 * object of id → file, replaced (never mutated) on every change.
 */
export function connectFiles({
  url = "/api/files/events",
  getToken,
  snapshot = true,
  EventSourceImpl = globalThis.EventSource,
  withCredentials = false,
  backoff = DEFAULT_BACKOFF,
  maxRetries = Infinity,
} = {}) {
  const deleted = new Map(); // id → last version held, for files removed by file-deleted
  // Our own reconnects resume from the last cursor seen while live: before `synced` the
  // server is still catching up, and a cursor from the middle of that could skip rows.
  let resumeFrom = null;
  let live = false;
  const interrupted = (value) => {
    if (live) resumeFrom = value.lastEventId;
    live = false;
  };

  return liveStore(
    { files: {}, status: "closed", error: null, lastEventId: null, lastSeen: null },
    {
      EventSourceImpl,
      withCredentials,
      getToken,
      backoff,
      maxRetries,
      url: () => url,
      interrupted,
      // With a cursor the server sends what changed since; without one, a snapshot.
      prepare(value) {
        interrupted(value);
        if (resumeFrom != null) return { query: { last_event_id: resumeFrom } };
        if (!snapshot) return { query: {} };
        // Leftovers of an unfinished snapshot may be gone by now; the new one replaces them.
        deleted.clear();
        return { query: { snapshot: "1" }, patch: { files: {} } };
      },
      events: {
        "file-update"(data, { value }) {
          const file = data && data.file;
          if (!file || file.id == null) return {};
          const held = value.files[file.id];
          const floor = held ? held.version : deleted.get(file.id);
          if (isStale(file.version, floor)) return {};
          deleted.delete(file.id);
          return { files: { ...value.files, [file.id]: file } };
        },
        "file-deleted"(data, { value }) {
          const id = data && data.file && data.file.id;
          if (id == null) return {};
          const held = value.files[id];
          if (held && typeof held.version === "number") remember(deleted, id, held.version);
          if (!held) return {};
          const { [id]: _removed, ...files } = value.files;
          return { files };
        },
        reset() {
          // A full snapshot follows: start over rather than keep files that may be gone.
          deleted.clear();
          return { files: {} };
        },
        synced(_data, { connected }) {
          connected();
          live = true;
          return { status: "live", error: null };
        },
        heartbeat() {
          return {};
        },
        "token-expired"(_data, { renew }) {
          renew();
          return {};
        },
      },
    },
  );
}

/**
 * One file, until its processing ends.
 * Value: { file, status, error, lastEventId, lastSeen }. `file` is null before the first
 * event and after `file-deleted`. The store reaches status "closed" for good after a
 * terminal status (`ready` or `failed`) or `file-deleted`, and does not reconnect.
 */
export function watchFile({
  url = (id) => "/api/files/" + encodeURIComponent(id) + "/events",
  id,
  getToken,
  EventSourceImpl = globalThis.EventSource,
  withCredentials = false,
  backoff = DEFAULT_BACKOFF,
  // A file that does not exist fails exactly like an expired token (EventSource shows
  // no status code), so give up after a few failures in a row instead of forever.
  maxRetries = 5,
} = {}) {
  if (id == null || id === "") throw new TypeError("watchFile needs the file's id");

  return liveStore(
    { file: null, status: "closed", error: null, lastEventId: null, lastSeen: null },
    {
      EventSourceImpl,
      withCredentials,
      getToken,
      backoff,
      maxRetries,
      url: () => (typeof url === "function" ? url(id) : url),
      prepare: () => ({ query: {} }),
      events: {
        "file-update"(data, { value, connected, finish }) {
          const file = data && data.file;
          if (!file) return {};
          connected();
          const patch = { status: "live", error: null };
          if (!isStale(file.version, value.file && value.file.version)) patch.file = file;
          const current = patch.file || value.file;
          if (current && TERMINAL.has(current.status)) finish();
          return patch; // status becomes "closed" if finish() was called
        },
        "file-deleted"(_data, { finish }) {
          finish();
          return { file: null };
        },
        heartbeat() {
          return {};
        },
        "token-expired"(_data, { renew }) {
          renew();
          return {};
        },
      },
    },
  );
}

function isStale(version, held) {
  return typeof held === "number" && typeof version === "number" && version <= held;
}

function remember(map, id, version) {
  map.delete(id);
  map.set(id, version);
  if (map.size > TOMBSTONES) map.delete(map.keys().next().value);
}

function withQuery(url, params) {
  const query = new URLSearchParams(params).toString();
  if (!query) return url;
  const hash = url.indexOf("#");
  const base = hash === -1 ? url : url.slice(0, hash);
  return base + (base.includes("?") ? "&" : "?") + query;
}

function describe(err) {
  return err && err.message ? err.message : String(err);
}

// The store and the connection's life: token, EventSource, reconnects with backoff.
// `config.prepare(value)` gives the query (and maybe a patch) for each connection we open;
// `config.events[name](data, ctx)` returns a patch for the value; ctx offers the current
// value and the actions connected() (reset the backoff), renew() (close and reconnect at
// once with a fresh token) and finish() (close for good, status "closed").
function liveStore(initial, config) {
  let value = initial;
  const subscribers = new Set();
  let notify = false; // false while starting: the first subscriber is called once, after
  let generation = 0; // bumped on every start and stop; late async work checks it
  let source = null;
  let timer = null;
  let failures = 0;
  let finished = false;

  function set(patch) {
    value = { ...value, ...patch };
    if (notify) for (const sub of [...subscribers]) sub.fn(value);
  }

  function closeSource() {
    if (source) {
      source.close();
      source = null;
    }
    if (timer != null) {
      clearTimeout(timer);
      timer = null;
    }
  }

  async function open(gen) {
    let token;
    if (config.getToken) {
      try {
        token = await config.getToken();
      } catch (err) {
        if (gen === generation) retry(`could not get a token: ${describe(err)}`);
        return;
      }
      if (gen !== generation) return;
    }
    const { query, patch } = config.prepare(value);
    if (patch) set(patch);
    if (token) query.access_token = token;
    let es;
    try {
      es = new config.EventSourceImpl(withQuery(config.url(value), query), {
        withCredentials: config.withCredentials,
      });
    } catch (err) {
      retry(`could not open the stream: ${describe(err)}`);
      return;
    }
    source = es;
    es.onerror = () => {
      if (source !== es) return;
      if (es.readyState === CLOSED) {
        // Refused (401 for an expired token, 429, a proxy error) or the browser gave up.
        source = null;
        retry("the stream was refused or lost");
      } else if (es.readyState === CONNECTING) {
        // The browser retries by itself, sending Last-Event-ID.
        if (config.interrupted) config.interrupted(value);
        set({ status: "reconnecting" });
      }
    };
    const ctx = {
      get value() {
        return value;
      },
      connected: () => {
        failures = 0;
      },
      renew: () => renew(gen),
      finish,
    };
    for (const [name, handle] of Object.entries(config.events)) {
      es.addEventListener(name, (event) => {
        if (source !== es) return;
        let data = null;
        try {
          data = JSON.parse(event.data);
        } catch {
          // A payload we cannot read is skipped; the cursor still moves like the browser's.
        }
        const patch = handle(data, ctx);
        if (finished) patch.status = "closed";
        if (event.lastEventId) patch.lastEventId = event.lastEventId;
        patch.lastSeen = Date.now();
        set(patch);
      });
    }
  }

  function retry(reason) {
    closeSource();
    failures += 1;
    if (failures > config.maxRetries) {
      set({ status: "closed", error: `${reason}; gave up after ${failures} attempts` });
      return;
    }
    const { initial = 1000, max = 30000 } = config.backoff || {};
    const ceiling = Math.min(max, initial * 2 ** (failures - 1));
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    const gen = generation;
    set({ status: "reconnecting", error: reason });
    timer = setTimeout(() => {
      timer = null;
      if (gen === generation) open(gen);
    }, delay);
  }

  function renew(gen) {
    if (gen !== generation) return;
    // The server ends the stream at the token's exp; reconnect now, from our cursor.
    closeSource();
    set({ status: "expired" });
    open(gen);
  }

  function finish() {
    finished = true;
    generation += 1;
    closeSource();
  }

  function start() {
    if (finished) return;
    generation += 1;
    failures = 0;
    if (typeof config.EventSourceImpl !== "function") {
      // Server-side rendering, or a runtime without EventSource: stay closed, do not throw.
      set({ status: "closed", error: "EventSource is not available in this environment" });
      return;
    }
    set({ status: "connecting", error: null });
    open(generation);
  }

  function stop() {
    generation += 1;
    closeSource();
    if (!finished) set({ status: "closed" });
  }

  return {
    subscribe(fn) {
      const sub = { fn };
      subscribers.add(sub);
      if (subscribers.size === 1) {
        notify = false;
        start();
        notify = true;
      }
      fn(value);
      return () => {
        if (!subscribers.delete(sub)) return;
        if (subscribers.size === 0) stop();
      };
    },
  };
}
