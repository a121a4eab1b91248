#!/usr/bin/env node
// Entry point. Runs src/ as one module compiled on first use, or through tsx where that cannot be
// written (bin/bundle.js; docs/decisions.md "Runtime").
import { loadMain } from './bundle.js';

const main = await loadMain();
process.exitCode = await main(process.argv.slice(2));
