// Programmatic API of the built-in NBD server (`nbd-attach serve` and the tests use it).
//
//   const srv = await startServer({ exports: [await fileExport('/srv/disk.img')], port: 0 });
//   … nbd://127.0.0.1:${srv.port}/disk.img …
//   await srv.close();   // finish in-flight requests, flush, close
//
// `serveConnection(socket, exports, opts)` serves one already-connected stream (e.g. a socketpair).

import { promises as fsp } from 'node:fs';
import net from 'node:net';
import { basename } from 'node:path';
import createDebug from '../debug.ts';
import { NbdError } from '../errors.ts';
import { DEFAULT_PORT, MAX_STRING } from '../protocol/constants.ts';
import { display, wireLength } from '../text.ts';
import { MemoryBackend, openFileBackend } from './backends.ts';
import { serveConnection, type ConnectionOptions, type ServedConnection } from './connection.ts';
import type { Backend, ServedExport } from './export.ts';

export { serveConnection, type ConnectionOptions, type ServedConnection } from './connection.ts';
export type { Backend, ServedExport } from './export.ts';
export { MemoryBackend, openFileBackend } from './backends.ts';
export { parseSize, formatSize } from './size.ts';

const log = createDebug('nbd:server');

/** Default caps on open connections (`serve --max-connections`, `--max-connections-per-address`). */
export { DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS } from './defaults.ts';
import { DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS } from './defaults.ts';

export interface ServerOptions {
  exports: ServedExport[];
  /** TCP port; 0 picks a free one. Default 10809 (proto.md "Introduction": IANA port). */
  port?: number;
  /** Address to bind; default 127.0.0.1 (loopback only). */
  host?: string;
  /** Listen on a Unix socket instead of TCP. */
  unix?: string;
  connection?: ConnectionOptions;
  /** Connections open at once (default 128); more are closed as soon as they are accepted. */
  maxConnections?: number;
  /** Connections open at once from one remote IP address (default 32; not applied to Unix sockets). */
  maxConnectionsPerAddress?: number;
  /** Close the exports' backends when the server closes (default true). */
  closeBackends?: boolean;
}

export interface RunningServer {
  /** "127.0.0.1:10809", "[::1]:10809" or the Unix socket path. */
  readonly address: string;
  readonly port: number | undefined;
  readonly path: string | undefined;
  readonly exports: readonly ServedExport[];
  /** Connections currently open. */
  readonly connections: ReadonlySet<ServedConnection>;
  /** Stop accepting, finish in-flight requests, flush, close connections and backends. Idempotent. */
  close(): Promise<void>;
}

/** Usage errors for exports no server may offer (exported for tests). */
export function checkExports(exports: readonly ServedExport[]): void {
  if (exports.length === 0) throw new NbdError('NBD_E_USAGE', 'serve: no exports; give a FILE or --memory SIZE');
  const seen = new Set<string>();
  for (const e of exports) {
    // proto.md "Conventions": a string MUST NOT contain NUL and MUST be no longer than 4096 bytes.
    // Anything else (controls, escapes, invalid UTF-8 from the programmatic API) is served as given:
    // clients show it safely (src/text.ts).
    for (const [what, s] of [['export name', e.name], [`description of export '${display(e.name)}'`, e.description]] as const) {
      if (wireLength(s) > MAX_STRING) throw new NbdError('NBD_E_USAGE', `serve: ${what} longer than ${MAX_STRING} bytes (proto.md string limit)`);
      if (s.includes('\0')) throw new NbdError('NBD_E_USAGE', `serve: ${what} contains a NUL character, which NBD strings must not (proto.md "Conventions")`);
    }
    if (seen.has(e.name)) throw new NbdError('NBD_E_USAGE', `serve: export name '${display(e.name)}' used twice; give each a distinct --name`);
    seen.add(e.name);
  }
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  checkExports(opts.exports);
  const connections = new Set<ServedConnection>();
  const maxTotal = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
  const maxPerAddress = opts.maxConnectionsPerAddress ?? DEFAULT_MAX_CONNECTIONS_PER_ADDRESS;
  const perAddress = new Map<string, number>();
  // pauseOnConnect: nothing is read before the connection takes the socket over (connection.ts).
  const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => {
    const from = socket.remoteAddress; // undefined for a Unix socket
    log('connection from %s', from ?? 'unix socket');
    // A connection counts until it is over (connection.ts), so a client cannot open more by
    // dropping connections whose storage operations are still running.
    const fromHere = from === undefined ? 0 : (perAddress.get(from) ?? 0);
    if (connections.size >= maxTotal || fromHere >= maxPerAddress) {
      log('refusing connection from %s: %s', from ?? 'unix socket', connections.size >= maxTotal ? `${maxTotal} connections open` : `${maxPerAddress} connections open from this address`);
      socket.destroy();
      return;
    }
    if (from !== undefined) perAddress.set(from, fromHere + 1);
    const conn = serveConnection(socket, opts.exports, opts.connection);
    connections.add(conn);
    void conn.done.then(() => {
      connections.delete(conn);
      if (from === undefined) return;
      const left = (perAddress.get(from) ?? 1) - 1;
      if (left > 0) perAddress.set(from, left);
      else perAddress.delete(from);
    });
  });

  await new Promise<void>((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      const where = opts.unix ?? `${opts.host ?? '127.0.0.1'}:${opts.port ?? DEFAULT_PORT}`;
      if (err.code === 'EADDRINUSE' && opts.unix) reject(new NbdError('NBD_E_ADDRESS', `listen on ${where}: socket file exists; remove it if no server uses it, or pick another --unix path`));
      else if (err.code === 'EADDRINUSE') reject(new NbdError('NBD_E_ADDRESS', `listen on ${where}: address already in use; pick another --port or stop the other server`));
      else if (err.code === 'EACCES') reject(new NbdError('NBD_E_PERMISSION', `listen on ${where}: permission denied`));
      else reject(new NbdError('NBD_E_ADDRESS', `listen on ${where}: ${err.message}`));
    };
    server.once('error', onError);
    const ready = (): void => {
      server.off('error', onError);
      resolve();
    };
    if (opts.unix) server.listen(opts.unix, ready);
    else server.listen(opts.port ?? DEFAULT_PORT, opts.host ?? '127.0.0.1', ready);
  });
  server.on('error', (err) => log('server error: %s', err.message));

  const addr = server.address();
  let address: string;
  let port: number | undefined;
  let path: string | undefined;
  if (typeof addr === 'string') {
    address = addr;
    path = addr;
  } else if (addr) {
    port = addr.port;
    address = addr.family === 'IPv6' ? `[${addr.address}]:${addr.port}` : `${addr.address}:${addr.port}`;
  } else {
    address = opts.unix ?? '';
  }

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> =>
    (closing ??= (async () => {
      const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
      await Promise.all([...connections].map((c) => c.shutdown()));
      await stopped;
      if (opts.closeBackends ?? true) {
        const backends = new Set(opts.exports.map((e) => e.backend));
        for (const b of backends) {
          try {
            if (!b.readOnly) await b.flush();
            await b.close();
          } catch (err) {
            log('closing backend failed: %s', (err as Error).message);
          }
        }
      }
      if (path) await fsp.rm(path, { force: true }).catch(() => undefined);
    })());

  return { address, port, path, exports: opts.exports, connections, close };
}

// ---------------------------------------------------------------------------------------------
// Export builders

export interface ExportOptions {
  name?: string;
  description?: string;
  readOnly?: boolean;
}

export async function fileExport(file: string, opts: ExportOptions = {}): Promise<ServedExport> {
  const backend = await openFileBackend(file, { readOnly: opts.readOnly ?? false });
  return makeExport(backend, opts.name ?? basename(file), opts);
}

export function memoryExport(size: number, opts: ExportOptions = {}): ServedExport {
  return makeExport(new MemoryBackend(size), opts.name ?? 'memory', opts);
}

export function makeExport(backend: Backend, name: string, opts: ExportOptions = {}): ServedExport {
  return { name, description: opts.description ?? backend.description, backend, readOnly: opts.readOnly ?? false };
}
