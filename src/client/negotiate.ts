// The client's I/O edge: open a socket, drive the pure handshake machine over it, and hand back a
// socket positioned exactly at the start of the transmission phase (nothing read past the handshake).

import net from 'node:net';
import createDebug from 'debug';
import { type Endpoint, type Target, describeEndpoint } from '../address.ts';
import { NbdError } from '../errors.ts';
import { Cmd } from '../protocol/constants.ts';
import { encodeRequest } from '../protocol/codec.ts';
import {
  ClientHandshake,
  type ExportInfo,
  type HandshakeGoal,
  type HandshakeResult,
  type ServerStyle,
  type Via,
} from '../protocol/handshake.ts';

const debug = createDebug('nbd:client');

export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** Keepalive probes start after this much idle time (the kernel-side supervisor tunes more later). */
export const KEEPALIVE_IDLE_MS = 10_000;

export interface NegotiateOptions {
  /** Export name; '' is the server's default export. */
  exportName: string;
  /** -g/--no-optgo: use NBD_OPT_EXPORT_NAME only. */
  noOptGo?: boolean;
  /** Connect + handshake deadline. */
  timeoutMs?: number;
}

export interface Connection {
  /** Connected, handshake finished, paused, nothing buffered: ready for the kernel. */
  socket: net.Socket;
  info: ExportInfo;
  style: ServerStyle;
  via: Via;
}

function tlsRefused(target: Target): void {
  if (target.tls) {
    throw new NbdError('NBD_E_TLS_UNSUPPORTED', 'TLS not supported yet: use nbd:// or nbd+unix:// against a server that allows plain connections');
  }
}

/** Open a TCP or unix stream socket with TCP_NODELAY and keepalive, failing clearly and in time. */
export function connectSocket(endpoint: Endpoint, deadline: number): Promise<net.Socket> {
  const where = describeEndpoint(endpoint);
  return new Promise((resolve, reject) => {
    const socket =
      endpoint.kind === 'unix'
        ? net.connect({ path: endpoint.path })
        : net.connect({ host: endpoint.host, port: endpoint.port, noDelay: true, keepAlive: true, keepAliveInitialDelay: KEEPALIVE_IDLE_MS });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new NbdError('NBD_E_CONNECT_TIMEOUT', `connecting to ${where} timed out: is the host reachable? (--connect-timeout to wait longer)`));
    }, Math.max(0, deadline - Date.now()));
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      debug('connected to %s', where);
      resolve(socket);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      reject(connectError(where, endpoint, err));
    });
  });
}

function connectError(where: string, endpoint: Endpoint, err: NodeJS.ErrnoException): NbdError {
  const code = err.code ?? '';
  const hint: Record<string, string> = {
    ECONNREFUSED: 'connection refused: is the server running and listening there?',
    ENOENT: endpoint.kind === 'unix' ? 'no such socket file: is the server running?' : 'not found',
    ENOTFOUND: 'host name not found: check the name or use an IP address',
    EAI_AGAIN: 'host name lookup failed (temporary DNS failure)',
    EHOSTUNREACH: 'host unreachable: check the network',
    ENETUNREACH: 'network unreachable: check the network',
    ETIMEDOUT: 'timed out: is the host reachable?',
    EACCES: 'permission denied on the socket file',
    ECONNRESET: 'connection reset by the server',
  };
  return new NbdError('NBD_E_CONNECT', `cannot connect to ${where}: ${hint[code] ?? err.message}`, { cause: err });
}

/** Read exactly n bytes, or null on EOF. Never reads past n: what follows stays in the socket. */
function readExactly(socket: net.Socket, n: number): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const tryRead = (): boolean => {
      const chunk = socket.read(n) as Buffer | null;
      if (chunk !== null) {
        cleanup();
        resolve(chunk);
        return true;
      }
      return false;
    };
    const onEnd = () => {
      cleanup();
      resolve(null);
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    const onClose = () => {
      cleanup();
      resolve(null);
    };
    const cleanup = () => {
      socket.off('readable', onReadable);
      socket.off('end', onEnd);
      socket.off('error', onError);
      socket.off('close', onClose);
    };
    const onReadable = () => {
      tryRead();
    };
    if (tryRead()) return;
    if (socket.readableEnded || socket.destroyed) {
      cleanup();
      resolve(null);
      return;
    }
    socket.on('readable', onReadable);
    socket.once('end', onEnd);
    socket.once('error', onError);
    socket.once('close', onClose);
  });
}

/** Drive the handshake machine over a connected socket until it is done, within the deadline. */
export async function runHandshake(socket: net.Socket, machine: ClientHandshake, deadline: number, where: string): Promise<HandshakeResult> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new NbdError('NBD_E_HANDSHAKE_TIMEOUT', `handshake with ${where} timed out in state ${machine.stateName}: the server stopped answering (--connect-timeout to wait longer)`));
    }, Math.max(0, deadline - Date.now()));
  });
  const drive = async (): Promise<HandshakeResult> => {
    let step = machine.start();
    for (;;) {
      for (const b of step.send) socket.write(b);
      if (step.done) return step.done;
      let bytes: Buffer | null;
      try {
        bytes = await readExactly(socket, step.want);
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        if (e.code === 'ECONNRESET' || e.code === 'EPIPE') bytes = null;
        else throw new NbdError('NBD_E_CONNECT', `connection to ${where} failed during the handshake: ${e.message}`, { cause: err });
      }
      step = bytes === null ? machine.eof() : machine.receive(bytes);
    }
  };
  try {
    return await Promise.race([drive(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function handshakeOnce(target: Target, goal: HandshakeGoal, timeoutMs: number): Promise<{ socket: net.Socket; result: HandshakeResult }> {
  const deadline = Date.now() + timeoutMs;
  const where = describeEndpoint(target.endpoint);
  const socket = await connectSocket(target.endpoint, deadline);
  try {
    const result = await runHandshake(socket, new ClientHandshake(goal), deadline, where);
    return { socket, result };
  } catch (err) {
    socket.destroy();
    throw err;
  }
}

/**
 * Connect and negotiate `opts.exportName` into the transmission phase. Falls back to
 * NBD_OPT_EXPORT_NAME on a fresh connection when the server drops the connection on NBD_OPT_GO
 * (proto.md: some old servers close instead of answering NBD_REP_ERR_UNSUP).
 */
export async function negotiate(target: Target, opts: NegotiateOptions): Promise<Connection> {
  tlsRefused(target);
  const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const goal: HandshakeGoal = { kind: 'go', name: opts.exportName, noOptGo: opts.noOptGo ?? false };
  let attempt: { socket: net.Socket; result: HandshakeResult };
  try {
    attempt = await handshakeOnce(target, goal, timeoutMs);
  } catch (err) {
    if (!(err instanceof NbdError) || !(err as { goRejectedByClose?: boolean }).goRejectedByClose) throw err;
    debug('server closed on NBD_OPT_GO: retrying once with NBD_OPT_EXPORT_NAME');
    attempt = await handshakeOnce(target, { ...goal, noOptGo: true }, timeoutMs);
  }
  return transmissionReady(attempt.socket, attempt.result);
}

/** Check nothing was read past the handshake and package the connection for the kernel. */
function transmissionReady(socket: net.Socket, result: HandshakeResult): Connection {
  socket.pause();
  if (socket.readableLength !== 0) {
    socket.destroy();
    throw new NbdError('NBD_E_PROTOCOL', `protocol error: server sent ${socket.readableLength} bytes after the handshake, before any request`);
  }
  return { socket, info: result.info!, style: result.style, via: result.via };
}

/**
 * Negotiate over a stream that is already connected (the local-attach socketpair to the in-process
 * server). No fallback retry: there is no second connection to make.
 */
export async function negotiateOn(socket: net.Socket, opts: NegotiateOptions, where: string): Promise<Connection> {
  const deadline = Date.now() + (opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
  const goal: HandshakeGoal = { kind: 'go', name: opts.exportName, noOptGo: opts.noOptGo ?? false };
  try {
    return transmissionReady(socket, await runHandshake(socket, new ClientHandshake(goal), deadline, where));
  } catch (err) {
    socket.destroy();
    throw err;
  }
}

/** End a query connection politely: NBD_CMD_DISC when in transmission (proto.md "Terminating the transmission phase"). */
function closeQuery(socket: net.Socket, result: HandshakeResult): void {
  if (result.transmission) {
    socket.write(encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 0n, offset: 0n, length: 0 }));
  }
  socket.end();
  socket.destroySoon();
}

async function query(target: Target, goal: HandshakeGoal, timeoutMs: number | undefined): Promise<HandshakeResult> {
  tlsRefused(target);
  const { socket, result } = await handshakeOnce(target, goal, timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
  closeQuery(socket, result);
  return result;
}

/** Most exports `list` re-queries one by one when the server's NBD_OPT_INFO answers said size 0. */
const MAX_REQUERIES = 64;

/** `nbd-attach list`: every export with its details where the server gives them. */
export async function listExports(target: Target, opts: { timeoutMs?: number; details?: boolean } = {}): Promise<HandshakeResult> {
  const result = await query(target, { kind: 'list', details: opts.details ?? true }, opts.timeoutMs);
  // Exports whose NBD_OPT_INFO answer said size 0 (nbd-server 3.24 does so for every export): ask each
  // again with `info`, which confirms with NBD_OPT_GO on its own connection (see ClientHandshake.infoDone).
  const invalid = (result.exports ?? []).filter((e) => e.info?.size === 0n).slice(0, MAX_REQUERIES);
  for (const e of invalid) {
    try {
      e.info = (await exportInfo(target, e.name, opts)).info!;
    } catch (err) {
      delete e.info;
      e.infoError = err instanceof Error ? err.message : String(err);
    }
  }
  return result;
}

/** `nbd-attach info`: one export's size, flags and block sizes, without entering transmission where possible. */
export function exportInfo(target: Target, name: string, opts: { timeoutMs?: number } = {}): Promise<HandshakeResult> {
  return query(target, { kind: 'info', name }, opts.timeoutMs);
}
