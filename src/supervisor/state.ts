// Where a supervisor leaves its state: one JSON file per device under /run/nbd-attach/ (for `status`
// and for adoption by a new supervisor), and its log in the background under /var/log/nbd-attach/.
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

/** True when `pid` is a live process (not a zombie). */
export function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) [ZX] /s.test(stat);
  } catch {
    return false;
  }
}

/** Open (append) the background log for nbdN: /var/log/nbd-attach/nbdN.log, else under the run dir. */
export function openLog(index: number): { fd: number; file: string } {
  for (const dir of [logDir(), runDir()]) {
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
      const file = path.join(dir, `nbd${index}.log`);
      return { fd: fs.openSync(file, 'a', 0o644), file };
    } catch {
      /* read-only or not allowed: try the next place */
    }
  }
  return { fd: fs.openSync('/dev/null', 'a'), file: '/dev/null' };
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
