// Noticing a server that is shutting down gracefully, and letting go of its connections at once.
//
// proto.md: a server that wants the client to disconnect answers requests with NBD_ESHUTDOWN (108);
// nbdkit ≥ 1.32 does that from SIGTERM (`systemctl restart`) until its clients leave, and stays alive
// (and keeps its listening socket, answering no greeting) while any client holds a connection. The
// kernel turns each such reply into EIO and never disconnects; but it logs each one
// (drivers/block/nbd.c nbd_handle_reply: dev_err(disk_to_dev(nbd->disk), "Other side returned error
// (%d)\n", ntohl(reply->error)), not rate-limited), which /dev/kmsg delivers to us as
// "3,SEQ,USEC,-;block nbdN: Other side returned error (108)". On that line we shut down (shutdown(2),
// SHUT_RDWR) our duplicates of the device's sockets: the kernel's receiver sees the end of the
// stream, marks the link dead (LINK_DEAD) and requeues, and the reconnect path takes over. Why kmsg and
// kept duplicates: docs/decisions.md "Graceful server restart".

import fs from 'node:fs';
import createDebug from '../debug.ts';
import * as libc from '../../native-bindings/libc.ts';
import { MSG_DONTWAIT, MSG_PEEK } from '../kernel/constants.ts';
import { reconnectLimits } from '../kernel/queue-limits.ts';
import { IDLE_PROBE_MS } from './policy.ts';
import type { SupervisorDeps } from './supervisor.ts';
import { WireErr } from '../protocol/constants.ts';

const debug = createDebug('nbd:supervisor');

/** A device's error reply as the kernel logs it. */
export interface ServerErrorRecord {
  index: number;
  /** The NBD error value the server sent (proto.md "Error values"). */
  error: number;
}

const RECORD = /(?:^|[;\s])block nbd(\d+): Other side returned error \((\d+)\)/;

/** Parse one /dev/kmsg record (or a dmesg line); undefined for anything else. */
export function parseServerError(record: string): ServerErrorRecord | undefined {
  const m = RECORD.exec(record.split('\n', 1)[0]!);
  if (!m) return undefined;
  return { index: Number(m[1]), error: Number(m[2]) };
}

/** True for the reply that asks the client to disconnect. */
export function isShutdownReply(r: ServerErrorRecord | undefined, index: number): boolean {
  return r !== undefined && r.index === index && r.error === WireErr.ESHUTDOWN;
}

export interface KmsgWatch {
  close(): void;
}

/** Bound on one kmsg record (the kernel's records are at most ~1 KiB of text plus dictionary). */
const RECORD_BUF = 8192;
/** Bound on records read per wake-up, so a log storm cannot hold the event loop. */
const RECORDS_PER_WAKE = 256;

/**
 * Follow /dev/kmsg from now on and call `onRecord` for every new record. Returns undefined (and says
 * why through `log`) when the log cannot be read (no /dev/kmsg, not root).
 */
export function watchKmsg(onRecord: (record: string) => void, log: (m: string) => void, path = '/dev/kmsg'): KmsgWatch | undefined {
  let fd: number;
  try {
    fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  } catch (e) {
    log(`cannot read the kernel log (${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}): a server's graceful shutdown will be noticed only when it closes the connection`);
    return undefined;
  }
  const buf = Buffer.alloc(RECORD_BUF);
  // Returns false when there is nothing more to read now.
  const readOne = (deliver: boolean): boolean => {
    let n: number;
    try {
      n = fs.readSync(fd, buf, 0, buf.length, null);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN') return false;
      if (code === 'EPIPE') return true; // records overwritten before we read them: go on with the next
      throw e;
    }
    if (n <= 0) return false;
    if (deliver) onRecord(buf.toString('utf8', 0, n));
    return true;
  };
  // Skip what was logged before we started (at most the whole ring buffer, once).
  try {
    for (let i = 0; i < 1_000_000 && readOne(false); i++);
  } catch (e) {
    fs.closeSync(fd);
    log(`cannot read the kernel log (${path}: ${(e as Error).message}): a server's graceful shutdown will be noticed only when it closes the connection`);
    return undefined;
  }
  let closed = false;
  const watcher = libc.watchReadable(fd, () => {
    if (closed) return;
    try {
      for (let i = 0; i < RECORDS_PER_WAKE && readOne(true); i++);
    } catch (e) {
      debug('kmsg read: %s', (e as Error).message);
    }
  });
  watcher.unref();
  return {
    close() {
      if (closed) return;
      closed = true;
      watcher.close();
      try {
        fs.closeSync(fd);
      } catch {
        /* already closed */
      }
    },
  };
}

/**
 * Our duplicates of the sockets the kernel holds for one device. The kernel keeps its own reference;
 * ours lets us end a connection (shutdown(2) acts on the socket, not the descriptor) when the server
 * asks us to leave. A socket the kernel gave up is shut down by the kernel itself
 * (nbd_mark_nsock_dead → kernel_sock_shutdown): `prune` closes our copies of those.
 */
export interface SocketOps {
  shutdown(fd: number): void;
  close(fd: number): void;
  /** The socket is finished: its receive side is shut down or reports an error. */
  isFinished(fd: number): boolean;
}

export const LIBC_SOCKET_OPS: SocketOps = {
  shutdown: (fd) => libc.shutdown(fd, libc.SHUT_RDWR),
  close: (fd) => libc.close(fd),
  isFinished(fd) {
    // Peek one byte without waiting: 0 = end of stream (shut down), null = open and idle, n = data for
    // the kernel's receiver (left in place).
    try {
      return libc.recvNonblocking(fd, Buffer.alloc(1), MSG_PEEK | MSG_DONTWAIT) === 0;
    } catch {
      return true;
    }
  },
};

export class KeptSockets {
  private readonly fds = new Set<number>();
  constructor(private readonly ops: SocketOps = LIBC_SOCKET_OPS) {}

  get size(): number {
    return this.fds.size;
  }

  add(fd: number): void {
    this.fds.add(fd);
  }

  /** Close our copies of sockets the kernel has finished with. */
  prune(): number {
    let n = 0;
    for (const fd of [...this.fds]) {
      if (!this.ops.isFinished(fd)) continue;
      this.closeOne(fd);
      n++;
    }
    return n;
  }

  /** End every connection (the kernel sees each as dead) and close our copies. Returns how many. */
  dropAll(): number {
    const all = [...this.fds];
    for (const fd of all) {
      try {
        this.ops.shutdown(fd);
      } catch (e) {
        debug('shutdown(%d): %s', fd, (e as Error).message);
      }
      this.closeOne(fd);
    }
    return all.length;
  }

  closeAll(): void {
    for (const fd of [...this.fds]) this.closeOne(fd);
  }

  private closeOne(fd: number): void {
    this.fds.delete(fd);
    try {
      this.ops.close(fd);
    } catch {
      /* already closed */
    }
  }
}

/** Fields of /sys/block/nbdN/stat that move with any request (Documentation/block/stat.rst): read,
 *  write, discard and flush I/Os completed, and requests in flight. */
const STAT_FIELDS = [0, 4, 8, 11, 15];

/** The activity counters of a device's stat line; equal strings mean no request in between. */
export function activityKey(statLine: string): { key: string; inFlight: number } {
  const f = statLine.trim().split(/\s+/);
  return { key: STAT_FIELDS.map((i) => f[i] ?? '').join(' '), inFlight: Number(f[8] ?? 0) };
}

export interface IdleProbeDeps {
  /** /sys/block/nbdN/stat, or undefined when gone. */
  readStat(): string | undefined;
  /** One direct read of the first block through the kernel (O_DIRECT: past the page cache). */
  probe(): Promise<void>;
  /** False while a connection is being replaced (a probe would wait for the reconnect). */
  linksUp(): boolean;
  every(ms: number, fn: () => void): () => void;
}

/**
 * An idle device sends nothing, so a server waiting for its clients to leave (nbdkit after SIGTERM)
 * would never answer NBD_ESHUTDOWN and never leave: each interval with no request at all, send one
 * small read. Its reply, if the server is shutting down, is logged by the kernel like any other and
 * seen by the kernel-log watch. A device in use is never probed (its own requests get the reply).
 */
export function startIdleProbe(intervalMs: number, deps: IdleProbeDeps): { close(): void } {
  let last: string | undefined;
  let busy = false;
  const cancel = deps.every(intervalMs, () => {
    if (busy) return;
    const stat = deps.readStat();
    if (stat === undefined) return;
    const a = activityKey(stat);
    const idle = a.key === last && a.inFlight === 0;
    last = a.key;
    if (!idle || !deps.linksUp()) return;
    busy = true;
    deps
      .probe()
      .catch((e: Error) => debug('idle probe: %s', e.message))
      .finally(() => {
        busy = false;
        last = deps.readStat() === undefined ? last : activityKey(deps.readStat()!).key;
      });
  });
  return { close: cancel };
}

/** The real probe: an O_DIRECT read of `blockSize` bytes at 0 into page-aligned memory. */
export function directReadProbe(devicePath: string, blockSizeNow: () => number): () => Promise<void> {
  let mem: libc.Mapping | undefined;
  return async () => {
    const blockSize = blockSizeNow();
    if (!mem || mem.length < blockSize) {
      // O_DIRECT needs a buffer aligned to the logical block size (≤ PAGE_SIZE): a page of /dev/zero.
      const z = fs.openSync('/dev/zero', fs.constants.O_RDWR);
      try {
        mem = libc.mapShared(z, 0, Math.max(blockSize, libc.getpagesize()));
      } finally {
        fs.closeSync(z);
      }
    }
    const fh = await fs.promises.open(devicePath, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
    try {
      await fh.read(mem.buf, 0, blockSize, 0);
    } finally {
      await fh.close();
    }
  };
}

function readSysfs(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/**
 * The supervisor's hooks for a changing server, wired to the real kernel: the server's limits on
 * every reconnect (src/kernel/queue-limits.ts), kept socket duplicates, the kernel-log watch and (for
 * a remote server; the in-process server of local attach never shuts down by itself) the idle probe.
 */
export function serverChangeDeps(dev: { index: number; device: string; blockSize: number; local?: boolean | undefined }): Pick<
  SupervisorDeps<never>,
  'applyLimits' | 'sockets' | 'watchKernelLog' | 'startIdleProbe'
> {
  const sys = `/sys/block/nbd${dev.index}`;
  return {
    applyLimits: reconnectLimits(),
    sockets: new KeptSockets(),
    watchKernelLog: (onRecord, log) => watchKmsg(onRecord, log),
    ...(dev.local
      ? {}
      : {
          startIdleProbe: (linksUp: () => boolean) =>
            startIdleProbe(IDLE_PROBE_MS, {
              readStat: () => readSysfs(`${sys}/stat`),
              probe: directReadProbe(dev.device, () => Number(readSysfs(`${sys}/queue/logical_block_size`)) || dev.blockSize),
              linksUp,
              every: (ms, fn) => {
                const t = setInterval(fn, ms);
                t.unref();
                return () => clearInterval(t);
              },
            }),
        }),
  };
}
