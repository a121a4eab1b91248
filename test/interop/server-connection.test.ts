// The built-in server's transmission phase over real loopback sockets, driven by a small raw client:
// pipelining, completion-order replies, bounded in-flight work, error replies that keep the
// connection usable, protocol violations that close only their connection, DISC and shutdown.

import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { Duplex } from 'node:stream';
import { after, describe, it } from 'node:test';
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Cmd, CmdFlag, Opt, Rep, RepErr, ReplyType, STRUCTURED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, WireErr } from '../../src/protocol/constants.ts';
import { encodeInfoRequest, encodeOption, encodeRequest, type Request } from '../../src/protocol/codec.ts';
import { ByteQueue } from '../../src/server/byte-queue.ts';
import { MemoryBackend, openFileBackend } from '../../src/server/backends.ts';
import type { Backend, ServedExport } from '../../src/server/export.ts';
import { makeExport, memoryExport, serveConnection, startServer, type RunningServer, type ServedConnection, type ServerOptions } from '../../src/server/index.ts';
import { NbdError } from '../../src/errors.ts';
import { ENDED_WHILE_PAUSED } from '../../src/server/connection.ts';
import { socketPair } from '../../src/socket-pair.ts';
import { PayloadBudget } from '../../src/server/budget.ts';
import { loadTlsContext } from '../../src/commands/serve-run.ts';
import { makePki } from '../lib/servers.ts';

const TIMEOUT = 10_000;

/**
 * Serve `exp` on a Duplex that records every write the server makes (client bytes are pushed into
 * it), negotiated with NBD_OPT_GO; `writes` starts empty at transmission.
 */
async function servedOnRecordingWire(exp: ServedExport): Promise<{ wire: Duplex; writes: Buffer[]; served: ServedConnection }> {
  const writes: Buffer[] = [];
  const wire = new Duplex({
    read() {},
    write(chunk: Buffer, _enc, cb) {
      writes.push(Buffer.from(chunk));
      cb();
    },
  });
  const served = serveConnection(wire, [exp], { userBuffers: false });
  wire.push(Buffer.concat([Buffer.from('00000003', 'hex'), encodeOption(Opt.GO, encodeInfoRequest(exp.name, []))]));
  for (let i = 0; i < 50 && served.phase !== 'transmission'; i++) await new Promise((r) => setImmediate(r));
  assert.equal(served.phase, 'transmission');
  writes.length = 0;
  return { wire, writes, served };
}

/** Minimal NBD client for tests: fixed newstyle, NBD_OPT_GO, raw requests and replies. */
class RawClient {
  private readonly q = new ByteQueue();
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  closed = false;
  readonly closedP: Promise<void>;
  structured = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.q.push(d);
      this.feed();
    });
    this.closedP = new Promise((resolve) => {
      socket.on('close', () => {
        this.closed = true;
        this.want?.reject(new Error(`connection closed with ${this.q.length} bytes buffered`));
        this.want = undefined;
        resolve();
      });
    });
    socket.on('error', () => undefined);
  }

  static async connect(where: { port?: number; path?: string }): Promise<RawClient> {
    const socket = where.path ? net.connect(where.path) : net.connect(where.port!, '127.0.0.1');
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    socket.setNoDelay(true);
    return new RawClient(socket);
  }

  /** Connect and negotiate `name` with NBD_OPT_GO; returns the transmission flags and size. */
  static async open(srv: RunningServer, name: string, opts: { structured?: boolean } = {}): Promise<{ c: RawClient; size: bigint; flags: number }> {
    return RawClient.negotiate(await RawClient.connect({ port: srv.port! }), name, opts);
  }

  /** A client on a socket already connected (one end of a socketpair). */
  static wrap(socket: net.Socket): RawClient {
    return new RawClient(socket);
  }

  /** Negotiate `name` with NBD_OPT_GO on a fresh connection; returns the transmission flags and size. */
  static async negotiate(c: RawClient, name: string, opts: { structured?: boolean } = {}): Promise<{ c: RawClient; size: bigint; flags: number }> {
    const greeting = await c.read(18);
    assert.equal(greeting.subarray(0, 16).toString('hex'), '4e42444d4147494349484156454f5054');
    c.socket.write(Buffer.from('00000003', 'hex'));
    return RawClient.choose(c, name, opts);
  }

  /** Option haggling after the client flags (e.g. over TLS after STARTTLS): NBD_OPT_GO for `name`. */
  static async choose(c: RawClient, name: string, opts: { structured?: boolean } = {}): Promise<{ c: RawClient; size: bigint; flags: number }> {
    if (opts.structured) {
      c.socket.write(encodeOption(Opt.STRUCTURED_REPLY));
      const r = await c.optionReply();
      assert.equal(r.type, Rep.ACK);
      c.structured = true;
    }
    c.socket.write(encodeOption(Opt.GO, encodeInfoRequest(name, [])));
    let size = -1n;
    let flags = -1;
    for (;;) {
      const r = await c.optionReply();
      if (r.type === Rep.ACK) break;
      assert.equal(r.type, Rep.INFO, `GO ${name}: reply type 0x${r.type.toString(16)} ${r.data.toString()}`);
      if (r.data.readUInt16BE(0) === 0) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      }
    }
    return { c, size, flags };
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: Buffer.from(await this.read(len)) };
  }

  read(n: number): Promise<Buffer> {
    if (this.want) throw new Error('one read at a time');
    if (this.q.length >= n) return Promise.resolve(Buffer.from(this.q.take(n)));
    if (this.closed) return Promise.reject(new Error('connection closed'));
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
    });
  }

  private feed(): void {
    if (this.want && this.q.length >= this.want.n) {
      const w = this.want;
      this.want = undefined;
      w.resolve(Buffer.from(this.q.take(w.n)));
    }
  }

  send(r: Partial<Request> & { type: number }, payload?: Buffer): void {
    const full: Request = { flags: 0, cookie: 0n, offset: 0n, length: payload?.length ?? 0, ...r };
    this.socket.write(payload ? Buffer.concat([encodeRequest(full), payload]) : encodeRequest(full));
  }

  /**
   * Next reply. `readLengths` maps cookies of outstanding simple-reply READs to their length (a
   * simple reply does not say whether data follows: proto.md "Simple reply message").
   */
  async reply(readLengths: Map<bigint, number> = new Map()): Promise<{ cookie: bigint; error: number; data?: Buffer; message?: string }> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12);
      const error = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const len = readLengths.get(cookie);
      if (len !== undefined && error === 0) return { cookie, error, data: await this.read(len) };
      return { cookie, error };
    }
    assert.equal(magic, STRUCTURED_REPLY_MAGIC, `reply magic 0x${magic.toString(16)}`);
    const h = await this.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readBigUInt64BE(4);
    const len = h.readUInt32BE(12);
    const payload = await this.read(len);
    assert.equal(flags & 1, 1, 'single-chunk replies carry NBD_REPLY_FLAG_DONE');
    if (type === ReplyType.OFFSET_DATA) return { cookie, error: 0, data: payload.subarray(8) };
    if (type === ReplyType.NONE) return { cookie, error: 0 };
    assert.equal(type, ReplyType.ERROR);
    const mlen = payload.readUInt16BE(4);
    return { cookie, error: payload.readUInt32BE(0), message: payload.subarray(6, 6 + mlen).toString() };
  }

  async close(): Promise<void> {
    if (!this.closed) {
      this.send({ type: Cmd.DISC });
      this.socket.end();
    }
    await this.closedP;
  }
}

/** A backend whose reads and writes wait at a gate the test opens; counts what is pending. */
class GatedBackend implements Backend {
  readonly readOnly = false;
  readonly canMultiConn = true;
  readonly description = 'gated';
  readonly inner: MemoryBackend;
  pending: { what: string; release: () => void }[] = [];
  maxPending = 0;
  flushes = 0;
  fuaWrites = 0;
  failNext: Error | undefined;
  private waiters: { n: number; resolve: () => void }[] = [];

  constructor(readonly size: number) {
    this.inner = new MemoryBackend(size);
  }

  private gate(what: string): Promise<void> {
    return new Promise((resolve) => {
      this.pending.push({ what, release: resolve });
      this.maxPending = Math.max(this.maxPending, this.pending.length);
      for (const w of this.waiters.filter((w) => this.pending.length >= w.n)) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve();
      }
    });
  }

  /** Resolves when at least n operations wait at the gate (bounded by the test timeout). */
  whenPending(n: number): Promise<void> {
    if (this.pending.length >= n) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }

  /** Release the pending operation at `index` (in arrival order). */
  release(index: number): void {
    const [p] = this.pending.splice(index, 1);
    assert.ok(p, `nothing pending at ${index}`);
    p.release();
  }

  async read(offset: number, into: Buffer): Promise<void> {
    await this.gate(`read ${offset}`);
    if (this.failNext) {
      const e = this.failNext;
      this.failNext = undefined;
      throw e;
    }
    return this.inner.read(offset, into);
  }
  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    await this.gate(`write ${offset}`);
    if (fua) this.fuaWrites++;
    return this.inner.write(offset, data, fua);
  }
  writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    return this.inner.writeZeroes(offset, length, fua);
  }
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.inner.trim(offset, length, fua);
  }
  async flush(): Promise<void> {
    this.flushes++;
  }
  async close(): Promise<void> {}
}

/** A gated backend that records the offset of every WRITE it is asked for. */
class RecordingGated extends GatedBackend {
  readonly writes: number[] = [];
  override write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.writes.push(offset);
    return super.write(offset, data, fua);
  }
}

/**
 * Pause `served` at its bound of 2 with two slow WRITEs, send two more WRITEs to block 8192 and
 * NBD_CMD_DISC behind them, `close` the client, then let the slow ones complete: the unread WRITEs
 * must never reach the backend, and the connection must end.
 */
async function closeWhilePaused(g: RecordingGated, served: ServedConnection, c: RawClient, close: () => void): Promise<void> {
  c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(4096, 0xaa));
  c.send({ type: Cmd.WRITE, cookie: 2n, offset: 4096n }, Buffer.alloc(4096, 0xaa));
  await g.whenPending(2);
  // Paused at the bound: these stay unread; then the client goes.
  c.send({ type: Cmd.WRITE, cookie: 3n, offset: 8192n }, Buffer.alloc(4096, 0xcc));
  c.send({ type: Cmd.WRITE, cookie: 4n, offset: 8192n }, Buffer.alloc(4096, 0xdd));
  c.send({ type: Cmd.DISC });
  close();
  await new Promise((r) => setTimeout(r, 200)); // the hang-up arrives; nothing reads it
  assert.deepEqual(g.writes, [0, 4096], 'nothing past the bound was framed while paused');
  g.release(0);
  g.release(0);
  // Let anything the server still starts complete, so that a failure is an assertion, not a hang.
  let over = false;
  void served.done.then(() => (over = true));
  for (let i = 0; i < 100 && !over; i++) {
    while (g.pending.length > 0) g.release(0);
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(over, true, 'the connection ended');
  assert.deepEqual(g.writes, [0, 4096], 'the WRITEs left unread when the client went never reached the backend');
  const back = Buffer.alloc(4096);
  await g.inner.read(8192, back);
  assert.deepEqual(back, Buffer.alloc(4096), 'the block they target is untouched');
  await g.inner.read(4096, back);
  assert.deepEqual(back, Buffer.alloc(4096, 0xaa), 'the WRITEs already running completed');
}

const servers: RunningServer[] = [];
async function serveWith(userBuffers: boolean, opts: Omit<ServerOptions, 'port'>): Promise<RunningServer> {
  const srv = await startServer({ port: 0, ...opts, connection: { userBuffers, ...opts.connection } });
  servers.push(srv);
  return srv;
}
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
});

// Every test runs twice: reading through Node's onread into our own buffers (the default), and
// through plain 'data' events (the path for sockets that cannot be adopted).
for (const userBuffers of [true, false]) describe(`server transmission over loopback (${userBuffers ? 'onread buffers' : "'data' events"})`, { timeout: 60_000 }, () => {
  const serve = (opts: Omit<ServerOptions, 'port'>): Promise<RunningServer> => serveWith(userBuffers, opts);
  const conn = { userBuffers };
  it('handles requests concurrently and replies in completion order', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')] });
    const { c } = await RawClient.open(srv, 'g');
    const N = 8;
    const lengths = new Map<bigint, number>();
    for (let i = 0; i < N; i++) {
      c.send({ type: Cmd.READ, cookie: BigInt(i), offset: BigInt(i * 512), length: 512 });
      lengths.set(BigInt(i), 512);
    }
    // A one-at-a-time server would never get past the first read: all N must wait together.
    await g.whenPending(N);
    assert.equal(g.maxPending, N);
    // Release newest first: the replies must come back in that (completion) order.
    const order: bigint[] = [];
    for (let i = N - 1; i >= 0; i--) {
      g.release(i);
      const r = await c.reply(lengths);
      assert.equal(r.error, 0);
      assert.equal(r.data?.length, 512);
      order.push(r.cookie);
    }
    assert.deepEqual(order, [7n, 6n, 5n, 4n, 3n, 2n, 1n, 0n]);
    await c.close();
  });

  it('bounds in-flight requests per connection and resumes when replies drain', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')], connection: { maxInFlight: 4 } });
    const { c } = await RawClient.open(srv, 'g');
    const lengths = new Map<bigint, number>();
    for (let i = 0; i < 12; i++) {
      c.send({ type: Cmd.READ, cookie: BigInt(100 + i), offset: 0n, length: 4096 });
      lengths.set(BigInt(100 + i), 4096);
    }
    await g.whenPending(4);
    // All 12 requests (336 bytes) are already in the server's socket buffer; a round trip with a
    // second connection proves the server had every chance to dispatch more.
    const other = await RawClient.open(srv, 'g');
    await other.c.close();
    assert.equal(g.pending.length, 4);
    const seen = new Set<bigint>();
    for (let i = 0; i < 12; i++) {
      await g.whenPending(1);
      g.release(0);
      const r = await c.reply(lengths);
      assert.equal(r.error, 0);
      seen.add(r.cookie);
      assert.ok(g.maxPending <= 4, `max pending ${g.maxPending}`);
    }
    assert.equal(seen.size, 12);
    await c.close();
  });

  it('bounds in-flight payload bytes too', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 22);
    const srv = await serve({ exports: [makeExport(g, 'g')], connection: { maxInFlightBytes: 256 * 1024 } });
    const { c } = await RawClient.open(srv, 'g');
    const lengths = new Map<bigint, number>();
    for (let i = 0; i < 6; i++) {
      c.send({ type: Cmd.READ, cookie: BigInt(i), offset: 0n, length: 128 * 1024 });
      lengths.set(BigInt(i), 128 * 1024);
    }
    await g.whenPending(2);
    const other = await RawClient.open(srv, 'g');
    await other.c.close();
    assert.equal(g.pending.length, 2); // 2 × 128 KiB reach the 256 KiB budget
    for (let i = 0; i < 6; i++) {
      await g.whenPending(1);
      g.release(0);
      assert.equal((await c.reply(lengths)).error, 0);
    }
    await c.close();
  });

  it('answers wrong requests with the right error and stays usable', { timeout: TIMEOUT }, async () => {
    const srv = await serve({
      exports: [memoryExport(1 << 20, { name: 'rw' }), memoryExport(1 << 20, { name: 'ro', readOnly: true })],
      connection: { maxPayload: 64 * 1024 },
    });
    const { c, flags } = await RawClient.open(srv, 'rw');
    assert.equal(flags & 2, 0);
    const data = Buffer.alloc(4096, 0x3c);
    c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, data);
    assert.deepEqual(await c.reply(), { cookie: 1n, error: 0 });
    c.send({ type: Cmd.READ, cookie: 2n, offset: BigInt((1 << 20) - 100), length: 200 });
    assert.deepEqual(await c.reply(), { cookie: 2n, error: WireErr.EINVAL });
    c.send({ type: Cmd.WRITE, cookie: 3n, offset: BigInt((1 << 20) - 100) }, Buffer.alloc(200));
    assert.deepEqual(await c.reply(), { cookie: 3n, error: WireErr.ENOSPC });
    c.send({ type: Cmd.WRITE, cookie: 4n, offset: 0n }, Buffer.alloc(64 * 1024 + 1, 0xee)); // over max payload
    assert.deepEqual(await c.reply(), { cookie: 4n, error: WireErr.EINVAL });
    c.send({ type: Cmd.READ, cookie: 5n, offset: 0n, length: 64 * 1024 + 1 });
    assert.deepEqual(await c.reply(), { cookie: 5n, error: WireErr.EINVAL });
    c.send({ type: 42, cookie: 6n });
    assert.deepEqual(await c.reply(), { cookie: 6n, error: WireErr.EINVAL });
    c.send({ type: Cmd.WRITE_ZEROES, cookie: 7n, offset: BigInt(1 << 19), length: 1 << 20 });
    assert.deepEqual(await c.reply(), { cookie: 7n, error: WireErr.ENOSPC });
    c.send({ type: Cmd.READ, cookie: 8n, offset: 0n, length: 4096, flags: CmdFlag.DF }); // DF without structured
    assert.deepEqual(await c.reply(), { cookie: 8n, error: WireErr.EINVAL });
    // Still in step: the oversized write's payload was skipped, the data written first is intact.
    c.send({ type: Cmd.READ, cookie: 9n, offset: 0n, length: 4096 });
    assert.deepEqual(await c.reply(new Map([[9n, 4096]])), { cookie: 9n, error: 0, data });
    await c.close();

    const ro = await RawClient.open(srv, 'ro');
    assert.equal(ro.flags & 2, 2, 'NBD_FLAG_READ_ONLY');
    ro.c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(512));
    assert.deepEqual(await ro.c.reply(), { cookie: 1n, error: WireErr.EPERM });
    ro.c.send({ type: Cmd.TRIM, cookie: 2n, offset: 0n, length: 512 });
    assert.deepEqual(await ro.c.reply(), { cookie: 2n, error: WireErr.EPERM });
    ro.c.send({ type: Cmd.WRITE_ZEROES, cookie: 3n, offset: 0n, length: 512 });
    assert.deepEqual(await ro.c.reply(), { cookie: 3n, error: WireErr.EPERM });
    ro.c.send({ type: Cmd.READ, cookie: 4n, offset: 0n, length: 512 });
    assert.deepEqual(await ro.c.reply(new Map([[4n, 512]])), { cookie: 4n, error: 0, data: Buffer.alloc(512) });
    await ro.c.close();
  });

  it('structured replies: OFFSET_DATA for reads, ERROR chunks with a message', { timeout: TIMEOUT }, async () => {
    const srv = await serve({ exports: [memoryExport(1 << 20, { name: 'm' })] });
    const { c, flags } = await RawClient.open(srv, 'm', { structured: true });
    assert.equal(flags & (1 << 7), 1 << 7, 'NBD_FLAG_SEND_DF once structured');
    c.send({ type: Cmd.WRITE, cookie: 1n, offset: 10n }, Buffer.from('abc'));
    assert.deepEqual(await c.reply(), { cookie: 1n, error: 0 });
    c.send({ type: Cmd.READ, cookie: 2n, offset: 9n, length: 5, flags: CmdFlag.DF });
    assert.deepEqual(await c.reply(), { cookie: 2n, error: 0, data: Buffer.from('00616263' + '00', 'hex') });
    c.send({ type: Cmd.READ, cookie: 3n, offset: BigInt(1 << 20), length: 1 });
    const e = await c.reply();
    assert.equal(e.error, WireErr.EINVAL);
    assert.match(e.message!, /beyond the export size/);
    c.send({ type: Cmd.READ, cookie: 4n, offset: 0n, length: 0 });
    assert.deepEqual(await c.reply(), { cookie: 4n, error: 0 });
    await c.close();
  });

  it('backend failures become NBD_EIO and the connection goes on', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')] });
    const { c } = await RawClient.open(srv, 'g');
    g.failNext = new Error('disk on fire');
    c.send({ type: Cmd.READ, cookie: 1n, offset: 0n, length: 512 });
    await g.whenPending(1);
    g.release(0);
    assert.deepEqual(await c.reply(new Map([[1n, 512]])), { cookie: 1n, error: WireErr.EIO });
    c.send({ type: Cmd.READ, cookie: 2n, offset: 0n, length: 512 });
    await g.whenPending(1);
    g.release(0);
    assert.equal((await c.reply(new Map([[2n, 512]]))).error, 0);
    await c.close();
  });

  it('FUA reaches the backend; FLUSH flushes', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')] });
    const { c } = await RawClient.open(srv, 'g');
    c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n, flags: CmdFlag.FUA }, Buffer.alloc(512, 1));
    await g.whenPending(1);
    g.release(0);
    assert.equal((await c.reply()).error, 0);
    assert.equal(g.fuaWrites, 1);
    c.send({ type: Cmd.FLUSH, cookie: 2n });
    assert.deepEqual(await c.reply(), { cookie: 2n, error: 0 });
    assert.equal(g.flushes, 1);
    await c.close();
  });

  it('a protocol violation closes only that connection', { timeout: TIMEOUT }, async () => {
    const srv = await serve({ exports: [memoryExport(1 << 20, { name: 'm' })] });
    const good = await RawClient.open(srv, 'm');
    const bad = await RawClient.open(srv, 'm');
    const garbage = encodeRequest({ type: Cmd.READ, flags: 0, cookie: 1n, offset: 0n, length: 512 });
    garbage.writeUInt32BE(0xdeadbeef, 0);
    bad.c.socket.write(garbage);
    await bad.c.closedP;
    assert.equal(bad.c.closed, true);
    good.c.send({ type: Cmd.WRITE, cookie: 7n, offset: 0n }, Buffer.from('still here'));
    assert.deepEqual(await good.c.reply(), { cookie: 7n, error: 0 });
    await good.c.close();
    // and the server still accepts new connections
    const again = await RawClient.open(srv, 'm');
    await again.c.close();
  });

  it('NBD_CMD_DISC: outstanding requests are answered before the close', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')] });
    const { c } = await RawClient.open(srv, 'g');
    c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(512, 9));
    c.send({ type: Cmd.DISC });
    await g.whenPending(1);
    assert.equal(c.closed, false);
    g.release(0);
    assert.deepEqual(await c.reply(), { cookie: 1n, error: 0 });
    await c.closedP;
    const back = Buffer.alloc(512);
    await g.inner.read(0, back);
    assert.deepEqual(back, Buffer.alloc(512, 9));
  });

  it('TLS: a client that never starts its TLS handshake after STARTTLS is cut off (handshake timeout)', { timeout: TIMEOUT }, async () => {
    const pkiDir = mkdtempSync(path.join(os.tmpdir(), 'nbd-tls-'));
    try {
      const context = loadTlsContext(makePki(pkiDir));
      const srv = await startServer({ port: 0, exports: [memoryExport(1 << 16, { name: 't' })], connection: { tls: { mode: 'require', context, handshakeTimeoutMs: 300 } } });
      try {
        const c = await RawClient.connect({ port: srv.port! });
        await c.read(18);
        c.socket.write(Buffer.from('00000003', 'hex'));
        c.socket.write(encodeOption(Opt.GO, encodeInfoRequest('t', [])));
        assert.equal((await c.optionReply()).type >>> 0, RepErr.TLS_REQD, 'GO before TLS: TLS_REQD');
        c.socket.write(encodeOption(Opt.STARTTLS));
        assert.equal((await c.optionReply()).type, Rep.ACK);
        const t0 = Date.now();
        await c.closedP; // and then says nothing
        const waited = Date.now() - t0;
        assert.ok(waited >= 250 && waited < 5000, `closed after ${waited} ms`);
        for (let i = 0; i < 100 && srv.connections.size > 0; i++) await new Promise((r) => setTimeout(r, 20));
        assert.equal(srv.connections.size, 0, 'the server forgot the connection');
      } finally {
        await srv.close();
      }
    } finally {
      rmSync(pkiDir, { recursive: true, force: true });
    }
  });

  it('shutdown: in-flight requests finish, later ones get NBD_ESHUTDOWN, backend flushed, closed', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    const srv = await startServer({ port: 0, exports: [makeExport(g, 'g')], connection: conn });
    const { c } = await RawClient.open(srv, 'g');
    c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(512, 5));
    await g.whenPending(1);
    let closed = false;
    const closing = srv.close().then(() => (closed = true));
    c.send({ type: Cmd.READ, cookie: 2n, offset: 0n, length: 512 });
    assert.deepEqual(await c.reply(), { cookie: 2n, error: WireErr.ESHUTDOWN });
    assert.equal(closed, false);
    // New connections are refused once closing.
    await assert.rejects(RawClient.connect({ port: srv.port! }).then((x) => x.read(18)));
    g.release(0);
    assert.deepEqual(await c.reply(), { cookie: 1n, error: 0 });
    await c.closedP;
    await closing;
    assert.ok(g.flushes >= 1, 'flushed on shutdown');
    const back = Buffer.alloc(512);
    await g.inner.read(0, back);
    assert.deepEqual(back, Buffer.alloc(512, 5));
  });

  it('listens on a unix socket; the default export answers to the empty name', { timeout: TIMEOUT }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-server-unix-'));
    try {
      const sock = path.join(dir, 's');
      const srv = await startServer({ unix: sock, exports: [memoryExport(1 << 16, { name: 'only' })], connection: conn });
      assert.equal(srv.path, sock);
      const c = await RawClient.connect({ path: sock });
      await c.read(18);
      c.socket.write(Buffer.from('00000003', 'hex'));
      c.socket.write(encodeOption(Opt.EXPORT_NAME, Buffer.alloc(0)));
      const reply = await c.read(10); // C_NO_ZEROES was set: no 124 zeros
      assert.equal(reply.readBigUInt64BE(0), 1n << 16n);
      c.send({ type: Cmd.READ, cookie: 1n, length: 16 });
      assert.deepEqual(await c.reply(new Map([[1n, 16]])), { cookie: 1n, error: 0, data: Buffer.alloc(16) });
      await c.close();
      await srv.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  it('shutdown closes connections still negotiating, promptly', { timeout: TIMEOUT }, async () => {
    const srv = await startServer({ port: 0, exports: [memoryExport(1 << 16, { name: 'm' })], connection: conn });
    const c = await RawClient.connect({ port: srv.port! });
    await c.read(18); // greeting; the client says nothing more
    await srv.close();
    await c.closedP;
    assert.equal(srv.connections.size, 0);
  });

  it('a busy port is an NBD_E_ADDRESS error that says what to do', { timeout: TIMEOUT }, async () => {
    const srv = await serve({ exports: [memoryExport(1 << 16)] });
    await assert.rejects(
      startServer({ port: srv.port!, exports: [memoryExport(1 << 16)] }),
      (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_ADDRESS' && /already in use; pick another --port/.test(e.message),
    );
  });

  it('serveConnection serves one already-connected socket', { timeout: TIMEOUT }, async () => {
    const exports = [memoryExport(1 << 20, { name: 'solo' })];
    let served: ServedConnection | undefined;
    const plain = net.createServer((sock) => {
      served = serveConnection(sock, exports, conn);
    });
    await new Promise<void>((resolve) => plain.listen(0, '127.0.0.1', resolve));
    try {
      const port = (plain.address() as net.AddressInfo).port;
      const fake = { port } as RunningServer;
      const { c, size } = await RawClient.open(fake, 'solo');
      assert.equal(size, 1n << 20n);
      assert.equal(served?.phase, 'transmission');
      assert.equal(served?.exportName, 'solo');
      c.send({ type: Cmd.WRITE, cookie: 1n, offset: 100n }, Buffer.from('xyz'));
      assert.deepEqual(await c.reply(), { cookie: 1n, error: 0 });
      await c.close();
      await served!.done;
      assert.equal(served!.phase, 'closed');
      assert.equal(served!.closeReason, 'client sent NBD_CMD_DISC');
    } finally {
      await new Promise<void>((resolve) => plain.close(() => resolve()));
    }
  });
  it('large WRITEs arriving in pieces, interleaved with small requests, land intact', { timeout: TIMEOUT }, async () => {
    const srv = await serve({ exports: [memoryExport(8 << 20, { name: 'm' })] });
    const { c } = await RawClient.open(srv, 'm');
    const big = Buffer.alloc(3 << 20);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32BE(i, i);
    const frame = Buffer.concat([
      encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 4096n, length: big.length }),
      big,
      encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 2n, offset: 0n, length: 5 }),
      Buffer.from('small'),
      encodeRequest({ type: Cmd.READ, flags: 0, cookie: 3n, offset: 0n, length: 5 }),
    ]);
    // Odd-sized pieces so headers and payloads straddle reads.
    for (let i = 0; i < frame.length; i += 77_777) c.socket.write(frame.subarray(i, i + 77_777));
    const lengths = new Map([[3n, 5]]);
    const got = new Map<bigint, { error: number; data?: Buffer }>();
    for (let i = 0; i < 3; i++) {
      const r = await c.reply(lengths);
      got.set(r.cookie, r);
    }
    assert.equal(got.get(1n)?.error, 0);
    assert.equal(got.get(2n)?.error, 0);
    assert.equal(got.get(3n)?.data?.toString(), 'small');
    c.send({ type: Cmd.READ, cookie: 4n, offset: 4096n, length: big.length });
    const back = await c.reply(new Map([[4n, big.length]]));
    assert.ok(back.data?.equals(big), 'big write reads back intact');
    await c.close();
  });

  it('large WRITEs to a tmpfs file go straight into its pages; FUA flushes; holes, wrong requests and small writes take the other paths', { timeout: TIMEOUT }, async () => {
    const dir = mkdtempSync('/dev/shm/nbd-attach-placed-');
    try {
      const f = path.join(dir, 'disk.img');
      writeFileSync(f, Buffer.alloc(2 << 20, 0x11));
      truncateSync(f, 4 << 20); // the upper 2 MiB is a hole
      const fb = await openFileBackend(f);
      const seen = { placed: 0, done: 0, writes: 0, flushes: 0 };
      // A spy around the real backend, so the test knows which path each WRITE took.
      const backend: Backend = Object.assign(Object.create(fb) as Backend, {
        writeTarget: (o: number, l: number) => {
          const t = fb.writeTarget!(o, l);
          if (t) seen.placed++;
          return t;
        },
        writeTargetDone: (t: Buffer) => {
          seen.done++;
          fb.writeTargetDone!(t);
        },
        write: (o: number, d: Uint8Array, fua: boolean) => {
          seen.writes++;
          return fb.write(o, d, fua);
        },
        writev: (o: number, d: readonly Buffer[]) => {
          seen.writes++;
          return fb.writev!(o, d);
        },
        flush: () => {
          seen.flushes++;
          return fb.flush();
        },
      });
      const srv = await serve({ exports: [makeExport(backend, 'rw'), makeExport(backend, 'ro', { readOnly: true })] });
      const { c } = await RawClient.open(srv, 'rw');
      const pattern = (n: number, seed: number): Buffer => {
        const b = Buffer.alloc(n);
        for (let i = 0; i < n; i += 4) b.writeUInt32BE((i * 2654435761 + seed) >>> 0, i);
        return b;
      };
      const a = pattern(256 * 1024, 1);
      const frame = Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 64n * 1024n, length: a.length }), a]);
      for (let i = 0; i < frame.length; i += 50_000) c.socket.write(frame.subarray(i, i + 50_000)); // payload over several reads
      assert.deepEqual(await c.reply(), { cookie: 1n, error: 0 });
      assert.deepEqual(seen, { placed: 1, done: 1, writes: 0, flushes: 0 }, 'received into the file, no separate write');
      const b = pattern(128 * 1024, 2);
      c.send({ type: Cmd.WRITE, flags: CmdFlag.FUA, cookie: 2n, offset: 1024n * 1024n }, b);
      assert.deepEqual(await c.reply(), { cookie: 2n, error: 0 });
      assert.deepEqual(seen, { placed: 2, done: 2, writes: 0, flushes: 1 }, 'FUA: flushed before the reply');
      const hole = pattern(128 * 1024, 3);
      c.send({ type: Cmd.WRITE, cookie: 3n, offset: 3n << 20n }, hole);
      assert.deepEqual(await c.reply(), { cookie: 3n, error: 0 });
      assert.equal(seen.writes, 1, 'a hole is written through write() (it allocates, or fails with ENOSPC)');
      c.send({ type: Cmd.WRITE, cookie: 4n, offset: (4n << 20n) - 4096n }, pattern(128 * 1024, 4));
      assert.equal((await c.reply()).error, WireErr.ENOSPC, 'past the end');
      c.send({ type: Cmd.WRITE, cookie: 5n, offset: 0n }, Buffer.from('small'));
      assert.deepEqual(await c.reply(), { cookie: 5n, error: 0 });
      assert.deepEqual({ placed: seen.placed, done: seen.done }, { placed: 2, done: 2 }, 'only the two large in-range writes to allocated pages were placed');
      const ro = await RawClient.open(srv, 'ro');
      ro.c.send({ type: Cmd.WRITE, cookie: 6n, offset: 0n }, pattern(128 * 1024, 6));
      assert.equal((await ro.c.reply()).error, WireErr.EPERM);
      await ro.c.close();
      assert.equal(seen.placed, 2, 'a read-only export never offers the storage');
      // A payload cut off by the client's close: its target is handed back (else TRIMs over it would wait forever).
      c.socket.write(Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 7n, offset: 0n, length: 256 * 1024 }), Buffer.alloc(1000, 0x99)]));
      for (let i = 0; i < 50 && seen.placed < 3; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(seen.placed, 3);
      c.socket.destroy();
      for (let i = 0; i < 100 && seen.done < 3; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(seen.done, 3, 'handed back on close');
      await fb.trim(8192, 4096, false); // inside the cut-off target's range: resolves, nothing is being received there any more
      const onDisk = readFileSync(f);
      assert.equal(onDisk.length, 4 << 20);
      assert.deepEqual(onDisk.subarray(64 * 1024, 64 * 1024 + a.length), a);
      assert.deepEqual(onDisk.subarray(1 << 20, (1 << 20) + b.length), b);
      assert.deepEqual(onDisk.subarray(3 << 20, (3 << 20) + hole.length), hole);
      assert.deepEqual(onDisk.subarray((4 << 20) - 4096), Buffer.alloc(4096), 'nothing written past the end');
      assert.deepEqual(onDisk.subarray(64 * 1024 + a.length, 64 * 1024 + a.length + 16), Buffer.alloc(16, 0x11), 'nothing after the range changed');
      assert.deepEqual(onDisk.subarray(0, 1000), Buffer.alloc(1000, 0x99), 'the cut-off payload landed as far as it came');
      assert.deepEqual(onDisk.subarray(8192, 8192 + 4096), Buffer.alloc(4096), 'then the trim punched its range');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('large READs from a file interleave correctly with other replies, also when the client is slow to read', { timeout: TIMEOUT }, async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-bigread-'));
    try {
      const f = path.join(dir, 'disk.img');
      const content = Buffer.alloc(24 << 20);
      for (let i = 0; i < content.length; i += 4) content.writeUInt32BE((i ^ 0x9e3779b9) >>> 0, i);
      writeFileSync(f, content);
      const srv = await serve({ exports: [makeExport(await openFileBackend(f), 'f')] });
      const { c } = await RawClient.open(srv, 'f');
      const lengths = new Map<bigint, number>();
      const want = new Map<bigint, Buffer>();
      const read = (cookie: bigint, offset: number, length: number): void => {
        c.send({ type: Cmd.READ, cookie, offset: BigInt(offset), length });
        lengths.set(cookie, length);
        want.set(cookie, content.subarray(offset, offset + length));
      };
      read(1n, 4096, 1 << 20);
      read(2n, 0, 512); // small: answered inline, must not land inside reply 1's data
      read(3n, 3 << 20, 300_001);
      c.send({ type: Cmd.WRITE, cookie: 4n, offset: BigInt(23 << 20) }, Buffer.from('tail'));
      read(5n, 5 << 20, 16 << 20); // larger than the socket buffers
      c.socket.pause(); // and the client is slow to read
      await new Promise((r) => setTimeout(r, 300));
      c.socket.resume();
      const got = new Map<bigint, { error: number; data?: Buffer }>();
      for (let i = 0; i < 5; i++) {
        const r = await c.reply(lengths);
        got.set(r.cookie, r);
      }
      for (const [cookie, data] of want) assert.ok(got.get(cookie)?.data?.equals(data), `READ ${cookie} returned the file's bytes`);
      assert.equal(got.get(4n)?.error, 0);
      read(6n, 23 << 20, 4);
      assert.equal((await c.reply(lengths)).data?.toString(), 'tail');
      await c.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a burst of requests answered inline leaves in one write, READ data behind its header', { timeout: TIMEOUT }, async () => {
    const exp = memoryExport(1 << 20, { name: 'b' });
    await exp.backend.write(0, Buffer.alloc(1 << 16, 0x5a), false);
    const { wire, writes, served } = await servedOnRecordingWire(exp);
    const burst: Buffer[] = [];
    for (let i = 0; i < 16; i++) burst.push(encodeRequest({ type: Cmd.READ, flags: 0, cookie: BigInt(i + 1), offset: BigInt(i * 512), length: 512 }));
    burst.push(encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 99n, offset: 0n, length: 3 }), Buffer.from('abc'));
    wire.push(Buffer.concat(burst));
    for (let i = 0; i < 50 && writes.length === 0; i++) await new Promise((r) => setImmediate(r));
    assert.equal(writes.length, 1, `one write for the burst (got ${writes.length})`);
    const out = writes[0]!;
    assert.equal(out.length, 16 * (16 + 512) + 16);
    for (let i = 0; i < 16; i++) {
      const at = i * (16 + 512);
      assert.equal(out.readUInt32BE(at), SIMPLE_REPLY_MAGIC);
      assert.equal(out.readUInt32BE(at + 4), 0);
      assert.equal(out.readBigUInt64BE(at + 8), BigInt(i + 1));
      assert.deepEqual(out.subarray(at + 16, at + 16 + 512), Buffer.alloc(512, 0x5a));
    }
    assert.equal(out.readBigUInt64BE(16 * 528 + 8), 99n, 'the WRITE ack joins the same write');
    const back = Buffer.alloc(3);
    await exp.backend.read(0, back);
    assert.equal(back.toString(), 'abc');
    wire.push(null);
    await served.done;
  });

  it('WRITEs for the pool that continue one another go in one writev per loop turn; FUA ones alone; a failed writev fails its run', { timeout: TIMEOUT }, async () => {
    const mem = memoryExport(4 << 20, { name: 'v' });
    const calls: string[] = [];
    let failAt = -1;
    const backend = Object.assign(Object.create(mem.backend) as typeof mem.backend, {
      writeNow: undefined, // every WRITE goes to the pool paths
      writeTarget: undefined,
      writev: async (offset: number, data: readonly Buffer[]) => {
        calls.push(`writev ${offset} x${data.length}`);
        if (offset === failAt) throw Object.assign(new Error('injected'), { code: 'EIO' });
        let at = offset;
        for (const d of data) {
          await mem.backend.write(at, d, false);
          at += d.length;
        }
      },
      write: async (offset: number, data: Uint8Array, fua: boolean) => {
        calls.push(`write ${offset}${fua ? ' fua' : ''}`);
        await mem.backend.write(offset, data, fua);
      },
    });
    const { wire, writes, served } = await servedOnRecordingWire({ ...mem, backend });
    const K = 128 * 1024;
    const w = (cookie: number, offset: number, flags = 0): Buffer =>
      Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags, cookie: BigInt(cookie), offset: BigInt(offset), length: K }), Buffer.alloc(K, cookie)]);
    const acks = async (n: number): Promise<Map<bigint, number>> => {
      for (let i = 0; i < 200 && writes.reduce((a, b) => a + b.length, 0) < n * 16; i++) await new Promise((r) => setImmediate(r));
      const all = Buffer.concat(writes.splice(0));
      assert.equal(all.length, n * 16, `${n} replies`);
      const m = new Map<bigint, number>();
      for (let i = 0; i < n; i++) m.set(all.readBigUInt64BE(i * 16 + 8), all.readUInt32BE(i * 16 + 4));
      return m;
    };
    // One burst: three that continue one another, a gap, two more, and one with FUA.
    wire.push(Buffer.concat([w(1, 0), w(2, K), w(3, 2 * K), w(4, 1 << 20), w(5, (1 << 20) + K), w(6, 2 << 20, CmdFlag.FUA)]));
    const first = await acks(6);
    assert.deepEqual([...first.values()], [0, 0, 0, 0, 0, 0]);
    assert.deepEqual(calls.sort(), ['write 2097152 fua', 'writev 0 x3', `writev ${1 << 20} x2`]);
    for (const [cookie, off] of [[1, 0], [3, 2 * K], [5, (1 << 20) + K], [6, 2 << 20]] as const) {
      const back = Buffer.alloc(K, 0xee);
      await mem.backend.read(off, back);
      assert.deepEqual(back, Buffer.alloc(K, cookie), `WRITE ${cookie} landed`);
    }
    failAt = 3 << 20;
    calls.length = 0;
    wire.push(Buffer.concat([w(7, 3 << 20), w(8, (3 << 20) + K), w(9, 0)]));
    const second = await acks(3);
    assert.deepEqual(Object.fromEntries([...second].map(([c, e]) => [String(c), e])), { '7': WireErr.EIO, '8': WireErr.EIO, '9': 0 });
    assert.deepEqual(calls.sort(), ['writev 0 x1', `writev ${3 << 20} x2`]);
    wire.push(null);
    await served.done;
  });

  it('replies of requests that complete together outside a burst leave in one write', { timeout: TIMEOUT }, async () => {
    const mem = memoryExport(1 << 20, { name: 'h' });
    // A backend whose writes cannot finish inline and all complete at once, as pool writes under load.
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const backend = Object.assign(Object.create(mem.backend) as typeof mem.backend, {
      writeNow: undefined,
      writeTarget: undefined, // payloads go through write(), not straight into memory
      write: async (offset: number, data: Uint8Array, fua: boolean) => {
        await gate;
        await mem.backend.write(offset, data, fua);
      },
    });
    const { wire, writes, served } = await servedOnRecordingWire({ ...mem, backend });
    for (let i = 0; i < 8; i++) {
      wire.push(Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: BigInt(i + 1), offset: BigInt(i * 4), length: 4 }), Buffer.from('wxyz')]));
    }
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    writes.length = 0;
    open();
    for (let i = 0; i < 50 && writes.length === 0; i++) await new Promise((r) => setImmediate(r));
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    assert.equal(writes.length, 1, `eight acks in one write (got ${writes.length} writes)`);
    assert.equal(writes[0]!.length, 8 * 16);
    const cookies = Array.from({ length: 8 }, (_, i) => writes[0]!.readBigUInt64BE(i * 16 + 8)).sort((a, b) => Number(a - b));
    assert.deepEqual(cookies, [1n, 2n, 3n, 4n, 5n, 6n, 7n, 8n]);
    const back = Buffer.alloc(32);
    await mem.backend.read(0, back);
    assert.equal(back.toString(), 'wxyz'.repeat(8));
    wire.push(null);
    await served.done;
  });

  it('a connection dropped with a WRITE running is over only when it lands; a new connection starts after it (resent write not overtaken)', { timeout: TIMEOUT }, async () => {
    // What the kernel does on its request timeout: it gives up on connection A while A's WRITE still
    // runs in the storage, and resends the WRITE on a new connection B.
    const g = new GatedBackend(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')] });
    const a = await RawClient.open(srv, 'g');
    const servedA = [...srv.connections][0]!;
    a.c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(4096, 0xaa));
    await g.whenPending(1);
    a.c.socket.destroy();
    await a.c.closedP;
    let aOver = false;
    void servedA.done.then(() => (aOver = true));
    let bReady = false;
    const bOpen = RawClient.open(srv, 'g').then((b) => ((bReady = true), b));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(aOver, false, "A is not over while its WRITE runs");
    assert.notEqual(servedA.phase, 'closed');
    assert.equal(bReady, false, "B does not reach transmission while A's WRITE runs");
    assert.equal(srv.connections.size, 2, 'A still counts as open');
    g.release(0); // A's stale write lands now
    await servedA.done;
    const b = await bOpen;
    b.c.send({ type: Cmd.WRITE, cookie: 2n, offset: 0n }, Buffer.alloc(4096, 0xbb));
    await g.whenPending(1);
    g.release(0);
    assert.deepEqual(await b.c.reply(), { cookie: 2n, error: 0 });
    const back = Buffer.alloc(4096);
    await g.inner.read(0, back);
    assert.deepEqual(back, Buffer.alloc(4096, 0xbb), "the resent write is the last to land");
    await b.c.close();
  });

  it('a connection paused at its bounds whose client then closed runs none of the requests left unread (kernel resends them elsewhere)', { timeout: TIMEOUT }, async () => {
    // The kernel's request timeout on a busy connection: the server is paused at maxInFlight with
    // slow WRITEs running and more requests unread in its socket buffer; the kernel shuts the socket
    // down (FIN) and resends those requests on another connection. When the slow ones complete,
    // the unread ones must not be run: they would land after the resent ones.
    const g = new RecordingGated(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')], connection: { maxInFlight: 2 } });
    const { c } = await RawClient.open(srv, 'g');
    const served = [...srv.connections][0]!;
    await closeWhilePaused(g, served, c, () => c.socket.end());
    assert.equal(served.closeReason, ENDED_WHILE_PAUSED);
  });

  for (const how of ['end', 'destroy'] as const) {
    it(`the same over a socketpair, the client ${how === 'end' ? 'shutting its side down' : 'closing its end'}`, { timeout: TIMEOUT }, async () => {
      const g = new RecordingGated(1 << 20);
      const [mine, theirs] = socketPair();
      const served = serveConnection(mine, [makeExport(g, 'g')], { ...conn, maxInFlight: 2 });
      const { c } = await RawClient.negotiate(RawClient.wrap(theirs), 'g');
      await closeWhilePaused(g, served, c, () => (how === 'end' ? theirs.end() : theirs.destroy()));
      // A closed end also fails the first reply (EPIPE), which may be noticed first.
      if (how === 'end') assert.equal(served.closeReason, ENDED_WHILE_PAUSED);
      else assert.match(served.closeReason ?? '', /^client closed the connection while reading was paused|EPIPE/);
    });
  }

  it('a client that sends requests before its GO reply and closes while transmission waits for earlier writes gets none of them run', { timeout: TIMEOUT }, async () => {
    const g = new RecordingGated(1 << 20);
    const srv = await serve({ exports: [makeExport(g, 'g')] });
    const a = await RawClient.open(srv, 'g');
    const servedA = [...srv.connections][0]!;
    a.c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(4096, 0xaa));
    await g.whenPending(1);
    a.c.socket.destroy(); // A's WRITE still runs: B's transmission waits for it
    const b = await RawClient.connect({ port: srv.port! });
    for (let i = 0; i < 100 && srv.connections.size < 2; i++) await new Promise((r) => setTimeout(r, 5));
    const servedB = [...srv.connections].find((s) => s !== servedA)!;
    await b.read(18);
    b.socket.write(Buffer.from('00000003', 'hex'));
    b.socket.write(encodeOption(Opt.GO, encodeInfoRequest('g', [])));
    b.send({ type: Cmd.WRITE, cookie: 2n, offset: 8192n }, Buffer.alloc(4096, 0xcc)); // not waiting for the reply
    b.socket.end();
    await new Promise((r) => setTimeout(r, 200));
    assert.notEqual(servedB.phase, 'transmission', 'B waits for A');
    g.release(0);
    let over = false;
    void servedB.done.then(() => (over = true));
    for (let i = 0; i < 100 && !over; i++) {
      while (g.pending.length > 0) g.release(0);
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(over, true, 'B ended');
    assert.deepEqual(g.writes, [0], "B's WRITE never reached the backend");
    // Through 'data' events Node may report the end at once (nothing unread): B then ends as closed.
    if (userBuffers) assert.equal(servedB.closeReason, ENDED_WHILE_PAUSED);
    await servedA.done;
  });

  // TLS uses plain stream events whatever userBuffers says: once is enough.
  if (userBuffers) {
    it('the same over TLS: the hang-up is asked of the TCP socket under the TLS one', { timeout: TIMEOUT }, async () => {
      const pkiDir = mkdtempSync(path.join(os.tmpdir(), 'nbd-tls-'));
      try {
        const pki = makePki(pkiDir);
        const g = new RecordingGated(1 << 20);
        const srv = await serve({ exports: [makeExport(g, 'g')], connection: { maxInFlight: 2, tls: { mode: 'require', context: loadTlsContext(pki) } } });
        const raw = await RawClient.connect({ port: srv.port! });
        await raw.read(18);
        raw.socket.write(Buffer.from('00000003', 'hex'));
        raw.socket.write(encodeOption(Opt.STARTTLS));
        assert.equal((await raw.optionReply()).type, Rep.ACK);
        const secure = tls.connect({ socket: raw.socket, ca: readFileSync(path.join(pki, 'ca-cert.pem')), servername: 'localhost' });
        await new Promise<void>((resolve, reject) => {
          secure.once('secureConnect', resolve);
          secure.once('error', reject);
        });
        const { c } = await RawClient.choose(RawClient.wrap(secure), 'g');
        const served = [...srv.connections][0]!;
        await closeWhilePaused(g, served, c, () => secure.end());
        assert.equal(served.closeReason, ENDED_WHILE_PAUSED);
      } finally {
        rmSync(pkiDir, { recursive: true, force: true });
      }
    });
  }

  it('a server shutdown waits for WRITEs of connections already dropped before flushing and closing the backend', { timeout: TIMEOUT }, async () => {
    const g = new GatedBackend(1 << 20);
    let closedBackend = false;
    g.close = async () => {
      closedBackend = true;
    };
    const srv = await startServer({ port: 0, exports: [makeExport(g, 'g')], connection: conn });
    const { c } = await RawClient.open(srv, 'g');
    c.send({ type: Cmd.WRITE, cookie: 1n, offset: 0n }, Buffer.alloc(512, 7));
    await g.whenPending(1);
    c.socket.destroy();
    await c.closedP;
    const closing = srv.close();
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(closedBackend, false, 'backend not closed under a pending write');
    g.release(0);
    await closing;
    assert.equal(closedBackend, true);
    const back = Buffer.alloc(512);
    await g.inner.read(0, back);
    assert.deepEqual(back, Buffer.alloc(512, 7));
  });

  it('a client that never finishes its handshake is closed after the handshake timeout', { timeout: TIMEOUT }, async () => {
    const srv = await serve({ exports: [memoryExport(1 << 16, { name: 'm' })], connection: { handshakeTimeoutMs: 300 } });
    const t0 = Date.now();
    const idle = await RawClient.connect({ port: srv.port! });
    await idle.read(18); // the greeting; then nothing (no client flags)
    const half = await RawClient.connect({ port: srv.port! });
    await half.read(18);
    half.socket.write(Buffer.from('00000003', 'hex')); // flags, then no option
    await Promise.all([idle.closedP, half.closedP]);
    const took = Date.now() - t0;
    assert.ok(took >= 250 && took < 3000, `closed after ${took} ms`);
    // A client that negotiates in time keeps its connection past the deadline.
    const { c } = await RawClient.open(srv, 'm');
    await new Promise((r) => setTimeout(r, 500));
    c.send({ type: Cmd.READ, cookie: 1n, length: 16 });
    assert.deepEqual(await c.reply(new Map([[1n, 16]])), { cookie: 1n, error: 0, data: Buffer.alloc(16) });
    await c.close();
  });

  it('one payload budget for all connections: framing stops over it, and unread replies give their bytes back when the client goes', { timeout: TIMEOUT }, async () => {
    const budget = new PayloadBudget(4 << 20);
    const srv = await serve({ exports: [memoryExport(64 << 20, { name: 'm' })], connection: { budget } });
    const clients = [await RawClient.open(srv, 'm'), await RawClient.open(srv, 'm')];
    for (const { c } of clients) {
      c.socket.pause(); // never reads a reply
      for (let i = 0; i < 32; i++) c.send({ type: Cmd.READ, cookie: BigInt(i), offset: BigInt(i << 20), length: 1 << 20 });
    }
    let peak = 0;
    for (let i = 0; i < 40; i++) {
      await new Promise((r) => setTimeout(r, 10));
      peak = Math.max(peak, budget.held);
    }
    assert.ok(peak > 0, 'requests were taken');
    // 4 MiB for the process, plus at most one 1 MiB request for a connection with nothing in flight.
    assert.ok(peak <= 6 << 20, `held ${peak} bytes`);
    for (const { c } of clients) c.socket.destroy();
    for (let i = 0; i < 200 && srv.connections.size > 0; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(srv.connections.size, 0);
    assert.equal(budget.held, 0, 'every reply that will never be read gave its bytes back');
  });

  it('caps connections in total and per address; a closed one frees its place', { timeout: TIMEOUT }, async () => {
    const srv = await serve({ exports: [memoryExport(1 << 16, { name: 'm' })], maxConnections: 3, maxConnectionsPerAddress: 2 });
    const first = await RawClient.open(srv, 'm');
    const second = await RawClient.open(srv, 'm');
    // A third from 127.0.0.1 is closed without a greeting.
    const third = await RawClient.connect({ port: srv.port! });
    await third.closedP;
    // Another loopback address is another client: allowed up to the total.
    const other = net.connect({ port: srv.port!, host: '127.0.0.1', localAddress: '127.0.0.2' });
    const greeting = await new Promise<Buffer>((resolve, reject) => {
      other.once('data', resolve);
      other.once('error', reject);
    });
    assert.equal(greeting.subarray(0, 8).toString(), 'NBDMAGIC');
    const fourth = net.connect({ port: srv.port!, host: '127.0.0.1', localAddress: '127.0.0.3' });
    fourth.on('error', () => undefined);
    await new Promise((resolve) => fourth.once('close', resolve)); // over the total of 3
    other.destroy();
    await first.c.close();
    for (let i = 0; i < 100 && srv.connections.size > 1; i++) await new Promise((r) => setTimeout(r, 10));
    const again = await RawClient.open(srv, 'm');
    await again.c.close();
    await second.c.close();
  });
});
