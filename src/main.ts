#!/usr/bin/env node
// The program's entry point: `npm run build` bundles it into dist/nbd-attach.mjs (package.json
// "bin"); the tests run it from the sources through tsx. It loads nothing for `--version`, and the
// command line (src/cli.ts) otherwise. Built, the command line is one CommonJS file with a V8 code
// cache (src/bundle.ts); from the sources, each command imports its heavy modules (server, TLS,
// kernel, koffi) when it runs (src/commands/*.ts). docs/decisions.md "Start-up".
import { VERSION } from './version.ts';

/** Set by scripts/build.mjs (esbuild `define`): the command line's bundle, beside this file. */
declare const NBD_ATTACH_CLI_BUNDLE: string | undefined;

const argv = process.argv.slice(2);
if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
  process.stdout.write(`${VERSION}\n`);
} else {
  // Stack traces name src/ lines with DEBUG set (dist/ has source maps; applies to what loads next).
  if (process.env.DEBUG) process.setSourceMapsEnabled(true);
  const { main } = typeof NBD_ATTACH_CLI_BUNDLE === 'string' ? await loadCli(NBD_ATTACH_CLI_BUNDLE) : await import('./cli.ts');
  process.exitCode = await main(argv);
}

async function loadCli(name: string): Promise<typeof import('./cli.ts')> {
  const { loadBundle } = await import('./bundle.ts');
  const { fileURLToPath } = await import('node:url');
  const file = fileURLToPath(new URL(name, import.meta.url));
  const loaded = loadBundle<typeof import('./cli.ts')>(file, !process.env.DEBUG);
  if (process.env.NBD_ATTACH_TIMING === '1') process.stderr.write(`nbd-attach: code cache ${loaded.cacheUsed ? 'used' : 'not used'}\n`);
  return loaded.exports;
}
