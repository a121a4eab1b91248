// Block-size choice for the kernel device (pure).
//
// Kernel rule (drivers/block/nbd.c nbd_set_size → blk_validate_block_size): a power of two from 512
// to PAGE_SIZE, and it becomes the device's *logical* sector size. Protocol rule (proto.md "Block
// size constraints"): never below the server's minimum; the preferred size is a performance hint.
// Default: 512 (what nbd-client and qemu-nbd --connect use), raised to the server's minimum when that
// is larger. A 4096-byte logical sector would hide 512-byte GPT/MBR partition tables and refuse ext4
// made with 1 KiB blocks (see docs/decisions.md "Block size"); `-b preferred` asks for the server's
// preferred size, `-b N` for N. The export size must be a whole number of blocks.

import { NbdError } from '../errors.ts';

export const KERNEL_MIN_BLOCK = 512;
/** Without INFO_BLOCK_SIZE from the server: the classic sector, which every partition table agrees with. */
export const DEFAULT_BLOCK = 512;

export interface BlockSizeInput {
  size: bigint;
  server?: { min: number; preferred: number; max: number } | undefined;
  /** -b N, or -b preferred (the server's preferred size) */
  requested?: number | 'preferred' | undefined;
  pageSize: number;
}
export interface BlockSizeChoice {
  blockSize: number;
  /** A sentence for stderr when the choice differs from what the server prefers. */
  note?: string;
}

const isPow2 = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/** Allowed sizes, ascending: 512, 1024, …, pageSize. */
export function kernelBlockSizes(pageSize: number): number[] {
  const out: number[] = [];
  for (let b = KERNEL_MIN_BLOCK; b <= pageSize; b *= 2) out.push(b);
  return out;
}

export function chooseBlockSize(inp: BlockSizeInput): BlockSizeChoice {
  const allowed = kernelBlockSizes(inp.pageSize);
  const max = allowed[allowed.length - 1]!;
  const srv = inp.server;
  const srvMin = srv?.min ?? 1;
  const fail = (msg: string): never => {
    throw new NbdError('NBD_E_KERNEL_BLOCKSIZE', `attach: ${msg}`);
  };
  const divides = (b: number): boolean => inp.size % BigInt(b) === 0n;

  if (inp.requested !== undefined && inp.requested !== 'preferred') {
    const b = inp.requested;
    if (!isPow2(b) || b < KERNEL_MIN_BLOCK || b > max) fail(`block size ${b} is not possible: the kernel accepts a power of two from ${KERNEL_MIN_BLOCK} to ${max} (-b)`);
    if (b < srvMin) fail(`block size ${b} (-b) is below the server's minimum of ${srvMin}: use -b ${allowed.find((a) => a >= srvMin) ?? srvMin}`);
    if (srv && srv.max > 0 && b > srv.max) fail(`block size ${b} (-b) is above the server's maximum request of ${srv.max} bytes: use a smaller -b`);
    if (!divides(b)) {
      const fit = [...allowed].reverse().find((a) => a >= srvMin && divides(a));
      fail(`export size ${inp.size} bytes is not a multiple of the block size ${b} (-b)${fit ? `: use -b ${fit}` : `: the export size must be a multiple of ${KERNEL_MIN_BLOCK}`}`);
    }
    const choice: BlockSizeChoice = { blockSize: b };
    if (srv && srv.preferred !== b) choice.note = `using block size ${b} (-b); the server prefers ${srv.preferred}`;
    return choice;
  }

  if (srvMin > max) fail(`the server requires a minimum block size of ${srvMin}, above the kernel's maximum of ${max}: this export cannot be attached here`);
  const preferred = inp.requested === 'preferred';
  let want = srv && preferred ? srv.preferred : DEFAULT_BLOCK;
  const notes: string[] = [];
  if (preferred && !srv) notes.push(`the server did not state a preferred block size (-b preferred): using ${DEFAULT_BLOCK}`);
  if (srv && preferred && (!isPow2(want) || want < KERNEL_MIN_BLOCK || want > max)) {
    const clamped = Math.min(Math.max(isPow2(want) ? want : KERNEL_MIN_BLOCK, KERNEL_MIN_BLOCK), max);
    notes.push(`the server prefers block size ${want}; the kernel allows ${KERNEL_MIN_BLOCK}..${max}, using ${clamped}`);
    want = clamped;
  }
  if (want < srvMin) want = allowed.find((a) => a >= srvMin)!;
  if (!divides(want)) {
    const fit = [...allowed].reverse().find((a) => a <= want && a >= srvMin && divides(a));
    if (fit === undefined) {
      fail(`export size ${inp.size} bytes is not a multiple of ${Math.max(KERNEL_MIN_BLOCK, allowed.find((a) => a >= srvMin)!)} bytes: the kernel can only attach whole blocks; resize the export`);
    }
    notes.push(`export size ${inp.size} is not a multiple of ${want}: using block size ${fit}`);
    want = fit!;
  }
  const choice: BlockSizeChoice = { blockSize: want };
  if (notes.length) choice.note = notes.join('; ');
  return choice;
}
