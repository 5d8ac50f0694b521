// streamer-client.js: follow a user's rows of a feed (files by default) over Server-Sent Events.
//
// A plain ES module with no dependencies. Each function returns a readable store that
// honours the Svelte store contract (subscribe calls back at once and returns an
// unsubscribe function), so it also works with React's useSyncExternalStore, Vue, or
// by hand. The connection opens with the first subscriber and closes with the last.
//
//   import { connectFiles, connectFeed } from "/static/streamer-client.js";
//   const files = connectFiles({ getToken: () => fetchMyJwt() });
//   const stop = files.subscribe(({ files, status, error }) => render(files, status));
//   // Any other table enabled with streamer.enable_feed('jobs', ..., event => 'job'):
//   const jobs = connectFeed({ feed: "jobs", event: "job", getToken: () => fetchMyJwt() });
//   jobs.subscribe(({ rows, status }) => render(rows, status));

const CONNECTING = 0;
const CLOSED = 2;
const FILES = "files";
const FILE_TERMINAL = new Set(["ready", "failed"]);
// Enough to stop a late repeat from resurrecting a deleted row, without growing forever.
const TOMBSTONES = 1000;

export const DEFAULT_BACKOFF = Object.freeze({ initial: 1000, max: 30000 });

/**
 * A feed's names. `event` must be the one the server was given in
 * `enable_feed(..., event => …)`: it names the events (`<event>-update`, `<event>-deleted`)
 * and the data key that holds the row. Default: "file" for "files", else the feed's name.
 */
function feedNames(feed = FILES, event) {
  if (typeof feed !== "string" || feed === "") throw new TypeError("feed must be a table's name");
  if (event == null || event === "") event = feed === FILES ? "file" : feed;
  return { path: "/api/" + encodeURIComponent(feed), event };
}

/**
 * Every row of the caller in one feed, kept current.
 * Value: { rows, status, error, lastEventId, lastSeen }, where `rows` is a plain object
 * of id → row (a bigint id is a number on the wire and its decimal string as a key),
 * replaced (never mutated) on every change.
 */
export function connectFeed(options) {
  return feedStore(options, "rows");
}

/** connectFeed for the `files` feed, with the rows under `files`. */
export function connectFiles(options) {
  return feedStore(options, "files");
}

/**
 * One row of a feed, until it reaches its end.
 * Value: { row, status, error, lastEventId, lastSeen }. `row` is null before the first
 * event and after `<event>-deleted`. The store reaches status "closed" for good after
 * `<event>-deleted` or an update for which `terminal(row)` is true, and does not
 * reconnect. `terminal` should say what the feed's `enable_feed(..., terminal => …)` says
 * (the server ends the stream there); for `files` it defaults to status ready or failed.
 */
export function watchRow(options) {
  return rowStore(options, "row", "watchRow needs the row's id");
}

/** watchRow for the `files` feed, with the row under `file`. */
export function watchFile(options) {
  return rowStore(options, "file", "watchFile needs the file's id");
}

// The store of connectFeed and connectFiles: `key` names the value's id → row object.
function feedStore(
  {
    feed,
    event: eventName,
    url,
    getToken,
    snapshot = true,
    EventSourceImpl = globalThis.EventSource,
    withCredentials = false,
    backoff = DEFAULT_BACKOFF,
    maxRetries = Infinity,
  } = {},
  key,
) {
  const { path, event } = feedNames(feed, eventName);
  if (url == null) url = path + "/events";
  // id → last version held, for rows removed by <event>-deleted. Keyed as object keys are
  // (a string), so a numeric id and its string are one row.
  const deleted = new Map();
  // Our own reconnects resume from the last cursor seen while live: before `synced` the
  // server is still catching up, and a cursor from the middle of that could skip rows.
  let resumeFrom = null;
  let live = false;
  const interrupted = (value) => {
    if (live) resumeFrom = value.lastEventId;
    live = false;
  };

  return liveStore(
    { [key]: {}, status: "closed", error: null, lastEventId: null, lastSeen: null },
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
        return { query: { snapshot: "1" }, patch: { [key]: {} } };
      },
      events: {
        [`${event}-update`](data, { value }) {
          const row = data && data[event];
          if (!row || row.id == null) return {};
          const id = String(row.id);
          const held = own(value[key], id);
          const floor = held ? held.version : deleted.get(id);
          if (isStale(row.version, floor)) return {};
          deleted.delete(id);
          return { [key]: { ...value[key], [id]: row } };
        },
        [`${event}-deleted`](data, { value }) {
          const raw = data && data[event] && data[event].id;
          if (raw == null) return {};
          const id = String(raw);
          const held = own(value[key], id);
          if (held && typeof held.version === "number") remember(deleted, id, held.version);
          if (!held) return {};
          const { [id]: _removed, ...rows } = value[key];
          return { [key]: rows };
        },
        reset() {
          // A full snapshot follows: start over rather than keep rows that may be gone.
          deleted.clear();
          return { [key]: {} };
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

// The store of watchRow and watchFile: `key` names the value's row.
function rowStore(
  {
    feed,
    event: eventName,
    id,
    url,
    terminal,
    getToken,
    EventSourceImpl = globalThis.EventSource,
    withCredentials = false,
    backoff = DEFAULT_BACKOFF,
    // A row that does not exist fails exactly like an expired token (EventSource shows
    // no status code), so give up after a few failures in a row instead of forever.
    maxRetries = 5,
  } = {},
  key,
  missingId,
) {
  if (id == null || id === "") throw new TypeError(missingId);
  const { path, event } = feedNames(feed, eventName);
  if (url == null) url = (rowId) => path + "/" + encodeURIComponent(rowId) + "/events";
  if (terminal == null && (feed == null || feed === FILES)) {
    terminal = (row) => FILE_TERMINAL.has(row.status);
  }

  return liveStore(
    { [key]: null, status: "closed", error: null, lastEventId: null, lastSeen: null },
    {
      EventSourceImpl,
      withCredentials,
      getToken,
      backoff,
      maxRetries,
      url: () => (typeof url === "function" ? url(id) : url),
      prepare: () => ({ query: {} }),
      events: {
        [`${event}-update`](data, { value, connected, finish }) {
          const row = data && data[event];
          if (!row) return {};
          connected();
          const patch = { status: "live", error: null };
          if (!isStale(row.version, value[key] && value[key].version)) patch[key] = row;
          const current = patch[key] || value[key];
          if (current && terminal && terminal(current)) finish();
          return patch; // status becomes "closed" if finish() was called
        },
        [`${event}-deleted`](_data, { finish }) {
          finish();
          return { [key]: null };
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

// A text id may be "constructor" or "__proto__": only the object's own rows count.
function own(rows, id) {
  return Object.hasOwn(rows, id) ? rows[id] : undefined;
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
