// The nbd device side: which /dev/nbdN an argument names, whether it really is an nbd device, and
// what sysfs says about it. Pure helpers first (unit-tested), then small readers of /sys, /proc, /dev.
//
// Device numbers: include/uapi/linux/major.h NBD_MAJOR 43; drivers/block/nbd.c gives nbdN the minor
// N << part_shift, part_shift = fls(max_part) (0 when max_part is 0). dev_t encoding: glibc
// <sys/sysmacros.h> gnu_dev_makedev (12-bit major split, 20-bit minor split).

import fs from 'node:fs';
import path from 'node:path';
import { NbdError } from '../errors.ts';
import { CAP_SYS_ADMIN, NBD_MAJOR, SECTOR_SIZE } from './constants.ts';

// ---------------------------------------------------------------------------------------------
// Pure helpers

/** `nbd3`, `/dev/nbd3` → 3; anything else → undefined (a path to stat). */
export function parseDeviceName(arg: string): number | undefined {
  const m = /^(?:\/dev\/)?nbd(0|[1-9]\d{0,6})$/.exec(arg);
  return m ? Number(m[1]) : undefined;
}

/** glibc gnu_dev_major. */
export function devMajor(dev: bigint): number {
  return Number(((dev >> 8n) & 0xfffn) | ((dev >> 32n) & 0xfffff000n));
}
/** glibc gnu_dev_minor. */
export function devMinor(dev: bigint): number {
  return Number((dev & 0xffn) | ((dev >> 12n) & 0xffffff00n));
}
/** glibc gnu_dev_makedev. */
export function makedev(major: number, minor: number): bigint {
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return ((ma & 0xfffn) << 8n) | ((ma & 0xfffff000n) << 32n) | (mi & 0xffn) | ((mi & 0xffffff00n) << 12n);
}

/** drivers/block/nbd.c nbd_init: part_shift = fls(max_part) when max_part > 0. */
export function partShift(maxPart: number): number {
  if (maxPart <= 0) return 0;
  return 32 - Math.clz32(maxPart);
}
export function minorOf(index: number, shift: number): number {
  return index * 2 ** shift;
}
/** Minor → device index and partition number (0 = the whole device). */
export function indexFromMinor(minor: number, shift: number): { index: number; partition: number } {
  return { index: Math.floor(minor / 2 ** shift), partition: minor % 2 ** shift };
}

/** /proc/self/mountinfo → "maj:min" and mount point of each line. */
export function parseMountinfo(text: string): { majorMinor: string; mountPoint: string; source: string }[] {
  const out: { majorMinor: string; mountPoint: string; source: string }[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length < 10) continue;
    const sep = f.indexOf('-', 6);
    out.push({ majorMinor: f[2]!, mountPoint: unescapeMount(f[4]!), source: sep > 0 ? unescapeMount(f[sep + 2] ?? '') : '' });
  }
  return out;
}
const unescapeMount = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

/** Mounts of nbd `index` or any of its partitions. */
export function mountsOf(mountinfo: string, index: number, shift: number): string[] {
  return parseMountinfo(mountinfo)
    .filter((m) => {
      const [ma, mi] = m.majorMinor.split(':').map(Number);
      return ma === NBD_MAJOR && mi !== undefined && indexFromMinor(mi, shift).index === index;
    })
    .map((m) => m.mountPoint);
}

/** /proc/self/status "CapEff:\t000001ffffffffff" → whether CAP_SYS_ADMIN is effective. */
export function hasCapSysAdmin(statusText: string): boolean {
  const m = /^CapEff:\s*([0-9a-fA-F]+)$/m.exec(statusText);
  if (!m) return false;
  return ((BigInt(`0x${m[1]}`) >> BigInt(CAP_SYS_ADMIN)) & 1n) === 1n;
}

// ---------------------------------------------------------------------------------------------
// Readers (paths overridable for tests)

export interface Roots {
  sys: string;
  dev: string;
  proc: string;
}
export const DEFAULT_ROOTS: Roots = { sys: '/sys', dev: '/dev', proc: '/proc' };

function readTrim(p: string): string | undefined {
  try {
    return fs.readFileSync(p, 'utf8').trim();
  } catch {
    return undefined;
  }
}

export interface ModuleInfo {
  loaded: boolean;
  nbdsMax?: number;
  maxPart?: number;
}

export function moduleInfo(roots: Roots = DEFAULT_ROOTS): ModuleInfo {
  const base = path.join(roots.sys, 'module/nbd');
  if (!fs.existsSync(base)) return { loaded: false };
  const num = (n: string): number | undefined => {
    const v = readTrim(path.join(base, 'parameters', n));
    return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
  };
  const info: ModuleInfo = { loaded: true };
  const nbdsMax = num('nbds_max');
  const maxPart = num('max_part');
  if (nbdsMax !== undefined) info.nbdsMax = nbdsMax;
  if (maxPart !== undefined) info.maxPart = maxPart;
  return info;
}

export function moduleMissingError(op: string): NbdError {
  return new NbdError('NBD_E_KERNEL_MODULE', `${op}: the nbd kernel module is not loaded: run: modprobe nbd`);
}

export interface DeviceRef {
  index: number;
  /** Block node to open for ioctls and to print; `/dev/nbdN` when named that way. */
  path: string;
}

/**
 * Resolve a device argument: `/dev/nbdN`, `nbdN`, or any block node of major 43 (index from its minor
 * and the module's max_part). Refuses anything that is not an nbd block device — before any ioctl.
 */
export function resolveDevice(arg: string, roots: Roots = DEFAULT_ROOTS, op = 'attach'): DeviceRef {
  const byName = parseDeviceName(arg);
  const nodePath = byName !== undefined ? path.join(roots.dev, `nbd${byName}`) : arg;
  let st: fs.BigIntStats | undefined;
  try {
    st = fs.statSync(nodePath, { bigint: true });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (byName !== undefined && code === 'ENOENT') {
      // No node (a machine without udev): fine for netlink, which addresses devices by index.
      if (!fs.existsSync(path.join(roots.sys, 'module/nbd'))) throw moduleMissingError(op);
      return { index: byName, path: nodePath };
    }
    if (code === 'ENOENT') throw new NbdError('NBD_E_DEVICE_INVALID', `${op}: ${arg} does not exist: give /dev/nbdN or nbdN`);
    throw new NbdError('NBD_E_DEVICE_INVALID', `${op}: cannot examine ${arg}: ${(e as Error).message}`);
  }
  if (!st.isBlockDevice()) {
    throw new NbdError('NBD_E_DEVICE_INVALID', `${op}: ${arg} is not a block device: give an nbd device such as /dev/nbd0`);
  }
  const major = devMajor(st.rdev);
  const minor = devMinor(st.rdev);
  if (major !== NBD_MAJOR) {
    throw new NbdError('NBD_E_DEVICE_INVALID', `${op}: ${arg} is block device ${major}:${minor}, not an nbd device (major ${NBD_MAJOR}): give /dev/nbdN`);
  }
  const mod = moduleInfo(roots);
  if (!mod.loaded) throw moduleMissingError(op);
  const shift = partShift(mod.maxPart ?? 0);
  const { index, partition } = indexFromMinor(minor, shift);
  if (partition !== 0) {
    throw new NbdError('NBD_E_DEVICE_INVALID', `${op}: ${arg} is partition ${partition} of nbd${index}, not a whole device: give /dev/nbd${index}`);
  }
  if (byName !== undefined && index !== byName) {
    throw new NbdError('NBD_E_DEVICE_INVALID', `${op}: ${nodePath} has minor ${minor}, which is nbd${index} with max_part=${mod.maxPart ?? 0}, not nbd${byName}: recreate the node (nbd-attach mknod)`);
  }
  return { index, path: nodePath };
}

export interface DeviceState {
  /** /sys/block/nbdN exists. */
  exists: boolean;
  /** Thread id recorded by CONNECT / DO_IT; present while attached. */
  pid?: number;
  /** Size in bytes (sysfs `size` is in 512-byte sectors). */
  sizeBytes: bigint;
  /** Backend identifier (netlink attach only). */
  backend?: string;
}

export function deviceState(index: number, roots: Roots = DEFAULT_ROOTS): DeviceState {
  const base = path.join(roots.sys, 'block', `nbd${index}`);
  if (!fs.existsSync(base)) return { exists: false, sizeBytes: 0n };
  const st: DeviceState = { exists: true, sizeBytes: 0n };
  const pid = readTrim(path.join(base, 'pid'));
  if (pid !== undefined && /^\d+$/.test(pid)) st.pid = Number(pid);
  const size = readTrim(path.join(base, 'size'));
  if (size !== undefined && /^\d+$/.test(size)) st.sizeBytes = BigInt(size) * BigInt(SECTOR_SIZE);
  const backend = readTrim(path.join(base, 'backend'));
  if (backend !== undefined && backend !== '') st.backend = backend;
  return st;
}

/** Every nbd index sysfs knows, ascending. */
export function listDevices(roots: Roots = DEFAULT_ROOTS): number[] {
  let names: string[];
  try {
    names = fs.readdirSync(path.join(roots.sys, 'block'));
  } catch {
    return [];
  }
  return names
    .map((n) => /^nbd(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

/** Root or CAP_SYS_ADMIN, checked before any kernel call so the message is clear. */
export function requireAdmin(op: string, roots: Roots = DEFAULT_ROOTS): void {
  const status = readTrim(path.join(roots.proc, 'self/status'));
  const ok = status !== undefined ? hasCapSysAdmin(status) : process.geteuid?.() === 0;
  if (!ok) throw new NbdError('NBD_E_PERMISSION', `${op}: needs root or CAP_SYS_ADMIN: run it with sudo`);
}
