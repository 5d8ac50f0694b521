// The package as a project installs it: its exports map, and types that declare exactly
// what the module exports (a function added on one side only fails here).
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { test } from "node:test";

import * as client from "streamer-client";

const require = createRequire(import.meta.url);
const manifest = require("streamer-client/package.json");

test("the package is an ES module whose types sit beside its code", () => {
  assert.equal(manifest.type, "module");
  const entry = manifest.exports["."];
  assert.equal(entry.types, manifest.types);
  assert.match(entry.default, /\.js$/);
  assert.equal(entry.types, entry.default.replace(/\.js$/, ".d.ts"));
});

test("the declarations name exactly the module's exports", async () => {
  const declarations = await readFile(new URL(`../${manifest.types}`, import.meta.url), "utf8");
  const declared = [...declarations.matchAll(/^export declare (?:function|const) (\w+)/gm)]
    .map((match) => match[1])
    .sort();
  assert.deepEqual(declared, Object.keys(client).sort());
});
