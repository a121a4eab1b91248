// `nbd-attach mknod`: block nodes of major 43 for machines without udev (initramfs, containers).
// nbdN gets minor N << part_shift (drivers/block/nbd.c; part_shift = fls(max_part)), so the module's
// max_part decides the minors. Idempotent: a node that is already right is left alone; a path that
// exists but is something else is refused, never overwritten.

import fs from 'node:fs';
import path from 'node:path';
import { NbdError } from '../errors.ts';
import * as libc from '../../native-bindings/libc.ts';
import { NBD_MAJOR, S_IFBLK } from './constants.ts';
import { type Roots, DEFAULT_ROOTS, devMajor, devMinor, makedev, minorOf, moduleInfo, moduleMissingError, partShift, requireAdmin } from './device.ts';

export interface MknodPlanEntry {
  path: string;
  index: number;
  major: number;
  minor: number;
}

/** Pure: which nodes to create. */
export function planNodes(p: { count: number; prefix: string; dir: string; maxPart: number }): MknodPlanEntry[] {
  const shift = partShift(p.maxPart);
  const out: MknodPlanEntry[] = [];
  for (let i = 0; i < p.count; i++) out.push({ path: path.join(p.dir, `${p.prefix}${i}`), index: i, major: NBD_MAJOR, minor: minorOf(i, shift) });
  return out;
}

export type NodeStatus = 'create' | 'exists' | 'conflict';

/** Compare a planned node with what is on disk. */
export function nodeStatus(e: MknodPlanEntry, st: fs.BigIntStats | undefined): { status: NodeStatus; detail?: string } {
  if (!st) return { status: 'create' };
  if (!st.isBlockDevice()) return { status: 'conflict', detail: 'exists and is not a block device' };
  const ma = devMajor(st.rdev);
  const mi = devMinor(st.rdev);
  if (ma !== e.major || mi !== e.minor) return { status: 'conflict', detail: `is block device ${ma}:${mi}, expected ${e.major}:${e.minor}` };
  return { status: 'exists' };
}

export interface MknodOptions {
  count?: number;
  prefix: 'nbd' | 'nd';
  dir: string;
  mode?: number;
  roots?: Roots;
}

export interface MknodResult {
  created: string[];
  existing: string[];
  maxPart: number;
}

export function mknodAll(opts: MknodOptions): MknodResult {
  const roots = opts.roots ?? DEFAULT_ROOTS;
  const op = 'mknod';
  requireAdmin(op, roots);
  const mod = moduleInfo(roots);
  if (!mod.loaded) throw moduleMissingError(op);
  const maxPart = mod.maxPart ?? 0;
  const count = opts.count ?? mod.nbdsMax ?? 16;
  if (!fs.existsSync(opts.dir)) throw new NbdError('NBD_E_USAGE', `${op}: directory ${opts.dir} does not exist`);
  const plan = planNodes({ count, prefix: opts.prefix, dir: opts.dir, maxPart });
  // Check everything first, so a conflict leaves nothing half-done.
  const statuses = plan.map((e) => {
    let st: fs.BigIntStats | undefined;
    try {
      st = fs.lstatSync(e.path, { bigint: true });
    } catch {
      st = undefined;
    }
    return { e, ...nodeStatus(e, st) };
  });
  const conflicts = statuses.filter((s) => s.status === 'conflict');
  if (conflicts.length) {
    const c = conflicts[0]!;
    throw new NbdError('NBD_E_DEVICE_CONFLICT', `${op}: ${c.e.path} ${c.detail}: refusing to overwrite it${conflicts.length > 1 ? ` (and ${conflicts.length - 1} more)` : ''}; remove it or use --dir/--prefix`);
  }
  const created: string[] = [];
  const existing: string[] = [];
  for (const s of statuses) {
    if (s.status === 'exists') {
      existing.push(s.e.path);
      continue;
    }
    try {
      libc.mknod(s.e.path, S_IFBLK | (opts.mode ?? 0o660), makedev(s.e.major, s.e.minor));
      fs.chmodSync(s.e.path, opts.mode ?? 0o660); // mknod's mode is filtered by the umask
    } catch (e) {
      throw new NbdError('NBD_E_DEVICE_MKNOD', `${op}: ${(e as Error).message}`, { cause: e });
    }
    created.push(s.e.path);
  }
  return { created, existing, maxPart };
}
