// Sizes typed by people: "1G", "512M", "64K", "1T", "4096", "1GiB". Binary multiples (like nbdkit,
// qemu-img and dd). Pure.

import { NbdError } from '../errors.ts';

const MULT: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

export function parseSize(text: string): number {
  const m = /^\s*(\d+)\s*(?:([KMGTP])(?:i?B)?|B)?\s*$/i.exec(text);
  if (!m) {
    throw new NbdError('NBD_E_USAGE', `parse size "${text}": use bytes or a number with K, M, G or T (e.g. 512M)`);
  }
  const value = Number(m[1]) * MULT[(m[2] ?? '').toUpperCase()]!;
  if (!Number.isSafeInteger(value)) {
    throw new NbdError('NBD_E_USAGE', `parse size "${text}": larger than ${Number.MAX_SAFE_INTEGER} bytes`);
  }
  return value;
}

/** "1 GiB", "512 MiB", "1.5 KiB", "100 B" for messages. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const s = Number.isInteger(v) ? String(v) : v.toFixed(1);
  return `${s} ${units[i]}`;
}

/** A byte count for people: "1 GiB"; below 1 KiB "N bytes" (exact bytes are printed beside where it matters). */
export function formatByteCount(bytes: bigint): string {
  return bytes < 1024n ? `${bytes} bytes` : formatSize(Number(bytes));
}
