// The resident phase shared by a fresh attach and an adoption: log, state file, signals, systemd
// notifications, and the Supervisor (LINK_DEAD → reconnect → RECONFIGURE) until the device is
// detached, a stop signal ends it, or reconnecting is given up.

import fs from 'node:fs';
import * as libc from '../../native-bindings/libc.ts';
import { takeSocketFd } from '../kernel/attach.ts';
import { devMajor, devMinor, indexFromMinor, moduleInfo, partShift } from '../kernel/device.ts';
import { NBD_MAJOR } from '../kernel/constants.ts';
import { describeUser, deviceUsers } from '../kernel/users.ts';
import type { Connection } from '../client/negotiate.ts';
import type { KernelOps } from './kernel-ops.ts';
import type { ConnectionSource } from './source.ts';
import type { Candidate } from './reconnector.ts';
import type { Reporter } from './reporter.ts';
import { type LogSink, createLogSink, openLogFile } from './log.ts';
import { type SupervisorState, logDir, processIdentity, removeState, runDir, writeState } from './state.ts';
import { Supervisor } from './supervisor.ts';
import { serverChangeDeps } from './shutdown-watch.ts';
import { type Notifier, createNotifier, deviceStatusText } from '../systemd/notify.ts';
import { followRootIfInitramfs } from './follow-root.ts';

/** What systemd is told (src/systemd/notify.ts; a no-op without $NOTIFY_SOCKET). */
export type ServiceNotifier = Pick<Notifier, 'ready' | 'status' | 'stopping' | 'flush' | 'close'>;

/**
 * What -s/--swap and -m/--systemd-mark do to the process that stays resident for a device (the
 * supervisor, or the -L process). Swap: the OOM killer must never pick the process that reconnects
 * the swap device (nbd-client -swap does the same, plus mlockall, which V8 cannot survive: see
 * docs/decisions.md). Systemd mark: systemd's shutdown leaves processes whose argv[0] starts with '@'
 * alive (root or swap on NBD must outlive the unmount); Node's process.title rewrites argv in place.
 */
export function residentProcessSetup(how: { swap?: boolean | undefined; systemdMark?: boolean | undefined; device: string }, note: (m: string) => void): void {
  if (how.systemdMark) {
    // systemd docs/ROOT_STORAGE_DAEMONS.md: argv[0] starts with '@', comm stays what it was
    // (libuv's process.title also renames the thread: put the name back).
    let comm: string | undefined;
    try {
      comm = fs.readFileSync('/proc/self/comm', 'utf8').trim();
    } catch {
      comm = undefined;
    }
    process.title = `@nbd-attach ${how.device}`;
    try {
      if (comm) fs.writeFileSync('/proc/self/comm', comm);
    } catch {
      // best effort: the mark is what systemd reads
    }
  }
  if (how.swap) {
    try {
      fs.writeFileSync('/proc/self/oom_score_adj', '-1000');
    } catch (e) {
      note(`--swap: cannot set oom_score_adj -1000: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  }
}

/** KernelOps whose LINK_DEAD events, arriving before anyone listens, are kept and replayed. */
export class EarlySubscription implements KernelOps {
  private early: number[] = [];
  private handler: ((i: number) => void) | undefined;
  constructor(private readonly inner: KernelOps) {}
  async listen(): Promise<void> {
    await this.inner.subscribe((i) => (this.handler ? this.handler(i) : this.early.push(i)));
  }
  async subscribe(onLinkDead: (index: number) => void): Promise<void> {
    this.handler = onLinkDead;
    for (const i of this.early.splice(0)) onLinkDead(i);
  }
  reconfigure(index: number, fds: readonly number[], change: { sizeBytes?: bigint; backend?: string }): Promise<void> {
    return this.inner.reconfigure(index, fds, change);
  }
  disconnect(index: number): Promise<void> {
    return this.inner.disconnect(index);
  }
  stillOurs(index: number, identifier: string | undefined): boolean {
    return this.inner.stillOurs(index, identifier);
  }
  close(): void {
    this.inner.close();
  }
}

interface LiveCandidate extends Candidate {
  conn: Connection;
  blockSizes: Connection['info']['blockSize'];
}

/** True when a directory with st_dev `dev` lives on nbd`index` (or one of its partitions). */
export function onDevice(index: number): (dev: bigint) => boolean {
  const shift = partShift(moduleInfo().maxPart ?? 0);
  return (dev) => devMajor(dev) === NBD_MAJOR && indexFromMinor(devMinor(dev), shift).index === index;
}

/**
 * The log of the resident phase. Foreground (-n) and under the journal ($JOURNAL_STREAM, inherited
 * stderr): stderr. Otherwise nbdN.log under /var/log/nbd-attach/, or /run/nbd-attach/ when that is
 * read-only or lives on the supervised device itself.
 */
export function openResidentLog(index: number, mode: 'foreground' | 'background', given?: { fd: number; file: string }): { sink: LogSink; where: string; file?: string } {
  const tag = `nbd${index}`;
  const toStderr = mode === 'foreground' || (given === undefined && process.env['JOURNAL_STREAM'] !== undefined);
  if (toStderr) {
    const prefix = mode === 'foreground' ? `nbd-attach: ${tag}: ` : `${tag}[${process.pid}]: `;
    return { sink: createLogSink({ fd: 2 }, (m) => `${prefix}${m}`), where: 'logging to stderr' };
  }
  const { fd, file } = given ?? openLogFile(index, [logDir(), runDir()], onDevice(index));
  const sink = createLogSink({ fd, file }, (m) => `${new Date().toISOString()} ${tag}[${process.pid}]: ${m}`);
  // debug() and stray warnings go to the log too, bounded like the rest.
  process.stderr.write = ((chunk: string | Uint8Array): boolean => {
    sink.raw(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
    return true;
  }) as typeof process.stderr.write;
  return { sink, where: `log ${file}`, file };
}

export interface ResidentHow {
  source: ConnectionSource;
  reconnectTimeout: number;
  /**
   * Replace every connection at once: an adopted device's links may have died while nobody
   * listened (LINK_DEAD is sent once per socket), or were relayed (TLS) by the previous supervisor.
   * RECONFIGURE fills dead slots only; a fresh socket offered while every link is alive is dropped by
   * the kernel (drivers/block/nbd.c nbd_reconnect_socket: -ENOSPC, reported as success).
   */
  replaceAll?: 'adopted' | 'tls';
  /**
   * Duplicates of the sockets given to the kernel (by attach, or by the attach command:
   * src/supervisor/handoff.ts), kept to end them when the server asks us to leave. Once subscribed to
   * LINK_DEAD, each one that has already ended gets a replacement (with `checkKept`).
   */
  keptFds?: readonly number[];
  checkKept?: boolean;
  /** The log file the attach command opened (and named in its ready line). */
  log?: { fd: number; file: string };
  notifier?: ServiceNotifier;
}

export async function supervise(base: SupervisorState, ops: KernelOps, how: ResidentHow, rep: Reporter, mode: 'foreground' | 'background', summary: string): Promise<number> {
  const { sink, where, file } = openResidentLog(base.index, mode, how.log);
  const log = (m: string): void => sink.write(m);
  // Created here, in the process systemd knows as the main one (-n); it takes $NOTIFY_SOCKET out of
  // the environment so nothing this process starts can speak for the unit.
  const notifier: ServiceNotifier = how.notifier ?? (await createNotifier({ log }));
  if (file !== undefined) base.logFile = file;
  base.pidStart = processIdentity(process.pid)?.start;
  process.on('uncaughtException', (e) => {
    log(`internal error: ${e.stack ?? e.message}`);
    const t = setTimeout(() => process.exit(1), 2000);
    void sink.close().finally(() => {
      clearTimeout(t);
      process.exit(1);
    });
  });

  residentProcessSetup({ swap: base.swap, systemdMark: base.systemdMark, device: base.device }, log);
  if (base.swap && base.tls && base.tlsPath !== 'kernel') {
    log('warning: --swap with the TLS relay can deadlock: every swapped page passes through this process, which is kept from the OOM killer but not locked in memory (kernel TLS, the default, has no such process)');
  }
  const state: SupervisorState = { ...base };
  const follower = followRootIfInitramfs(log);
  const selfPids = new Set([process.pid]);
  let lastStatus = '';
  const sup = new Supervisor<LiveCandidate>(
    {
      index: base.index,
      device: base.device,
      identifier: base.identifier,
      connections: base.connections,
      size: BigInt(base.sizeBytes),
      flags: base.flags,
      deadTimeoutS: base.deadTimeoutS,
      whenBusy: base.local ? 'stay' : 'leave',
      blockSize: base.blockSize,
      ...(how.keptFds ? { keptFds: how.keptFds } : {}),
    },
    {
      kernel: ops,
      now: () => Date.now(),
      sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
      random: Math.random,
      negotiate: async () => {
        const c = await how.source.connect(how.reconnectTimeout);
        return { size: c.info.size, flags: c.info.flags, blockSizes: c.info.blockSize, conn: c, discard: () => c.socket.destroy() };
      },
      takeFd: (c) => takeSocketFd(c.conn.socket),
      closeFd: (fd) => {
        try {
          libc.close(fd);
        } catch {
          /* already closed */
        }
      },
      log,
      users: () => deviceUsers(base.index, base.device, { selfPids }).map(describeUser),
      stopping: () => notifier.stopping(`${base.device}: stopping`),
      saveState: (s) => {
        state.reconnects = (base.reconnects ?? 0) + s.reconnects;
        state.liveConnections = s.liveConnections;
        state.sizeBytes = s.sizeBytes.toString();
        if (s.lastError !== undefined) state.lastError = s.lastError;
        writeState(state);
        const text = deviceStatusText(state);
        if (text !== lastStatus && lastStatus !== '') notifier.status(text);
        lastStatus = text;
      },
      every: (ms, fn) => {
        const t = setInterval(() => {
          // Between switch_root moving /sys away and this process following PID 1 into the real
          // root, the device cannot be checked (it would look detached): skip those ticks.
          if (follower && !follower.check()) return;
          fn();
        }, ms);
        return () => clearInterval(t);
      },
      ...serverChangeDeps(base),
    },
  );
  await sup.start();
  if (how.replaceAll === 'tls') log(`TLS: the previous supervisor relayed this device's connections, so they ended with it: replacing all ${base.connections}`);
  if (how.replaceAll === 'adopted') log(`adopting: offering the kernel ${base.connections} fresh connection(s); dead links take them, live ones let them go`);
  if (how.replaceAll) for (let i = 0; i < base.connections; i++) sup.onLinkDead(base.index);
  if (how.checkKept && how.keptFds) {
    // Subscribed now: a link that died before (its LINK_DEAD unheard) shows as an ended socket.
    const ended = how.keptFds.filter((fd) => libc.socketEnded(fd)).length;
    if (ended > 0) log(`${ended} connection(s) ended before this supervisor listened: replacing them`);
    for (let i = 0; i < ended; i++) sup.onLinkDead(base.index);
  }
  const onSignal = (sig: NodeJS.Signals): void => void sup.terminate(sig);
  for (const s of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(s, onSignal);
  log(`${summary}; supervising (pid ${process.pid}, dead timeout ${base.deadTimeoutS} s, request timeout ${base.requestTimeoutS} s)`);
  rep.ready(`${summary}, supervisor pid ${process.pid}, ${where}`);
  // READY=1 only now: the device is usable (attach() waited for its size) and supervised.
  lastStatus = deviceStatusText(state);
  notifier.ready(lastStatus);

  const end = await sup.ended;
  for (const s of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.off(s, onSignal);
  if (end.reason === 'gave-up' || end.reason === 'error') {
    log(`supervisor stopped: ${end.error.message}`);
    state.lastError = end.error.message;
    try {
      writeState({ ...state, pid: 0 });
    } catch {
      /* best effort */
    }
  } else if (end.reason === 'left') {
    // The device stays attached: the state file stays for the next supervisor (this pid is then gone).
  } else {
    removeState(base.index);
  }
  notifier.stopping(`${base.device}: ${end.reason === 'left' ? 'left attached (in use)' : end.reason}`);
  await notifier.flush();
  notifier.close();
  log(`exit ${end.code}`);
  await sink.close();
  return end.code;
}
