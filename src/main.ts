#!/usr/bin/env node
// The program's entry point: `npm run build` bundles it into dist/nbd-attach.mjs (package.json
// "bin"); the tests run it from the sources through tsx. It loads nothing for `--version`, and the
// command line (src/cli.ts) otherwise; each command imports its heavy modules (server, TLS, kernel,
// koffi) when it runs (src/commands/*.ts). docs/decisions.md "Start-up".
import { writeSync } from 'node:fs';
import { VERSION } from './version.ts';

const argv = process.argv.slice(2);
if (argv.length === 1 && (argv[0] === '--version' || argv[0] === '-V')) {
  writeSync(1, `${VERSION}\n`); // not process.stdout: that stream loads ~30 modules (src/output.ts)
} else {
  // Stack traces name src/ lines with DEBUG set (dist/ has source maps; applies to what loads next).
  if (process.env.DEBUG) process.setSourceMapsEnabled(true);
  const { main } = await import('./cli.ts');
  process.exitCode = await main(argv);
}
