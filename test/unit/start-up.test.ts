// bin/bundle.js: the CLI runs from a bundle compiled on first use, never a stale one, and falls back
// to the sources through tsx where no bundle can be written. Runs the real bin on a copy of the checkout.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** A copy of the checkout whose node_modules links to the real packages (and has no cache yet). */
function copyCheckout(): string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-startup-'));
  for (const f of ['bin', 'src', 'native-bindings', 'package.json', 'tsconfig.json']) {
    fs.cpSync(path.join(REPO, f), path.join(root, f), { recursive: true });
  }
  fs.mkdirSync(path.join(root, 'node_modules'));
  for (const name of fs.readdirSync(path.join(REPO, 'node_modules'))) {
    if (name === '.cache') continue;
    fs.symlinkSync(path.join(REPO, 'node_modules', name), path.join(root, 'node_modules', name));
  }
  return root;
}

/** stdout and the nbd:boot trace of one CLI run. */
function start(root: string, args: string[], env: Record<string, string> = {}): { out: string; boot: string } {
  const errFile = path.join(root, 'stderr.txt');
  const fd = fs.openSync(errFile, 'w');
  try {
    const out = execFileSync(process.execPath, [path.join(root, 'bin', 'nbd-attach.js'), ...args], {
      env: { ...process.env, DEBUG: 'nbd:boot', ...env },
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', fd],
      timeout: 60_000,
    });
    const boot = fs.readFileSync(errFile, 'utf8').split('\n').filter((l) => l.startsWith('nbd:boot')).join('\n');
    return { out, boot };
  } finally {
    fs.closeSync(fd);
  }
}

const bundles = (root: string): string[] => {
  const dir = path.join(root, 'node_modules', '.cache', 'nbd-attach');
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
};

test('the CLI compiles a bundle on first use, reuses it, and makes a new one when a source changes', (t) => {
  const root = copyCheckout();
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));

  const first = start(root, ['--help']);
  assert.match(first.out, /Attach a Network Block Device export/);
  const [key] = bundles(root);
  assert.ok(key, 'a bundle directory was made');
  assert.equal(bundles(root).length, 1);
  assert.match(first.boot, new RegExp(`running .*nbd-attach/${key}`));
  assert.ok(fs.existsSync(path.join(root, 'node_modules', '.cache', 'nbd-attach', key, 'doit-worker.mjs')), 'the worker bundle sits beside cli.mjs');

  const again = start(root, ['--help']);
  assert.deepEqual(bundles(root), [key], 'the second start reuses it');
  assert.equal(again.out, first.out);

  // A bundle unused for longer than 30 days goes when the next one is built; a recent one stays.
  const stale = path.join(root, 'node_modules', '.cache', 'nbd-attach', '0000000000000000');
  fs.mkdirSync(stale);
  const old = new Date(Date.now() - 31 * 24 * 3600 * 1000);
  fs.utimesSync(stale, old, old);

  // An edited source must never run from the old bundle.
  const cli = path.join(root, 'src', 'cli.ts');
  fs.writeFileSync(cli, fs.readFileSync(cli, 'utf8').replace('Attach a Network Block Device export', 'Attach an edited export'));
  const edited = start(root, ['--help']);
  assert.match(edited.out, /Attach an edited export/);
  const after = bundles(root);
  assert.equal(after.length, 2, `the previous bundle and one for the new sources (got ${after.join(', ')})`);
  assert.ok(after.includes(key), 'the bundle used a moment ago is kept');
  assert.ok(!after.includes('0000000000000000'), 'the one unused for 31 days is pruned');
});

test('where no bundle can be written, the CLI runs its sources through tsx', (t) => {
  const root = copyCheckout();
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  // A file where the cache directory would go: mkdir fails (as on a read-only checkout; root ignores modes).
  fs.writeFileSync(path.join(root, 'node_modules', '.cache'), 'not a directory');
  const r = start(root, ['--version']);
  assert.equal(r.out.trim(), '0.1.0');
  assert.match(r.boot, /cannot compile a bundle/);
  assert.match(r.boot, /running the sources through tsx/);

  // NBD_ATTACH_TSX=1 chooses tsx even where a bundle could be written.
  fs.rmSync(path.join(root, 'node_modules', '.cache'));
  const forced = start(root, ['--version'], { NBD_ATTACH_TSX: '1' });
  assert.equal(forced.out.trim(), '0.1.0');
  assert.match(forced.boot, /running the sources through tsx/);
  assert.deepEqual(bundles(root), []);
});
