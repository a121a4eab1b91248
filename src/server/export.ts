// What the built-in server serves: named exports, each backed by a Backend (file, memory, or a
// test double). Pure definitions and the rules that turn an export into wire flags.

import { DEFAULT_MAX_PAYLOAD, DEFAULT_MIN_BLOCK, DEFAULT_PREFERRED_BLOCK, TransmissionFlag } from '../protocol/constants.ts';
import type { BlockSizes } from '../protocol/codec.ts';

/** Storage behind one export. Offsets and lengths are already validated against `size`. */
export interface Backend {
  /** Export size in bytes (at most Number.MAX_SAFE_INTEGER). */
  readonly size: number;
  /** The storage cannot be written (opened read-only). */
  readonly readOnly: boolean;
  /**
   * True when every connection sees one shared state with no per-connection cache, so a FLUSH or FUA
   * on one connection covers writes replied to on any other (proto.md "Transmission flags",
   * NBD_FLAG_CAN_MULTI_CONN). Both built-in backends are one object per export inside one process.
   */
  readonly canMultiConn: boolean;
  /** Human-readable summary for logs and NBD_INFO_DESCRIPTION, e.g. "file /srv/disk.img". */
  readonly description: string;
  /** Fill `into` entirely with the bytes at `offset`. */
  read(offset: number, into: Buffer): Promise<void>;
  /**
   * Optional fast path: fill `into` now, on the caller's stack, if that cannot block; return false
   * (having changed nothing the caller relies on) when `read` must be used instead. Throws on I/O errors.
   */
  readNow?(offset: number, into: Buffer): boolean;
  write(offset: number, data: Uint8Array, fua: boolean): Promise<void>;
  /** Optional fast path for `write`, as `readNow`: `data` may be reused by the caller once it returns. */
  writeNow?(offset: number, data: Uint8Array, fua: boolean): boolean;
  /**
   * Optional: the storage itself for [offset, offset + length), as a buffer a WRITE payload can be
   * received straight into (the socket's bytes land in the file's pages or the memory chunk, with no
   * copy and no separate write). Once the bytes are there the write is done; FUA still needs `flush`.
   * Undefined when the range cannot be offered safely: the caller then uses `write`. Only asked for
   * writes that passed every check (in range, export writable). Every buffer returned must be given
   * back to `writeTargetDone` once the payload is in it or will not come (connection closed).
   */
  writeTarget?(offset: number, length: number): Buffer | undefined;
  writeTargetDone?(target: Buffer): void;
  /** Optional: write `data` back to back from `offset`, as one call (no FUA). */
  writev?(offset: number, data: readonly Buffer[]): Promise<void>;
  /**
   * Must leave the range reading back as zeros. `mayTrim`: the client allows deallocating the range
   * (NBD_CMD_FLAG_NO_HOLE not set, proto.md "NBD_CMD_WRITE_ZEROES").
   */
  writeZeroes(offset: number, length: number, fua: boolean, mayTrim?: boolean): Promise<void>;
  /** A hint: may discard the range (reads then return unspecified data) or do nothing. */
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  /** Persist every completed write (fdatasync for files). */
  flush(): Promise<void>;
  close(): Promise<void>;
}

export interface ServedExport {
  /** Canonical name (NBD_REP_SERVER, NBD_INFO_NAME). */
  name: string;
  description: string;
  backend: Backend;
  /** Served read-only even if the backend could write (`--read-only`). */
  readOnly: boolean;
}

/** Size constraints we advertise: the spec defaults (proto.md "Size constraints"). */
export const SERVER_BLOCK_SIZES: BlockSizes = {
  min: DEFAULT_MIN_BLOCK,
  preferred: DEFAULT_PREFERRED_BLOCK,
  max: DEFAULT_MAX_PAYLOAD,
};

export function isReadOnly(e: ServedExport): boolean {
  return e.readOnly || e.backend.readOnly;
}

/**
 * Transmission flags for an export (proto.md "Values" › "Transmission flags"). Write-side features
 * are not exposed on a read-only export; SEND_DF only once structured replies are negotiated.
 */
export function transmissionFlags(e: ServedExport, structured: boolean): number {
  let f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE;
  if (isReadOnly(e)) {
    f |= TransmissionFlag.READ_ONLY;
  } else {
    f |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES;
  }
  if (e.backend.canMultiConn) f |= TransmissionFlag.CAN_MULTI_CONN;
  if (structured) f |= TransmissionFlag.SEND_DF;
  return f;
}

/**
 * Name lookup: exact match first; the empty (default) name reaches the only export when there is
 * exactly one (proto.md "NBD_OPT_EXPORT_NAME": the empty name is the "default" export).
 */
export function findExport(exports: readonly ServedExport[], name: string): ServedExport | undefined {
  const exact = exports.find((e) => e.name === name);
  if (exact) return exact;
  if (name === '' && exports.length === 1) return exports[0];
  return undefined;
}
