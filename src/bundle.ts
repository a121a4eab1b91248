// Loads the built command line, dist/nbd-attach-cli.cjs (scripts/build.mjs), from the entry
// dist/nbd-attach.mjs: one CommonJS file (commander and debug inside; koffi stays a package), and
// V8's code cache for it, dist/nbd-attach-cli.cjs.cache, which the build made after a warm-up run,
// so the functions the hot commands run are not compiled again at each start. One file to read,
// not thirty modules to resolve through the ES module loader. docs/decisions.md "Start-up: one
// CommonJS bundle and a code cache".
//
// The cache is only an accelerator: a Node whose V8 differs (an `apt upgrade nodejs`), other V8
// flags, or a missing or damaged file make V8 reject it (script.cachedDataRejected) and the code
// simply compiles. Nothing is written at run time: dist/ may be read-only.

import { createRequire } from 'node:module';

// Required, not imported: built, this module is inlined into the entry, whose imports would load
// for `--version` too.
const builtin = createRequire(import.meta.url);

/** The CommonJS wrapper, as scripts/build.mjs wraps the same text to make the cache (it must match). */
export const WRAP_HEAD = '(function (exports, require, module, __filename, __dirname) {';
export const WRAP_TAIL = '\n})';
/**
 * The bundle ends with this line and the build's id (a hash of its text); the cache file starts with
 * the same id and a newline. V8 checks only the length of the source against a cache, so a cache
 * is used only beside the bundle it was made for (a build replacing the files one by one while a
 * command starts could otherwise pair a new bundle with an old cache).
 */
export const BUILD_ID_LINE = '//# nbd-attach-build=';
export const BUILD_ID_LENGTH = 16;

export interface Loaded<T> {
  exports: T;
  /** Whether V8 used the code cache (false: none, another build's, or rejected by V8). */
  cacheUsed: boolean;
}

/** Pure: the build id at the end of a bundle's text, or undefined. */
export function buildIdOf(source: string): string | undefined {
  const m = /\/\/# nbd-attach-build=([0-9a-f]{16})\s*$/.exec(source.slice(-64));
  return m?.[1];
}

/** Pure: the V8 data of a cache file made for this build id, or undefined. */
export function cacheFor(id: string | undefined, file: Buffer | undefined): Buffer | undefined {
  if (id === undefined || file === undefined || file.length <= BUILD_ID_LENGTH + 1) return undefined;
  if (file.toString('latin1', 0, BUILD_ID_LENGTH) !== id || file[BUILD_ID_LENGTH] !== 0x0a) return undefined;
  return file.subarray(BUILD_ID_LENGTH + 1);
}

/**
 * Run a CommonJS file with its code cache (FILE.cache) when it belongs to this file and V8 accepts
 * it. With `useCache` false (DEBUG set: stack traces through source maps) it is an ordinary require().
 */
export function loadBundle<T>(file: string, useCache = true): Loaded<T> {
  const require = createRequire(file);
  if (!useCache) return { exports: require(file) as T, cacheUsed: false };
  const fs = builtin('node:fs') as typeof import('node:fs');
  const path = builtin('node:path') as typeof import('node:path');
  const vm = builtin('node:vm') as typeof import('node:vm');
  const source = fs.readFileSync(file, 'utf8');
  let cacheFile: Buffer | undefined;
  try {
    cacheFile = fs.readFileSync(`${file}.cache`);
  } catch {
    cacheFile = undefined; // built without a cache: compile
  }
  const cachedData = cacheFor(buildIdOf(source), cacheFile);
  const script = new vm.Script(WRAP_HEAD + source + WRAP_TAIL, { filename: file, ...(cachedData ? { cachedData } : {}) });
  const module = { exports: {} as T };
  const fn = script.runInThisContext() as (e: T, r: NodeJS.Require, m: { exports: T }, f: string, d: string) => void;
  fn.call(module.exports, module.exports, require, module, file, path.dirname(file));
  return { exports: module.exports, cacheUsed: cachedData !== undefined && !script.cachedDataRejected };
}
