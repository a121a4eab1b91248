// Start-up: run src/ as one JavaScript module compiled on first use, instead of through tsx's
// loader (which transforms and resolves every module at each start; see docs/decisions.md
// "Runtime: no build step; the CLI compiles itself on first use"). Plain JavaScript: it runs before
// any loader.
//
// The bundle lives in node_modules/.cache/nbd-attach/<key>/, where <key> names what it was made
// from (every source file's path, size and mtime, this file's, and Node's version), so an edited
// source gets a new bundle and nothing stale is ever run. Where it cannot be written (a read-only checkout, such
// as the test VM's, or no esbuild), the sources run through tsx as before: slower, same behaviour.
// NBD_ATTACH_TSX=1 forces that path.
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath, pathToFileURL } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const trace = process.env.DEBUG?.includes('nbd:') ? (m) => process.stderr.write(`nbd:boot ${m}\n`) : () => {};
const SOURCE_DIRS = ['src', 'native-bindings'];
const OTHER_INPUTS = ['package.json', 'tsconfig.json', 'bin/bundle.js'];
/** Entry points; the worker is started by src/kernel/attach.ts from the same directory. */
const ENTRIES = { cli: 'src/cli.ts', 'doit-worker': 'src/kernel/doit-worker.ts' };
const CACHE_DIR = path.join(ROOT, 'node_modules', '.cache', 'nbd-attach');
/**
 * Bundles of other sources are removed once unused this long (each start touches its own): a
 * long-running `-L` process starts its worker from its bundle again when it reconnects.
 */
const PRUNE_AFTER_MS = 30 * 24 * 3600 * 1000;

/** A short name for the current sources. */
export function sourceKey() {
  const h = crypto.createHash('sha256');
  h.update(`${process.version}\n`);
  const files = [...OTHER_INPUTS];
  for (const dir of SOURCE_DIRS) {
    for (const rel of fs.readdirSync(path.join(ROOT, dir), { recursive: true })) {
      if (String(rel).endsWith('.ts')) files.push(path.join(dir, String(rel)));
    }
  }
  for (const f of files.sort()) {
    const st = fs.statSync(path.join(ROOT, f));
    h.update(`${f}\0${st.size}\0${Math.trunc(st.mtimeMs)}\n`);
  }
  return h.digest('hex').slice(0, 16);
}

/** The directory holding an up-to-date bundle, built now if needed; undefined if it cannot be. */
export async function ensureBundle() {
  const key = sourceKey();
  const dir = path.join(CACHE_DIR, key);
  if (Object.keys(ENTRIES).every((name) => fs.existsSync(path.join(dir, `${name}.mjs`)))) {
    try {
      const now = new Date();
      fs.utimesSync(dir, now, now); // in use: not pruned (best effort; read-only where it cannot be built)
    } catch {
      // read-only checkout
    }
    return dir;
  }
  let tmp;
  try {
    fs.mkdirSync(CACHE_DIR, { recursive: true });
    tmp = fs.mkdtempSync(path.join(CACHE_DIR, `tmp-${key}-`));
    fs.chmodSync(tmp, 0o755); // mkdtemp makes it private; whoever runs the CLI next may not be its builder
    const esbuild = await import('esbuild');
    await esbuild.build({
      absWorkingDir: ROOT,
      entryPoints: Object.fromEntries(Object.entries(ENTRIES).map(([name, src]) => [name, path.join(ROOT, src)])),
      outdir: tmp,
      outExtension: { '.js': '.mjs' },
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      packages: 'external', // resolved from node_modules at run time (koffi is native)
      sourcemap: 'linked',
      logLevel: 'silent',
    });
    try {
      fs.renameSync(tmp, dir); // atomic: a concurrent start sees all of it or none
    } catch (err) {
      if (!fs.existsSync(path.join(dir, 'cli.mjs'))) throw err;
      fs.rmSync(tmp, { recursive: true, force: true }); // another process built the same one first
    }
    prune(key);
    return dir;
  } catch (err) {
    trace(`cannot compile a bundle in ${CACHE_DIR}: ${err.message}`);
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
    return undefined;
  }
}

function prune(keep) {
  const now = Date.now();
  for (const name of fs.readdirSync(CACHE_DIR)) {
    if (name === keep) continue;
    const p = path.join(CACHE_DIR, name);
    try {
      if (now - fs.statSync(p).mtimeMs > PRUNE_AFTER_MS) fs.rmSync(p, { recursive: true, force: true });
    } catch {
      // best effort
    }
  }
}

/** The CLI's `main`: from the bundle when there is one, else from the sources through tsx. */
export async function loadMain() {
  if (process.env.NBD_ATTACH_TSX !== '1') {
    const dir = await ensureBundle();
    if (dir) {
      trace(`running ${dir}`);
      return (await import(pathToFileURL(path.join(dir, 'cli.mjs')).href)).main;
    }
  }
  trace('running the sources through tsx');
  const { register } = await import('tsx/esm/api');
  register();
  return (await import('../src/cli.ts')).main;
}

// `node bin/bundle.js`: compile now (test/vm/run.sh does, as the guest's checkout is read-only).
if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  const dir = await ensureBundle();
  if (!dir) {
    process.stderr.write(`nbd-attach: cannot write a bundle in ${CACHE_DIR} (the CLI will run its sources through tsx, which starts slower)\n`);
    process.exitCode = 1;
  } else process.stdout.write(`${dir}\n`);
}
