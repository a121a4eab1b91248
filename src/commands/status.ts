// `nbd-attach status [DEV] [--json]`: per nbd device, attached or not, size, server, export,
// connections live/total, supervisor pid, reconnects so far, last error. Sysfs says what the kernel
// knows; the supervisor's state file (/run/nbd-attach/nbdN.json) adds the rest. Needs no privilege.

import type { Command } from 'commander';
import { type Roots, DEFAULT_ROOTS, deviceState, listDevices, moduleInfo, resolveDevice } from '../kernel/device.ts';
import { pidAlive, readState } from '../supervisor/state.ts';
import { formatSize } from './common.ts';

export interface DeviceStatusEntry {
  device: string;
  index: number;
  attached: boolean;
  sizeBytes: number | string;
  /** Thread id the kernel recorded at attach (/sys/block/nbdN/pid). */
  kernelPid?: number;
  identifier?: string;
  server?: string;
  export?: string;
  /** Local attach (--file/--memory): `server` is "local file PATH" or "local memory SIZE". */
  local?: boolean;
  /** The connections use TLS. */
  tls?: boolean;
  /** How: kernel TLS on the TCP sockets, or the supervisor's relay (state files before kernel TLS: absent, a relay). */
  tlsPath?: 'kernel' | 'relay';
  connections?: { live: number; total: number };
  /** Supervisor process id while it runs; null when its state says it stopped or it died. */
  supervisorPid?: number | null;
  reconnects?: number;
  lastError?: string;
  logFile?: string;
}

/** Pure-ish: one device's status from sysfs and its state file. */
export function statusOf(index: number, devicePath: string, roots: Roots = DEFAULT_ROOTS, alive: (pid: number) => boolean = pidAlive): DeviceStatusEntry {
  const st = deviceState(index, roots);
  const size = st.sizeBytes <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(st.sizeBytes) : st.sizeBytes.toString();
  const e: DeviceStatusEntry = { device: devicePath, index, attached: st.pid !== undefined, sizeBytes: size };
  if (st.pid !== undefined) e.kernelPid = st.pid;
  if (st.backend !== undefined) e.identifier = st.backend;
  const s = readState(index);
  // A state file describes this attachment only when the identifiers agree (or the device is gone and
  // the file still says why, e.g. a supervisor that gave up).
  if (s && (st.backend === undefined || s.identifier === st.backend)) {
    e.server = s.server;
    e.export = s.export;
    if (s.local) e.local = true;
    if (s.tls !== undefined) {
      e.tls = true;
      e.tlsPath = s.tlsPath ?? 'relay';
    }
    e.connections = { live: e.attached ? s.liveConnections : 0, total: s.connections };
    e.supervisorPid = s.pid > 0 && alive(s.pid) ? s.pid : null;
    e.reconnects = s.reconnects;
    if (s.lastError !== undefined) e.lastError = s.lastError;
    if (s.logFile !== undefined) e.logFile = s.logFile;
  } else if (e.attached) {
    e.supervisorPid = null;
  }
  return e;
}

/** One line a person reads. */
export function formatStatus(e: DeviceStatusEntry): string {
  if (!e.attached) return `${e.device}: not attached${e.lastError ? ` (last error: ${e.lastError})` : ''}`;
  const parts = [`${e.device}: attached`, formatSize(BigInt(e.sizeBytes))];
  if (e.local && e.server !== undefined) parts.push(`served from ${e.server} by its supervisor`);
  else if (e.server !== undefined) parts.push(`server ${e.server}`, `export ${e.export === '' ? '(default)' : `'${e.export}'`}${e.tls ? ` over TLS (${e.tlsPath === 'kernel' ? 'kernel TLS' : 'relay'})` : ''}`);
  if (e.connections) parts.push(`connections ${e.connections.live}/${e.connections.total}`);
  if (e.supervisorPid) parts.push(`supervisor pid ${e.supervisorPid}`);
  else if (e.local) parts.push('no supervisor (its server is gone: detach it)');
  else if (e.tls && e.tlsPath !== 'kernel') parts.push('no supervisor (it relayed the TLS connections: I/O waits until nbd-attach --reattach)');
  else parts.push('no supervisor (adopt it with nbd-attach --reattach)');
  if (e.reconnects !== undefined) parts.push(`reconnects ${e.reconnects}`);
  parts.push(`last error: ${e.lastError ?? 'none'}`);
  return parts.join(', ');
}

export function register(program: Command): void {
  program
    .command('status')
    .description('show each nbd device: attached, size, server, export, connections, supervisor, reconnects, last error')
    .argument('[device]', '/dev/nbdN or nbdN (default: every nbd device)')
    .option('--json', 'print JSON (an array, one object per device)')
    .action((device: string | undefined, opts: { json?: boolean }) => {
      let entries: DeviceStatusEntry[];
      if (device !== undefined) {
        const dev = resolveDevice(device, DEFAULT_ROOTS, 'status');
        entries = [statusOf(dev.index, dev.path)];
      } else {
        entries = moduleInfo().loaded ? listDevices().map((i) => statusOf(i, `/dev/nbd${i}`)) : [];
      }
      if (opts.json) {
        process.stdout.write(`${JSON.stringify(entries, null, 2)}\n`);
        return;
      }
      if (entries.length === 0) process.stdout.write('no nbd devices (the nbd module is not loaded)\n');
      for (const e of entries) process.stdout.write(`${formatStatus(e)}\n`);
    });
}
