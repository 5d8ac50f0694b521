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
//   // Only some rows, and only some columns (id and version always come):
//   const active = connectFeed({ filter: { status: "in.(pending,processing)" },
//                                select: ["filename", "status", "progress"] });

const CONNECTING = 0;
const CLOSED = 2;
const FILES = "files";
const FILE_TERMINAL = new Set(["ready", "failed"]);
// Enough to stop a late repeat from resurrecting a deleted row, without growing forever.
const TOMBSTONES = 1000;
// Query parameters of the stream itself, which no filter may take as a column's name.
const RESERVED = new Set(["snapshot", "last_event_id", "access_token", "select"]);
// Refusals that the same request can never get past: the store closes for good.
const HOPELESS = new Set(["INVALID_FILTER", "FORBIDDEN", "INVALID_ID"]);

export const DEFAULT_BACKOFF = Object.freeze({ initial: 1000, max: 30000 });

/**
 * A shaped stream's query parameters, in order: each filter expression under its column,
 * then `select`. Bad input throws here, before anything is opened.
 */
function shapeParams(filter, select) {
  const pairs = [];
  if (filter != null) {
    const proto = typeof filter === "object" ? Object.getPrototypeOf(filter) : undefined;
    if (proto !== Object.prototype && proto !== null) {
      throw new TypeError(
        'filter must be an object of column → expression: { status: "eq.ready" }',
      );
    }
    for (const [column, value] of Object.entries(filter)) {
      if (column === "") throw new TypeError("filter names an empty column");
      if (RESERVED.has(column)) {
        throw new TypeError(`"${column}" is the stream's own parameter, not a column to filter`);
      }
      if (value === undefined) continue; // left out: { status: tab === "all" ? undefined : … }
      const expressions = Array.isArray(value) ? value : [value];
      const valid = expressions.every((e) => typeof e === "string" && e !== "");
      if (expressions.length === 0 || !valid) {
        throw new TypeError(
          `filter.${column} must be a PostgREST expression such as "eq.ready" or "is.null", ` +
            "or an array of them",
        );
      }
      for (const expression of expressions) pairs.push([column, expression]);
    }
  }
  if (select != null) {
    const names = Array.isArray(select) && select.length > 0 && select;
    if (!names || !names.every((name) => typeof name === "string" && name !== "")) {
      throw new TypeError(
        'select must be a non-empty array of column names: ["status", "progress"]',
      );
    }
    const listed = names.find((name) => name.includes(","));
    if (listed) throw new TypeError(`select names one column per item, not "${listed}"`);
    pairs.push(["select", names.join(",")]);
  }
  return pairs;
}

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
 * Value: { rows, status, error, errorCode, lastEventId, lastSeen }, where `rows` is a plain
 * object of id → row (a bigint id is a number on the wire and its decimal string as a key),
 * replaced (never mutated) on every change. `filter` ({ column: "gte.50" or an array of
 * such PostgREST expressions }, ANDed) and `select` (column names) shape the stream: the
 * store then holds exactly the rows that match now, with those columns.
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
    filter,
    select,
    EventSourceImpl = globalThis.EventSource,
    fetchImpl = globalThis.fetch,
    withCredentials = false,
    backoff = DEFAULT_BACKOFF,
    maxRetries = Infinity,
  } = {},
  key,
) {
  const { path, event } = feedNames(feed, eventName);
  if (url == null) url = path + "/events";
  // Sent on every connection: a cursor belongs to its shape.
  const shape = shapeParams(filter, select);
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
    { [key]: {}, ...CLOSED_STATE },
    {
      EventSourceImpl,
      fetchImpl,
      withCredentials,
      getToken,
      backoff,
      maxRetries,
      url: () => url,
      shape,
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
          return { status: "live", error: null, errorCode: null };
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
    fetchImpl = globalThis.fetch,
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
    { [key]: null, ...CLOSED_STATE },
    {
      EventSourceImpl,
      fetchImpl,
      withCredentials,
      getToken,
      backoff,
      maxRetries,
      url: () => (typeof url === "function" ? url(id) : url),
      shape: [],
      prepare: () => ({ query: {} }),
      events: {
        [`${event}-update`](data, { value, connected, finish }) {
          const row = data && data[event];
          if (!row) return {};
          connected();
          const patch = { status: "live", error: null, errorCode: null };
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

/**
 * Why a stream was refused: an EventSource shows no status, so the same URL is asked once
 * more with fetch, and the server's JSON error read. Null when that says nothing (no fetch,
 * a network error, a proxy's page, or the stream would open now: that one is closed at once).
 */
async function whyRefused(fetchImpl, href, withCredentials) {
  if (typeof fetchImpl !== "function") return null;
  const abort = typeof AbortController === "function" ? new AbortController() : null;
  try {
    const response = await fetchImpl(href, {
      credentials: withCredentials ? "include" : "same-origin",
      cache: "no-store",
      signal: abort ? abort.signal : undefined,
    });
    if (response.ok) return null;
    const body = await response.json();
    if (body && typeof body.error === "string" && typeof body.code === "string") {
      return { error: body.error.replace(/\.$/, ""), code: body.code };
    }
  } catch {
    // Nothing to learn: the reconnects carry on as for any refusal.
  } finally {
    if (abort) abort.abort();
  }
  return null;
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

const CLOSED_STATE = Object.freeze({
  status: "closed",
  error: null,
  errorCode: null,
  lastEventId: null,
  lastSeen: null,
});

// `params`: [name, value] pairs, so that a name may repeat (progress=gte.10&progress=lt.50).
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
// `config.shape` holds the query pairs every connection sends (a feed's filter and select);
// `config.prepare(value)` gives the rest of the query (and maybe a patch) for each one;
// `config.events[name](data, ctx)` returns a patch for the value; ctx offers the current
// value and the actions connected() (reset the backoff), renew() (close and reconnect at
// once with a fresh token) and finish() (close for good, status "closed").
// A refusal the server explains as hopeless (HOPELESS) closes the store for good too.
function liveStore(initial, config) {
  let value = initial;
  const subscribers = new Set();
  let notify = false; // false while starting: the first subscriber is called once, after
  let generation = 0; // bumped on every start and stop; late async work checks it
  let source = null;
  let timer = null;
  let failures = 0;
  let refusals = 0; // bumped on every refused connection; a late explanation checks it
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
    const href = withQuery(config.url(value), [...config.shape, ...Object.entries(query)]);
    let es;
    try {
      es = new config.EventSourceImpl(href, { withCredentials: config.withCredentials });
    } catch (err) {
      retry(`could not open the stream: ${describe(err)}`);
      return;
    }
    source = es;
    let opened = false;
    es.onopen = () => {
      opened = true;
    };
    es.onerror = () => {
      if (source !== es) return;
      if (es.readyState === CLOSED) {
        // Refused (401 for an expired token, 429, 400 for a bad filter, a proxy error) or
        // the browser gave up.
        source = null;
        retry("the stream was refused or lost");
        // A stream refused before it ever opened may be refused for good: ask why. (One
        // that was open and lost it on the browser's own reconnect is not asked: that is
        // a restart or an expired token, and our next connection is asked if refused.)
        if (!opened) explain(href, gen);
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
        opened = true;
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

  async function explain(href, gen) {
    const refusal = (refusals += 1);
    const answer = await whyRefused(config.fetchImpl, href, config.withCredentials);
    // Only while nothing newer happened: no new connection, no stop, no later refusal.
    if (!answer || gen !== generation || refusal !== refusals || source !== null) return;
    if (HOPELESS.has(answer.code)) {
      finish();
      set({ status: "closed", error: answer.error, errorCode: answer.code });
    } else if (timer != null) {
      set({ error: answer.error, errorCode: answer.code }); // still waiting to retry
    }
  }

  function retry(reason) {
    closeSource();
    failures += 1;
    if (failures > config.maxRetries) {
      set({
        status: "closed",
        error: `${reason}; gave up after ${failures} attempts`,
        errorCode: null,
      });
      return;
    }
    const { initial = 1000, max = 30000 } = config.backoff || {};
    const ceiling = Math.min(max, initial * 2 ** (failures - 1));
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    const gen = generation;
    set({ status: "reconnecting", error: reason, errorCode: null });
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
      set({
        status: "closed",
        error: "EventSource is not available in this environment",
        errorCode: null,
      });
      return;
    }
    set({ status: "connecting", error: null, errorCode: null });
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
