// Local attach's connection source without a kernel: a real socketpair (libc through koffi), the
// built-in server on one end, our handshake on the other; then raw NBD requests on the client end,
// exactly what the kernel would send once it owns that socket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type net from 'node:net';
import { localSource, servedSource } from '../../src/supervisor/source.ts';
import { MemoryBackend } from '../../src/server/backends.ts';
import { makeExport, serveConnection, type Backend } from '../../src/server/index.ts';
import { socketPair } from '../../src/socket-pair.ts';
import { encodeRequest, decodeSimpleReply } from '../../src/protocol/codec.ts';
import { Cmd, TransmissionFlag, WireErr } from '../../src/protocol/constants.ts';

/** Send one request and read its simple reply (plus `readLength` bytes of data for READ). */
function roundTrip(sock: net.Socket, req: Buffer, readLength = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const onData = (b: Buffer): void => {
      buf = Buffer.concat([buf, b]);
      if (buf.length < 16) return;
      const r = decodeSimpleReply(buf.subarray(0, 16));
      const need = 16 + (r.error === 0 ? readLength : 0);
      if (buf.length < need) return;
      sock.off('data', onData);
      resolve({ ...r, data: buf.subarray(16, need) });
    };
    sock.on('data', onData);
    sock.once('error', reject);
    sock.write(req);
  });
}

test('--memory: a socketpair connection negotiates and carries WRITE, READ and FLUSH', async () => {
  const src = await localSource({ memory: '4M', readOnly: false });
  try {
    assert.equal(src.server, 'local memory 4M');
    assert.equal(src.endpoint, undefined);
    const conn = await src.connect(5000);
    assert.equal(conn.info.size, 4n * 1024n * 1024n);
    assert.ok(conn.info.flags & TransmissionFlag.SEND_FLUSH, 'flush advertised');
    assert.ok(!(conn.info.flags & TransmissionFlag.READ_ONLY));
    const payload = Buffer.alloc(8192, 0x5a);
    const w = await roundTrip(conn.socket, Buffer.concat([encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 7n, offset: 65536n, length: payload.length }), payload]));
    assert.deepEqual([w.error, w.cookie], [0, 7n]);
    const r = await roundTrip(conn.socket, encodeRequest({ flags: 0, type: Cmd.READ, cookie: 8n, offset: 65536n - 4096n, length: 16384 }), 16384);
    assert.equal(r.error, 0);
    assert.ok(r.data.subarray(0, 4096).every((b) => b === 0), 'unwritten range reads zeros');
    assert.ok(r.data.subarray(4096, 12288).every((b) => b === 0x5a), 'written range reads back');
    const f = await roundTrip(conn.socket, encodeRequest({ flags: 0, type: Cmd.FLUSH, cookie: 9n, offset: 0n, length: 0 }));
    assert.equal(f.error, 0);
    conn.socket.destroy();
  } finally {
    await src.close();
  }
});

test('--file: writes reach the image; -R opens it read-only and writes get EPERM', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'nbd-local-'));
  try {
    const file = join(dir, 'disk.img');
    writeFileSync(file, Buffer.alloc(1024 * 1024));
    const src = await localSource({ file, readOnly: false });
    assert.equal(src.server, `local file ${file}`);
    const conn = await src.connect(5000);
    assert.equal(conn.info.size, 1024n * 1024n);
    const data = Buffer.from('written through a socketpair'.padEnd(512, '.'));
    const w = await roundTrip(conn.socket, Buffer.concat([encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 1n, offset: 4096n, length: 512 }), data]));
    assert.equal(w.error, 0);
    assert.equal((await roundTrip(conn.socket, encodeRequest({ flags: 0, type: Cmd.FLUSH, cookie: 2n, offset: 0n, length: 0 }))).error, 0);
    assert.deepEqual(readFileSync(file).subarray(4096, 4608), data, 'the image has the bytes after FLUSH');
    conn.socket.destroy();
    await src.close();

    const ro = await localSource({ file, readOnly: true });
    try {
      const c2 = await ro.connect(5000);
      assert.ok(c2.info.flags & TransmissionFlag.READ_ONLY, 'read-only flag');
      const denied = await roundTrip(c2.socket, Buffer.concat([encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 3n, offset: 0n, length: 512 }), Buffer.alloc(512, 1)]));
      assert.equal(denied.error, WireErr.EPERM);
      const r = await roundTrip(c2.socket, encodeRequest({ flags: 0, type: Cmd.READ, cookie: 4n, offset: 4096n, length: 512 }), 512);
      assert.deepEqual(r.data, data, 'the connection stays usable after the refusal');
      c2.socket.destroy();
    } finally {
      await ro.close();
    }
    assert.ok(readFileSync(file).subarray(0, 512).every((b) => b === 0), 'nothing written by the refused request');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('local sources refuse what cannot work, with a line that says what to do', async () => {
  await assert.rejects(localSource({ file: '/nonexistent/disk.img', readOnly: false }), /no such file; create it first/);
  await assert.rejects(localSource({ memory: 'lots', readOnly: false }), /--memory lots: .*e\.g\. 512M/);
  await assert.rejects(localSource({ file: 'x', memory: '1M', readOnly: false }), /not both/);
  const dir = mkdtempSync(join(tmpdir(), 'nbd-local-'));
  try {
    writeFileSync(join(dir, 'empty.img'), '');
    await assert.rejects(localSource({ file: join(dir, 'empty.img'), readOnly: false }), /the image is empty; give it a size first/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a dropped connection\'s running WRITE lands before the next connection is handed out (the resent WRITE is last)', async () => {
  // Test double: a memory export whose pool writes wait until the test lets them finish.
  const inner = new MemoryBackend(1 << 20);
  const stalled: (() => void)[] = [];
  const backend: Backend = {
    size: inner.size,
    readOnly: false,
    canMultiConn: true,
    description: 'memory with stalled writes',
    read: (o, b) => inner.read(o, b),
    write: async (o, d, fua) => {
      await new Promise<void>((resolve) => stalled.push(resolve));
      await inner.write(o, d, fua);
    },
    writeZeroes: (o, l, f) => inner.writeZeroes(o, l, f),
    trim: (o, l, f) => inner.trim(o, l, f),
    flush: () => inner.flush(),
    close: () => inner.close(),
  };
  const src = servedSource(makeExport(backend, ''), 'local test', { serveConnection, socketPair });
  try {
    const a = await src.connect(5000);
    a.socket.write(Buffer.concat([encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 1n, offset: 0n, length: 4096 }), Buffer.alloc(4096, 0xaa)]));
    for (let i = 0; i < 200 && stalled.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(stalled.length as number, 1, "A's write is running");
    a.socket.destroy(); // the kernel gives up on A (request timeout)
    let handedOut = false;
    const next = src.connect(5000).then((c) => ((handedOut = true), c));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(handedOut, false, "no new connection while A's write runs");
    stalled.shift()!();
    const b = await next;
    const resent = roundTrip(b.socket, Buffer.concat([encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 2n, offset: 0n, length: 4096 }), Buffer.alloc(4096, 0xbb)]));
    for (let i = 0; i < 200 && stalled.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
    stalled.shift()!();
    assert.equal((await resent).error, 0);
    const back = Buffer.alloc(4096);
    await inner.read(0, back);
    assert.deepEqual(back, Buffer.alloc(4096, 0xbb));
    b.socket.destroy();
  } finally {
    await src.close();
  }
});
