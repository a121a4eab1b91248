// The two built-in backends: a file (or block device) and sparse memory.

import fs, { constants as fsConstants, promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { resolve } from 'node:path';
import { NbdError } from '../errors.ts';
import type { Backend } from './export.ts';
import { formatSize } from './size.ts';

/** Largest zero buffer written at once by WRITE_ZEROES on a file (shared, never modified). */
const ZERO_BLOCK = 1 << 20;
let zeroBlock: Buffer | undefined;
const zeros = (): Buffer => (zeroBlock ??= Buffer.alloc(ZERO_BLOCK));

// ---------------------------------------------------------------------------------------------
// File

export interface FileBackendOptions {
  readOnly?: boolean;
}

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
  return new FileBackend(fh, path, size, readOnly);
}

// The callback forms of fs.read/fs.write on the raw fd: measurably less overhead per request than
// FileHandle.read/write (no per-call object allocation and FileHandle bookkeeping).
function pread(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}
function pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))));
}

class FileBackend implements Backend {
  readonly canMultiConn = true; // one FileHandle per export, no userspace cache
  readonly description: string;
  constructor(
    private readonly fh: FileHandle,
    readonly path: string,
    readonly size: number,
    readonly readOnly: boolean,
  ) {
    this.description = `file ${resolve(path)}`;
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    const length = buf.length;
    let done = 0;
    while (done < length) {
      const bytesRead = await pread(this.fh.fd, buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        // The file shrank under us: report an I/O error rather than inventing data.
        throw Object.assign(new Error(`short read at ${offset + done}`), { code: 'EIO' });
      }
      done += bytesRead;
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

  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    const z = zeros();
    let done = 0;
    while (done < length) {
      const n = Math.min(z.length, length - done);
      await this.write(offset + done, z.subarray(0, n), false);
      done += n;
    }
    if (fua) await this.fh.datasync();
  }

  // TRIM is a hint (proto.md "NBD_CMD_TRIM": the server MAY discard). Without fallocate(PUNCH_HOLE)
  // in Node there is nothing cheaper than leaving the data alone, which is correct.
  async trim(_offset: number, _length: number, fua: boolean): Promise<void> {
    if (fua) await this.fh.datasync();
  }

  async flush(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
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

  async read(offset: number, out: Buffer): Promise<void> {
    this.each(offset, out.length, (idx, within, n, outPos) => {
      const c = this.chunks.get(idx);
      if (c) c.copy(out, outPos, within, within + n);
      else out.fill(0, outPos, outPos + n);
    });
  }

  async write(offset: number, data: Uint8Array, _fua: boolean): Promise<void> {
    this.each(offset, data.length, (idx, within, n, pos) => {
      let c = this.chunks.get(idx);
      if (!c) {
        c = Buffer.alloc(MEMORY_CHUNK);
        this.chunks.set(idx, c);
      }
      c.set(data.subarray(pos, pos + n), within);
    });
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
