#!/usr/bin/env node
// Entry point. Runs the TypeScript sources through tsx, so there is no build step (docs/decisions.md).
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli.ts');
process.exitCode = await main(process.argv.slice(2));
