// Attach in the command, supervise beside it. The command the user runs negotiates, hands the
// sockets to the kernel and returns once the device is usable; the resident supervisor is started
// next to it and never delays that return (one Node start on the attach path, not two).
//
// Nothing is lost in the gap between the two: the command passes the supervisor what it holds —
// the device's lock (the same open file, so the lock never lapses), the log file, and a duplicate
// of every socket it gave the kernel. The supervisor subscribes to LINK_DEAD first and then looks
// at those duplicates (poll, never read: native-bindings socketEnded): a link the kernel shut down,
// or whose server hung up, before anyone listened is replaced at once.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { NbdError } from '../errors.ts';
import { CHILD_FLAG } from './reporter.ts';
import { removeState } from './state.ts';

export const HANDOFF_ENV = 'NBD_ATTACH_HANDOFF';

/** What the supervisor receives, as descriptor numbers in its own table. */
export interface Handoff {
  device: string;
  lockFd: number;
  logFd: number;
  logFile: string;
  keptFds: number[];
}

/** Pure: the environment value → the hand-off, or undefined when absent or malformed. */
export function parseHandoff(text: string | undefined): Handoff | undefined {
  if (text === undefined) return undefined;
  try {
    const v = JSON.parse(text) as Partial<Handoff>;
    const fd = (n: unknown): n is number => Number.isInteger(n) && (n as number) >= 3 && (n as number) < 1024;
    if (typeof v.device !== 'string' || !fd(v.lockFd) || !fd(v.logFd) || typeof v.logFile !== 'string') return undefined;
    if (!Array.isArray(v.keptFds) || !v.keptFds.every(fd) || v.keptFds.length > 16) return undefined;
    return { device: v.device, lockFd: v.lockFd, logFd: v.logFd, logFile: v.logFile, keptFds: v.keptFds };
  } catch {
    return undefined;
  }
}

/**
 * Start the supervisor for an attached device with our descriptors (lock, log, socket duplicates)
 * as its fds 3, 4, 5…; returns its pid. It is detached and not waited for.
 */
export function startSupervisor(
  device: string,
  fds: { lockFd: number; logFd: number; logFile: string; keptFds: readonly number[] },
  marks: { swap?: boolean | undefined; systemdMark?: boolean | undefined } = {},
): number {
  const entry = process.argv[1];
  if (!entry) throw new NbdError('NBD_E_FAILURE', 'attach: cannot find this program to start the supervisor: use -n/--foreground');
  const handoff: Handoff = { device, lockFd: 3, logFd: 4, logFile: fds.logFile, keptFds: fds.keptFds.map((_, i) => 5 + i) };
  const env = { ...process.env, [HANDOFF_ENV]: JSON.stringify(handoff) };
  const stderr = process.env['JOURNAL_STREAM'] !== undefined ? 'inherit' : 'ignore';
  const child = spawn(process.execPath, [...process.execArgv, entry, ...process.argv.slice(2), CHILD_FLAG], {
    detached: true,
    stdio: ['ignore', 'ignore', stderr, fds.lockFd, fds.logFd, ...fds.keptFds],
    env,
    // -m: the '@' mark from the first instruction on (systemd's ROOT_STORAGE_DAEMONS.md), not only
    // once the supervisor has started (it sets its title again itself).
    ...(marks.systemdMark ? { argv0: `@nbd-attach` } : {}),
  });
  child.unref();
  if (child.pid === undefined) throw new NbdError('NBD_E_FAILURE', 'attach: cannot start the supervisor process');
  if (marks.swap) {
    // -s: kept from the OOM killer from the start (the supervisor also sets it for itself).
    try {
      fs.writeFileSync(`/proc/${child.pid}/oom_score_adj`, '-1000');
    } catch {
      /* it sets it itself moments later, and logs a failure */
    }
  }
  return child.pid;
}

/** Close descriptors this process no longer needs (the supervisor has its own copies). */
export function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
  }
}

/**
 * The supervisor started beside the attach command could not take over (it has nobody to report to).
 * Its one line goes to the log the command named. When the device went before it started (detached
 * at once: a Node start can take seconds), the state file the command wrote for it, naming this
 * process, describes nothing: it is removed, so no stale state outlives the device. Any other failure
 * leaves the state for `--reattach`.
 */
export function handoffFailed(handoff: Handoff, e: unknown): void {
  const index = Number(/(\d+)$/.exec(handoff.device)?.[1] ?? NaN);
  const message = e instanceof Error ? e.message : String(e);
  try {
    fs.writeSync(handoff.logFd, `${new Date().toISOString()} nbd${Number.isInteger(index) ? index : '?'}[${process.pid}]: supervisor not started: ${message}\n`);
  } catch {
    /* no log: the exit code still says it */
  }
  if (e instanceof NbdError && e.code === 'NBD_E_DEVICE_NOT_ATTACHED' && Number.isInteger(index)) removeState(index, process.pid);
}
