// The client's I/O edge: open a socket, drive the pure handshake machine over it, and hand back a
// socket positioned exactly at the start of the transmission phase (nothing read past the handshake).

import net from 'node:net';
import createDebug from '../debug.ts';
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
// TLS (node:tls, the relay, kernel TLS key work) is loaded only for a TLS target.
import type { KernelTlsParams } from './ktls.ts';
import { DEFAULT_CONNECT_TIMEOUT_MS } from './defaults.ts';

const debug = createDebug('nbd:client');

export { DEFAULT_CONNECT_TIMEOUT_MS };
/** Keepalive probes start after this much idle time (the kernel-side supervisor tunes more later). */
export const KEEPALIVE_IDLE_MS = 10_000;

export interface NegotiateOptions {
  /** Export name; '' is the server's default export. */
  exportName: string;
  /** -g/--no-optgo: use NBD_OPT_EXPORT_NAME only. */
  noOptGo?: boolean;
  /** Connect + handshake deadline. */
  timeoutMs?: number;
  /**
   * With TLS over TCP: prepare the connection for kernel TLS (`ktls` in the result) instead of the
   * relay, where the negotiated suite allows it (src/client/ktls.ts).
   */
  kernelTls?: boolean;
  /**
   * The TLS options (certificates, keys, PSK) read by an earlier connection of the same target: a
   * supervisor reads its TLS files once, at attach, and reconnects with what it read. The files may
   * live on the device it reconnects (a root on NBD: reading them then blocks until the dead
   * timeout), or in an initramfs that is gone after switch_root.
   */
  tlsOptions?: import('node:tls').ConnectionOptions;
}

export interface Connection {
  /**
   * Connected, handshake finished, paused, nothing buffered: ready for the kernel. With TLS, the
   * kernel's end of a socketpair relayed to the TLS connection by this process (src/client/tls.ts).
   */
  socket: net.Socket;
  /** The TCP or unix socket to the server, when it is not `socket` itself (TLS): what to tune. */
  transport?: net.Socket;
  /**
   * Kernel TLS: `socket` is the TCP socket itself, its TLS session to be carried on by the kernel
   * with these keys (src/kernel/ktls.ts installs them before the handoff).
   */
  ktls?: KernelTlsParams;
  /** TLS through the relay although kernel TLS was asked for: why. */
  relayReason?: string;
  info: ExportInfo;
  style: ServerStyle;
  via: Via;
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

/**
 * Read exactly n bytes, or null on EOF. Never reads past n: what follows stays in the socket. A
 * stream that ends with fewer than n bytes buffered hands those out from read(n): that is EOF too
 * (the server closed in the middle of a message), never a short message for the machine.
 */
function readExactly(socket: net.Socket, n: number): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const tryRead = (): boolean => {
      const chunk = socket.read(n) as Buffer | null;
      if (chunk !== null) {
        cleanup();
        resolve(chunk.length === n ? chunk : null);
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

/**
 * Drive the handshake machine over a connected socket until it is done, within the deadline. When
 * the machine asks for TLS, `upgrade` runs the TLS handshake and the rest goes over the result, which
 * is the socket returned.
 */
export async function runHandshake(
  socket: net.Socket,
  machine: ClientHandshake,
  deadline: number,
  where: string,
  upgrade?: (plain: net.Socket) => Promise<net.Socket>,
): Promise<{ result: HandshakeResult; socket: net.Socket }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new NbdError('NBD_E_HANDSHAKE_TIMEOUT', `handshake with ${where} timed out in state ${machine.stateName}: the server stopped answering (--connect-timeout to wait longer)`));
    }, Math.max(0, deadline - Date.now()));
  });
  const drive = async (): Promise<{ result: HandshakeResult; socket: net.Socket }> => {
    let step = machine.start();
    for (;;) {
      for (const b of step.send) socket.write(b);
      if (step.done) return { result: step.done, socket };
      if (step.startTls) {
        if (!upgrade) throw new NbdError('NBD_E_TLS', `TLS was negotiated with ${where} but this connection cannot carry it`);
        socket = await upgrade(socket);
        step = machine.tlsDone();
        continue;
      }
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

interface Attempt {
  /** What the rest of the session speaks over: the TCP/unix socket, or TLS over it. */
  socket: net.Socket;
  /** The TCP/unix socket itself. */
  transport: net.Socket;
  result: HandshakeResult;
}

async function handshakeOnce(target: Target, goal: HandshakeGoal, timeoutMs: number, kernelTls = false, given?: import('node:tls').ConnectionOptions): Promise<Attempt> {
  const deadline = Date.now() + timeoutMs;
  const where = describeEndpoint(target.endpoint);
  // TLS files are read before connecting, so a wrong path is a usage error, not a network one.
  const tlsMod = target.tls ? await import('./tls.ts') : undefined;
  const tlsOptions = target.tls && tlsMod ? (given ?? tlsMod.tlsConnectOptions(target.tls, target.endpoint)) : undefined;
  const tapped = tlsOptions && kernelTls && target.endpoint.kind === 'tcp' ? (await import('./ktls.ts')).startTlsTapped : undefined;
  const transport = await connectSocket(target.endpoint, deadline);
  try {
    const start = tapped ?? tlsMod?.startTls;
    const upgrade = tlsOptions && start && ((plain: net.Socket) => start(plain, tlsOptions, where));
    const { result, socket } = await runHandshake(transport, new ClientHandshake({ ...goal, tls: target.tls !== false }), deadline, where, upgrade);
    return { socket, transport, result };
  } catch (err) {
    transport.destroy();
    throw err;
  }
}

/**
 * Connect and negotiate `opts.exportName` into the transmission phase. Falls back to
 * NBD_OPT_EXPORT_NAME on a fresh connection when the server drops the connection on NBD_OPT_GO
 * (proto.md: some old servers close instead of answering NBD_REP_ERR_UNSUP).
 */
export async function negotiate(target: Target, opts: NegotiateOptions): Promise<Connection> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const goal: HandshakeGoal = { kind: 'go', name: opts.exportName, noOptGo: opts.noOptGo ?? false };
  let attempt: Attempt;
  try {
    attempt = await handshakeOnce(target, goal, timeoutMs, opts.kernelTls, opts.tlsOptions);
  } catch (err) {
    if (!(err instanceof NbdError) || !(err as { goRejectedByClose?: boolean }).goRejectedByClose) throw err;
    debug('server closed on NBD_OPT_GO: retrying once with NBD_OPT_EXPORT_NAME');
    attempt = await handshakeOnce(target, { ...goal, noOptGo: true }, timeoutMs, opts.kernelTls, opts.tlsOptions);
  }
  const { socket, transport, result } = attempt;
  const ready = transmissionReady(socket, result);
  if (target.tls === false) return ready;
  const { relayForKernel } = await import('./tls.ts');
  let relayReason: string | undefined;
  if (opts.kernelTls) {
    if (target.endpoint.kind !== 'tcp') relayReason = 'kernel TLS needs a TCP connection (this is a unix socket)';
    else {
      const { kernelTlsHandoff } = await import('./ktls.ts');
      const h = await kernelTlsHandoff(socket as import('node:tls').TLSSocket);
      if ('socket' in h) return { ...ready, socket: h.socket, ktls: h.params };
      relayReason = h.refused;
    }
  }
  try {
    return { ...ready, socket: relayForKernel(socket as import('node:tls').TLSSocket, describeEndpoint(target.endpoint)), transport, ...(relayReason !== undefined ? { relayReason } : {}) };
  } catch (err) {
    transport.destroy();
    throw err;
  }
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
    return transmissionReady(socket, (await runHandshake(socket, new ClientHandshake(goal), deadline, where)).result);
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
