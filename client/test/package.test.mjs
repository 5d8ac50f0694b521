// The package as a project installs it: its exports map, and types that declare exactly
// what the module exports (a function added on one side only fails here).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

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

// What `npm publish` would ship, and the example app installs (make app packs it).
const CLIENT = new URL("../", import.meta.url);
const ROOT = new URL("../../", import.meta.url);
const APP = new URL("examples/sveltekit/", ROOT);

function packed() {
  const output = execFileSync("npm", ["pack", "--dry-run", "--json", "--ignore-scripts"], {
    cwd: fileURLToPath(CLIENT),
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
  return JSON.parse(output)[0];
}

test("npm pack ships the module, its types, the readme and the license, nothing else", () => {
  const tarball = packed();
  const files = tarball.files.map((file) => file.path).sort();
  assert.deepEqual(files, [
    "LICENSE",
    "README.md",
    "package.json",
    manifest.exports["."].types.replace(/^\.\//, ""),
    manifest.exports["."].default.replace(/^\.\//, ""),
  ].sort());
  assert.equal(tarball.filename, `streamer-client-${manifest.version}.tgz`);
});

test("the package is Apache-2.0, with the repository's license text", async () => {
  assert.equal(manifest.license, "Apache-2.0");
  const [ours, repository] = await Promise.all([
    readFile(new URL("LICENSE", CLIENT), "utf8"),
    readFile(new URL("LICENSE", ROOT), "utf8"),
  ]);
  assert.equal(ours, repository);
  assert.match(ours, /Apache License\s+Version 2\.0, January 2004/);
});

test("the package's version is the release's (pyproject.toml's)", async () => {
  const pyproject = await readFile(new URL("pyproject.toml", ROOT), "utf8");
  const [, release] = pyproject.match(/^\[project\][^[]*?^version = "([^"]+)"/ms);
  assert.equal(manifest.version, release);
});

test("the example app installs the packed tarball, with no checksum to go stale", async () => {
  const app = JSON.parse(await readFile(new URL("package.json", APP), "utf8"));
  const spec = app.devDependencies["streamer-client"];
  assert.equal(spec, "file:packed/streamer-client.tgz");
  const lock = JSON.parse(await readFile(new URL("package-lock.json", APP), "utf8"));
  assert.equal(lock.packages[""].devDependencies["streamer-client"], spec);
  const entry = lock.packages["node_modules/streamer-client"];
  // npm's cache is keyed by checksum: with one in the lock a changed client would be
  // installed stale from the cache, or refused (EINTEGRITY) on a fresh machine.
  assert.deepEqual(
    { resolved: entry.resolved, version: entry.version, integrity: entry.integrity },
    { resolved: spec, version: manifest.version, integrity: undefined },
  );
});
