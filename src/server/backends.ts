// The two built-in backends: a file (or block device) and sparse memory.

import fs, { constants as fsConstants, promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import * as libc from '../../native-bindings/libc.ts';
import { NbdError } from '../errors.ts';
import type { Backend } from './export.ts';
import { INLINE_WRITE_MAX_BYTES } from './inline-io.ts';
import { formatSize } from './size.ts';

/** Largest zero buffer written at once by WRITE_ZEROES on a file (shared, never modified). */
const ZERO_BLOCK = 1 << 20;
let zeroBlock: Buffer | undefined;
const zeros = (): Buffer => (zeroBlock ??= Buffer.alloc(ZERO_BLOCK));

// ---------------------------------------------------------------------------------------------
// File

export interface FileBackendOptions {
  readOnly?: boolean;
  /** Bytes per mapping of a tmpfs/ramfs file for `writeTarget` (default MAP_WINDOW; smaller in tests). */
  mapWindow?: number;
}

/**
 * A writable file on tmpfs/ramfs is mapped (mmap, MAP_SHARED) in windows of this size, made when a
 * WRITE first falls in one, so WRITE payloads are received straight into its pages (writeTarget).
 * Node 20 caps a Buffer at 4 GiB; a payload spanning two windows uses the ordinary path.
 */
export const MAP_WINDOW = 256 * 1024 * 1024;

/** Size of a block device from sysfs (stat reports 0): /sys/dev/block/MAJ:MIN/size in 512-byte sectors. */
async function blockDeviceSize(rdev: number, path: string): Promise<number> {
  // glibc dev_t layout (sys/sysmacros.h gnu_dev_major/gnu_dev_minor).
  const major = (Math.floor(rdev / 2 ** 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | (Math.floor(rdev / 2 ** 12) & ~0xff);
  try {
    const sectors = (await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim();
    return Number(sectors) * 512;
  } catch (err) {
    throw new NbdError('NBD_E_USAGE', `open ${path}: cannot read the block device size from sysfs (${(err as Error).message})`);
  }
}

export async function openFileBackend(path: string, opts: FileBackendOptions = {}): Promise<Backend> {
  const readOnly = opts.readOnly ?? false;
  let fh: FileHandle;
  try {
    fh = await fsp.open(path, readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new NbdError('NBD_E_USAGE', `open ${path}: no such file; create it first (e.g. truncate -s 1G ${path})`);
    if (code === 'EACCES' || code === 'EPERM' || code === 'EROFS') {
      throw new NbdError('NBD_E_PERMISSION', `open ${path}: permission denied${readOnly ? '' : '; serve it with --read-only or fix its permissions'}`);
    }
    if (code === 'EISDIR') throw new NbdError('NBD_E_USAGE', `open ${path}: is a directory; serve a file or block device`);
    throw new NbdError('NBD_E_USAGE', `open ${path}: ${(err as Error).message}`);
  }
  const st = await fh.stat();
  let size: number;
  if (st.isBlockDevice()) size = await blockDeviceSize(st.rdev, path);
  else if (st.isFile()) size = st.size;
  else {
    await fh.close();
    throw new NbdError('NBD_E_USAGE', `open ${path}: not a regular file or block device`);
  }
  return new FileBackend(fh, path, size, readOnly, st.isFile() && (await inMemoryFileSystem(path)), opts.mapWindow);
}

/** Magic numbers of RAM-backed file systems, include/uapi/linux/magic.h (TMPFS_MAGIC, RAMFS_MAGIC). */
const MEMORY_FS_MAGIC = new Set([0x01021994, 0x858458f6]);

/** The file lives in RAM (tmpfs, ramfs): reading and writing it never waits for a disk. */
async function inMemoryFileSystem(path: string): Promise<boolean> {
  try {
    return MEMORY_FS_MAGIC.has(Number((await fsp.statfs(path)).type));
  } catch {
    return false;
  }
}

// The callback forms of fs.read/fs.write on the raw fd: measurably less overhead per request than
// FileHandle.read/write (no per-call object allocation and FileHandle bookkeeping). These run on the
// libuv pool; the inline fast paths (readNow/writeNow) are tried first.
function pread(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

const shortRead = (at: number): Error => Object.assign(new Error(`short read at ${at}`), { code: 'EIO' });

class FileBackend implements Backend {
  readonly canMultiConn = true; // one fd per export, no userspace cache
  readonly description: string;
  /** preadv2(RWF_NOWAIT) works on this file (until it reports EOPNOTSUPP). */
  private nowaitReads: boolean;
  /** fallocate modes the file system refused (EOPNOTSUPP): not tried again. */
  private unsupportedFalloc = 0;
  /** On tmpfs/ramfs: plain reads and writes cannot wait for a disk, so they may run inline. */
  private readonly inMemory: boolean;
  /** False once the FFI turned out to be unavailable: then only the pool paths are used. */
  private ffi = true;
  /** writeTarget may map the file (writable, on tmpfs/ramfs); false after a mapping failed. */
  private mappable: boolean;
  private readonly windows: (libc.Mapping | undefined)[] = [];
  /** Targets handed out by writeTarget and not yet done, with their file offsets. */
  private readonly targets = new Map<Buffer, number>();
  /** Ranges being deallocated by fallocate ([start, end)): no target is handed out over them. */
  private readonly punches: [number, number][] = [];
  /** fallocate calls waiting for targets over their range to be done. */
  private waiters: (() => void)[] = [];

  constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly size: number,
    readonly readOnly: boolean,
    /** On tmpfs/ramfs: every call runs inline, untimed (a clock read costs ~12 µs under emulation). */
    inMemory = false,
    private readonly mapWindow = MAP_WINDOW,
  ) {
    this.description = `file ${resolve(path)}`;
    this.mappable = inMemory && !readOnly && size > 0;
    this.nowaitReads = !inMemory;
    this.inMemory = inMemory;
  }

  /**
   * Run `fn` inline, on a file in RAM only; false if it cannot run here. On a disk file a plain
   * pread/pwrite may wait without bound (a frozen file system, a hung NFS server, writeback
   * throttling), and on the event loop that would stop the whole process: no reconnect, no signal.
   */
  private inline(fn: () => void): boolean {
    if (!this.ffi || !this.inMemory) return false;
    try {
      fn();
      return true;
    } catch (err) {
      if (err instanceof libc.SyscallError || (err as { code?: string }).code === 'EIO') throw err;
      this.ffi = false; // koffi or libc could not be loaded: not an I/O error
      return false;
    }
  }

  /**
   * Inline read: from the page cache without blocking (RWF_NOWAIT) on a disk file whose file system
   * supports it, a plain pread on a file in RAM. False: not (all) cached, or no way to read without
   * blocking: use `read` (the pool).
   */
  readNow(offset: number, buf: Buffer): boolean {
    if (this.nowaitReads) {
      try {
        return libc.preadNowait(this.fh.fd, buf, offset) === buf.length;
      } catch (err) {
        if (err instanceof libc.SyscallError && err.code !== 'EOPNOTSUPP') throw err; // a real I/O error
        this.nowaitReads = false; // unsupported here (or no FFI): the pool from now on
      }
    }
    return this.inline(() => {
      let done = libc.pread(this.fh.fd, buf, offset);
      while (done < buf.length) {
        const n = libc.pread(this.fh.fd, buf.subarray(done), offset + done);
        if (n === 0) throw shortRead(offset + done);
        done += n;
      }
    });
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    const length = buf.length;
    let done = 0;
    while (done < length) {
      const bytesRead = await pread(this.fh.fd, buf, done, length - done, offset + done);
      // The file shrank under us: report an I/O error rather than inventing data.
      if (bytesRead === 0) throw shortRead(offset + done);
      done += bytesRead;
    }
  }

  /**
   * Inline write, on a file in RAM only (see `inline`): a buffered write to a disk file can block
   * without bound (a frozen file system holds every writer until it is thawed). FUA (fdatasync) and
   * big writes go to the pool.
   */
  writeNow(offset: number, data: Uint8Array, fua: boolean): boolean {
    if (fua || data.length > INLINE_WRITE_MAX_BYTES) return false;
    return this.inline(() => {
      let done = libc.pwrite(this.fh.fd, data, offset);
      while (done < data.length) done += libc.pwrite(this.fh.fd, data.subarray(done), offset + done);
    });
  }

  /**
   * The file's own pages for a WRITE payload, on tmpfs/ramfs only: there a page in memory is
   * allocated, so a store into it cannot fail, and nothing waits for a disk. A range with a hole or
   * a swapped-out page (mincore) is left to `write`, which allocates it or reports ENOSPC; a store
   * into such a page through the mapping would raise SIGBUS instead. On a disk file a store could
   * wait for writeback on the event loop, so those are never mapped.
   */
  writeTarget(offset: number, length: number): Buffer | undefined {
    if (!this.mappable || !this.ffi) return undefined;
    for (const [s, e] of this.punches) if (offset < e && s < offset + length) return undefined;
    const w = Math.floor(offset / this.mapWindow);
    if (Math.floor((offset + length - 1) / this.mapWindow) !== w) return undefined;
    const base = w * this.mapWindow;
    let m = this.windows[w];
    try {
      if (!m) m = this.windows[w] = libc.mapShared(this.fh.fd, base, Math.min(this.mapWindow, this.size - base));
      if (!libc.resident(m, offset - base, length)) return undefined;
    } catch {
      this.mappable = false; // no FFI, or the kernel refused the mapping: plain writes from now on
      return undefined;
    }
    const target = m.buf.subarray(offset - base, offset - base + length);
    this.targets.set(target, offset);
    return target;
  }

  writeTargetDone(target: Buffer): void {
    if (!this.targets.delete(target) || this.waiters.length === 0) return;
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * Run fallocate over [offset, offset + length) once no payload is being received into that range
   * through a mapping, and hand out no target over it meanwhile. fallocate may deallocate pages
   * (PUNCH_HOLE); a store into one of them through the mapping would allocate it again, and on a
   * full tmpfs that raises SIGBUS instead of returning ENOSPC.
   */
  private async punching<T>(offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const range: [number, number] = [offset, offset + length];
    this.punches.push(range);
    try {
      const overlaps = (): boolean => {
        for (const [t, o] of this.targets) if (o < range[1] && range[0] < o + t.length) return true;
        return false;
      };
      while (this.targets.size > 0 && overlaps()) await new Promise<void>((wake) => this.waiters.push(wake));
      return await fn();
    } finally {
      this.punches.splice(this.punches.indexOf(range), 1);
    }
  }

  async writev(offset: number, data: readonly Buffer[]): Promise<void> {
    const n = await new Promise<number>((resolve, reject) => fs.writev(this.fh.fd, data, offset, (err, w) => (err ? reject(err) : resolve(w))));
    // A short writev (rare: a signal, a full disk midway) finishes piece by piece.
    let pos = offset;
    let left = n;
    for (const d of data) {
      if (left >= d.length) left -= d.length;
      else {
        await this.write(pos + left, d.subarray(left), false);
        left = 0;
      }
      pos += d.length;
    }
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const bytesWritten = await pwrite(this.fh.fd, data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
    if (fua) await this.fh.datasync();
  }

  /**
   * fallocate(2) with `mode`; false when the file system does not support that mode (EOPNOTSUPP,
   * remembered) or FFI is unavailable, so the caller falls back. Other errors are thrown.
   */
  private async falloc(mode: number, offset: number, length: number): Promise<boolean> {
    if (this.unsupportedFalloc & mode) return false;
    try {
      await this.punching(offset, length, () => libc.fallocateAsync(this.fh.fd, mode, offset, length));
      return true;
    } catch (err) {
      if (err instanceof libc.SyscallError && err.code !== 'EOPNOTSUPP' && err.code !== 'ENOSYS') throw err;
      this.unsupportedFalloc |= mode;
      return false;
    }
  }

  // proto.md "NBD_CMD_WRITE_ZEROES": without NO_HOLE the server may punch a hole; either way the range
  // must read back as zeros. Punching keeps the file size (KEEP_SIZE); ZERO_RANGE keeps the blocks
  // allocated; a file system with neither gets zeros written.
  async writeZeroes(offset: number, length: number, fua: boolean, mayTrim = false): Promise<void> {
    const done =
      (mayTrim && (await this.falloc(libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length))) ||
      (await this.falloc(libc.FALLOC_FL_ZERO_RANGE | libc.FALLOC_FL_KEEP_SIZE, offset, length));
    if (!done) {
      const z = zeros();
      for (let pos = 0; pos < length; pos += z.length) {
        await this.write(offset + pos, z.subarray(0, Math.min(z.length, length - pos)), false);
      }
    }
    if (fua) await this.fh.datasync();
  }

  // proto.md "NBD_CMD_TRIM": a hint; the server MAY discard. Punch a hole where the file system can
  // (space goes back to it); elsewhere leaving the data alone is correct.
  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.falloc(libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length);
    if (fua) await this.fh.datasync();
  }

  async flush(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    this.mappable = false;
    for (const m of this.windows.splice(0)) if (m) libc.unmap(m);
    await this.fh.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Memory

/**
 * Chunk granularity of the sparse memory backend: untouched chunks cost nothing. 1 MiB keeps the
 * number of ArrayBuffers (and V8's external-memory GC work) low for large disks.
 */
export const MEMORY_CHUNK = 1024 * 1024;

export class MemoryBackend implements Backend {
  readonly readOnly = false;
  readonly canMultiConn = true; // one shared Map per export
  readonly description: string;
  private readonly chunks = new Map<number, Buffer>();

  constructor(readonly size: number) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`memory size ${size}`);
    this.description = `memory ${formatSize(size)}`;
  }

  /** Bytes actually allocated (for tests and logs). */
  get allocated(): number {
    return this.chunks.size * MEMORY_CHUNK;
  }

  readNow(offset: number, out: Buffer): boolean {
    this.each(offset, out.length, (idx, within, n, outPos) => {
      const c = this.chunks.get(idx);
      if (c) c.copy(out, outPos, within, within + n);
      else out.fill(0, outPos, outPos + n);
    });
    return true;
  }

  async read(offset: number, out: Buffer): Promise<void> {
    this.readNow(offset, out);
  }

  writeNow(offset: number, data: Uint8Array, _fua: boolean): boolean {
    this.each(offset, data.length, (idx, within, n, pos) => this.chunk(idx).set(data.subarray(pos, pos + n), within));
    return true;
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.writeNow(offset, data, fua);
  }

  /** The chunk itself (allocated now if untouched) when the range lies within one chunk. */
  writeTarget(offset: number, length: number): Buffer | undefined {
    const idx = Math.floor(offset / MEMORY_CHUNK);
    const within = offset - idx * MEMORY_CHUNK;
    if (length === 0 || within + length > MEMORY_CHUNK) return undefined;
    return this.chunk(idx).subarray(within, within + length);
  }

  /** Chunk `idx`, allocated (zeroed) if it was never written. */
  private chunk(idx: number): Buffer {
    let c = this.chunks.get(idx);
    if (!c) {
      c = Buffer.alloc(MEMORY_CHUNK);
      this.chunks.set(idx, c);
    }
    return c;
  }

  async writeZeroes(offset: number, length: number, _fua: boolean): Promise<void> {
    this.each(offset, length, (idx, within, n) => {
      if (n === MEMORY_CHUNK) this.chunks.delete(idx);
      else this.chunks.get(idx)?.fill(0, within, within + n);
    });
  }

  /** Trim frees whole chunks and zeroes partial ones, so trimmed ranges read back as zeros. */
  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.writeZeroes(offset, length, fua);
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.chunks.clear();
  }

  /** Visit [offset, offset+length) chunk by chunk: (chunk index, offset within chunk, bytes, position in range). */
  private each(offset: number, length: number, fn: (idx: number, within: number, n: number, pos: number) => void): void {
    let pos = 0;
    while (pos < length) {
      const abs = offset + pos;
      const idx = Math.floor(abs / MEMORY_CHUNK);
      const within = abs - idx * MEMORY_CHUNK;
      const n = Math.min(MEMORY_CHUNK - within, length - pos);
      fn(idx, within, n, pos);
      pos += n;
    }
  }
}
