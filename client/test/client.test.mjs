// The client against a scripted EventSource: run with `npm test` here, or `make js-test`.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { connectFeed, connectFiles, watchFile, watchRow } from "streamer-client";

import { deleted, fakeEventSource, file, plain, settle, update } from "./fakes.mjs";

// Subscribe, let the connection open, and keep every value seen.
async function connected(options = {}) {
  const EventSourceImpl = fakeEventSource();
  let tokens = 0;
  const getToken = options.getToken ?? (async () => `token-${(tokens += 1)}`);
  const store = connectFiles({ EventSourceImpl, getToken, ...options });
  const values = [];
  const unsubscribe = store.subscribe((value) => values.push(value));
  await settle();
  return { store, EventSourceImpl, values, unsubscribe, latest: () => values.at(-1) };
}

describe("connectFiles", () => {
  test("subscribe calls back at once with the current value", () => {
    const EventSourceImpl = fakeEventSource();
    const store = connectFiles({ EventSourceImpl, getToken: async () => "t" });
    const values = [];
    const unsubscribe = store.subscribe((value) => values.push(value));
    assert.equal(values.length, 1);
    assert.deepEqual(values[0].files, {});
    assert.equal(values[0].status, "connecting");
    unsubscribe();
  });

  test("the token and snapshot are sent as query parameters", async () => {
    const { EventSourceImpl, unsubscribe } = await connected();
    const { url, withCredentials } = EventSourceImpl.last;
    assert.equal(url.pathname, "/api/files/events");
    assert.equal(url.searchParams.get("access_token"), "token-1");
    assert.equal(url.searchParams.get("snapshot"), "1");
    assert.equal(url.searchParams.has("last_event_id"), false);
    assert.equal(withCredentials, false);
    unsubscribe();
  });

  test("without getToken it relies on the cookie and sends credentials", async () => {
    const EventSourceImpl = fakeEventSource();
    const store = connectFiles({ EventSourceImpl, withCredentials: true, snapshot: false });
    const unsubscribe = store.subscribe(() => {});
    assert.equal(EventSourceImpl.instances.length, 1);
    assert.equal(EventSourceImpl.last.url.search, "");
    assert.equal(EventSourceImpl.last.withCredentials, true);
    unsubscribe();
  });

  test("synced makes the store live", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    assert.equal(latest().status, "connecting");
    EventSourceImpl.last.emit("synced", plain("synced"), "c1");
    assert.equal(latest().status, "live");
    assert.equal(latest().lastEventId, "c1");
    unsubscribe();
  });

  test("a stale update is dropped and a newer one applied", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("a", 3, { progress: 30 })), "c1");
    es.emit("file-update", update(file("a", 2, { progress: 20 })), "c2");
    assert.equal(latest().files.a.version, 3);
    assert.equal(latest().files.a.progress, 30);
    es.emit("file-update", update(file("a", 3, { progress: 99 })), "c3");
    assert.equal(latest().files.a.progress, 30, "a repeat of the same version changes nothing");
    es.emit("file-update", update(file("a", 4, { progress: 40 })), "c4");
    assert.equal(latest().files.a.progress, 40);
    unsubscribe();
  });

  test("every change gives a new files object", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    EventSourceImpl.last.emit("file-update", update(file("a", 1)), "c1");
    const before = latest().files;
    EventSourceImpl.last.emit("file-update", update(file("b", 1)), "c2");
    assert.notEqual(latest().files, before);
    assert.deepEqual(Object.keys(before), ["a"]);
    unsubscribe();
  });

  test("file-deleted removes the file, and a late repeat does not bring it back", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("a", 5)), "c1");
    es.emit("file-update", update(file("b", 1)), "c2");
    es.emit("file-deleted", deleted("a"), "c3");
    assert.deepEqual(Object.keys(latest().files), ["b"]);
    es.emit("file-update", update(file("a", 5)), "c4");
    assert.deepEqual(Object.keys(latest().files), ["b"]);
    es.emit("file-update", update(file("a", 6)), "c5");
    assert.deepEqual(Object.keys(latest().files).sort(), ["a", "b"]);
    unsubscribe();
  });

  test("reset clears every file before the snapshot that follows", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("a", 5)), "c1");
    es.emit("file-update", update(file("b", 5)), "c2");
    es.emit("reset", plain("reset"));
    assert.deepEqual(latest().files, {});
    es.emit("file-update", update(file("b", 5)), "c3");
    es.emit("synced", plain("synced"), "c4");
    assert.deepEqual(Object.keys(latest().files), ["b"]);
    assert.equal(latest().status, "live");
    unsubscribe();
  });

  test("heartbeat changes no file and keeps the cursor", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("a", 1)), "c1");
    const files = latest().files;
    es.emit("heartbeat", plain("heartbeat"));
    assert.equal(latest().files, files);
    assert.equal(latest().lastEventId, "c1");
    assert.equal(typeof latest().lastSeen, "number");
    unsubscribe();
  });

  test("token-expired fetches a fresh token and resumes from the last cursor", async () => {
    const { EventSourceImpl, latest, values, unsubscribe } = await connected();
    const first = EventSourceImpl.last;
    first.emit("file-update", update(file("a", 1)), "c1");
    first.emit("synced", plain("synced"), "c2");
    first.emit("file-update", update(file("a", 2)), "c3");
    first.emit("token-expired", plain("token-expired"));
    assert.equal(first.closed, true);
    assert.equal(latest().status, "expired");
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    const second = EventSourceImpl.last;
    assert.equal(second.url.searchParams.get("access_token"), "token-2");
    assert.equal(second.url.searchParams.get("last_event_id"), "c3");
    assert.equal(second.url.searchParams.has("snapshot"), false);
    assert.equal(latest().files.a.version, 2, "files are kept across the reconnect");
    second.emit("synced", plain("synced"), "c4");
    assert.equal(latest().status, "live");
    assert.ok(values.some((v) => v.status === "expired"));
    unsubscribe();
  });

  test("events of a replaced connection are ignored", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const first = EventSourceImpl.last;
    first.emit("synced", plain("synced"), "c1");
    first.emit("token-expired", plain("token-expired"));
    await settle();
    first.emit("file-update", update(file("late", 1)), "c9");
    assert.deepEqual(latest().files, {});
    assert.equal(latest().lastEventId, "c1");
    unsubscribe();
  });

  test("an error while the browser reconnects shows reconnecting, then live again", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const es = EventSourceImpl.last;
    es.emit("synced", plain("synced"), "c1");
    es.fail(0);
    assert.equal(latest().status, "reconnecting");
    assert.equal(EventSourceImpl.instances.length, 1, "the browser reconnects by itself");
    es.emit("synced", plain("synced"), "c2");
    assert.equal(latest().status, "live");
    unsubscribe();
  });

  test("a refused connection reconnects after a backoff with a fresh token", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    let tokens = 0;
    const getToken = async () => `token-${(tokens += 1)}`;
    const { EventSourceImpl, latest, unsubscribe } = await connected({ getToken });
    const first = EventSourceImpl.last;
    first.emit("synced", plain("synced"), "c1");
    first.fail(2);
    assert.equal(latest().status, "reconnecting");
    assert.match(latest().error, /refused or lost/);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 1, "waits before reconnecting");
    t.mock.timers.tick(1000);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    assert.equal(tokens, 2);
    const second = EventSourceImpl.last;
    assert.equal(second.url.searchParams.get("last_event_id"), "c1");
    assert.equal(second.url.searchParams.get("access_token"), "token-2");
    second.emit("synced", plain("synced"), "c2");
    assert.equal(latest().status, "live");
    assert.equal(latest().error, null);
    unsubscribe();
  });

  test("the backoff doubles up to its cap", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    t.mock.method(Math, "random", () => 1);
    const backoff = { initial: 100, max: 300 };
    const { EventSourceImpl, unsubscribe } = await connected({ backoff });
    for (const wait of [100, 200, 300, 300]) {
      const count = EventSourceImpl.instances.length;
      EventSourceImpl.last.fail(2);
      t.mock.timers.tick(wait - 1);
      await settle();
      assert.equal(EventSourceImpl.instances.length, count, `still waiting at ${wait - 1} ms`);
      t.mock.timers.tick(1);
      await settle();
      assert.equal(EventSourceImpl.instances.length, count + 1, `reconnected at ${wait} ms`);
    }
    unsubscribe();
  });

  test("a connection lost before synced resumes from a cursor the server completed", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const { EventSourceImpl, latest, unsubscribe } = await connected();
    const first = EventSourceImpl.last;
    first.emit("file-update", update(file("a", 1)), "s1");
    first.fail(2);
    t.mock.timers.tick(1000);
    await settle();
    const second = EventSourceImpl.last;
    assert.equal(second.url.searchParams.get("snapshot"), "1", "the snapshot starts over");
    assert.equal(second.url.searchParams.has("last_event_id"), false);
    assert.deepEqual(latest().files, {});
    unsubscribe();
  });

  test("the last unsubscribe closes the connection and a new subscriber resumes", async () => {
    const { store, EventSourceImpl, latest, unsubscribe } = await connected();
    const first = EventSourceImpl.last;
    first.emit("file-update", update(file("a", 1)), "c1");
    first.emit("synced", plain("synced"), "c2");
    const other = store.subscribe(() => {});
    unsubscribe();
    assert.equal(first.closed, false, "another subscriber still listens");
    other();
    assert.equal(first.closed, true);
    assert.equal(latest().status, "live", "an unsubscribed callback hears nothing more");

    const values = [];
    const again = store.subscribe((value) => values.push(value));
    assert.equal(values.length, 1);
    assert.equal(values[0].status, "connecting");
    assert.equal(values[0].files.a.version, 1);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    assert.equal(EventSourceImpl.last.url.searchParams.get("last_event_id"), "c2");
    again();
    again();
    assert.equal(EventSourceImpl.last.closed, true);
  });

  test("unsubscribing while the token is fetched opens nothing", async () => {
    const EventSourceImpl = fakeEventSource();
    let release;
    const getToken = () => new Promise((resolve) => (release = resolve));
    const unsubscribe = connectFiles({ EventSourceImpl, getToken }).subscribe(() => {});
    unsubscribe();
    release("t");
    await settle();
    assert.equal(EventSourceImpl.instances.length, 0);
  });

  test("without EventSource the store stays closed instead of throwing", () => {
    const store = connectFiles({ EventSourceImpl: undefined });
    let value;
    store.subscribe((v) => (value = v))();
    assert.equal(value.status, "closed");
    assert.match(value.error, /EventSource/);
  });
});

describe("watchFile", () => {
  async function watching(options = {}) {
    const EventSourceImpl = fakeEventSource();
    const store = watchFile({ EventSourceImpl, id: "f 1", getToken: async () => "t", ...options });
    const values = [];
    const unsubscribe = store.subscribe((value) => values.push(value));
    await settle();
    return { EventSourceImpl, store, unsubscribe, latest: () => values.at(-1) };
  }

  test("it follows one file and closes after a terminal status", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching();
    const es = EventSourceImpl.last;
    assert.equal(es.url.pathname, "/api/files/f%201/events");
    assert.equal(es.url.searchParams.get("access_token"), "t");
    es.emit("file-update", update(file("f 1", 1, { progress: 40 })), "c1");
    assert.equal(latest().status, "live");
    assert.equal(latest().file.progress, 40);
    es.emit("file-update", update(file("f 1", 2, { status: "ready", progress: 100 })), "c2");
    assert.equal(latest().file.status, "ready");
    assert.equal(latest().status, "closed");
    assert.equal(es.closed, true);
    es.fail(2);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 1, "no reconnect after the end");
    unsubscribe();
  });

  test("a failed file closes it too, with its error message", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching();
    const failed = { status: "failed", error_message: "virus found" };
    EventSourceImpl.last.emit("file-update", update(file("f 1", 3, failed)), "c1");
    assert.equal(latest().status, "closed");
    assert.equal(latest().file.error_message, "virus found");
    unsubscribe();
  });

  test("file-deleted clears the file and closes", async () => {
    const { EventSourceImpl, store, latest, unsubscribe } = await watching();
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("f 1", 1)), "c1");
    es.emit("file-deleted", deleted("f 1"), "c2");
    assert.equal(latest().file, null);
    assert.equal(latest().status, "closed");
    assert.equal(es.closed, true);
    unsubscribe();
    store.subscribe(() => {})();
    assert.equal(EventSourceImpl.instances.length, 1, "a finished watch does not reconnect");
  });

  test("a stale update of the file is dropped", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching();
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("f 1", 5, { progress: 50 })), "c1");
    es.emit("file-update", update(file("f 1", 4, { progress: 40 })), "c2");
    assert.equal(latest().file.progress, 50);
    unsubscribe();
  });

  test("it gives up after maxRetries refused connections", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const { EventSourceImpl, latest, unsubscribe } = await watching({ maxRetries: 2 });
    for (let i = 0; i < 3; i += 1) {
      EventSourceImpl.last.fail(2);
      t.mock.timers.tick(30000);
      await settle();
    }
    assert.equal(EventSourceImpl.instances.length, 3);
    assert.equal(latest().status, "closed");
    assert.match(latest().error, /gave up after 3 attempts/);
    unsubscribe();
  });

  test("token-expired reconnects with a fresh token", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching();
    const first = EventSourceImpl.last;
    first.emit("file-update", update(file("f 1", 1)), "c1");
    first.emit("token-expired", plain("token-expired"));
    assert.equal(latest().status, "expired");
    assert.equal(first.closed, true);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    unsubscribe();
  });
});

// Another feed, as SPEC.md's "Any table is a feed" enables it:
// enable_feed('jobs', owner_column => 'owner_id', event => 'job', ...) with bigint ids.
function job(id, version, fields = {}) {
  return { id, name: `job ${id}`, status: "running", progress: 10, version, ...fields };
}
const jobUpdate = (j) => ({ eventType: "job-update", timestamp: "2024-05-01T10:00:00Z", job: j });
const jobDeleted = (id) => ({
  eventType: "job-deleted",
  timestamp: "2024-05-01T10:00:00Z",
  job: { id },
});

describe("connectFeed", () => {
  async function following(options = {}) {
    const EventSourceImpl = fakeEventSource();
    let tokens = 0;
    const getToken = async () => `token-${(tokens += 1)}`;
    const store = connectFeed({
      EventSourceImpl,
      getToken,
      feed: "jobs",
      event: "job",
      ...options,
    });
    const values = [];
    const unsubscribe = store.subscribe((value) => values.push(value));
    await settle();
    return { EventSourceImpl, values, unsubscribe, latest: () => values.at(-1) };
  }

  test("it opens the feed's own URL with the token and a snapshot", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    const { url } = EventSourceImpl.last;
    assert.equal(url.pathname, "/api/jobs/events");
    assert.equal(url.searchParams.get("access_token"), "token-1");
    assert.equal(url.searchParams.get("snapshot"), "1");
    assert.deepEqual(latest().rows, {});
    assert.equal("files" in latest(), false);
    unsubscribe();
  });

  test("it listens to the feed's event names and reads the row under its data key", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    const es = EventSourceImpl.last;
    assert.deepEqual([...es.listeners.keys()].sort(), [
      "heartbeat",
      "job-deleted",
      "job-update",
      "reset",
      "synced",
      "token-expired",
    ]);
    es.emit("job-update", jobUpdate(job(7, 1, { progress: 70 })), "c1");
    es.emit("synced", plain("synced"), "c2");
    assert.equal(latest().rows[7].progress, 70);
    assert.equal(latest().status, "live");
    assert.equal(latest().lastEventId, "c2");
    unsubscribe();
  });

  test("numeric ids key the rows, and a stale update of one is dropped", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    const es = EventSourceImpl.last;
    es.emit("job-update", jobUpdate(job(7, 3, { progress: 30 })), "c1");
    es.emit("job-update", jobUpdate(job(12, 1)), "c2");
    es.emit("job-update", jobUpdate(job(7, 2, { progress: 20 })), "c3");
    assert.deepEqual(Object.keys(latest().rows), ["7", "12"]);
    assert.equal(latest().rows[7], latest().rows["7"]);
    assert.equal(latest().rows[7].id, 7, "the row keeps its id as the server sent it");
    assert.equal(latest().rows[7].progress, 30);
    es.emit("job-update", jobUpdate(job(7, 4, { progress: 40 })), "c4");
    assert.equal(latest().rows[7].progress, 40);
    unsubscribe();
  });

  test("a delete by numeric id removes the row, and a late repeat does not bring it back", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    const es = EventSourceImpl.last;
    es.emit("job-update", jobUpdate(job(7, 5)), "c1");
    es.emit("job-update", jobUpdate(job(8, 1)), "c2");
    const before = latest().rows;
    es.emit("job-deleted", jobDeleted(7), "c3");
    assert.deepEqual(Object.keys(latest().rows), ["8"]);
    assert.deepEqual(Object.keys(before), ["7", "8"], "the previous object is not mutated");
    es.emit("job-update", jobUpdate(job(7, 5)), "c4");
    assert.deepEqual(Object.keys(latest().rows), ["8"]);
    es.emit("job-update", jobUpdate(job(7, 6)), "c5");
    assert.deepEqual(Object.keys(latest().rows), ["7", "8"]);
    unsubscribe();
  });

  test("text ids key the rows as they are", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following({
      feed: "tags",
      event: "tag",
    });
    const es = EventSourceImpl.last;
    assert.equal(es.url.pathname, "/api/tags/events");
    const tag = (id, version) => ({
      eventType: "tag-update",
      timestamp: "t",
      tag: { id, version },
    });
    es.emit("tag-update", tag("urgent", 1), "c1");
    es.emit("tag-update", tag("12", 1), "c2");
    es.emit(
      "tag-deleted",
      { eventType: "tag-deleted", timestamp: "t", tag: { id: "urgent" } },
      "c3",
    );
    assert.deepEqual(latest().rows, { 12: { id: "12", version: 1 } });
    // An id that is also a name every object has is a row like any other.
    es.emit("tag-update", tag("constructor", 2), "c4");
    es.emit("tag-deleted", { eventType: "tag-deleted", tag: { id: "constructor" } }, "c5");
    es.emit("tag-update", tag("constructor", 2), "c6");
    assert.deepEqual(Object.keys(latest().rows), ["12"]);
    unsubscribe();
  });

  test("a files event on another feed's stream changes nothing", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    EventSourceImpl.last.emit("file-update", update(file("a", 1)), "c1");
    EventSourceImpl.last.emit("job-update", { eventType: "job-update", file: file("a", 1) }, "c2");
    assert.deepEqual(latest().rows, {});
    unsubscribe();
  });

  test("reset clears every row before the snapshot that follows", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    const es = EventSourceImpl.last;
    es.emit("job-update", jobUpdate(job(7, 5)), "c1");
    es.emit("reset", plain("reset"));
    assert.deepEqual(latest().rows, {});
    es.emit("job-update", jobUpdate(job(8, 1)), "c2");
    assert.deepEqual(Object.keys(latest().rows), ["8"]);
    unsubscribe();
  });

  test("token-expired resumes the feed from the last cursor", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await following();
    const first = EventSourceImpl.last;
    first.emit("job-update", jobUpdate(job(7, 1)), "c1");
    first.emit("synced", plain("synced"), "c2");
    first.emit("job-update", jobUpdate(job(7, 2)), "c3");
    first.emit("token-expired", plain("token-expired"));
    await settle();
    const second = EventSourceImpl.last;
    assert.equal(second.url.pathname, "/api/jobs/events");
    assert.equal(second.url.searchParams.get("access_token"), "token-2");
    assert.equal(second.url.searchParams.get("last_event_id"), "c3");
    assert.equal(second.url.searchParams.has("snapshot"), false);
    assert.equal(latest().rows[7].version, 2, "rows are kept across the reconnect");
    second.emit("job-deleted", jobDeleted(7), "c4");
    second.emit("synced", plain("synced"), "c5");
    assert.deepEqual(latest().rows, {});
    assert.equal(latest().status, "live");
    unsubscribe();
  });

  test("a refused connection reconnects to the feed from the last cursor", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const { EventSourceImpl, unsubscribe } = await following();
    const first = EventSourceImpl.last;
    first.emit("synced", plain("synced"), "c1");
    first.emit("job-update", jobUpdate(job(7, 1)), "c2");
    first.fail(0); // the browser reconnects by itself, with Last-Event-ID
    first.emit("synced", plain("synced"), "c3");
    first.fail(2);
    t.mock.timers.tick(1000);
    await settle();
    const second = EventSourceImpl.last;
    assert.equal(EventSourceImpl.instances.length, 2);
    assert.equal(second.url.pathname, "/api/jobs/events");
    assert.equal(second.url.searchParams.get("last_event_id"), "c3");
    unsubscribe();
  });

  test("the event name defaults to the feed's name, and the feed to files", async () => {
    const jobs = await following({ event: undefined });
    assert.ok(jobs.EventSourceImpl.last.listeners.has("jobs-update"));
    jobs.EventSourceImpl.last.emit("jobs-update", { jobs: job(1, 1) }, "c1");
    assert.equal(jobs.latest().rows[1].version, 1);
    jobs.unsubscribe();

    const files = await following({ feed: undefined, event: undefined });
    const es = files.EventSourceImpl.last;
    assert.equal(es.url.pathname, "/api/files/events");
    es.emit("file-update", update(file("a", 1)), "c1");
    assert.equal(files.latest().rows.a.version, 1);
    files.unsubscribe();
  });

  test("an explicit url wins over the feed's", async () => {
    const { EventSourceImpl, unsubscribe } = await following({ url: "/edge/jobs/stream" });
    assert.equal(EventSourceImpl.last.url.pathname, "/edge/jobs/stream");
    unsubscribe();
  });

  test("a feed without a name is refused at once", () => {
    assert.throws(() => connectFeed({ feed: "" }), TypeError);
    assert.throws(() => watchRow({ feed: "", id: 1 }), TypeError);
  });
});

describe("watchRow", () => {
  async function watching(options = {}) {
    const EventSourceImpl = fakeEventSource();
    const store = watchRow({
      EventSourceImpl,
      getToken: async () => "t",
      feed: "jobs",
      event: "job",
      id: 7,
      ...options,
    });
    const values = [];
    const unsubscribe = store.subscribe((value) => values.push(value));
    await settle();
    return { EventSourceImpl, unsubscribe, latest: () => values.at(-1) };
  }

  test("it follows one row of the feed by numeric id", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching();
    const es = EventSourceImpl.last;
    assert.equal(es.url.pathname, "/api/jobs/7/events");
    es.emit("job-update", jobUpdate(job(7, 2, { progress: 40 })), "c1");
    es.emit("job-update", jobUpdate(job(7, 1, { progress: 20 })), "c2");
    assert.equal(latest().status, "live");
    assert.equal(latest().row.progress, 40);
    assert.equal("file" in latest(), false);
    unsubscribe();
  });

  test("terminal closes it for good, and only terminal does", async () => {
    const terminal = (row) => row.status === "completed" || row.status === "failed";
    const { EventSourceImpl, latest, unsubscribe } = await watching({ terminal });
    const es = EventSourceImpl.last;
    es.emit("job-update", jobUpdate(job(7, 1, { status: "ready" })), "c1");
    assert.equal(latest().status, "live", "files' terminal statuses mean nothing here");
    es.emit("job-update", jobUpdate(job(7, 2, { status: "completed" })), "c2");
    assert.equal(latest().status, "closed");
    assert.equal(es.closed, true);
    unsubscribe();
  });

  test("without terminal, another feed's row is followed until it is deleted", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching();
    const es = EventSourceImpl.last;
    es.emit("job-update", jobUpdate(job(7, 1, { status: "failed" })), "c1");
    assert.equal(latest().status, "live");
    es.emit("job-deleted", jobDeleted(7), "c2");
    assert.equal(latest().row, null);
    assert.equal(latest().status, "closed");
    assert.equal(es.closed, true);
    unsubscribe();
  });

  test("a text id is encoded into the feed's URL", async () => {
    const { EventSourceImpl, unsubscribe } = await watching({
      feed: "tags",
      event: "tag",
      id: "a/b c",
    });
    assert.equal(EventSourceImpl.last.url.pathname, "/api/tags/a%2Fb%20c/events");
    unsubscribe();
  });

  test("the files feed is the default, with its terminal statuses", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await watching({
      feed: undefined,
      event: undefined,
      id: "f1",
    });
    const es = EventSourceImpl.last;
    assert.equal(es.url.pathname, "/api/files/f1/events");
    es.emit("file-update", update(file("f1", 1, { status: "ready" })), "c1");
    assert.equal(latest().row.status, "ready");
    assert.equal(latest().status, "closed");
    unsubscribe();
  });

  test("id 0 is an id", () => {
    assert.doesNotThrow(() => watchRow({ feed: "jobs", id: 0, EventSourceImpl: undefined }));
    assert.throws(() => watchRow({ feed: "jobs" }), /needs the row's id/);
  });
});
