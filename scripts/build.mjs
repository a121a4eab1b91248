// `npm run build` (also run by `prepare`, so `npm ci` builds): bundles src/ into dist/ with esbuild.
//
//   dist/nbd-attach.mjs   the CLI (package.json "bin"; src/main.ts)
//   dist/doit-worker.mjs  the -L worker thread, started from beside the code of src/kernel/attach.ts
//   dist/chunk-*.mjs      code that only some commands load (server, TLS, kernel, supervisor)
//   *.map                 source maps (node --enable-source-maps, or DEBUG=nbd:* which turns them on)
//
// Packages stay external: they are resolved from node_modules at run time (koffi is native).
// Nothing is written at run time: dist/ runs from a read-only file system. The output goes to a
// temporary directory first and replaces the .mjs/.map files of dist/ at the end, so a build that
// fails leaves the previous one whole; other files in dist/ (npm run deb's package) stay.
// A process already running keeps the modules it loaded; the commands import what they need when
// they start (an attach supervisor loads all of its code before it attaches).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIST = path.join(ROOT, 'dist');
/** Entry points (name → source). The worker must sit beside the chunk that starts it. */
export const ENTRIES = { 'nbd-attach': 'src/main.ts', 'doit-worker': 'src/kernel/doit-worker.ts' };

let esbuild;
try {
  esbuild = await import('esbuild');
} catch {
  process.stderr.write('build: esbuild is missing: run `npm ci` (it is a devDependency; the built dist/ needs none of them)\n');
  process.exit(1);
}

const isOutput = (name) => name.endsWith('.mjs') || name.endsWith('.mjs.map');

/**
 * commander requires node:child_process (and with it node:net and the stream stack) when it loads,
 * for the one thing nbd-attach never does: running a subcommand as a separate executable. The
 * bundled copy requires it when it spawns. The build fails if commander's code no longer matches.
 */
const COMMANDER_CHILD_PROCESS = "const childProcess = require('node:child_process');";
const lazyChildProcess = {
  name: 'commander-lazy-child-process',
  setup(b) {
    b.onLoad({ filter: /[\\/]commander[\\/]lib[\\/]command\.js$/ }, async (args) => {
      const src = await fs.promises.readFile(args.path, 'utf8');
      if (!src.includes(COMMANDER_CHILD_PROCESS) || /childProcess\.(?!spawn\()/.test(src)) {
        throw new Error(`${args.path}: commander no longer requires node:child_process as scripts/build.mjs expects; update lazyChildProcess`);
      }
      const lazy = "const childProcess = { spawn: (...a) => require('node:child_process').spawn(...a) };";
      return { contents: src.replace(COMMANDER_CHILD_PROCESS, lazy), loader: 'js' };
    });
  },
};

export async function build({ outdir = DIST } = {}) {
  fs.mkdirSync(outdir, { recursive: true });
  // Beside outdir, at the same depth: the source maps' relative paths (../src/…) stay right after the move.
  const tmp = fs.mkdtempSync(path.join(path.dirname(outdir), `.${path.basename(outdir)}-build-`));
  try {
    await esbuild.build({
      absWorkingDir: ROOT,
      entryPoints: Object.fromEntries(Object.entries(ENTRIES).map(([name, src]) => [name, path.join(ROOT, src)])),
      outdir: tmp,
      outExtension: { '.js': '.mjs' },
      bundle: true,
      splitting: true, // a command's modules load when it runs (dynamic imports in src/commands/)
      chunkNames: 'chunk-[hash]', // beside the entries: src/kernel/attach.ts finds ./doit-worker.mjs
      platform: 'node',
      format: 'esm',
      target: 'node20',
      // commander (plain JavaScript) is bundled: loading it from node_modules runs Node's CommonJS
      // loader and export lexer for ten files on every command. koffi (native) and debug (loaded
      // only with DEBUG set) stay external, resolved from node_modules at run time.
      external: ['koffi', 'debug'],
      // commander is CommonJS: its require() of Node's built-in modules needs a real require in ESM.
      banner: { js: "import { createRequire as __nbdCreateRequire } from 'node:module'; const require = __nbdCreateRequire(import.meta.url);" },
      sourcemap: 'linked',
      legalComments: 'none',
      plugins: [lazyChildProcess],
      logLevel: 'warning',
    });
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

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = await build();
  const files = fs.readdirSync(out).filter((n) => n.endsWith('.mjs'));
  process.stdout.write(`build: ${path.relative(process.cwd(), out) || '.'}/ (${files.length} modules)\n`);
}
