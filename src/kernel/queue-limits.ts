// The server's block-size constraints applied to the device's request queue.
//
// We ask for NBD_INFO_BLOCK_SIZE, which promises the server that we honour its constraints
// (proto.md "Block size constraints"). The kernel's nbd driver takes none of them: it only knows the
// logical block size we give it. What honours each one:
// - minimum: the logical block size is chosen ≥ the minimum (blocksize.ts), so every request the
//   block layer builds is a multiple of it and aligned to it.
// - maximum payload: the queue's `max_sectors_kb` (block/blk-sysfs.c queue_max_sectors_store,
//   writable, PAGE_SIZE/1024 ≤ value ≤ max_hw_sectors_kb; nbd sets max_hw_sectors 65536 sectors =
//   32 MiB in nbd_dev_add) bounds READ and WRITE; `discard_max_bytes` (queue_discard_max_store,
//   writable, a multiple of discard_granularity = the block size) bounds TRIM. The same limit is kept
//   for TRIM although it carries no payload: older versions of proto.md called it the maximum *block*
//   size and applied it to every request, and a server may still do so.
// - WRITE_ZEROES (sent by kernels ≥ 6.12 when the server has SEND_WRITE_ZEROES): its queue limit
//   `write_zeroes_max_bytes` is read-only (QUEUE_RO_ENTRY in blk-sysfs.c), so with a bounded maximum
//   we withhold the flag from the kernel; it then writes zeroes with WRITE, bounded by max_sectors_kb.
// - preferred: a performance hint (SHOULD). The queue's minimum_io_size/optimal_io_size are
//   read-only and the driver sets neither; `-b preferred` makes it the logical block size.
//
// The queue outlives an attach (the disk is allocated once, at module load), so a limit left by an
// earlier attach to a stricter server is raised back to the kernel's default. nbd_set_size, called by
// CONNECT and by a RECONFIGURE that changes the size, resets discard_max_bytes: the limits are
// applied after every connect and reconnect.

import fs from 'node:fs';
import path from 'node:path';
import createDebug from '../debug.ts';
import { NbdError } from '../errors.ts';
import { TransmissionFlag } from '../protocol/constants.ts';
import type { BlockSizes } from '../protocol/codec.ts';
import { type Roots, DEFAULT_ROOTS } from './device.ts';
import * as libc from '../../native-bindings/libc.ts';

const debug = createDebug('nbd:kernel');

/** proto.md: a maximum payload of 0xffffffff means "no limit beyond the protocol's". */
export const NO_MAXIMUM = 0xffffffff;
/** drivers/block/nbd.c nbd_dev_add: blk_queue_max_hw_sectors(disk->queue, 65536) — 32 MiB. */
export const NBD_MAX_HW_SECTORS_KB = 65536 / 2;
/** include/linux/blkdev.h BLK_DEF_MAX_SECTORS 2560 (Linux 6.1): the default max_sectors_kb, 1280 KiB. */
export const KERNEL_DEFAULT_MAX_SECTORS_KB = 2560 / 2;

export interface QueueLimitsInput {
  /** The device's logical block size. */
  blockSize: number;
  /** NBD_INFO_BLOCK_SIZE, when the server sent it. */
  server?: BlockSizes | undefined;
  /** The server's transmission flags. */
  flags: number;
  pageSize: number;
  /** /sys/block/nbdN/queue/max_hw_sectors_kb (NBD_MAX_HW_SECTORS_KB before the device is known). */
  maxHwSectorsKb?: number;
}

export interface QueueLimitsPlan {
  /** Bytes a READ or WRITE may carry; undefined: the server sets no maximum. */
  maxPayload: number | undefined;
  /** Value for max_sectors_kb: exact when the server has a maximum; else the kernel default to restore. */
  maxSectorsKb: number;
  /** True when the server sets a maximum (max_sectors_kb must not exceed it). */
  bounded: boolean;
  /** Value for discard_max_bytes (the export accepts TRIM and the server sets a maximum). */
  discardMaxBytes?: number;
  /** Withhold NBD_FLAG_SEND_WRITE_ZEROES from the kernel (it cannot bound WRITE_ZEROES). */
  maskWriteZeroes: boolean;
}

/** The limits to give the queue, or an NbdError saying why the kernel cannot honour the server. */
export function planQueueLimits(inp: QueueLimitsInput): QueueLimitsPlan {
  const hwKb = inp.maxHwSectorsKb ?? NBD_MAX_HW_SECTORS_KB;
  if (inp.server && inp.server.min > inp.blockSize) {
    // At attach blocksize.ts already chose a block size ≥ the minimum; this is a reconnected server.
    throw new NbdError(
      'NBD_E_KERNEL_LIMITS',
      `attach: the server's minimum block size ${inp.server.min} is above the device's block size ${inp.blockSize}: the kernel would send requests the server refuses; detach and attach again`,
    );
  }
  const max = inp.server?.max;
  if (max === undefined || max === 0 || max >= NO_MAXIMUM) {
    return { maxPayload: undefined, maxSectorsKb: Math.min(KERNEL_DEFAULT_MAX_SECTORS_KB, hwKb), bounded: false, maskWriteZeroes: false };
  }
  // max_sectors_kb counts KiB; requests are whole logical blocks.
  const unit = Math.max(1024, inp.blockSize);
  const usable = Math.floor(max / unit) * unit;
  const pageKb = inp.pageSize / 1024;
  if (usable / 1024 < pageKb) {
    throw new NbdError(
      'NBD_E_KERNEL_LIMITS',
      `attach: the server's maximum payload of ${max} bytes is below the smallest request size limit the kernel can set (${inp.pageSize} bytes, max_sectors_kb ≥ ${pageKb}): the kernel would send requests the server refuses; this export cannot be attached here`,
    );
  }
  const kb = Math.min(usable / 1024, hwKb);
  const plan: QueueLimitsPlan = { maxPayload: max, maxSectorsKb: kb, bounded: true, maskWriteZeroes: (inp.flags & TransmissionFlag.SEND_WRITE_ZEROES) !== 0 };
  if (inp.flags & TransmissionFlag.SEND_TRIM) plan.discardMaxBytes = Math.floor((kb * 1024) / inp.blockSize) * inp.blockSize;
  return plan;
}

/** One line for logs: what the queue was limited to. */
export function describePlan(p: QueueLimitsPlan): string {
  if (!p.bounded) return 'the server sets no maximum payload';
  const parts = [`requests of at most ${p.maxSectorsKb} KiB (server maximum payload ${p.maxPayload} bytes)`];
  if (p.discardMaxBytes !== undefined) parts.push(`discards of at most ${p.discardMaxBytes} bytes`);
  if (p.maskWriteZeroes) parts.push('WRITE_ZEROES withheld from the kernel');
  return parts.join(', ');
}

export interface QueueState {
  maxSectorsKb: number;
  maxHwSectorsKb: number;
  discardMaxBytes: number;
  logicalBlockSize: number;
}

function queueDir(index: number, roots: Roots): string {
  return path.join(roots.sys, 'block', `nbd${index}`, 'queue');
}

function readNumber(file: string): number {
  const v = Number(fs.readFileSync(file, 'utf8').trim());
  if (!Number.isFinite(v)) throw new Error(`${file}: not a number`);
  return v;
}

export function readQueue(index: number, roots: Roots = DEFAULT_ROOTS): QueueState {
  const dir = queueDir(index, roots);
  return {
    maxSectorsKb: readNumber(path.join(dir, 'max_sectors_kb')),
    maxHwSectorsKb: readNumber(path.join(dir, 'max_hw_sectors_kb')),
    discardMaxBytes: readNumber(path.join(dir, 'discard_max_bytes')),
    logicalBlockSize: readNumber(path.join(dir, 'logical_block_size')),
  };
}

function refuse(op: string, device: string, what: string, e: unknown): NbdError {
  const why = e instanceof Error ? ((e as NodeJS.ErrnoException).code ?? e.message) : String(e);
  return new NbdError('NBD_E_KERNEL_LIMITS', `${op}: cannot limit ${device}'s requests to the server's maximum payload (${what}: ${why}): the kernel would send requests the server refuses`, { cause: e });
}

/**
 * Write the plan's limits into /sys/block/nbdN/queue and read them back. `discard`: also the TRIM
 * limit (only once the device is connected: CONNECT resets it). Throws NBD_E_KERNEL_LIMITS when a
 * bounded limit cannot be set.
 */
export function applyQueueLimits(index: number, plan: QueueLimitsPlan, opts: { roots?: Roots; op?: string; discard?: boolean } = {}): QueueState {
  const roots = opts.roots ?? DEFAULT_ROOTS;
  const op = opts.op ?? 'attach';
  const device = `/dev/nbd${index}`;
  const dir = queueDir(index, roots);
  let q: QueueState;
  try {
    q = readQueue(index, roots);
  } catch (e) {
    if (!plan.bounded) return { maxSectorsKb: 0, maxHwSectorsKb: 0, discardMaxBytes: 0, logicalBlockSize: 0 };
    throw refuse(op, device, `reading ${dir}`, e);
  }
  const want = Math.min(plan.maxSectorsKb, q.maxHwSectorsKb);
  // Bounded: exactly the server's limit. Unbounded: only raise a limit an earlier attach left lower.
  if (plan.bounded ? q.maxSectorsKb !== want : q.maxSectorsKb < want) {
    try {
      fs.writeFileSync(path.join(dir, 'max_sectors_kb'), `${want}\n`);
    } catch (e) {
      if (plan.bounded) throw refuse(op, device, `writing ${want} to max_sectors_kb`, e);
      debug('restoring max_sectors_kb %d on nbd%d: %s', want, index, (e as Error).message);
    }
  }
  if (plan.bounded && (opts.discard ?? true) && plan.discardMaxBytes !== undefined) {
    const cur = readQueue(index, roots).discardMaxBytes;
    if (cur !== plan.discardMaxBytes) {
      try {
        fs.writeFileSync(path.join(dir, 'discard_max_bytes'), `${plan.discardMaxBytes}\n`);
      } catch (e) {
        throw refuse(op, device, `writing ${plan.discardMaxBytes} to discard_max_bytes`, e);
      }
    }
  }
  const after = readQueue(index, roots);
  if (plan.bounded && after.maxSectorsKb * 1024 > plan.maxPayload!) {
    throw refuse(op, device, `max_sectors_kb reads ${after.maxSectorsKb} after writing ${want}`, new Error('not applied'));
  }
  if (plan.bounded && (opts.discard ?? true) && plan.discardMaxBytes !== undefined && after.discardMaxBytes > plan.discardMaxBytes) {
    throw refuse(op, device, `discard_max_bytes reads ${after.discardMaxBytes} after writing ${plan.discardMaxBytes}`, new Error('not applied'));
  }
  debug('nbd%d queue: max_sectors_kb %d, discard_max_bytes %d', index, after.maxSectorsKb, after.discardMaxBytes);
  return after;
}

/**
 * For the supervisor (SupervisorDeps.applyLimits): the limits of a reconnected server, planned
 * against the device's own logical block size, applied before RECONFIGURE (`discard` false) and
 * after it. A server whose limits the kernel cannot honour is refused like any other incompatible
 * change (NBD_E_EXPORT_CHANGED: retried until the dead timeout).
 */
export function reconnectLimits(roots: Roots = DEFAULT_ROOTS, pageSize?: number) {
  return (index: number, c: { blockSizes?: BlockSizes | undefined; flags: number }, discard: boolean): string | undefined => {
    const changed = (e: unknown): NbdError =>
      new NbdError('NBD_E_EXPORT_CHANGED', `reconnect: ${(e as Error).message.replace(/^attach: /, '')}`, { cause: e });
    let plan: QueueLimitsPlan;
    try {
      const q = readQueue(index, roots);
      plan = planQueueLimits({ blockSize: q.logicalBlockSize, server: c.blockSizes, flags: c.flags, pageSize: pageSize ?? libc.getpagesize(), maxHwSectorsKb: q.maxHwSectorsKb });
      applyQueueLimits(index, plan, { roots, op: 'reconnect', discard });
    } catch (e) {
      throw changed(e);
    }
    return discard && plan.bounded ? `request limits: ${describePlan(plan)}` : undefined;
  };
}
