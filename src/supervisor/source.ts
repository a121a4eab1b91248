// Where an attach gets its connections from: a remote server (TCP or Unix socket, negotiated with
// src/client/negotiate.ts) or the in-process server of local attach (`--file`/`--memory`: a
// socketpair per connection, one end served by src/server/, the other negotiated and handed to
// the kernel). The supervisor only ever calls `connect()`, so a local device is supervised exactly
// like a remote one: a connection the kernel declares dead is replaced with a fresh socketpair.

import path from 'node:path';
import createDebug from 'debug';
import { type Endpoint, type Target, type TlsSettings, describeEndpoint } from '../address.ts';
import { type Connection, negotiate, negotiateOn } from '../client/negotiate.ts';
import { NbdError } from '../errors.ts';
// The built-in server is loaded only for local attach (a remote attach never needs it).
import type { ServedConnection, ServedExport } from '../server/index.ts';
import { installKernelTls } from '../kernel/ktls.ts';
import { tuneSocket } from './kernel-ops.ts';

const debug = createDebug('nbd:local');

export interface ConnectionSource {
  /** For people and the state file: "10.0.0.5:10809", "unix:/run/x.sock", "local file /srv/disk.img". */
  readonly server: string;
  /** How a later supervisor reaches the server again; undefined for local attach (nothing to reach). */
  readonly endpoint: Endpoint | undefined;
  /** TLS settings when connections negotiate TLS (kernel TLS, or a relay: src/client/ktls.ts, tls.ts). */
  readonly tls: TlsSettings | undefined;
  /**
   * With TLS, how the last connection reached the kernel: 'kernel' (kernel TLS on the TCP socket,
   * nothing of ours on the data path) or 'relay' (a socketpair relayed by this process).
   */
  readonly tlsPath?: 'kernel' | 'relay' | undefined;
  /** Why the relay is used although kernel TLS was tried (said once, by whoever reports the attach). */
  readonly relayReason?: string | undefined;
  readonly exportName: string;
  /** Negotiate one connection, ready to be handed to the kernel (keepalive and TCP_USER_TIMEOUT set). */
  connect(timeoutMs: number): Promise<Connection>;
  /** Release what the source holds (local: finish in-flight requests, flush and close the image). */
  close(): Promise<void>;
}

/** " over TLS (kernel TLS)", " over TLS (relay: why)", or "" without TLS: for the attach line and the log. */
export function tlsSummary(source: ConnectionSource): string {
  if (source.tls === undefined) return '';
  if (source.tlsPath === 'kernel') return ' over TLS (kernel TLS)';
  return ` over TLS (relay${source.relayReason !== undefined ? `: ${source.relayReason}` : ', --tls-relay'})`;
}

export function remoteSource(target: Target, exportName: string, noOptGo: boolean): ConnectionSource {
  const tls = target.tls === false ? undefined : target.tls;
  // Kernel TLS unless --tls-relay; once the kernel or the server's suite rules it out, the relay
  // for every later connection too (the reason is said once, see relayReason).
  let kernelTls = tls !== undefined && tls.relay !== true;
  let tlsPath: 'kernel' | 'relay' | undefined = tls === undefined ? undefined : kernelTls ? 'kernel' : 'relay';
  let relayReason: string | undefined;
  const useRelay = (why: string): void => {
    kernelTls = false;
    tlsPath = 'relay';
    relayReason ??= why;
    debug('TLS through the relay from now on: %s', why);
  };
  const once = async (timeoutMs: number): Promise<Connection> => {
    const c = await negotiate(target, { exportName, noOptGo, timeoutMs, kernelTls });
    try {
      tuneSocket(c.transport ?? c.socket); // with the TLS relay, the TCP socket under it
    } catch (e) {
      c.socket.destroy();
      c.transport?.destroy();
      throw new NbdError('NBD_E_KERNEL', `attach: cannot set keepalive/TCP_USER_TIMEOUT on the connection: ${(e as Error).message}`, { cause: e });
    }
    if (c.relayReason !== undefined) useRelay(c.relayReason);
    if (c.ktls) {
      try {
        installKernelTls(c.socket, c.ktls);
        tlsPath = 'kernel';
      } catch (e) {
        c.socket.destroy();
        if (!(e instanceof NbdError) || e.code !== 'NBD_E_KERNEL_TLS') throw e;
        useRelay(e.message);
        return once(timeoutMs);
      }
    }
    return c;
  };
  return {
    server: describeEndpoint(target.endpoint),
    endpoint: target.endpoint,
    tls,
    get tlsPath() {
      return tlsPath;
    },
    get relayReason() {
      return relayReason;
    },
    exportName,
    connect: once,
    close: async () => undefined,
  };
}

export interface LocalSourceOptions {
  file?: string | undefined;
  memory?: string | undefined;
  readOnly: boolean;
}

/**
 * Local attach: open the image (or allocate sparse memory) and serve it on socketpairs. The export
 * is opened read-only when the device is (`-R`), so the kernel and the file agree.
 */
export async function localSource(opts: LocalSourceOptions): Promise<ConnectionSource> {
  if (opts.file !== undefined && opts.memory !== undefined) throw new NbdError('NBD_E_USAGE', 'give --file or --memory, not both');
  const { fileExport, memoryExport, parseSize, serveConnection } = await import('../server/index.ts');
  const { socketPair } = await import('../socket-pair.ts');
  let exp: ServedExport;
  let server: string;
  if (opts.file !== undefined) {
    const file = path.resolve(opts.file);
    exp = await fileExport(file, { name: '', readOnly: opts.readOnly });
    server = `local file ${file}`;
  } else if (opts.memory !== undefined) {
    let size: number;
    try {
      size = parseSize(opts.memory);
    } catch (e) {
      throw new NbdError('NBD_E_USAGE', `--memory ${opts.memory}: ${(e as Error).message}`);
    }
    exp = memoryExport(size, { name: '', readOnly: opts.readOnly });
    server = `local memory ${opts.memory}`;
  } else {
    throw new NbdError('NBD_E_USAGE', 'local attach needs --file IMAGE or --memory SIZE');
  }
  if (exp.backend.size === 0) {
    await exp.backend.close();
    throw new NbdError('NBD_E_USAGE', `${server}: the image is empty; give it a size first (e.g. truncate -s 1G ${opts.file ?? 'IMAGE'})`);
  }
  return servedSource(exp, server, { serveConnection, socketPair });
}

/**
 * Serve `exp` on a socketpair per connection. A connection the kernel dropped may still have
 * writes running in the storage; `connect()` resolves only once they have finished, because the
 * server answers a new connection's negotiation only after every write started before it on the
 * export (src/server/activity.ts). The kernel's resent requests can then not be overtaken. `close()`
 * waits for every connection to be over (writes included) before flushing and closing the export.
 */
/** What serving on socketpairs needs (passed in: this module loads the server only for local attach). */
export interface ServeParts {
  serveConnection: typeof import('../server/index.ts').serveConnection;
  socketPair: typeof import('../socket-pair.ts').socketPair;
}

export function servedSource(exp: ServedExport, server: string, { serveConnection, socketPair }: ServeParts): ConnectionSource {
  const served = new Set<ServedConnection>();
  let closed: Promise<void> | undefined;
  return {
    server,
    endpoint: undefined,
    tls: undefined,
    exportName: '',
    async connect(timeoutMs) {
      if (closed) throw new NbdError('NBD_E_FAILURE', `${server}: the local server is closed`);
      const [serverSock, clientSock] = socketPair();
      const conn = serveConnection(serverSock, [exp]);
      served.add(conn);
      void conn.done.then(() => {
        served.delete(conn);
        debug('local connection closed: %s', conn.closeReason ?? 'peer closed');
      });
      debug('new local connection (socketpair)');
      return negotiateOn(clientSock, { exportName: '', timeoutMs }, server);
    },
    close() {
      return (closed ??= (async () => {
        await Promise.all([...served].map((c) => c.shutdown()));
        try {
          if (!exp.backend.readOnly) await exp.backend.flush();
        } finally {
          await exp.backend.close();
        }
      })());
    },
  };
}
