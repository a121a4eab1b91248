// Backends (memory, file), size parsing, export planning for `serve`.

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, statfsSync, truncateSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { NbdError } from '../../src/errors.ts';
import { planExports } from '../../src/commands/serve.ts';
import { checkExports, memoryExport } from '../../src/server/index.ts';
import { MEMORY_CHUNK, MemoryBackend, openFileBackend } from '../../src/server/backends.ts';
import { findExport, transmissionFlags, type Backend, type ServedExport } from '../../src/server/export.ts';
import { BufferPool } from '../../src/server/buffer-pool.ts';
import { formatSize, parseSize } from '../../src/server/size.ts';
import { INLINE_WRITE_MAX_BYTES } from '../../src/server/inline-io.ts';
import { TransmissionFlag } from '../../src/protocol/constants.ts';

/** Read into a buffer pre-filled with 0xee, so holes that are not zero-filled show up. */
async function rd(b: Backend, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length, 0xee);
  await b.read(offset, buf);
  return buf;
}

describe('MemoryBackend', () => {
  it('is sparse: 1 TiB costs nothing until written', async () => {
    const m = new MemoryBackend(2 ** 40);
    assert.equal(m.allocated, 0);
    assert.deepEqual(await rd(m, 2 ** 40 - 4096, 4096), Buffer.alloc(4096));
    assert.equal(m.allocated, 0);
    await m.write(2 ** 39, Buffer.from('hi'), false);
    assert.equal(m.allocated, MEMORY_CHUNK);
  });

  it('reads back writes that cross chunk boundaries', async () => {
    const m = new MemoryBackend(4 * MEMORY_CHUNK);
    const data = Buffer.alloc(2 * MEMORY_CHUNK + 100);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await m.write(MEMORY_CHUNK - 50, data, false);
    assert.deepEqual(await rd(m, MEMORY_CHUNK - 50, data.length), data);
    const around = await rd(m, MEMORY_CHUNK - 60, 20);
    assert.deepEqual(around.subarray(0, 10), Buffer.alloc(10));
    assert.deepEqual(around.subarray(10), data.subarray(0, 10));
  });

  it('write zeroes frees whole chunks and zeroes partial ones; trim reads back zeros', async () => {
    const m = new MemoryBackend(4 * MEMORY_CHUNK);
    await m.write(0, Buffer.alloc(4 * MEMORY_CHUNK, 0xff), false);
    assert.equal(m.allocated, 4 * MEMORY_CHUNK);
    await m.writeZeroes(10, 2 * MEMORY_CHUNK, false);
    assert.equal(m.allocated, 3 * MEMORY_CHUNK); // chunk 1 freed, chunks 0 and 2 partly zeroed
    const r = await rd(m, 0, 3 * MEMORY_CHUNK);
    assert.deepEqual(r.subarray(0, 10), Buffer.alloc(10, 0xff));
    assert.deepEqual(r.subarray(10, 10 + 2 * MEMORY_CHUNK), Buffer.alloc(2 * MEMORY_CHUNK));
    assert.deepEqual(r.subarray(10 + 2 * MEMORY_CHUNK), Buffer.alloc(MEMORY_CHUNK - 10, 0xff));
    await m.trim(3 * MEMORY_CHUNK, MEMORY_CHUNK, false);
    assert.deepEqual(await rd(m, 3 * MEMORY_CHUNK, 16), Buffer.alloc(16));
  });
});

describe('file backend', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-server-unit-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('reads, writes, zeroes, flushes a regular file', async () => {
    const f = path.join(dir, 'disk.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 0x11));
    const b = await openFileBackend(f);
    assert.equal(b.size, 1 << 20);
    assert.equal(b.readOnly, false);
    assert.equal(b.canMultiConn, true);
    await b.write(100, Buffer.from('hello'), true);
    assert.equal((await rd(b, 98, 9)).toString('hex'), '1111' + Buffer.from('hello').toString('hex') + '1111');
    await b.writeZeroes(1000, (1 << 20) - 2000, false);
    await b.flush();
    await b.close();
    const onDisk = readFileSync(f);
    assert.equal(onDisk.subarray(100, 105).toString(), 'hello');
    assert.deepEqual(onDisk.subarray(1000, (1 << 20) - 1000), Buffer.alloc((1 << 20) - 2000));
    assert.deepEqual(onDisk.subarray((1 << 20) - 1000), Buffer.alloc(1000, 0x11));
  });

  it('TRIM and WRITE_ZEROES that may trim punch holes (blocks return to the file system); NO_HOLE zeroes keep them', async () => {
    const f = path.join(dir, 'holes.img');
    writeFileSync(f, Buffer.alloc(4 << 20, 0x22));
    const blocks = (): number => statSync(f).blocks;
    const b = await openFileBackend(f);
    const full = blocks();
    await b.trim(1 << 20, 1 << 20, false);
    const afterTrim = blocks();
    assert.ok(afterTrim <= full - 2048 + 64, `trim of 1 MiB freed ${full - afterTrim} sectors`);
    await b.writeZeroes(2 << 20, 1 << 20, false, true);
    const afterHole = blocks();
    assert.ok(afterHole <= afterTrim - 2048 + 64, `write-zeroes that may trim freed ${afterTrim - afterHole} sectors`);
    await b.writeZeroes(3 << 20, 4096, true, false); // NO_HOLE: still zeros on read
    assert.ok(blocks() >= afterHole - 8, 'NO_HOLE zeroes do not deallocate');
    assert.deepEqual(await rd(b, 2 << 20, 1 << 20), Buffer.alloc(1 << 20), 'a punched range reads back as zeros');
    assert.deepEqual(await rd(b, 3 << 20, 4096), Buffer.alloc(4096));
    assert.deepEqual(await rd(b, 0, 16), Buffer.alloc(16, 0x22), 'outside the ranges nothing changed');
    assert.equal(statSync(f).size, 4 << 20, 'size kept');
    await b.close();
  });

  it('a disk image never writes on the event loop (a frozen file system would stop the process)', async (t) => {
    const candidates = [process.cwd(), os.tmpdir(), '/var/tmp'];
    const disk = candidates.find((d) => ![0x01021994, 0x858458f6].includes(Number(statfsSync(d).type)));
    if (!disk) return t.skip('no disk-backed directory here');
    const ddir = mkdtempSync(path.join(disk, '.nbd-attach-unit-'));
    try {
      const f = path.join(ddir, 'disk.img');
      writeFileSync(f, Buffer.alloc(1 << 20, 0x33));
      const b = await openFileBackend(f);
      assert.equal(b.writeNow!(4096, Buffer.from('inline'), false), false, 'a small write goes to the pool');
      await b.write(4096, Buffer.from('inline'), false);
      const out = Buffer.alloc(6);
      assert.equal(b.readNow!(4096, out), true, 'a cached read runs inline (RWF_NOWAIT cannot block)');
      assert.equal(out.toString(), 'inline');
      await b.close();
    } finally {
      rmSync(ddir, { recursive: true, force: true });
    }
  });

  it('inline fast paths read and write the same bytes as the pool paths (file in RAM)', async () => {
    const shm = mkdtempSync('/dev/shm/nbd-inline-');
    const f = path.join(shm, 'inline.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 0x33));
    const b = await openFileBackend(f);
    rmSync(shm, { recursive: true, force: true }); // the open file stays
    assert.equal(b.writeNow!(4096, Buffer.from('inline'), false), true, 'a write to tmpfs runs inline');
    assert.equal(b.writeNow!(8192, Buffer.from('fua'), true), false, 'FUA goes to the pool (fdatasync)');
    assert.equal(b.writeNow!(0, Buffer.alloc(INLINE_WRITE_MAX_BYTES + 1), false), false, 'big writes go to the pool');
    assert.equal(b.readNow!(0, Buffer.alloc(256 * 1024)), true, 'big cached reads run inline');
    const out = Buffer.alloc(10);
    // Just written, so cached: the non-blocking read (or the guarded inline read) answers at once.
    assert.equal(b.readNow!(4094, out), true);
    assert.equal(out.toString('hex'), '3333' + Buffer.from('inline').toString('hex') + '3333');
    assert.deepEqual(await rd(b, 4094, 10), out);
    await b.close();
    assert.throws(() => b.readNow!(0, Buffer.alloc(4)), /EBADF/, 'I/O errors are thrown, not taken as "would block"');
  });

  it('writev writes buffers back to back from one offset', async () => {
    const f = path.join(dir, 'writev.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 0x33));
    const b = await openFileBackend(f);
    await b.writev!(1000, [Buffer.alloc(5000, 1), Buffer.from('mid'), Buffer.alloc(70_000, 2)]);
    await b.close();
    const onDisk = readFileSync(f);
    assert.deepEqual(onDisk.subarray(999, 1000 + 5000), Buffer.concat([Buffer.from([0x33]), Buffer.alloc(5000, 1)]));
    assert.equal(onDisk.subarray(6000, 6003).toString(), 'mid');
    assert.deepEqual(onDisk.subarray(6003, 6003 + 70_001), Buffer.concat([Buffer.alloc(70_000, 2), Buffer.from([0x33])]));
  });

  it('read-only open refuses writes at the OS level too', async () => {
    const f = path.join(dir, 'ro.img');
    writeFileSync(f, Buffer.alloc(4096));
    const b = await openFileBackend(f, { readOnly: true });
    assert.equal(b.readOnly, true);
    await assert.rejects(b.write(0, Buffer.from('x'), false));
    await b.close();
  });

  it('missing file and directory: usage errors that say what to do', async () => {
    await assert.rejects(openFileBackend(path.join(dir, 'nope.img')), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_USAGE' && /truncate -s/.test(e.message));
    await assert.rejects(openFileBackend(dir), (e: unknown) => e instanceof NbdError && /directory/.test(e.message));
  });
});

/** A directory on tmpfs (/dev/shm), where FileBackend offers writeTarget. */
function shmDir(): string {
  assert.equal(Number(statfsSync('/dev/shm').type), 0x01021994, '/dev/shm is a tmpfs (TMPFS_MAGIC) on this machine');
  return mkdtempSync('/dev/shm/nbd-attach-unit-');
}

describe('writeTarget: WRITE payloads received straight into the storage', () => {
  const shm = shmDir();
  after(() => rmSync(shm, { recursive: true, force: true }));

  it('memory: a view of the chunk itself, only within one chunk', async () => {
    const m = new MemoryBackend(4 * MEMORY_CHUNK);
    const t = m.writeTarget(MEMORY_CHUNK + 10, 5)!;
    assert.equal(t.length, 5);
    t.write('hello');
    assert.equal((await rd(m, MEMORY_CHUNK + 8, 9)).toString('hex'), '0000' + Buffer.from('hello').toString('hex') + '0000');
    assert.equal(m.allocated, MEMORY_CHUNK);
    assert.equal(m.writeTarget(MEMORY_CHUNK - 2, 4), undefined, 'spans two chunks');
    assert.equal(m.writeTarget(0, 0), undefined);
  });

  it('tmpfs file: the file\'s pages where they are allocated; holes, window edges and read-only files are refused', async () => {
    const f = path.join(shm, 'disk.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 0x44));
    truncateSync(f, 2 << 20); // the second MiB is a hole
    const b = await openFileBackend(f, { mapWindow: 256 * 1024 });
    const t = b.writeTarget!(4096, 8192)!;
    assert.ok(t, 'allocated pages are offered');
    assert.equal(t.length, 8192);
    t.fill(0x55);
    t.write('mapped', 100);
    b.writeTargetDone!(t);
    // The bytes are in the file: through the backend, and through another open of the file.
    assert.equal((await rd(b, 4096 + 98, 10)).toString('hex'), '5555' + Buffer.from('mapped').toString('hex') + '5555');
    const seen = readFileSync(f);
    assert.deepEqual(seen.subarray(4096, 4096 + 100), Buffer.alloc(100, 0x55));
    assert.deepEqual(seen.subarray(4095, 4096), Buffer.from([0x44]), 'nothing before the range changed');
    assert.deepEqual(seen.subarray(4096 + 8192, 4096 + 8193), Buffer.from([0x44]), 'nothing after it either');
    assert.equal(b.writeTarget!((1 << 20) + 4096, 4096), undefined, 'a hole is left to write() (allocation may fail with ENOSPC)');
    assert.equal(b.writeTarget!(256 * 1024 - 10, 20), undefined, 'spans two mapping windows');
    const t2 = b.writeTarget!(3 * 256 * 1024, 1000);
    assert.ok(t2, 'a later window is mapped when first needed');
    b.writeTargetDone!(t2);
    await b.write((1 << 20) + 4096, Buffer.alloc(4096, 0x66), false);
    const t3 = b.writeTarget!((1 << 20) + 4096, 4096);
    assert.ok(t3, 'once written the page is allocated and offered');
    b.writeTargetDone!(t3);
    await b.close();
    assert.equal(b.writeTarget!(4096, 4096), undefined, 'nothing after close');
    const ro = await openFileBackend(f, { readOnly: true });
    assert.equal(ro.writeTarget!(0, 4096), undefined, 'read-only');
    await ro.close();
  });

  it('a file on a disk file system is never mapped (a store could wait for writeback on the event loop)', async (t) => {
    const candidates = [process.cwd(), os.tmpdir(), '/var/tmp'];
    const disk = candidates.find((d) => ![0x01021994, 0x858458f6].includes(Number(statfsSync(d).type)));
    if (!disk) return t.skip('no disk-backed directory here');
    const dir = mkdtempSync(path.join(disk, '.nbd-attach-unit-'));
    try {
      const f = path.join(dir, 'disk.img');
      writeFileSync(f, Buffer.alloc(1 << 20, 1));
      const b = await openFileBackend(f);
      assert.equal(b.writeTarget!(0, 4096), undefined);
      await b.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('deallocating a range waits for payloads being received into it, and no target is offered over it meanwhile', async () => {
    const f = path.join(shm, 'punch.img');
    writeFileSync(f, Buffer.alloc(1 << 20, 0x77));
    const b = await openFileBackend(f);
    const t = b.writeTarget!(0, 64 * 1024)!;
    assert.ok(t);
    let trimmed = false;
    const trim = b.trim(0, 8192, false).then(() => (trimmed = true));
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    assert.equal(trimmed, false, 'the punch waits for the target over its range');
    assert.equal(b.writeTarget!(4096, 4096), undefined, 'no target over a range being punched');
    const elsewhere = b.writeTarget!(512 * 1024, 4096);
    assert.ok(elsewhere, 'other ranges are still offered');
    b.writeTargetDone!(elsewhere);
    assert.equal(trimmed, false);
    t.fill(0x12);
    b.writeTargetDone!(t);
    await trim;
    assert.deepEqual(await rd(b, 0, 8192), Buffer.alloc(8192), 'punched after the payload was in');
    assert.deepEqual(await rd(b, 8192, 16), Buffer.alloc(16, 0x12), 'the rest of the payload stays');
    assert.equal(b.writeTarget!(0, 4096), undefined, 'the punched pages are a hole now');
    await b.close();
  });
});

describe('BufferPool', () => {
  it('reuses large buffers, passes small ones through, stays bounded', () => {
    const pool = new BufferPool(3 << 20, 64 * 1024);
    const a = pool.take(1 << 20);
    assert.equal(a.length, 1 << 20);
    pool.give(a);
    assert.equal(pool.idleBytes, 1 << 20);
    const b = pool.take(1000 * 1024); // same size class (1 MiB)
    assert.equal(b.buffer, a.buffer);
    assert.equal(b.length, 1000 * 1024);
    assert.equal(pool.idleBytes, 0);
    const small = pool.take(4096);
    pool.give(small);
    pool.give(Buffer.alloc(1 << 20)); // not ours: ignored
    assert.equal(pool.idleBytes, 0);
    const bufs = [pool.take(1 << 20), pool.take(1 << 20), pool.take(1 << 20), pool.take(1 << 20)];
    for (const x of bufs) pool.give(x);
    assert.equal(pool.idleBytes, 3 << 20); // the fourth is dropped: bounded
    pool.give(bufs[0]!);
    assert.equal(pool.idleBytes, 3 << 20);
  });

  it('lets idle buffers go once nothing was taken for a while, not while they are in use', async () => {
    const pool = new BufferPool(8 << 20, 64 * 1024, 100);
    pool.give(pool.take(1 << 20));
    // Taken and given back within each period: kept.
    for (let i = 0; i < 4; i++) {
      await new Promise((r) => setTimeout(r, 60));
      pool.give(pool.take(1 << 20));
      assert.equal(pool.idleBytes, 1 << 20);
    }
    await new Promise((r) => setTimeout(r, 350));
    assert.equal(pool.idleBytes, 0, 'idle for two periods: let go');
  });
});

describe('sizes', () => {
  it('parses bytes and binary suffixes', () => {
    assert.equal(parseSize('4096'), 4096);
    assert.equal(parseSize('64K'), 65536);
    assert.equal(parseSize('512M'), 512 * 2 ** 20);
    assert.equal(parseSize('1G'), 2 ** 30);
    assert.equal(parseSize('1g'), 2 ** 30);
    assert.equal(parseSize('2GiB'), 2 ** 31);
    assert.equal(parseSize('3T'), 3 * 2 ** 40);
    assert.equal(parseSize('100B'), 100);
  });
  it('rejects nonsense', () => {
    for (const bad of ['', '1.5G', '-1', '12Q', 'G', '1 G B', '99999999999P']) {
      assert.throws(() => parseSize(bad), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_USAGE', bad);
    }
  });
  it('formats for people', () => {
    assert.equal(formatSize(2 ** 30), '1 GiB');
    assert.equal(formatSize(1536), '1.5 KiB');
    assert.equal(formatSize(100), '100 B');
  });
});

describe('exports', () => {
  const mk = (name: string): ServedExport => ({ name, description: '', backend: new MemoryBackend(512), readOnly: false });
  it('findExport: exact name, empty name only with one export', () => {
    assert.equal(findExport([mk('a')], '')?.name, 'a');
    assert.equal(findExport([mk('a'), mk('b')], ''), undefined);
    assert.equal(findExport([mk('a'), mk('b')], 'b')?.name, 'b');
    assert.equal(findExport([mk('a'), mk('')], '')?.name, '');
  });
  it('CAN_MULTI_CONN follows the backend', () => {
    const e = mk('a');
    assert.ok(transmissionFlags(e, false) & TransmissionFlag.CAN_MULTI_CONN);
    const single = { ...e, backend: Object.assign(Object.create(e.backend), { canMultiConn: false }) };
    assert.equal(transmissionFlags(single, false) & TransmissionFlag.CAN_MULTI_CONN, 0);
  });

  it('planExports: FILE, NAME=FILE, --memory, --name in order', () => {
    const none = (): boolean => false;
    assert.deepEqual(planExports(['/srv/a.img', 'b=/srv/x.img'], ['1G'], ['first', 'mem'], none), [
      { kind: 'file', source: '/srv/a.img', name: 'first' },
      { kind: 'file', source: '/srv/x.img', name: 'b' },
      { kind: 'memory', source: '1G', name: 'mem' },
    ]);
    assert.deepEqual(planExports([], ['1G', '2G'], [], none).map((p) => p.name), ['memory0', 'memory1']);
    // a real file whose name contains '=' is a FILE, not NAME=FILE
    assert.deepEqual(planExports(['k=v.img'], [], [], () => true), [{ kind: 'file', source: 'k=v.img', name: 'k=v.img' }]);
  });

  it('planExports: usage errors', () => {
    const none = (): boolean => false;
    assert.throws(() => planExports([], [], [], none), /nothing to serve/);
    assert.throws(() => planExports(['/a/x.img', '/b/x.img'], [], [], none), /used twice/);
    assert.throws(() => planExports(['/a/x.img'], [], ['p', 'q'], none), /drop the extra --name/);
  });

  it('exports: names and descriptions with controls are served; NUL and more than 4096 bytes are refused (proto.md "Conventions")', () => {
    const mem = (name: string, description?: string): ServedExport => memoryExport(1024, { name, ...(description !== undefined ? { description } : {}) });
    checkExports([mem('a\x1b[2J\nb', 'line\r\n\u202e'), mem('x'.repeat(4096), 'é'.repeat(2048)), mem('\udcff')]);
    assert.throws(() => checkExports([mem('a\0b')]), /export name contains a NUL character/);
    assert.throws(() => checkExports([mem('a', 'd\0')]), /description of export 'a' contains a NUL/);
    assert.throws(() => checkExports([mem('x'.repeat(4097))]), /export name longer than 4096 bytes/);
    assert.throws(() => checkExports([mem('\udcff'.repeat(4097))]), /export name longer than 4096 bytes/, 'raw bytes count one each');
    assert.throws(() => checkExports([mem('\x1b', 'é'.repeat(2049))]), (e: Error) => e.message.includes("description of export '\\x1b' longer than 4096 bytes"));
  });
});

