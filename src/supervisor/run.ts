// `nbd-attach HOST [DEV]` with a resident supervisor (netlink), and `--reattach DEV`.
//
// Background (default): Node cannot fork, so the command spawns itself detached with the internal
// flag --supervisor-child; the child negotiates, attaches and supervises, and reports "ready …" or
// the one-line error over an inherited pipe (fd 3). The parent prints it and exits with the right
// code, so `nbd-attach host /dev/nbd0 && mount …` works. -n/--foreground does it all in-process.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { randomUUID } from 'node:crypto';
import createDebug from 'debug';
import { type Target, describeEndpoint } from '../address.ts';
import { type Connection, negotiate } from '../client/negotiate.ts';
import { NbdError, exitCodeOf } from '../errors.ts';
import { TransmissionFlag } from '../protocol/constants.ts';
import { attach, preflight, takeSocketFd } from '../kernel/attach.ts';
import { deviceState, parseDeviceName, resolveDevice } from '../kernel/device.ts';
import * as libc from '../../native-bindings/libc.ts';
import { formatSize, resolveTarget, type ServerOptions } from '../commands/common.ts';
import { splitPositionals } from '../commands/attach.ts';
import { type KernelOps, NetlinkKernelOps } from './kernel-ops.ts';
import { type ConnectionSource, localSource, remoteSource, tlsSummary } from './source.ts';
import { DEFAULT_DEAD_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S, RECONNECT_ATTEMPT_TIMEOUT_MS } from './policy.ts';
import type { Candidate } from './reconnector.ts';
import { type SupervisorState, openLog, pidAlive, readState, removeState, writeState } from './state.ts';
import { Supervisor } from './supervisor.ts';

const debug = createDebug('nbd:supervisor');

/** The options of `attach` this module reads (src/commands/attach.ts declares them). */
export interface SupervisedAttachOptions extends ServerOptions {
  optgo: boolean;
  blockSize?: number | 'preferred';
  timeout?: number;
  identifier?: string;
  readOnly?: boolean;
  foreground?: boolean;
  deadTimeout?: number;
  connections?: number;
  reattach?: string;
  supervisorChild?: boolean;
  ioctl?: boolean;
  /** Local attach: serve this image from this process (src/supervisor/source.ts). */
  file?: string;
  /** Local attach: serve sparse memory of this size from this process. */
  memory?: string;
  /** -s: the device holds swap. */
  swap?: boolean;
  /** -m: mark argv[0] with '@' for systemd. */
  systemdMark?: boolean;
}

/**
 * What -s/--swap and -m/--systemd-mark do to the process that stays resident for a device (the
 * supervisor, or the -L process). Swap: the OOM killer must never pick the process that reconnects
 * the swap device (nbd-client -swap does the same, plus mlockall, which V8 cannot survive: see
 * docs/decisions.md). Systemd mark: systemd's shutdown leaves processes whose argv[0] starts with '@'
 * alive (root or swap on NBD must outlive the unmount); Node's process.title rewrites argv in place.
 */
export function residentProcessSetup(how: { swap?: boolean | undefined; systemdMark?: boolean | undefined; device: string }, note: (m: string) => void): void {
  if (how.systemdMark) process.title = `@nbd-attach ${how.device}`;
  if (how.swap) {
    try {
      fs.writeFileSync('/proc/self/oom_score_adj', '-1000');
    } catch (e) {
      note(`--swap: cannot set oom_score_adj -1000: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  }
}

export const CHILD_FLAG = '--supervisor-child';
const REPORT_FD = 3;

// ---------------------------------------------------------------------------------------------
// Reporting: to the console (foreground, parent) or over the pipe (background child)

interface Reporter {
  note(message: string): void;
  ready(line: string): void;
}

function consoleReporter(): Reporter {
  return {
    note: (m) => process.stderr.write(`nbd-attach: note: ${m}\n`),
    ready: (line) => process.stdout.write(`${line}\n`),
  };
}

function pipeReporter(): Reporter & { error(e: unknown): void } {
  const send = (s: string): void => {
    try {
      fs.writeSync(REPORT_FD, `${s.replace(/\n/g, ' ')}\n`);
    } catch {
      /* parent gone */
    }
  };
  return {
    note: (m) => send(`note ${m}`),
    ready: (line) => {
      send(`ready ${line}`);
      try {
        fs.closeSync(REPORT_FD);
      } catch {
        /* already closed */
      }
    },
    error: (e) => {
      const code = e instanceof NbdError ? e.code : 'NBD_E_FAILURE';
      send(`error ${code} ${e instanceof Error ? e.message : String(e)}`);
    },
  };
}

/** Logging of the resident phase: stderr in the foreground, the log file in the background. */
type Log = (message: string) => void;

// ---------------------------------------------------------------------------------------------
// Entry from the attach command

export async function runSupervisedAttach(positionals: readonly (string | undefined)[], opts: SupervisedAttachOptions): Promise<void> {
  if (opts.supervisorChild) {
    const rep = pipeReporter();
    let code: number;
    try {
      code = await attachAndSupervise(positionals, opts, rep, 'background');
    } catch (e) {
      debug('child failed: %O', e);
      rep.error(e);
      code = exitCodeOf(e);
    }
    process.exitCode = code;
    // Background: nothing else to wait for (netlink socket closed, timers cancelled).
    process.exit(code);
  }
  if (opts.foreground) {
    const code = await attachAndSupervise(positionals, opts, consoleReporter(), 'foreground');
    process.exitCode = code;
    return;
  }
  await launchBackground(opts);
}

/** Parent side of background mode: spawn the detached child and relay its first report. */
async function launchBackground(opts: SupervisedAttachOptions): Promise<void> {
  const entry = process.argv[1];
  if (!entry) throw new NbdError('NBD_E_FAILURE', 'attach: cannot find this program to start the supervisor: use -n/--foreground');
  const args = [...process.execArgv, entry, ...process.argv.slice(2), CHILD_FLAG];
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'ignore', 'ignore', 'pipe'], env: process.env });
  const pipe = child.stdio[REPORT_FD] as NodeJS.ReadableStream | null;
  if (!pipe) throw new NbdError('NBD_E_FAILURE', 'attach: no pipe to the supervisor process');
  const limitMs = (opts.connectTimeout ?? 10_000) * Math.max(1, opts.connections ?? 1) + 60_000;
  const outcome = await new Promise<{ ok: true; line: string } | { ok: false; error: NbdError }>((resolve) => {
    let buf = '';
    let settled = false;
    const done = (v: { ok: true; line: string } | { ok: false; error: NbdError }): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(v);
    };
    const timer = setTimeout(() => {
      child.kill('SIGTERM');
      done({ ok: false, error: new NbdError('NBD_E_KERNEL_TIMEOUT', `attach: the supervisor did not report within ${Math.round(limitMs / 1000)} s: see its log under /var/log/nbd-attach/`) });
    }, limitMs);
    pipe.setEncoding('utf8');
    pipe.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const sp = line.indexOf(' ');
        const kind = sp < 0 ? line : line.slice(0, sp);
        const rest = sp < 0 ? '' : line.slice(sp + 1);
        if (kind === 'note') process.stderr.write(`nbd-attach: note: ${rest}\n`);
        else if (kind === 'ready') done({ ok: true, line: rest });
        else if (kind === 'error') {
          const sp2 = rest.indexOf(' ');
          done({ ok: false, error: new NbdError(sp2 < 0 ? rest : rest.slice(0, sp2), sp2 < 0 ? 'attach failed' : rest.slice(sp2 + 1)) });
        }
      }
    });
    child.on('error', (e) => done({ ok: false, error: new NbdError('NBD_E_FAILURE', `attach: cannot start the supervisor: ${e.message}`) }));
    child.on('exit', (code, sig) =>
      done({ ok: false, error: new NbdError('NBD_E_FAILURE', `attach: the supervisor exited (${sig ?? `code ${code}`}) before the device was ready: run with -n/--foreground to see why`) }),
    );
  });
  (pipe as unknown as { destroy(): void }).destroy();
  child.unref();
  if (!outcome.ok) throw outcome.error;
  process.stdout.write(`${outcome.line}\n`);
}

// ---------------------------------------------------------------------------------------------
// The work: negotiate, attach (or adopt), supervise

/** KernelOps whose LINK_DEAD events, arriving before anyone listens, are kept and replayed. */
class EarlySubscription implements KernelOps {
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
}

function sameServer(s: SupervisorState, target: Target, exportName: string): boolean {
  return s.endpoint !== undefined && describeEndpoint(s.endpoint) === describeEndpoint(target.endpoint) && s.export === exportName;
}

/**
 * Where the connections come from, and the device argument: `HOST[:PORT] [PORT] [DEV]`, `-u SOCK
 * [DEV]`, or local attach `--file IMAGE [DEV]` / `--memory SIZE [DEV]`. Local opens the image.
 */
export async function openSource(
  positionals: readonly (string | undefined)[],
  opts: SupervisedAttachOptions,
): Promise<{ source: ConnectionSource; device: string | undefined; target?: Target }> {
  if (opts.file !== undefined || opts.memory !== undefined) {
    const given = positionals.filter((x): x is string => x !== undefined);
    const what = opts.file !== undefined ? `--file ${opts.file}` : `--memory ${opts.memory}`;
    if (opts.swap) {
      throw new NbdError('NBD_E_USAGE', `${what} with -s/--swap: swapping to a disk served by this same machine can deadlock under memory pressure; swap needs a remote server`);
    }
    if (given.length > 1 || opts.unix !== undefined || opts.name !== undefined) {
      throw new NbdError('NBD_E_USAGE', `${what} serves the image from this process: give only the device (nbd-attach ${what} [/dev/nbdN]), no server or export`);
    }
    if (given[0] !== undefined && parseDeviceName(given[0]) === undefined && !given[0].startsWith('/')) {
      throw new NbdError('NBD_E_USAGE', `${what}: '${given[0]}' is not a device (/dev/nbdN or nbdN)`);
    }
    return { source: await localSource({ file: opts.file, memory: opts.memory, readOnly: opts.readOnly === true }), device: given[0] };
  }
  const { host, port, device } = splitPositionals(positionals, opts.unix !== undefined);
  const { target, exportName } = resolveTarget(host, port, opts);
  return { source: remoteSource(target, exportName, opts.optgo === false), device, target };
}

async function attachAndSupervise(
  positionals: readonly (string | undefined)[],
  opts: SupervisedAttachOptions,
  rep: Reporter,
  mode: 'foreground' | 'background',
): Promise<number> {
  const noOptGo = opts.optgo === false;
  const deadTimeoutS = opts.deadTimeout ?? DEFAULT_DEAD_TIMEOUT_S;
  const requestTimeoutS = opts.timeout ?? DEFAULT_REQUEST_TIMEOUT_S;
  const connections = opts.connections ?? 1;
  const reconnectTimeout = Math.min(opts.connectTimeout ?? 10_000, RECONNECT_ATTEMPT_TIMEOUT_MS);

  // --reattach DEV [HOST]: the device is given by the option; the positionals may name the server.
  if (opts.reattach !== undefined) {
    if (opts.file !== undefined || opts.memory !== undefined) throw new NbdError('NBD_E_USAGE', '--reattach adopts a device attached to a server: drop --file/--memory');
    const { host, port, device } = splitPositionals(positionals, opts.unix !== undefined);
    const target = host !== undefined || opts.unix !== undefined ? resolveTarget(host, port, opts) : undefined;
    if (device !== undefined) throw new NbdError('NBD_E_USAGE', `--reattach ${opts.reattach} names the device: drop '${device}'`);
    return adopt(opts.reattach, target, opts, rep, mode, { noOptGo, reconnectTimeout });
  }

  const { source, device, target } = await openSource(positionals, opts);
  try {
    return await attachFrom(source, device, target, opts, rep, mode, { noOptGo, reconnectTimeout, deadTimeoutS, requestTimeoutS, connections });
  } finally {
    await source.close();
  }
}

async function attachFrom(
  source: ConnectionSource,
  device: string | undefined,
  target: Target | undefined,
  opts: SupervisedAttachOptions,
  rep: Reporter,
  mode: 'foreground' | 'background',
  how: { noOptGo: boolean; reconnectTimeout: number; deadTimeoutS: number; requestTimeoutS: number; connections: number },
): Promise<number> {
  const { noOptGo, reconnectTimeout, deadTimeoutS, requestTimeoutS, connections } = how;
  const exportName = source.exportName;
  // Starting the same attach again adopts a device whose supervisor is gone.
  if (target !== undefined && device !== undefined && parseDeviceNameOrNode(device)) {
    const dev = resolveDevice(device, undefined, 'attach');
    const st = deviceState(dev.index);
    const saved = readState(dev.index);
    if (st.pid !== undefined && saved && saved.identifier === st.backend && sameServer(saved, target, exportName)) {
      if (pidAlive(saved.pid)) {
        throw new NbdError('NBD_E_DEVICE_ATTACHED', `attach: ${dev.path} is already attached to ${saved.server} and supervised by pid ${saved.pid}: nothing to do`);
      }
      return adopt(device, { target, exportName }, opts, rep, mode, { noOptGo, reconnectTimeout });
    }
  }

  await preflight({ device, useIoctl: false });
  if (connections > 1 && opts.ioctl) throw new NbdError('NBD_E_USAGE', 'attach: -C/--connections needs netlink; drop -L/--ioctl');

  // Listen for LINK_DEAD before CONNECT so a link that dies at once is not missed.
  const ops = new EarlySubscription(new NetlinkKernelOps());
  try {
    await ops.listen();
  } catch (e) {
    ops.close();
    throw e instanceof NbdError ? e : new NbdError('NBD_E_KERNEL', `attach: cannot listen for nbd netlink events: ${(e as Error).message}`, { cause: e });
  }

  const conns: Connection[] = [];
  try {
    conns.push(await source.connect(opts.connectTimeout));
    const info = conns[0]!.info;
    if (connections > 1 && !(info.flags & TransmissionFlag.CAN_MULTI_CONN)) {
      throw new NbdError('NBD_E_UNSUPPORTED', `attach: -C ${connections}: the server does not allow several connections to this export (no CAN_MULTI_CONN): use -C 1`);
    }
    const more = await Promise.allSettled(Array.from({ length: connections - 1 }, () => source.connect(opts.connectTimeout)));
    for (const m of more) if (m.status === 'fulfilled') conns.push(m.value);
    const failed = more.find((m) => m.status === 'rejected');
    if (failed) throw (failed as PromiseRejectedResult).reason;
  } catch (e) {
    for (const c of conns) c.socket.destroy();
    ops.close();
    throw e;
  }
  const info = conns[0]!.info;
  const identifier = opts.identifier ?? randomUUID();
  let r;
  try {
    r = await attach({
      connections: conns,
      device,
      blockSize: opts.blockSize,
      readOnly: opts.readOnly === true,
      timeout: requestTimeoutS,
      identifier,
      useIoctl: false,
      deadConnTimeout: deadTimeoutS,
      notice: rep.note,
    });
  } catch (e) {
    ops.close();
    throw e;
  }
  const name = source.endpoint === undefined ? source.server : `export ${exportName === '' ? '(default)' : `'${exportName}'`}${tlsSummary(source)}`;
  const summary = `${r.device} attached: ${formatSize(r.sizeBytes)} (${r.sizeBytes} bytes), ${name}, block size ${r.blockSize}${r.readOnly ? ', read-only' : ''}, ${r.interface}`;

  if (r.interface === 'ioctl' || r.done) {
    // No netlink family (very old kernel): this process holds the device; no reconnect possible.
    ops.close();
    residentProcessSetup({ swap: opts.swap, systemdMark: opts.systemdMark, device: r.device }, rep.note);
    rep.ready(`${summary}, no reconnect (ioctl fallback), supervisor pid ${process.pid}`);
    const end = await r.done!;
    return end.ret < 0 ? 5 : 0;
  }

  const base: SupervisorState = {
    version: 1,
    index: r.index,
    device: r.device,
    pid: process.pid,
    server: source.server,
    ...(source.endpoint !== undefined ? { endpoint: source.endpoint } : { local: true }),
    ...(source.tls !== undefined ? { tls: source.tls, tlsPath: source.tlsPath ?? 'relay' } : {}),
    export: exportName,
    noOptGo,
    identifier,
    interface: 'netlink',
    connections,
    liveConnections: connections,
    sizeBytes: r.sizeBytes.toString(),
    blockSize: r.blockSize,
    flags: info.flags,
    readOnly: r.readOnly,
    ...(opts.swap ? { swap: true as const } : {}),
    ...(opts.systemdMark ? { systemdMark: true as const } : {}),
    requestTimeoutS,
    deadTimeoutS,
    reconnects: 0,
    startedAt: new Date().toISOString(),
    updatedAt: new Date().toISOString(),
  };
  return supervise(base, ops, { source, reconnectTimeout }, rep, mode, `${summary}, connections ${connections}`);
}

function parseDeviceNameOrNode(device: string): boolean {
  return parseDeviceName(device) !== undefined || device.startsWith('/');
}

/** Take over supervision of a live device (supervisor killed, upgraded). */
async function adopt(
  deviceArg: string,
  given: { target: Target; exportName: string } | undefined,
  opts: SupervisedAttachOptions,
  rep: Reporter,
  mode: 'foreground' | 'background',
  how: { noOptGo: boolean; reconnectTimeout: number },
): Promise<number> {
  const op = 'reattach';
  const dev = resolveDevice(deviceArg, undefined, op);
  const st = deviceState(dev.index);
  if (st.pid === undefined) throw new NbdError('NBD_E_DEVICE_NOT_ATTACHED', `${op}: ${dev.path} is not attached: attach it with 'nbd-attach HOST ${dev.path}'`);
  if (st.backend === undefined) throw new NbdError('NBD_E_DEVICE_NO_BACKEND', `${op}: ${dev.path} has no backend identifier (set up with ioctl?): it cannot be reconfigured; detach and attach it again`);
  let saved = readState(dev.index);
  if (saved && saved.identifier !== st.backend) saved = undefined; // left over from an earlier attach
  if (saved?.local) {
    throw new NbdError('NBD_E_USAGE', `${op}: ${dev.path} was served by its own supervisor (${saved.server}), and that server is gone with it: detach it (nbd-attach -d ${dev.path}) and attach it again`);
  }
  if (saved && saved.pid !== process.pid && pidAlive(saved.pid)) {
    throw new NbdError('NBD_E_DEVICE_SUPERVISED', `${op}: ${dev.path} is already supervised by pid ${saved.pid}: nothing to do`);
  }
  const target: Target | undefined = given?.target ?? (saved?.endpoint ? { endpoint: saved.endpoint, tls: saved.tls ?? false } : undefined);
  const exportName = given?.exportName ?? saved?.export;
  if (!target || exportName === undefined) {
    throw new NbdError('NBD_E_USAGE', `${op}: no record of ${dev.path}'s server (no state file): give it: nbd-attach --reattach ${dev.path} HOST[:PORT] [-N EXPORT]`);
  }
  const noOptGo = saved?.noOptGo ?? how.noOptGo;
  let flags = saved?.flags;
  if (flags === undefined) {
    // No record of the flags: learn them from the server now (one handshake, then let it go).
    const probe = await negotiate(target, { exportName, noOptGo, timeoutMs: opts.connectTimeout });
    flags = probe.info.flags;
    probe.socket.destroy();
  }
  const ops = new EarlySubscription(new NetlinkKernelOps());
  try {
    await ops.listen();
  } catch (e) {
    ops.close();
    throw new NbdError('NBD_E_KERNEL', `${op}: cannot listen for nbd netlink events: ${(e as Error).message}`, { cause: e });
  }
  const connections = saved?.connections ?? opts.connections ?? 1;
  const base: SupervisorState = {
    version: 1,
    index: dev.index,
    device: dev.path,
    pid: process.pid,
    server: describeEndpoint(target.endpoint),
    endpoint: target.endpoint,
    ...(target.tls !== false ? { tls: target.tls, tlsPath: saved?.tlsPath ?? 'relay' } : {}),
    export: exportName,
    noOptGo,
    identifier: st.backend,
    interface: 'netlink',
    connections,
    liveConnections: connections,
    sizeBytes: st.sizeBytes.toString(),
    blockSize: saved?.blockSize ?? 512,
    flags,
    readOnly: saved?.readOnly ?? false,
    ...(saved?.swap || opts.swap ? { swap: true as const } : {}),
    ...(saved?.systemdMark || opts.systemdMark ? { systemdMark: true as const } : {}),
    requestTimeoutS: saved?.requestTimeoutS ?? opts.timeout ?? DEFAULT_REQUEST_TIMEOUT_S,
    deadTimeoutS: saved?.deadTimeoutS ?? opts.deadTimeout ?? DEFAULT_DEAD_TIMEOUT_S,
    reconnects: saved?.reconnects ?? 0,
    ...(saved?.lastError !== undefined ? { lastError: saved.lastError } : {}),
    startedAt: new Date().toISOString(),
    updatedAt: new Date().toISOString(),
  };
  const name = exportName === '' ? '(default)' : `'${exportName}'`;
  // The TLS relay: the kernel's sockets were relayed by the previous supervisor and died with it:
  // replace them all (also for state files from before kernel TLS: no tlsPath). Kernel TLS sockets live on.
  const replaceAll = target.tls !== false && saved?.tlsPath !== 'kernel';
  return supervise(
    base,
    ops,
    { source: remoteSource(target, exportName, noOptGo), reconnectTimeout: how.reconnectTimeout, replaceAll },
    rep,
    mode,
    `${dev.path} adopted: server ${base.server}, export ${name}${replaceAll ? ' over TLS' : ''}, connections ${connections}`,
  );
}

async function supervise(
  base: SupervisorState,
  ops: KernelOps,
  how: { source: ConnectionSource; reconnectTimeout: number; replaceAll?: boolean },
  rep: Reporter,
  mode: 'foreground' | 'background',
  summary: string,
): Promise<number> {
  const tag = `nbd${base.index}`;
  let log: Log;
  let where: string;
  if (mode === 'background') {
    const { fd, file } = openLog(base.index);
    base.logFile = file;
    where = `log ${file}`;
    const write = (s: string): void => {
      try {
        fs.writeSync(fd, s);
      } catch {
        /* disk full: nothing better to do */
      }
    };
    log = (m) => write(`${new Date().toISOString()} ${tag}[${process.pid}]: ${m}\n`);
    // debug() and stray warnings go to the log too.
    process.stderr.write = ((chunk: string | Uint8Array): boolean => {
      write(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
      return true;
    }) as typeof process.stderr.write;
  } else {
    where = 'logging to stderr';
    log = (m) => process.stderr.write(`nbd-attach: ${tag}: ${m}\n`);
  }
  process.on('uncaughtException', (e) => {
    log(`internal error: ${e.stack ?? e.message}`);
    process.exit(1);
  });

  residentProcessSetup({ swap: base.swap, systemdMark: base.systemdMark, device: base.device }, log);
  if (base.swap && base.tls && base.tlsPath !== 'kernel') {
    log('warning: --swap with the TLS relay can deadlock: every swapped page passes through this process, which is kept from the OOM killer but not locked in memory (kernel TLS, the default, has no such process)');
  }
  const state: SupervisorState = { ...base };
  const sup = new Supervisor<LiveCandidate>(
    {
      index: base.index,
      device: base.device,
      identifier: base.identifier,
      connections: base.connections,
      size: BigInt(base.sizeBytes),
      flags: base.flags,
      deadTimeoutS: base.deadTimeoutS,
    },
    {
      kernel: ops,
      now: () => Date.now(),
      sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
      random: Math.random,
      negotiate: async () => {
        const c = await how.source.connect(how.reconnectTimeout);
        return { size: c.info.size, flags: c.info.flags, conn: c, discard: () => c.socket.destroy() };
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
      saveState: (s) => {
        state.reconnects = (base.reconnects ?? 0) + s.reconnects;
        state.liveConnections = s.liveConnections;
        state.sizeBytes = s.sizeBytes.toString();
        if (s.lastError !== undefined) state.lastError = s.lastError;
        writeState(state);
      },
      every: (ms, fn) => {
        const t = setInterval(fn, ms);
        return () => clearInterval(t);
      },
    },
  );
  await sup.start();
  if (how.replaceAll) {
    log(`TLS: the previous supervisor relayed this device's connections, so they ended with it: replacing all ${base.connections}`);
    for (let i = 0; i < base.connections; i++) sup.onLinkDead(base.index);
  }
  const onSignal = (sig: NodeJS.Signals): void => void sup.terminate(sig);
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGHUP', () => log('SIGHUP ignored (use SIGTERM or nbd-attach -d to stop)'));
  log(`${summary}; supervising (pid ${process.pid}, dead timeout ${base.deadTimeoutS} s, request timeout ${base.requestTimeoutS} s)`);
  rep.ready(`${summary}, supervisor pid ${process.pid}, ${where}`);

  const end = await sup.ended;
  process.off('SIGTERM', onSignal);
  process.off('SIGINT', onSignal);
  if (end.reason === 'gave-up' || end.reason === 'error') {
    log(`supervisor stopped: ${end.error.message}`);
    state.lastError = end.error.message;
    try {
      writeState({ ...state, pid: 0 });
    } catch {
      /* best effort */
    }
  } else {
    removeState(base.index);
  }
  log(`exit ${end.code}`);
  return end.code;
}
