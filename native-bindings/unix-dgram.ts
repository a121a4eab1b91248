// AF_UNIX datagram sockets, which Node's `dgram` module does not offer: one datagram sent to a socket
// named by a path or an abstract name (systemd's $NOTIFY_SOCKET, sd_notify(3)), and a listener that
// receives them (tests play the service manager with it; no python or socat needed).
//
// Names as sd_notify(3) writes them: `/run/systemd/notify` is a path in the file system, `@name` a
// name in the abstract namespace (unix(7): sun_path[0] is NUL, the name is the bytes after it, up to
// the address length; no trailing NUL, and the length counts exactly the name). A path is
// NUL-terminated inside sun_path, so it has at most UNIX_PATH_MAX - 1 = 107 bytes.
//
// Sockets are SOCK_CLOEXEC (no child inherits them) and SOCK_NONBLOCK: a sender whose receiver's
// queue is full gets EAGAIN instead of stalling the event loop; the listener is watched by libuv
// (koffi's uv_poll) and never blocks either. koffi is loaded on the first call only (libc.ts).

import { unlinkSync } from 'node:fs';
import { NbdError } from '../src/errors.ts';
import { AF_UNIX, MSG_TRUNC, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, UNIX_PATH_MAX } from '../src/kernel/constants.ts';
import * as libc from './libc.ts';

/** offsetof(struct sockaddr_un, sun_path): the u16 sun_family before it (include/uapi/linux/un.h). */
const SUN_PATH_OFFSET = 2;

/**
 * struct sockaddr_un for `name`, exactly as long as the address length to pass (pure; no koffi).
 * `@name`: abstract, sun_path = NUL + name (no terminator). `/path` (or any other non-empty string):
 * sun_path = path + NUL. Throws NbdError(NBD_E_USAGE) for an empty name, a NUL inside it, or a
 * name that does not fit sun_path.
 */
export function sockaddrUn(name: string): Buffer {
  if (name === '' || name === '@') throw new NbdError('NBD_E_USAGE', `unix socket address '${name}' is empty: give a path or @name`);
  if (name.includes('\0')) throw new NbdError('NBD_E_USAGE', 'unix socket address contains a NUL byte: give a path or @name without one');
  const abstract = name.startsWith('@');
  const bytes = Buffer.from(abstract ? name.slice(1) : name, 'utf8');
  // Abstract: NUL + name fill at most all of sun_path; path: name + NUL do.
  const max = UNIX_PATH_MAX - 1;
  if (bytes.length > max) {
    throw new NbdError('NBD_E_USAGE', `unix socket ${abstract ? 'name' : 'path'} '${name}' is ${bytes.length} bytes, the limit is ${max} (sun_path holds ${UNIX_PATH_MAX}): use a shorter one`);
  }
  const addr = Buffer.alloc(SUN_PATH_OFFSET + 1 + bytes.length);
  addr.writeUInt16LE(AF_UNIX, 0); // host order; all supported targets are little-endian (x86_64, aarch64)
  if (abstract) bytes.copy(addr, SUN_PATH_OFFSET + 1); // sun_path[0] stays NUL
  else bytes.copy(addr, SUN_PATH_OFFSET); // the last byte stays NUL: the terminator
  return addr;
}

function dgramSocket(): number {
  return libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
}

/**
 * Send `data` as one datagram to the AF_UNIX SOCK_DGRAM socket named `address` (path or `@name`)
 * from a fresh unbound socket, closed again before returning. Throws NbdError for a bad name,
 * libc.SyscallError otherwise, naming the address: "sendto(/run/systemd/notify) failed: ENOENT
 * (No such file or directory)"; code EAGAIN means the receiver's queue is full (try again later).
 */
export function sendDatagram(address: string, data: Uint8Array): void {
  const addr = sockaddrUn(address);
  const fd = dgramSocket();
  try {
    try {
      libc.sendto(fd, data, 0, addr);
    } catch (e) {
      if (e instanceof libc.SyscallError) throw new libc.SyscallError(`sendto(${address})`, e.errno);
      throw e;
    }
  } finally {
    libc.close(fd);
  }
}

/** Largest datagram the listener keeps whole; longer ones are cut and flagged (`truncated`). */
export const LISTENER_MAX_DATAGRAM = 64 * 1024;

export interface Datagram {
  data: Buffer;
  /** The sender's datagram was longer than LISTENER_MAX_DATAGRAM; `data` is its beginning. */
  truncated: boolean;
}

/**
 * A bound AF_UNIX datagram socket that queues what arrives, for tests standing in for the service
 * manager. `receive(ms)` resolves with the next datagram, or undefined when none came in time.
 * Nothing here blocks: the socket is non-blocking and watched on the event loop.
 */
export class DatagramListener {
  readonly address: string;
  private readonly fd: number;
  private readonly watcher: libc.FdWatcher;
  private readonly queue: Datagram[] = [];
  private readonly waiters: { resolve: (d: Datagram | undefined) => void; timer: NodeJS.Timeout }[] = [];
  private readonly buf = Buffer.alloc(LISTENER_MAX_DATAGRAM);
  private closed = false;

  /** Bind `address` (a path, which must not exist yet, or `@name`). */
  constructor(address: string) {
    const addr = sockaddrUn(address);
    this.address = address;
    this.fd = dgramSocket();
    try {
      libc.bind(this.fd, addr);
    } catch (e) {
      libc.close(this.fd);
      if (e instanceof libc.SyscallError) throw new libc.SyscallError(`bind(${address})`, e.errno);
      throw e;
    }
    this.watcher = libc.watchReadable(this.fd, () => this.drainSocket());
    this.watcher.unref(); // a test waiting in receive() holds the loop with its timer
  }

  private drainSocket(): void {
    for (;;) {
      if (this.closed) return;
      const n = libc.recvNonblocking(this.fd, this.buf, MSG_TRUNC);
      if (n === null) return;
      const d: Datagram = { data: Buffer.from(this.buf.subarray(0, Math.min(n, this.buf.length))), truncated: n > this.buf.length };
      const w = this.waiters.shift();
      if (w) {
        clearTimeout(w.timer);
        w.resolve(d);
      } else {
        this.queue.push(d);
      }
    }
  }

  /** The next datagram (queued or arriving within `timeoutMs`), or undefined. */
  receive(timeoutMs: number): Promise<Datagram | undefined> {
    if (this.closed) return Promise.reject(new Error(`datagram listener ${this.address} is closed`));
    this.drainSocket(); // anything that arrived before the watcher's callback ran
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve) => {
      const entry = {
        resolve,
        timer: setTimeout(() => {
          const i = this.waiters.indexOf(entry);
          if (i >= 0) this.waiters.splice(i, 1);
          resolve(undefined);
        }, timeoutMs),
      };
      this.waiters.push(entry);
    });
  }

  /** Close the socket (and remove a path socket's file). Pending receives resolve with undefined. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    libc.close(this.fd);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.resolve(undefined);
    }
    if (!this.address.startsWith('@')) {
      try {
        unlinkSync(this.address);
      } catch {
        // already gone
      }
    }
  }
}
