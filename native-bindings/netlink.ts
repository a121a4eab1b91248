// A generic-netlink socket (AF_NETLINK / NETLINK_GENERIC) for the kernel's "nbd" family.
//
// The socket is non-blocking and watched by libuv (koffi's uv_poll): waiting for a reply never blocks
// the event loop and never holds a libuv pool thread (a blocking recv.async could not be cancelled).
// Every wait is bounded by a timer. Replies are matched by sequence number; the request ends with the
// NLMSG_ERROR ack (error 0 = success, negative errno = failure), which arrives after any data reply.

import createDebug from '../src/debug.ts';
import * as libc from './libc.ts';
import {
  AF_NETLINK,
  NETLINK_ADD_MEMBERSHIP,
  NETLINK_EXT_ACK,
  NETLINK_GENERIC,
  NlmsgType,
  SOCK_CLOEXEC,
  SOCK_NONBLOCK,
  SOCK_RAW,
  SOL_NETLINK,
  MSG_DONTWAIT,
} from '../src/kernel/constants.ts';
import {
  encodeGetFamily,
  parseAck,
  parseFamily,
  parseGenl,
  parseMessages,
  type FamilyInfo,
  type GenlMessage,
  type NlMessage,
} from '../src/kernel/netlink-codec.ts';

const debug = createDebug('nbd:netlink');

/** A failed netlink request: `errno` is positive (the ack carried -errno). */
export class NetlinkError extends Error {
  readonly errno: number;
  readonly code: string;
  readonly extackMessage: string | undefined;
  constructor(what: string, errno: number, extackMessage?: string) {
    const name = libc.errnoName(errno);
    super(`${what} failed: ${name} (${libc.strerror(errno)})${extackMessage ? `: ${extackMessage}` : ''}`);
    this.name = 'NetlinkError';
    this.errno = errno;
    this.code = name;
    this.extackMessage = extackMessage;
  }
}

export class NetlinkTimeoutError extends Error {
  constructor(what: string, ms: number) {
    super(`${what}: no answer from the kernel within ${ms} ms`);
    this.name = 'NetlinkTimeoutError';
  }
}

/** sockaddr_nl (include/uapi/linux/netlink.h): u16 family, u16 pad, u32 pid, u32 groups = 12 bytes. */
function sockaddrNl(pid = 0, groups = 0): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16LE(AF_NETLINK, 0);
  b.writeUInt32LE(pid, 4);
  b.writeUInt32LE(groups, 8);
  return b;
}

interface Pending {
  seq: number;
  what: string;
  replies: GenlMessage[];
  resolve: (r: GenlMessage[]) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class GenlSocket {
  readonly fd: number;
  private seq: number;
  private readonly buf = Buffer.alloc(64 * 1024);
  private watcher: libc.FdWatcher | undefined;
  private readonly pending = new Map<number, Pending>();
  private multicastHandler: ((m: NlMessage) => void) | undefined;
  private closed = false;

  constructor() {
    this.fd = libc.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_GENERIC);
    try {
      libc.bind(this.fd, sockaddrNl());
      try {
        // Ask for extended-ack messages; harmless when the kernel has nothing to say.
        libc.setsockoptInt(this.fd, SOL_NETLINK, NETLINK_EXT_ACK, 1, 'NETLINK_EXT_ACK');
      } catch {
        /* kernels before 4.12: plain acks */
      }
    } catch (e) {
      libc.close(this.fd);
      throw e;
    }
    this.seq = (Date.now() & 0x3fffffff) >>> 0;
  }

  nextSeq(): number {
    this.seq = (this.seq + 1) >>> 0;
    return this.seq;
  }

  /** Send a request built with `seq` and collect its data replies up to the ack. Bounded by `timeoutMs`. */
  request(what: string, build: (seq: number) => Buffer, timeoutMs = 5000): Promise<GenlMessage[]> {
    if (this.closed) return Promise.reject(new Error(`${what}: netlink socket is closed`));
    const seq = this.nextSeq();
    const msg = build(seq);
    return new Promise<GenlMessage[]>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        this.updateWatch();
        reject(new NetlinkTimeoutError(what, timeoutMs));
      }, timeoutMs);
      this.pending.set(seq, { seq, what, replies: [], resolve, reject, timer });
      try {
        debug('send %s seq=%d (%d bytes)', what, seq, msg.length);
        libc.sendto(this.fd, msg, 0, sockaddrNl());
      } catch (e) {
        clearTimeout(timer);
        this.pending.delete(seq);
        reject(e);
        return;
      }
      // Generic-netlink handlers run inside sendmsg(): the answer is usually queued already.
      this.drain();
      this.updateWatch();
    });
  }

  /** Resolve a family by name. Rejects with NetlinkError ENOENT when the family is not registered. */
  async resolveFamily(name: string, timeoutMs = 5000): Promise<FamilyInfo> {
    const replies = await this.request(`netlink CTRL_CMD_GETFAMILY(${name})`, (seq) => encodeGetFamily(seq, name), timeoutMs);
    const first = replies[0];
    if (!first) throw new Error(`netlink CTRL_CMD_GETFAMILY(${name}): ack without a family reply`);
    return parseFamily(first);
  }

  /** Join a multicast group; messages with seq 0 go to `handler`. Keeps the event loop alive until close/unref. */
  subscribe(groupId: number, handler: (m: GenlMessage) => void): void {
    libc.setsockoptInt(this.fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groupId, 'NETLINK_ADD_MEMBERSHIP');
    this.multicastHandler = (m) => {
      if (m.type >= 0x10) handler(parseGenl(m));
    };
    this.updateWatch();
  }

  /** Let the process exit while only a multicast subscription is open. */
  unref(): void {
    this.watcher?.unref();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.close();
    this.watcher = undefined;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new Error(`${p.what}: netlink socket closed`));
    }
    this.pending.clear();
    libc.close(this.fd);
  }

  private updateWatch(): void {
    const want = !this.closed && (this.pending.size > 0 || this.multicastHandler !== undefined);
    if (want && !this.watcher) this.watcher = libc.watchReadable(this.fd, () => this.drain());
    else if (!want && this.watcher) {
      this.watcher.close();
      this.watcher = undefined;
    }
  }

  /** Read every queued datagram (non-blocking) and dispatch its messages. */
  private drain(): void {
    for (let i = 0; i < 1024 && !this.closed; i++) {
      let n: number | null;
      try {
        n = libc.recvNonblocking(this.fd, this.buf, MSG_DONTWAIT);
      } catch (e) {
        for (const p of this.pending.values()) {
          clearTimeout(p.timer);
          p.reject(e as Error);
        }
        this.pending.clear();
        break;
      }
      if (n === null) break;
      let msgs: NlMessage[];
      try {
        msgs = parseMessages(Buffer.from(this.buf.subarray(0, n))); // copy: the receive buffer is reused
      } catch (e) {
        debug('dropping malformed datagram: %s', (e as Error).message);
        continue;
      }
      for (const m of msgs) this.dispatch(m);
    }
    this.updateWatch();
  }

  private dispatch(m: NlMessage): void {
    if (m.seq === 0 && m.type !== NlmsgType.ERROR) {
      this.multicastHandler?.(m);
      return;
    }
    const p = this.pending.get(m.seq);
    if (!p) {
      debug('reply for unknown seq %d (type %d) dropped', m.seq, m.type);
      return;
    }
    if (m.type === NlmsgType.ERROR) {
      const ack = parseAck(m);
      clearTimeout(p.timer);
      this.pending.delete(m.seq);
      debug('ack %s seq=%d error=%d %s', p.what, m.seq, ack.error, ack.message ?? '');
      if (ack.error === 0) p.resolve(p.replies);
      else p.reject(new NetlinkError(p.what, -ack.error, ack.message));
      return;
    }
    if (m.type === NlmsgType.DONE || m.type === NlmsgType.NOOP) return;
    try {
      p.replies.push(parseGenl(m));
    } catch (e) {
      debug('bad reply for %s: %s', p.what, (e as Error).message);
    }
  }
}
