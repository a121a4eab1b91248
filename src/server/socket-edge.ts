// The socket edge of a server connection: how an accepted socket is taken over (reads landing in
// buffers we choose when it allows), what a STARTTLS socket says about the client's certificate,
// and whether the peer has ended a socket we are not reading. Sockets only; no protocol.

import net from 'node:net';
import type { Duplex } from 'node:stream';
import type tls from 'node:tls';
import createDebug from '../debug.ts';
import * as libc from '../../native-bindings/libc.ts';

const log = createDebug('nbd:server');

export type OnRead = { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => boolean | void };
type HandleSocket = net.Socket & { _handle?: { useUserBuffer?: unknown } | null };

/**
 * Re-wrap an accepted TCP/Unix socket's handle in a net.Socket that reads into buffers we choose
 * (Node's documented `onread` option, which accepted sockets cannot request). Node otherwise
 * allocates a fresh 64 KiB buffer per read; on hosts with costly page faults that churn dominated
 * large WRITEs. Returns undefined (caller keeps the 'data' path) when the socket is not a fresh
 * net.Socket with a handle.
 */
export function adoptWithUserBuffers(sock: Duplex, onread: OnRead): net.Socket | undefined {
  if (!(sock instanceof net.Socket)) return undefined;
  const old = sock as HandleSocket;
  const handle = old._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function' || old.readableLength > 0 || old.connecting || old.destroyed) {
    return undefined;
  }
  old._handle = null; // the old wrapper lets go of the handle; destroying it then closes nothing
  old.destroy();
  return new net.Socket({ handle, onread, readable: true, writable: true } as net.SocketConstructorOpts);
}

/**
 * Take an accepted stream over for a connection: with `onread`, re-wrapped to read into our buffers
 * when the socket allows (adoptWithUserBuffers), else read through 'data' events into `onData`;
 * Nagle off (proto.md "Protocol phases": both sides SHOULD disable it); flowing. `userBuffers`:
 * reads go through `onread`.
 */
export function takeOver(sock: Duplex, onread: OnRead | undefined, onData: (chunk: Buffer) => void): { socket: Duplex; userBuffers: boolean } {
  const adopted = onread ? adoptWithUserBuffers(sock, onread) : undefined;
  const socket = adopted ?? sock;
  (socket as Duplex & { setNoDelay?: (v: boolean) => void }).setNoDelay?.(true);
  if (!adopted) socket.on('data', onData); // (with onread, data goes there; flowing still emits 'end')
  socket.resume(); // a socket accepted with pauseOnConnect does not start flowing on its own
  return { socket, userBuffers: adopted !== undefined };
}

/**
 * Why the client's certificate does not verify against the server's CA, or undefined if it does.
 * Only tls.Server checks this itself (and fills `authorized`); a TLSSocket wrapped around an
 * existing socket, as STARTTLS needs, asks its handle like tls.Server does (Node's _tls_wrap.js
 * onServerSocketSecure). Fails closed if that handle method is not there.
 */
export function peerVerificationError(secure: tls.TLSSocket): string | undefined {
  const handle = (secure as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return 'cannot check it in this Node.js version';
  if (Object.keys(secure.getPeerCertificate()).length === 0) return 'none presented';
  const err = handle.verifyError();
  return err ? ((err as Error & { code?: string }).code ?? err.message) : undefined;
}

type FdCarrier = { _handle?: { fd?: unknown } | null; _parent?: FdCarrier | null };

/**
 * The descriptor under a stream: a net.Socket's handle (TCP or Unix), or for a TLSSocket the socket
 * it wraps. Undefined for other streams (tests' Duplexes) or when Node does not expose it.
 */
export function socketFd(sock: Duplex): number | undefined {
  for (let s: FdCarrier | null | undefined = sock as unknown as FdCarrier, depth = 0; s && depth < 4; s = s._parent, depth++) {
    const fd = s._handle?.fd;
    if (typeof fd === 'number' && fd >= 0) return fd;
  }
  return undefined;
}

/**
 * Whether the peer of a socket we are not reading has ended it (shut down its side, reset, or the
 * kernel's nbd driver shut the link down), asked without reading (libc.socketEnded: poll with no
 * wait). False when the stream has no descriptor or the question cannot be asked: the caller then
 * behaves as it did without the check.
 */
export function peerHasEnded(sock: Duplex): boolean {
  const fd = socketFd(sock);
  if (fd === undefined) return false;
  try {
    return libc.socketEnded(fd);
  } catch (err) {
    log('cannot poll socket %d for a hang-up: %s', fd, (err as Error).message);
    return false;
  }
}
