// Who uses an nbd device: the one question behind "may this device be disconnected?" (`detach`
// without --force, and a supervisor told to stop). A device is in use when any of these holds:
//
// - the kernel has it claimed exclusively: an open with O_EXCL fails with EBUSY
//   (block/bdev.c bd_prepare_to_claim: mounts, swap areas, device-mapper and md members all claim
//   the whole disk, also through a partition), whatever mount namespace the claim was made in;
// - something is stacked on it: /sys/block/nbdN/holders/ (and each partition's holders/);
// - it or a partition is mounted in any mount namespace (every distinct /proc/PID/mountinfo);
// - it or a partition is an active swap area (/proc/swaps);
// - another process has it open (/proc/PID/fd), e.g. dd, a VM, a database on the raw device.
//
// The exclusive claim is the kernel's own answer and catches what the readable lists miss (a mount
// in a namespace whose processes we cannot see); the lists name the user for the message.
// Opening the node is harmless for nbd: with a config present, nbd_open only takes a reference
// (drivers/block/nbd.c), and we never set DISCONNECT_ON_CLOSE.

import fs from 'node:fs';
import path from 'node:path';
import { NBD_MAJOR } from './constants.ts';
import { type Roots, DEFAULT_ROOTS, devMajor, devMinor, indexFromMinor, moduleInfo, mountsOf, partShift } from './device.ts';

/** At most this many processes are looked at (each costs a readdir of its fds). */
const MAX_PROCESSES = 8192;
/** At most this many users are named. */
const MAX_USERS = 16;

export type DeviceUser =
  | { kind: 'mount'; mountPoint: string; namespace: 'this' | 'other'; pid?: number }
  | { kind: 'holder'; name: string }
  | { kind: 'swap'; name: string }
  | { kind: 'open'; pid: number; comm: string }
  | { kind: 'claimed' };

/** One phrase per user, for messages and logs: "mounted on /mnt", "swap", "used by dm-0". */
export function describeUser(u: DeviceUser): string {
  switch (u.kind) {
    case 'mount':
      return u.namespace === 'this' ? `mounted on ${u.mountPoint}` : `mounted on ${u.mountPoint} in another mount namespace (pid ${u.pid})`;
    case 'holder':
      return `used by ${u.name} (device-mapper/md holder)`;
    case 'swap':
      return `an active swap area (${u.name})`;
    case 'open':
      return `open by pid ${u.pid} (${u.comm})`;
    case 'claimed':
      return 'claimed exclusively by the kernel (mounted, swap or stacked, where this process cannot see it)';
  }
}

function readText(p: string): string | undefined {
  try {
    return fs.readFileSync(p, 'utf8');
  } catch {
    return undefined;
  }
}

function nbdIndexOf(majorMinor: { major: number; minor: number }, shift: number): number | undefined {
  return majorMinor.major === NBD_MAJOR ? indexFromMinor(majorMinor.minor, shift).index : undefined;
}

/** Names of nbdN and its partitions as sysfs lists them ("nbd0", "nbd0p1", …). */
function blockNames(index: number, roots: Roots): string[] {
  const base = path.join(roots.sys, 'block', `nbd${index}`);
  const names = [`nbd${index}`];
  try {
    for (const e of fs.readdirSync(base)) if (e.startsWith(`nbd${index}p`)) names.push(e);
  } catch {
    /* no sysfs entry */
  }
  return names;
}

/** Holders of the device or its partitions (device-mapper, md, bcache …). */
export function holdersOf(index: number, roots: Roots = DEFAULT_ROOTS): DeviceUser[] {
  const out: DeviceUser[] = [];
  const base = path.join(roots.sys, 'block', `nbd${index}`);
  for (const name of blockNames(index, roots)) {
    const dir = name === `nbd${index}` ? path.join(base, 'holders') : path.join(base, name, 'holders');
    try {
      for (const h of fs.readdirSync(dir)) {
        const dm = readText(path.join(roots.sys, 'block', h, 'dm', 'name'))?.trim();
        out.push({ kind: 'holder', name: dm ? `${h} (${dm})` : h });
      }
    } catch {
      /* no holders dir */
    }
  }
  return out;
}

/**
 * Active swap areas on the device or its partitions. /proc/swaps names block devices by path
 * (mangled spaces as \040); they are matched by name and, where the path resolves, by device number.
 */
export function swapsOf(index: number, shift: number, swapsText: string, roots: Roots = DEFAULT_ROOTS): DeviceUser[] {
  const out: DeviceUser[] = [];
  const names = new Set(blockNames(index, roots));
  for (const line of swapsText.split('\n').slice(1)) {
    const [file, type] = line.trim().split(/\s+/);
    if (!file || type !== 'partition') continue;
    const name = file.replace(/\\040/g, ' ');
    let mine = names.has(path.basename(name)) || new RegExp(`^nbd${index}(p\\d+)?$`).test(path.basename(name));
    if (!mine) {
      try {
        const st = fs.statSync(name, { bigint: true });
        mine = st.isBlockDevice() && nbdIndexOf({ major: devMajor(st.rdev), minor: devMinor(st.rdev) }, shift) === index;
      } catch {
        /* a path of another mount namespace */
      }
    }
    if (mine) out.push({ kind: 'swap', name });
  }
  return out;
}

/** Mounts in every mount namespace that some process of this machine lives in (deduplicated). */
export function mountsAnywhere(index: number, shift: number, roots: Roots = DEFAULT_ROOTS): DeviceUser[] {
  const out: DeviceUser[] = [];
  const seen = new Set<string>();
  const ownNs = nsId(path.join(roots.proc, 'self'));
  const own = readText(path.join(roots.proc, 'self', 'mountinfo'));
  if (own) for (const m of mountsOf(own, index, shift)) out.push({ kind: 'mount', mountPoint: m, namespace: 'this' });
  if (ownNs) seen.add(ownNs);
  for (const pid of processIds(roots)) {
    const ns = nsId(path.join(roots.proc, pid));
    if (!ns || seen.has(ns)) continue;
    seen.add(ns);
    const mi = readText(path.join(roots.proc, pid, 'mountinfo'));
    if (!mi) continue;
    for (const m of mountsOf(mi, index, shift)) out.push({ kind: 'mount', mountPoint: m, namespace: 'other', pid: Number(pid) });
    if (out.length >= MAX_USERS) break;
  }
  return out;
}

function nsId(procDir: string): string | undefined {
  try {
    return fs.readlinkSync(path.join(procDir, 'ns', 'mnt'));
  } catch {
    return undefined;
  }
}

function processIds(roots: Roots): string[] {
  try {
    return fs
      .readdirSync(roots.proc)
      .filter((p) => /^\d+$/.test(p))
      .slice(0, MAX_PROCESSES);
  } catch {
    return [];
  }
}

/** Processes other than `selfPids` with the device or a partition open. */
export function openersOf(index: number, shift: number, roots: Roots = DEFAULT_ROOTS, selfPids: ReadonlySet<number> = new Set([process.pid])): DeviceUser[] {
  const out: DeviceUser[] = [];
  for (const p of processIds(roots)) {
    if (selfPids.has(Number(p))) continue;
    let fds: string[];
    try {
      fds = fs.readdirSync(path.join(roots.proc, p, 'fd'));
    } catch {
      continue;
    }
    for (const fd of fds.slice(0, 4096)) {
      try {
        const st = fs.statSync(path.join(roots.proc, p, 'fd', fd), { bigint: true });
        if (st.isBlockDevice() && nbdIndexOf({ major: devMajor(st.rdev), minor: devMinor(st.rdev) }, shift) === index) {
          out.push({ kind: 'open', pid: Number(p), comm: readText(path.join(roots.proc, p, 'comm'))?.trim() ?? '?' });
          break;
        }
      } catch {
        /* gone or not ours to see */
      }
    }
    if (out.length >= MAX_USERS) break;
  }
  return out;
}

/**
 * True when the kernel refuses an exclusive open of the node (EBUSY): someone holds a claim.
 * Undefined when it cannot be asked (no node, not allowed).
 */
export function claimedExclusively(devicePath: string): boolean | undefined {
  let fd: number;
  try {
    fd = fs.openSync(devicePath, fs.constants.O_RDONLY | fs.constants.O_EXCL | fs.constants.O_NONBLOCK);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EBUSY' ? true : undefined;
  }
  fs.closeSync(fd);
  return false;
}

/**
 * Everything that uses nbd`index`, most specific first; empty when the device may be disconnected
 * without anyone losing their disk. `devicePath` is the node to probe for an exclusive claim.
 */
export function deviceUsers(
  index: number,
  devicePath: string,
  opts: { roots?: Roots; selfPids?: ReadonlySet<number>; probeClaim?: boolean } = {},
): DeviceUser[] {
  const roots = opts.roots ?? DEFAULT_ROOTS;
  const shift = partShift(moduleInfo(roots).maxPart ?? 0);
  const users: DeviceUser[] = [
    ...mountsAnywhere(index, shift, roots),
    ...holdersOf(index, roots),
    ...swapsOf(index, shift, readText(path.join(roots.proc, 'swaps')) ?? '', roots),
  ];
  // The claim covers what the lists could not see; it is only reported when they found nothing.
  // Not for a device being attached: an open there creates a config that makes CONNECT fail (EBUSY).
  if (users.length === 0 && opts.probeClaim !== false && claimedExclusively(devicePath) === true) users.push({ kind: 'claimed' });
  users.push(...openersOf(index, shift, roots, opts.selfPids));
  return users.slice(0, MAX_USERS);
}
