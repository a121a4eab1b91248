// `nbd-attach status [DEV] [--json]`: per nbd device, attached or not, size, server, export,
// connections live/total, supervisor pid, reconnects so far, last error. Sysfs says what the kernel
// knows; the supervisor's state file (/run/nbd-attach/nbdN.json) adds the rest. Needs no privilege.

import type { Command } from 'commander';
import { type Roots, DEFAULT_ROOTS, deviceState, listDevices, moduleInfo, resolveDevice } from '../kernel/device.ts';
import { type SupervisorState, readState, supervisorAlive } from '../supervisor/state.ts';
import { formatSize } from './common.ts';
import { display, jsonText, oneLine } from '../text.ts';
import { writeOut } from '../output.ts';

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
  /** `live` is null while no supervisor runs: nobody watches the links, so nobody knows. */
  connections?: { live: number | null; total: number };
  /** Supervisor process id while it runs; null when its state says it stopped or it died. */
  supervisorPid?: number | null;
  reconnects?: number;
  lastError?: string;
  logFile?: string;
}

/** Pure-ish: one device's status from sysfs and its state file. */
export function statusOf(index: number, devicePath: string, roots: Roots = DEFAULT_ROOTS, alive: (s: SupervisorState) => boolean = supervisorAlive): DeviceStatusEntry {
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
    e.supervisorPid = alive(s) ? s.pid : null;
    e.connections = { live: !e.attached ? 0 : e.supervisorPid !== null ? s.liveConnections : null, total: s.connections };
    e.reconnects = s.reconnects;
    if (s.lastError !== undefined) e.lastError = s.lastError;
    if (s.logFile !== undefined) e.logFile = s.logFile;
  } else if (e.attached) {
    e.supervisorPid = null;
  }
  return e;
}

/**
 * One line a person reads. The server, export and last error come from the state file and may quote
 * what a server sent: shown one line each, escapes visible (src/text.ts).
 */
export function formatStatus(e: DeviceStatusEntry): string {
  const lastError = e.lastError !== undefined ? oneLine(e.lastError) : undefined;
  if (!e.attached) return `${e.device}: not attached${lastError ? ` (last error: ${lastError})` : ''}`;
  const parts = [`${e.device}: attached`, formatSize(BigInt(e.sizeBytes))];
  // The server is an address or a local image's path (ours, never cut); the export name is the server's.
  const server = e.server !== undefined ? oneLine(e.server) : undefined;
  if (e.local && server !== undefined) parts.push(`served from ${server} by its supervisor`);
  else if (server !== undefined) parts.push(`server ${server}`, `export ${e.export === '' ? '(default)' : `'${display(e.export ?? '')}'`}${e.tls ? ` over TLS (${e.tlsPath === 'kernel' ? 'kernel TLS' : 'relay'})` : ''}`);
  if (e.connections) parts.push(`connections ${e.connections.live ?? '?'}/${e.connections.total}`);
  if (e.supervisorPid) parts.push(`supervisor pid ${e.supervisorPid}`);
  else if (e.local) parts.push('no supervisor (its server is gone: detach it)');
  else if (e.tls && e.tlsPath !== 'kernel') parts.push('no supervisor (it relayed the TLS connections: I/O waits until nbd-attach --reattach)');
  else parts.push('no supervisor (adopt it with nbd-attach --reattach)');
  if (e.reconnects !== undefined) parts.push(`reconnects ${e.reconnects}`);
  parts.push(`last error: ${lastError ?? 'none'}`);
  return parts.join(', ');
}

/** `status --json`: the state file's strings exactly, JSON-escaped (invisible characters too). */
export function statusJson(entries: DeviceStatusEntry[]): string {
  return jsonText(entries);
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
        writeOut(`${statusJson(entries)}\n`);
        return;
      }
      if (entries.length === 0) writeOut('no nbd devices (the nbd module is not loaded)\n');
      for (const e of entries) writeOut(`${formatStatus(e)}\n`);
    });
}
