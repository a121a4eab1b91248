// Where a supervisor leaves its state: one JSON file per device under /run/nbd-attach/ (for `status`
// and for adoption by a new supervisor); its log in the background goes under /var/log/nbd-attach/
// (src/supervisor/log.ts).
// Both directories can be moved with NBD_ATTACH_RUN_DIR / NBD_ATTACH_LOG_DIR (tests, read-only roots).

import fs from 'node:fs';
import path from 'node:path';
import type { Endpoint, TlsSettings } from '../address.ts';

export function runDir(): string {
  return process.env['NBD_ATTACH_RUN_DIR'] ?? '/run/nbd-attach';
}
export function logDir(): string {
  return process.env['NBD_ATTACH_LOG_DIR'] ?? '/var/log/nbd-attach';
}
export function stateFile(index: number): string {
  return path.join(runDir(), `nbd${index}.json`);
}

export interface SupervisorState {
  version: 1;
  index: number;
  device: string;
  /** Supervisor process id (the process to signal; /sys/block/nbdN/pid is the kernel's record). */
  pid: number;
  /** The supervisor's start time (/proc/PID/stat field 22), so a reused pid is not taken for it. */
  pidStart?: string;
  /** "host:port" or the unix socket path, for people. */
  server: string;
  /** What a new supervisor needs to reconnect (absent for local attach). */
  endpoint?: Endpoint;
  /** TLS settings (file paths, no keys) when the device's connections use TLS. */
  tls?: TlsSettings;
  /** With TLS: kernel TLS on the TCP sockets (they outlive the supervisor) or the supervisor's relay. */
  tlsPath?: 'kernel' | 'relay';
  /** -s/--swap: the supervisor keeps oom_score_adj -1000 (an adopting supervisor too). */
  swap?: true;
  /** -m/--systemd-mark: the supervisor's argv[0] starts with '@' (an adopting supervisor too). */
  systemdMark?: true;
  /** Local attach (`--file`/`--memory`): the server lived in the supervisor; nothing to adopt. */
  local?: true;
  export: string;
  noOptGo: boolean;
  identifier: string;
  interface: 'netlink' | 'ioctl';
  connections: number;
  liveConnections: number;
  sizeBytes: string;
  blockSize: number;
  flags: number;
  readOnly: boolean;
  requestTimeoutS: number;
  deadTimeoutS: number;
  reconnects: number;
  lastError?: string;
  logFile?: string;
  startedAt: string;
  updatedAt: string;
}

/** Write atomically (temp file + rename) so a reader never sees half a file. */
export function writeState(s: SupervisorState): void {
  const file = stateFile(s.index);
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, `${JSON.stringify({ ...s, updatedAt: new Date().toISOString() }, null, 2)}\n`, { mode: 0o644 });
  fs.renameSync(tmp, file);
}

export function readState(index: number): SupervisorState | undefined {
  try {
    const v = JSON.parse(fs.readFileSync(stateFile(index), 'utf8')) as SupervisorState;
    return v && v.version === 1 && v.index === index ? v : undefined;
  } catch {
    return undefined;
  }
}

export function removeState(index: number, onlyIfPid = process.pid): void {
  const s = readState(index);
  if (s && s.pid !== onlyIfPid) return; // someone else's (an adopter) by now
  fs.rmSync(stateFile(index), { force: true });
}

/** A process as the kernel knows it: pid plus start time (clock ticks since boot), which a reused pid does not share. */
export interface ProcessIdentity {
  pid: number;
  start: string;
  /** Zombie or dead (state Z or X). */
  gone: boolean;
}

/** Pure: /proc/PID/stat → state and start time (field 22; the comm in parentheses may hold spaces and ')'). */
export function parseProcStat(pid: number, stat: string): ProcessIdentity | undefined {
  const close = stat.lastIndexOf(')');
  if (close < 0) return undefined;
  const fields = stat.slice(close + 2).split(' ');
  // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
  const state = fields[0];
  const start = fields[19];
  if (state === undefined || start === undefined || !/^\d+$/.test(start)) return undefined;
  return { pid, start, gone: state === 'Z' || state === 'X' };
}

export function processIdentity(pid: number): ProcessIdentity | undefined {
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  try {
    return parseProcStat(pid, fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return undefined;
  }
}

/**
 * True when `pid` is a live process (not a zombie) and, when `start` is given, the same process
 * that recorded it (not a later one that got the same pid).
 */
export function pidAlive(pid: number, start?: string): boolean {
  const id = processIdentity(pid);
  if (!id || id.gone) return false;
  return start === undefined || id.start === start;
}

/** Whether the supervisor a state file names is still running. */
export function supervisorAlive(s: Pick<SupervisorState, 'pid' | 'pidStart'>): boolean {
  return s.pid > 0 && pidAlive(s.pid, s.pidStart);
}

/**
 * `nbd-attach -d` leaves this marker before it disconnects, so that an ioctl-mode attach (whose
 * NBD_DO_IT returns 0 both after a DISCONNECT and after the connection died, drivers/block/nbd.c
 * nbd_start_device_ioctl) can tell "detached: exit" from "link died: reconnect".
 */
function detachMarker(index: number): string {
  return path.join(runDir(), `nbd${index}.detach`);
}
export function markDetachRequested(index: number): void {
  try {
    fs.mkdirSync(runDir(), { recursive: true, mode: 0o755 });
    fs.writeFileSync(detachMarker(index), `${process.pid}\n`);
  } catch {
    /* read-only /run: the ioctl-mode attach then reconnects; SIGTERM still stops it */
  }
}
/**
 * Remove the marker once nobody will read it: `detach` calls this after the device's supervisor has
 * exited (or when there was none), since a netlink supervisor learns of the detach from the kernel
 * and never reads the marker, and a device attached by another client has no reader at all.
 */
export function clearDetachRequested(index: number): void {
  try {
    fs.rmSync(detachMarker(index), { force: true });
  } catch {
    /* read-only /run: there is no marker either */
  }
}
/** True (and the marker removed) when a detach was asked for in the last minute. */
export function takeDetachRequested(index: number): boolean {
  try {
    const st = fs.statSync(detachMarker(index));
    fs.rmSync(detachMarker(index), { force: true });
    return Date.now() - st.mtimeMs < 60_000;
  } catch {
    return false;
  }
}
