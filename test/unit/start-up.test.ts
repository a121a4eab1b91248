// Start-up: what `nbd-attach` loads before it knows the command. src/main.ts and the modules it
// imports statically (src/cli.ts, each command's register()) must stay light: the server, TLS,
// sockets, the kernel code and koffi are imported by the command that uses them (dynamic import()).
// This reads the static import graph of the sources; test/interop/package.test.ts checks the built
// dist/ at run time.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VERSION } from '../../src/version.ts';

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
