// Diagnostics (`DEBUG=nbd:*`): the `debug` package, loaded only when DEBUG is set. Without it a
// logger is a no-op and nothing is loaded: `debug` pulls node:tty and its own modules into every
// command's start-up for output nobody asked for (docs/decisions.md "Start-up"). Like `debug`
// itself, DEBUG is read when a module creates its logger, at load.

import { createRequire } from 'node:module';

/** A logger: printf-style, as `debug`'s (`%s`, `%d`, `%O`…). */
export type Logger = (formatter: unknown, ...args: unknown[]) => void;

const off: Logger = () => undefined;

export default function createDebug(namespace: string): Logger {
  if (!process.env['DEBUG']) return off;
  // Resolved from this file: from node_modules beside the sources, or beside dist/ when built
  // (the package is a run-time dependency for this; the build leaves this require alone).
  const debug = createRequire(import.meta.url)('debug') as (ns: string) => Logger;
  return debug(namespace);
}
