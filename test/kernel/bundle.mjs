// Bundles the kernel test files for the test VM: test/kernel/run.sh runs this on the host before
// the boot, and the guest runs plain JavaScript instead of loading tsx, whose start and compiling
// cost 20-40 s per test file under software emulation (measured 2026-12-01: `node --import tsx -e 0`
// 28 s, importing the test helpers 48 s, on a busy 2-core host), i.e. minutes per suite.
//
//   node test/kernel/bundle.mjs OUTDIR FILE.test.ts...
//
// OUTDIR must sit two levels below the checkout (like test/kernel/), so the tests'
// `new URL('../..', import.meta.url)` still names the checkout; the other files beside the tests
// (e.g. swap-job.mjs) are copied into it. Packages stay external (resolved from node_modules).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const [outdir, ...files] = process.argv.slice(2);
if (!outdir || files.length === 0) {
  process.stderr.write('usage: node test/kernel/bundle.mjs OUTDIR FILE.test.ts...\n');
  process.exit(2);
}
const out = path.resolve(outdir);
if (path.relative(ROOT, path.dirname(path.dirname(out))) !== '') {
  process.stderr.write(`bundle: ${outdir} must be two levels below the checkout (e.g. .kernel-tests-1/kernel)\n`);
  process.exit(2);
}
const esbuild = await import('esbuild');
fs.mkdirSync(out, { recursive: true });
await esbuild.build({
  absWorkingDir: ROOT,
  entryPoints: files.map((f) => path.resolve(f)),
  outdir: out,
  outExtension: { '.js': '.mjs' },
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  packages: 'external',
  sourcemap: 'linked',
  logLevel: 'warning',
});
const here = path.join(ROOT, 'test/kernel');
for (const entry of fs.readdirSync(here, { withFileTypes: true })) {
  const name = entry.name;
  if (entry.isFile() && !name.endsWith('.ts') && name !== 'run.sh' && name !== 'bundle.mjs') fs.copyFileSync(path.join(here, name), path.join(out, name));
}
