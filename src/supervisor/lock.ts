// At most one supervisor per device, ever: an exclusive flock(2) on /run/nbd-attach/nbdN.lock, held
// for the supervisor's whole life. The kernel drops it when the holder's last descriptor closes,
// so a killed supervisor never leaves a stale lock, and two adopters racing for one device cannot
// both win. The file says who holds it (pid and start time) for the refusal message; the lock, not
// the text, decides.

import fs from 'node:fs';
import path from 'node:path';
import * as libc from '../../native-bindings/libc.ts';
import { NbdError } from '../errors.ts';
import { type ProcessIdentity, processIdentity, runDir } from './state.ts';

export function lockFile(index: number): string {
  return path.join(runDir(), `nbd${index}.lock`);
}

export interface DeviceLock {
  readonly file: string;
  /** The locked open file: passed on to a supervisor started beside the command, the lock goes with it. */
  readonly fd: number;
  /** Release early (tests; a supervisor simply exits). */
  release(): void;
}

/**
 * Take the supervisor lock of nbd`index`, or throw NBD_E_DEVICE_SUPERVISED naming the holder.
 * The descriptor stays open (and the lock held) until release() or process exit.
 */
export function lockDevice(index: number, device: string, op: string): DeviceLock {
  const file = lockFile(index);
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
  let fd: number;
  try {
    // O_NOFOLLOW: /run/nbd-attach is root's, but a planted symlink must not make us truncate anything.
    fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o644);
  } catch (e) {
    throw new NbdError('NBD_E_FAILURE', `${op}: cannot open the supervisor lock ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  let held: boolean;
  try {
    held = libc.tryLockExclusive(fd);
  } catch (e) {
    fs.closeSync(fd);
    throw new NbdError('NBD_E_FAILURE', `${op}: cannot lock ${file}: ${(e as Error).message}`, { cause: e });
  }
  if (!held) {
    let holder = '';
    try {
      holder = fs.readFileSync(fd, 'utf8').trim().split(/\s+/)[0] ?? '';
    } catch {
      /* unreadable: say less */
    }
    fs.closeSync(fd);
    throw new NbdError('NBD_E_DEVICE_SUPERVISED', `${op}: ${device} is already supervised${/^\d+$/.test(holder) ? ` by pid ${holder}` : ''}: nothing to do (stop that supervisor first to replace it)`);
  }
  const me = processIdentity(process.pid);
  try {
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid} ${me?.start ?? ''}\n`, 0);
  } catch {
    /* the lock holds without the note */
  }
  let released = false;
  return {
    file,
    fd,
    release() {
      if (released) return;
      released = true;
      fs.closeSync(fd);
    },
  };
}

export type { ProcessIdentity };


/**
 * The lock inherited from the command that attached the device (src/supervisor/handoff.ts): the
 * same open file, so flock() on it succeeds at once; anything else means it is not ours.
 */
export function inheritedLock(fd: number, index: number, device: string): DeviceLock {
  let ok = false;
  try {
    ok = fs.fstatSync(fd).ino === fs.statSync(lockFile(index)).ino && libc.tryLockExclusive(fd);
  } catch {
    ok = false;
  }
  if (!ok) throw new NbdError('NBD_E_DEVICE_SUPERVISED', `supervise: the lock of ${device} handed over by the attach command is not held: another supervisor may run`);
  fs.ftruncateSync(fd, 0);
  fs.writeSync(fd, `${process.pid} ${processIdentity(process.pid)?.start ?? ''}\n`, 0);
  return { file: lockFile(index), fd, release: () => fs.closeSync(fd) };
}
