// A supervisor started in an initramfs carries the root file system past switch_root. switch_root
// moves /proc, /sys, /dev and /run into the new root and mounts it over "/", but a process keeps
// the root directory it had: the emptied initramfs, where /sys/block/nbdN and /run/nbd-attach no
// longer exist (the supervisor would read its device as detached and exit). So a supervisor that
// starts in an initramfs keeps /proc open, and once /sys is gone from under it, changes its root to
// PID 1's (fchdir to /proc, chroot to 1/root): the real system's, where its state and the device's
// sysfs files are again where `nbd-attach status` and the supervisor look for them.
// (systemd docs/ROOT_STORAGE_DAEMONS.md: such daemons are started from the initrd and stay.)

import fs from 'node:fs';
import * as libc from '../../native-bindings/libc.ts';

/** File system types an initramfs runs from (the kernel's rootfs is ramfs or tmpfs). */
const INITRAMFS_FS = new Set(['rootfs', 'ramfs', 'tmpfs']);

/**
 * Pure: whether /proc/self/mountinfo says "/" is an initramfs (the top mount on "/" is rootfs,
 * ramfs or tmpfs).
 */
export function rootIsInitramfs(mountinfo: string): boolean {
  let type: string | undefined;
  for (const line of mountinfo.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const fields = line.slice(0, sep).split(' ');
    if (fields[4] === '/') type = line.slice(sep + 3).split(' ')[0];
  }
  return type !== undefined && INITRAMFS_FS.has(type);
}

export interface RootFollower {
  /**
   * Called periodically. While /sys is reachable: nothing to do, true. Once switch_root moved it
   * away: false until PID 1 has entered the new root, then this process follows it (true again).
   */
  check(): boolean;
}

/**
 * A follower when this process runs in an initramfs (root on rootfs/ramfs/tmpfs and /init or
 * /etc/initrd-release present), else undefined.
 */
export function followRootIfInitramfs(log: (m: string) => void): RootFollower | undefined {
  let procFd: number;
  try {
    if (!rootIsInitramfs(fs.readFileSync('/proc/self/mountinfo', 'utf8'))) return undefined;
    if (!fs.existsSync('/init') && !fs.existsSync('/etc/initrd-release')) return undefined;
    procFd = fs.openSync('/proc', fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    // koffi (fchdir, chroot) now, while its files are there: the initramfs is emptied at switch_root.
    libc.errnoName(0);
  } catch {
    return undefined;
  }
  log('started in an initramfs: will follow the root file system across switch_root');
  let done = false;
  let complained = false;
  return {
    check(): boolean {
      if (done || fs.existsSync('/sys/block')) return true;
      try {
        // Relative to the /proc kept open: PID 1's root, once it differs from ours and has /sys.
        libc.fchdir(procFd);
        const ready = fs.statSync('1/root').dev !== fs.statSync('/').dev && fs.existsSync('1/root/sys/block');
        if (ready) libc.chroot('1/root');
        process.chdir('/');
        if (!ready) return false;
      } catch (e) {
        if (!complained) log(`cannot follow the root file system after switch_root: ${(e as Error).message}`);
        complained = true;
        return false;
      }
      done = true;
      fs.closeSync(procFd);
      log('switch_root: now in the real root file system (PID 1\'s root)');
      return true;
    },
  };
}
