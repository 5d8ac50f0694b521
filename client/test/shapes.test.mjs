// Shaped streams (filters and select) and refusals the client cannot get past: `make js-test`.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { connectFeed, watchFile } from "streamer-client";

import { deleted, fakeEventSource, fakeFetch, file, plain, settle, update } from "./fakes.mjs";

// The files feed through connectFeed, shaped by `options`; every value seen is kept.
async function shaped(options = {}) {
  const EventSourceImpl = fakeEventSource();
  let tokens = 0;
  const getToken = async () => `token-${(tokens += 1)}`;
  const fetchImpl = fakeFetch(new Error("offline"));
  const store = connectFeed({ EventSourceImpl, getToken, fetchImpl, ...options });
  const values = [];
  const unsubscribe = store.subscribe((value) => values.push(value));
  await settle();
  return { EventSourceImpl, values, unsubscribe, latest: () => values.at(-1) };
}

const refusal = (status, code, error) => ({ status, body: { error, code } });

describe("a shaped stream's URL", () => {
  test("each filter expression is a parameter under its column, and select a list", async () => {
    const { EventSourceImpl, unsubscribe } = await shaped({
      filter: { status: "in.(pending,processing)", progress: ["gte.10", "lt.50"] },
      select: ["filename", "status", "progress"],
    });
    const { url } = EventSourceImpl.last;
    assert.equal(url.pathname, "/api/files/events");
    assert.deepEqual(
      [...url.searchParams],
      [
        ["status", "in.(pending,processing)"],
        ["progress", "gte.10"],
        ["progress", "lt.50"],
        ["select", "filename,status,progress"],
        ["snapshot", "1"],
        ["access_token", "token-1"],
      ],
    );
    unsubscribe();
  });

  test("commas, parentheses, quotes, spaces and ampersands in a value survive", async () => {
    const value = 'in.("a,b",c d,"x&y=z",(1),100%)';
    const { EventSourceImpl, unsubscribe } = await shaped({
      filter: { filename: value, error_message: "ilike.*disk #1*" },
    });
    const { url } = EventSourceImpl.last;
    assert.equal(url.searchParams.get("filename"), value);
    assert.equal(url.searchParams.get("error_message"), "ilike.*disk #1*");
    assert.equal(url.hash, "", "a # is encoded, not a fragment");
    assert.doesNotMatch(url.search, /[",() #]/);
    unsubscribe();
  });

  test("the shape is sent again on every reconnect, beside the cursor", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const { EventSourceImpl, unsubscribe } = await shaped({
      filter: { status: "eq.failed" },
      select: ["status"],
    });
    const first = EventSourceImpl.last;
    first.emit("synced", plain("synced"), "41.ab12cd34ef56ab12");
    first.fail(2);
    t.mock.timers.tick(1000);
    await settle();
    const { url } = EventSourceImpl.last;
    assert.equal(EventSourceImpl.instances.length, 2);
    assert.equal(url.searchParams.get("status"), "eq.failed");
    assert.equal(url.searchParams.get("select"), "status");
    assert.equal(url.searchParams.get("last_event_id"), "41.ab12cd34ef56ab12");
    assert.equal(url.searchParams.has("snapshot"), false);
    unsubscribe();
  });

  test("a column whose filter is undefined is left out, and no shape sends none", async () => {
    const { EventSourceImpl, unsubscribe } = await shaped({
      filter: { status: undefined, progress: "gte.50" },
      url: "/edge/files?region=eu",
    });
    const { url } = EventSourceImpl.last;
    assert.equal(url.pathname, "/edge/files");
    const names = [...url.searchParams.keys()];
    assert.deepEqual(names, ["region", "progress", "snapshot", "access_token"]);
    unsubscribe();

    const plainStream = await shaped({ filter: {} });
    assert.deepEqual([...plainStream.EventSourceImpl.last.url.searchParams.keys()], [
      "snapshot",
      "access_token",
    ]);
    plainStream.unsubscribe();
  });
});

describe("a shape the client refuses at once", () => {
  const refused = {
    "an empty column name": [{ filter: { "": "eq.1" } }, /empty column/],
    "snapshot as a column": [{ filter: { snapshot: "eq.1" } }, /"snapshot"/],
    "last_event_id as a column": [{ filter: { last_event_id: "eq.1" } }, /"last_event_id"/],
    "access_token as a column": [{ filter: { access_token: "eq.x" } }, /"access_token"/],
    "select as a column": [{ filter: { select: "eq.x" } }, /"select"/],
    "a filter that is a string": [{ filter: "status=eq.ready" }, /filter must be an object/],
    "a filter that is an array": [{ filter: [["status", "eq.ready"]] }, /filter must be an object/],
    "a filter that is a Map": [{ filter: new Map([["s", "eq.1"]]) }, /filter must be an object/],
    "an empty expression": [{ filter: { status: "" } }, /filter\.status must be a PostgREST/],
    "a number for an expression": [{ filter: { progress: 50 } }, /filter\.progress must be/],
    "null for an expression": [{ filter: { error_message: null } }, /"is\.null"/],
    "an empty array of expressions": [{ filter: { progress: [] } }, /filter\.progress must be/],
    "a non-string in an array": [{ filter: { progress: ["gte.1", 5] } }, /filter\.progress/],
    "a select that is a string": [{ select: "id,status" }, /select must be a non-empty array/],
    "an empty select": [{ select: [] }, /select must be a non-empty array/],
    "a select with a number": [{ select: ["status", 3] }, /select must be a non-empty array/],
    "a select with an empty name": [{ select: ["status", ""] }, /select must be a non-empty array/],
    "a select item listing two columns": [{ select: ["id,status"] }, /one column per item/],
  };
  for (const [what, [options, message]] of Object.entries(refused)) {
    test(`${what} throws a TypeError before anything opens`, () => {
      const EventSourceImpl = fakeEventSource();
      assert.throws(() => connectFeed({ EventSourceImpl, ...options }), (err) => {
        assert.ok(err instanceof TypeError);
        assert.match(err.message, message);
        return true;
      });
      assert.equal(EventSourceImpl.instances.length, 0);
    });
  }
});

describe("a refused stream", () => {
  test("400 INVALID_FILTER closes the store for good with the server's sentence", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const fetchImpl = fakeFetch(
      refusal(400, "INVALID_FILTER", "Filter on an unknown column 'colour'; known: id, status."),
    );
    const { EventSourceImpl, latest, unsubscribe } = await shaped({
      filter: { colour: "eq.red" },
      fetchImpl,
    });
    const es = EventSourceImpl.last;
    es.fail(2);
    await settle();
    assert.equal(fetchImpl.calls.length, 1);
    assert.equal(fetchImpl.calls[0].url.href, es.url.href, "the refused URL is asked why");
    assert.equal(fetchImpl.calls[0].init.credentials, "same-origin");
    assert.equal(latest().status, "closed");
    assert.equal(latest().errorCode, "INVALID_FILTER");
    assert.equal(latest().error, "Filter on an unknown column 'colour'; known: id, status");
    t.mock.timers.tick(60000);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 1, "no reconnect");
    unsubscribe();
    assert.equal(latest().status, "closed");
  });

  test("403 FORBIDDEN closes the store for good, even on a later connection", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const fetchImpl = fakeFetch(refusal(403, "FORBIDDEN", "The token carries no org_id claim."));
    const { EventSourceImpl, latest, unsubscribe } = await shaped({
      feed: "invoices",
      event: "invoice",
      fetchImpl,
    });
    const first = EventSourceImpl.last;
    first.emit("synced", plain("synced"), "c1");
    first.emit("token-expired", plain("token-expired"));
    await settle();
    // The renewed token lacks the claim: refused before it opens.
    EventSourceImpl.last.fail(2);
    await settle();
    assert.equal(latest().status, "closed");
    assert.equal(latest().errorCode, "FORBIDDEN");
    assert.equal(latest().error, "The token carries no org_id claim");
    t.mock.timers.tick(60000);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    unsubscribe();
  });

  test("FORBIDDEN and INVALID_ID end watching one row", async () => {
    for (const [status, code] of [[403, "FORBIDDEN"], [400, "INVALID_ID"]]) {
      const EventSourceImpl = fakeEventSource();
      const fetchImpl = fakeFetch(refusal(status, code, "Refused."));
      const values = [];
      const store = watchFile({ id: "f1", EventSourceImpl, fetchImpl });
      const stop = store.subscribe((value) => values.push(value));
      await settle();
      EventSourceImpl.last.fail(2);
      await settle();
      assert.equal(values.at(-1).status, "closed");
      assert.equal(values.at(-1).errorCode, code);
      assert.equal(values.at(-1).error, "Refused");
      stop();
    }
  });

  test("a refusal retrying can cure keeps reconnecting, saying what the server said", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const fetchImpl = fakeFetch(refusal(429, "TOO_MANY_STREAMS", "Too many open streams."));
    const { EventSourceImpl, latest, unsubscribe } = await shaped({ fetchImpl });
    EventSourceImpl.last.fail(2);
    await settle();
    assert.equal(latest().status, "reconnecting");
    assert.equal(latest().errorCode, "TOO_MANY_STREAMS");
    assert.equal(latest().error, "Too many open streams");
    t.mock.timers.tick(1000);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    EventSourceImpl.last.emit("synced", plain("synced"), "c1");
    assert.equal(latest().status, "live");
    assert.equal(latest().error, null);
    assert.equal(latest().errorCode, null);
    unsubscribe();
  });

  test("when fetch learns nothing, the store reconnects as for any refusal", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    for (const answer of [new TypeError("Failed to fetch"), { status: 502, body: "<html>" }]) {
      const fetchImpl = fakeFetch(answer);
      const { EventSourceImpl, latest, unsubscribe } = await shaped({ fetchImpl });
      EventSourceImpl.last.fail(2);
      await settle();
      assert.equal(fetchImpl.calls.length, 1);
      assert.equal(latest().status, "reconnecting");
      assert.match(latest().error, /refused or lost/);
      assert.equal(latest().errorCode, null);
      t.mock.timers.tick(1000);
      await settle();
      assert.equal(EventSourceImpl.instances.length, 2);
      unsubscribe();
    }
  });

  test("a stream that would open now is closed at once by the one who asked", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const fetchImpl = fakeFetch({ status: 200, body: {} });
    const { EventSourceImpl, latest, unsubscribe } = await shaped({ fetchImpl });
    EventSourceImpl.last.fail(2);
    await settle();
    assert.equal(fetchImpl.calls[0].init.signal.aborted, true);
    assert.equal(latest().status, "reconnecting");
    t.mock.timers.tick(1000);
    await settle();
    assert.equal(EventSourceImpl.instances.length, 2);
    unsubscribe();
  });

  test("a stream lost after it was open is not asked about", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const fetchImpl = fakeFetch(refusal(400, "INVALID_FILTER", "Never asked."));
    const { EventSourceImpl, latest, unsubscribe } = await shaped({ fetchImpl });
    EventSourceImpl.last.emit("synced", plain("synced"), "c1");
    EventSourceImpl.last.fail(0); // the browser's own reconnect...
    EventSourceImpl.last.fail(2); // ...refused: a restart, or the token's exp
    await settle();
    assert.equal(fetchImpl.calls.length, 0);
    assert.equal(latest().status, "reconnecting");
    unsubscribe();
  });

  test("an answer that comes after the next connection opened changes nothing", async (t) => {
    t.mock.timers.enable({ apis: ["setTimeout"] });
    let answer;
    const fetchImpl = () => new Promise((resolve) => (answer = resolve));
    const { EventSourceImpl, latest, unsubscribe } = await shaped({ fetchImpl });
    EventSourceImpl.last.fail(2);
    t.mock.timers.tick(1000);
    await settle();
    EventSourceImpl.last.emit("synced", plain("synced"), "c1");
    answer({ ok: false, status: 403, json: async () => ({ error: "late", code: "FORBIDDEN" }) });
    await settle();
    assert.equal(latest().status, "live");
    assert.equal(latest().errorCode, null);
    unsubscribe();
  });
});

describe("a filtered store", () => {
  test("holds exactly the matching rows: they leave as deletes, come back as updates", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await shaped({
      filter: { status: "in.(pending,processing)" },
    });
    const es = EventSourceImpl.last;
    es.emit("file-update", update(file("a", 1, { status: "pending" })), "s1");
    es.emit("file-update", update(file("b", 4, { status: "processing", progress: 60 })), "s2");
    es.emit("synced", plain("synced"), "c1");
    assert.deepEqual(Object.keys(latest().rows), ["a", "b"]);

    es.emit("file-update", update(file("a", 2, { status: "processing", progress: 5 })), "c2");
    // b is ready: it no longer matches, and the stream says so with a delete.
    es.emit("file-deleted", deleted("b"), "c3");
    assert.deepEqual(Object.keys(latest().rows), ["a"]);
    assert.equal(latest().rows.a.progress, 5);
    // A late repeat of b's last matching state does not bring it back...
    es.emit("file-update", update(file("b", 4, { status: "processing", progress: 60 })), "c4");
    assert.deepEqual(Object.keys(latest().rows), ["a"]);
    // ...but b matching again (reprocessed) does, with its whole state.
    es.emit("file-update", update(file("b", 6, { status: "pending", progress: 0 })), "c5");
    assert.deepEqual(Object.keys(latest().rows), ["a", "b"]);
    assert.equal(latest().rows.b.version, 6);
    assert.equal(latest().lastEventId, "c5");
    unsubscribe();
  });

  test("a reset under a new shape starts over with its snapshot", async () => {
    const { EventSourceImpl, latest, unsubscribe } = await shaped({
      filter: { status: "eq.failed" },
      select: ["status", "error_message"],
    });
    const es = EventSourceImpl.last;
    const failed = (id, version) => ({ id, status: "failed", error_message: "x", version });
    es.emit("file-update", update(failed("a", 3)), "s1");
    es.emit("reset", plain("reset"));
    assert.deepEqual(latest().rows, {});
    es.emit("file-update", update(failed("c", 1)), "s2");
    es.emit("synced", plain("synced"), "c1");
    assert.deepEqual(latest().rows, { c: failed("c", 1) });
    unsubscribe();
  });
});
