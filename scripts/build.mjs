// `npm run build` (also run by `prepare`, so `npm ci` builds): bundles src/ into dist/ with esbuild.
//
//   dist/nbd-attach.mjs            the entry (package.json "bin"; src/main.ts): answers --version
//                                  alone, else loads the command line (src/bundle.ts)
//   dist/nbd-attach-cli.cjs        the command line, every command and commander and debug in one
//                                  CommonJS file (src/cli.ts); koffi stays a package (it is native)
//   dist/nbd-attach-cli.cjs.cache  V8's code cache for it, saved after a warm-up run (see warmUp)
//   dist/doit-worker.mjs           the -L worker thread, started from beside the code of src/kernel/attach.ts
//   *.map                          source maps (DEBUG=nbd:* turns them on)
//
// Why one CommonJS file and a cache: under the test VM's emulation each of the ~30 ES modules
// the commands loaded cost a resolve, a file read over 9p and a compile; one file with its code
// cache loads in a fraction of that (docs/decisions.md "Start-up: one CommonJS bundle and a code
// cache"). The CommonJS output keeps each module's code, and its require() of a Node module,
// inside a function that runs on first import(), so `check` still never loads node:tls.
//
// Nothing is written at run time: dist/ runs from a read-only file system. The output goes to a
// temporary directory first and replaces the outputs of dist/ at the end, so a build that
// fails leaves the previous one whole; other files in dist/ (npm run deb's package) stay.
// A process already running keeps the modules it loaded (a supervisor loads the whole command line).
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIST = path.join(ROOT, 'dist');
/** Entry points (name → source). The worker must sit beside the bundle that starts it. */
export const ENTRIES = { 'nbd-attach': 'src/main.ts', 'doit-worker': 'src/kernel/doit-worker.ts' };
/** The command line's bundle (src/cli.ts), loaded by the entry through src/bundle.ts. */
export const CLI_BUNDLE = 'nbd-attach-cli.cjs';
/** Must be src/bundle.ts's WRAP_HEAD/WRAP_TAIL: V8 accepts a cache only for the very same text. */
export const WRAP_HEAD = '(function (exports, require, module, __filename, __dirname) {';
export const WRAP_TAIL = '\n})';
/** src/bundle.ts BUILD_ID_LINE: the bundle's last line names its build, the cache's first line too. */
export const BUILD_ID_LINE = '//# nbd-attach-build=';

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  process.stderr.write('build: esbuild is missing: run `npm ci` (it is a devDependency; the built dist/ needs none of them)\n');
  process.exit(1);
}

const isOutput = (name) => /\.(mjs|cjs)(\.map|\.cache)?$/.test(name);

export async function build({ outdir = DIST } = {}) {
  fs.mkdirSync(outdir, { recursive: true });
  // Beside outdir, at the same depth: the source maps' relative paths (../src/…) stay right after the move.
  const tmp = fs.mkdtempSync(path.join(path.dirname(outdir), `.${path.basename(outdir)}-build-`));
  try {
    const common = {
      absWorkingDir: ROOT,
      outdir: tmp,
      bundle: true,
      platform: 'node',
      target: 'node20',
      sourcemap: 'linked',
      legalComments: 'none',
      logLevel: 'warning',
    };
    // The entry and the worker: ES modules, packages from node_modules (the worker needs only koffi).
    await esbuild.build({
      ...common,
      entryPoints: Object.fromEntries(Object.entries(ENTRIES).map(([name, src]) => [name, path.join(ROOT, src)])),
      outExtension: { '.js': '.mjs' },
      format: 'esm',
      packages: 'external',
      define: { NBD_ATTACH_CLI_BUNDLE: JSON.stringify(`./${CLI_BUNDLE}`) },
    });
    // The command line: one CommonJS file. import.meta (the worker's URL beside it, koffi's
    // createRequire) becomes this file's URL.
    await esbuild.build({
      ...common,
      entryPoints: { [CLI_BUNDLE.replace(/\.cjs$/, '')]: path.join(ROOT, 'src/cli.ts') },
      outExtension: { '.js': '.cjs' },
      format: 'cjs',
      external: ['koffi'],
      define: { 'import.meta': '__nbd_import_meta' },
      plugins: [lazyChildProcess],
      banner: { js: "var __nbd_import_meta = { url: require('node:url').pathToFileURL(__filename).href };" },
    });
    const bundle = path.join(tmp, CLI_BUNDLE);
    // ASCII only: one character outside Latin-1 makes V8 hold the whole source as UTF-16, twice
    // the memory in every process (the supervisor's RSS). esbuild escapes strings and regexps;
    // what is left is in comments, written as \u{…} (the line's length changes after it only).
    const text = fs.readFileSync(bundle, 'utf8').replace(/[^\x00-\x7f]/gu, (c) => `\\u{${c.codePointAt(0).toString(16)}}`);
    const id = crypto.createHash('sha256').update(text).digest('hex').slice(0, 16);
    fs.writeFileSync(bundle, `${text}${BUILD_ID_LINE}${id}\n`);
    warmUp(bundle, id);
    // Each file replaced by rename (a process starting meanwhile reads an old or a new file, never
    // half of one; chunk names are content hashes, so unchanged code keeps its name); then the
    // outputs of the previous build that this one no longer has go.
    const made = new Set(fs.readdirSync(tmp));
    for (const name of made) fs.renameSync(path.join(tmp, name), path.join(outdir, name));
    for (const name of fs.readdirSync(outdir)) if (isOutput(name) && !made.has(name)) fs.rmSync(path.join(outdir, name));
    fs.chmodSync(path.join(outdir, 'nbd-attach.mjs'), 0o755);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  return outdir;
}

/**
 * commander requires node:child_process (and with it node:net) at load, for its executable
 * subcommands (`program.command('x', 'description')`), which we never declare: in the bundle it
 * requires it when it would spawn one. Its only use of the module is spawn(); the build fails if
 * that changes.
 */
const lazyChildProcess = {
  name: 'commander-lazy-child-process',
  setup(b) {
    b.onLoad({ filter: /[\\/]commander[\\/]lib[\\/]command\.js$/ }, async (args) => {
      const text = await fs.promises.readFile(args.path, 'utf8');
      const line = "const childProcess = require('node:child_process');";
      const uses = [...text.matchAll(/childProcess\.(\w+)/g)].map((m) => m[1]);
      if (!text.includes(line) || uses.some((u) => u !== 'spawn')) {
        throw new Error(`${args.path}: commander no longer loads node:child_process as this build expects: review lazyChildProcess`);
      }
      const lazy = "const childProcess = { spawn: (...a) => require('node:child_process').spawn(...a) };";
      return { contents: text.replace(line, lazy), loader: 'js' };
    });
  },
};

/**
 * Write FILE.cache: V8's code cache of the bundle, made in a child Node (the same binary and flags
 * as a run) after it ran what the hot commands run: the command line parsing an attach (refused
 * before it does anything: --nbdtab with a server), `check` of a device that does not exist
 * (read-only: sysfs), and loading the modules of attach, check and detach (src/cli.ts
 * loadHotModules). Functions compiled by then are in the cache, so a run compiles only what the
 * warm-up did not reach. Nothing else is written; a failure leaves no cache (the CLI compiles).
 */
function warmUp(file, id) {
  const script = `
    const fs = require('node:fs'), path = require('node:path'), vm = require('node:vm'), { createRequire } = require('node:module');
    const file = process.argv[1];
    const script = new vm.Script(${JSON.stringify(WRAP_HEAD)} + fs.readFileSync(file, 'utf8') + ${JSON.stringify(WRAP_TAIL)}, { filename: file });
    const module = { exports: {} };
    script.runInThisContext().call(module.exports, module.exports, createRequire(file), module, file, path.dirname(file));
    const { main, loadHotModules } = module.exports;
    (async () => {
      await main(['127.0.0.1:10809', '/dev/nbd1023', '--nbdtab', '/nonexistent', '-t', '30']);
      await main(['-c', '/dev/nbd1023']);
      await loadHotModules();
      fs.writeFileSync(file + '.cache', Buffer.concat([Buffer.from(${JSON.stringify(`${id}\n`)}, 'latin1'), script.createCachedData()]));
      process.exitCode = 0; // the warm-up's commands set it (check: not attached)
    })();`;
  const r = spawnSync(process.execPath, ['-e', script, file], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DEBUG: '' }, timeout: 60_000 });
  if (r.status !== 0 || !fs.existsSync(`${file}.cache`)) {
    process.stderr.write(`build: no code cache (the command line will compile at each start): ${r.stderr?.toString().trim() || r.error?.message || `exit ${r.status}`}\n`);
  }
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = await build();
  const files = fs.readdirSync(out).filter((n) => /\.(mjs|cjs)$/.test(n));
  process.stdout.write(`build: ${path.relative(process.cwd(), out) || '.'}/ (${files.length} modules)\n`);
}
