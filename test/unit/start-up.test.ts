// Start-up: what `nbd-attach` loads before it knows the command. src/main.ts and the modules it
// imports statically (src/cli.ts, each command's register()) must stay light: the server, TLS,
// sockets, the kernel code and koffi are imported by the command that uses them (dynamic import()).
// This reads the static import graph of the sources, and tests the loader of the built command line
// (src/bundle.ts: one CommonJS file and its V8 code cache); test/interop/package.test.ts checks
// the built dist/ at run time.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import vm from 'node:vm';
import { fileURLToPath } from 'node:url';
import { VERSION } from '../../src/version.ts';
import { BUILD_ID_LINE, WRAP_HEAD, WRAP_TAIL, buildIdOf, cacheFor, loadBundle } from '../../src/bundle.ts';

const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** Static (value) imports of a module: `import … from 'x'` and `export … from 'x'`, not `import type`. */
function staticImports(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/^(?:import|export)\s+(type\s+)?(?:[^'";]*?\sfrom\s+)?['"]([^'"]+)['"]/gms)) {
    if (m[1]) continue; // import type: erased
    out.push(m[2]!);
  }
  return out;
}

/** Every module reachable from `entry` through static imports: files of the checkout and packages. */
function staticGraph(entry: string): { files: Set<string>; packages: Set<string> } {
  const files = new Set<string>();
  const packages = new Set<string>();
  const todo = [path.join(REPO, entry)];
  while (todo.length) {
    const f = todo.pop()!;
    if (files.has(f)) continue;
    files.add(f);
    for (const spec of staticImports(f)) {
      if (spec.startsWith('.')) todo.push(path.resolve(path.dirname(f), spec));
      else packages.add(spec);
    }
  }
  return { files: new Set([...files].map((f) => path.relative(REPO, f))), packages };
}

test('the statically loaded start-up code loads no server, TLS, socket, kernel or koffi module', () => {
  const { files, packages } = staticGraph('src/main.ts');
  assert.ok(files.has('src/cli.ts') === false, 'src/main.ts imports the command line only when it is needed (not for --version)');
  const cli = staticGraph('src/cli.ts');
  assert.ok(cli.files.has('src/commands/attach.ts') && cli.files.has('src/commands/serve.ts'), 'the graph is read (every command registers)');
  const heavy = [...cli.files].filter((f) =>
    /^src\/(server\/(?!size\.ts|defaults\.ts)|client\/(?!defaults\.ts)|supervisor\/(run|source|supervisor|reconnector|kernel-ops)\.ts|kernel\/(attach|mknod|netlink-codec|doit-worker)\.ts|commands\/serve-run\.ts|tls-files\.ts|socket-pair\.ts)|^native-bindings\//.test(f),
  );
  assert.deepEqual(heavy, [], 'modules the command line loads before choosing a command');
  const heavyPackages = [...cli.packages, ...packages].filter((p) => ['node:tls', 'node:net', 'node:worker_threads', 'node:crypto', 'node:child_process', 'koffi', 'debug'].includes(p));
  assert.deepEqual(heavyPackages, [], 'packages the command line loads before choosing a command');
});

test('--version is the version in package.json', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(REPO, 'package.json'), 'utf8')) as { version: string };
  assert.equal(VERSION, pkg.version);
});

test('the build wraps the command line exactly as src/bundle.ts does (else V8 would reject every cache)', async () => {
  const buildScript = new URL('../../scripts/build.mjs', import.meta.url).href; // plain JS: no types
  const build = (await import(buildScript)) as { WRAP_HEAD: string; WRAP_TAIL: string; BUILD_ID_LINE: string };
  assert.equal(build.WRAP_HEAD, WRAP_HEAD);
  assert.equal(build.WRAP_TAIL, WRAP_TAIL);
  assert.equal(build.BUILD_ID_LINE, BUILD_ID_LINE);
});

test('loadBundle: runs a CommonJS file, uses its code cache only when made for it, and runs without one', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-bundle-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'cli.cjs');
  const id = '0123456789abcdef';
  const source = `const path = require('node:path');\nexports.answer = () => 42;\nexports.where = path.basename(__filename);\n${BUILD_ID_LINE}${id}\n`;
  fs.writeFileSync(file, source);
  assert.equal(buildIdOf(source), id);

  // No cache: compiled, and it runs as CommonJS (require, exports, __filename).
  let r = loadBundle<{ answer(): number; where: string }>(file);
  assert.equal(r.exports.answer(), 42);
  assert.equal(r.exports.where, 'cli.cjs');
  assert.equal(r.cacheUsed, false);

  // A cache made as the build makes it (after running): used.
  const script = new vm.Script(WRAP_HEAD + source + WRAP_TAIL, { filename: file });
  const mod = { exports: {} as { answer(): number } };
  script.runInThisContext().call(mod.exports, mod.exports, () => ({ basename: () => '' }), mod, file, dir);
  mod.exports.answer();
  const data = script.createCachedData();
  fs.writeFileSync(`${file}.cache`, Buffer.concat([Buffer.from(`${id}\n`, 'latin1'), data]));
  r = loadBundle(file);
  assert.equal(r.exports.answer(), 42);
  assert.equal(r.cacheUsed, true);

  // Another build's cache (the id differs): not even given to V8.
  fs.writeFileSync(`${file}.cache`, Buffer.concat([Buffer.from('fedcba9876543210\n', 'latin1'), data]));
  assert.equal(cacheFor(id, fs.readFileSync(`${file}.cache`)), undefined);
  r = loadBundle(file);
  assert.equal(r.exports.answer(), 42);
  assert.equal(r.cacheUsed, false);

  // Damaged V8 data with the right id (as from another Node): V8 rejects it, the code compiles.
  // (Another text: V8 would take the one above from its in-process compilation cache.)
  const other = path.join(dir, 'other.cjs');
  fs.writeFileSync(other, source.replace('42', '43'));
  fs.writeFileSync(`${other}.cache`, Buffer.concat([Buffer.from(`${id}\n`, 'latin1'), Buffer.alloc(data.length, 0x5a)]));
  const o = loadBundle<{ answer(): number }>(other);
  assert.equal(o.exports.answer(), 43);
  assert.equal(o.cacheUsed, false);

  // A bundle without an id never uses a cache; DEBUG's path is a plain require().
  assert.equal(buildIdOf('exports.x = 1;\n'), undefined);
  assert.equal(cacheFor(undefined, Buffer.from(`${id}\nxx`)), undefined);
  r = loadBundle(file, false);
  assert.equal(r.exports.answer(), 42);
  assert.equal(r.cacheUsed, false);
});
