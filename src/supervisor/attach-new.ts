// A fresh attach (netlink): negotiate the connections, CONNECT, take the device's supervisor lock,
// then stay resident (src/supervisor/resident.ts). Attaching a device that is already attached to
// the same server by us, with no supervisor left, adopts it instead (a restarted service).

import { randomUUID } from 'node:crypto';
import { type Target, describeEndpoint } from '../address.ts';
import type { Connection } from '../client/negotiate.ts';
import { NbdError } from '../errors.ts';
import { mark, timingLine } from '../timing.ts';
import { display, oneLine } from '../text.ts';
import { TransmissionFlag } from '../protocol/constants.ts';
import { formatByteCount } from '../server/size.ts';
import { attach, preflight } from '../kernel/attach.ts';
import { deviceState, parseDeviceName, resolveDevice } from '../kernel/device.ts';
import { NetlinkKernelOps } from './kernel-ops.ts';
import { type ConnectionSource, tlsSummary } from './source.ts';
import type { Reporter } from './reporter.ts';
import type { SupervisedAttachOptions } from './spec.ts';
import { DEFAULT_DEAD_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S } from './policy.ts';
import { type SupervisorState, logDir, processIdentity, readState, runDir, supervisorAlive, writeState } from './state.ts';
import { openLogFile } from './log.ts';
import { startSupervisor } from './handoff.ts';
import { type DeviceLock, lockDevice } from './lock.ts';
import { EarlySubscription, type ServiceNotifier, onDevice, residentProcessSetup, supervise } from './resident.ts';
import { adopt } from './adopt.ts';

function sameServer(s: SupervisorState, target: Target, exportName: string): boolean {
  return s.endpoint !== undefined && describeEndpoint(s.endpoint) === describeEndpoint(target.endpoint) && s.export === exportName;
}

export interface AttachHow {
  /**
   * 'handoff': this is the command the user ran; attach here, start the supervisor beside it with our
   * lock, log and socket duplicates (src/supervisor/handoff.ts) and return at once.
   */
  mode: 'foreground' | 'background' | 'handoff';
  reconnectTimeout: number;
  notifier?: ServiceNotifier;
}

export async function attachNew(
  source: ConnectionSource,
  device: string | undefined,
  target: Target | undefined,
  opts: SupervisedAttachOptions,
  rep: Reporter,
  how: AttachHow,
): Promise<number> {
  const noOptGo = opts.optgo === false;
  const deadTimeoutS = opts.deadTimeout ?? DEFAULT_DEAD_TIMEOUT_S;
  const requestTimeoutS = opts.timeout ?? DEFAULT_REQUEST_TIMEOUT_S;
  const connections = opts.connections ?? 1;
  const exportName = source.exportName;
  // Starting the same attach again adopts a device whose supervisor is gone.
  if (target !== undefined && device !== undefined && (parseDeviceName(device) !== undefined || device.startsWith('/'))) {
    const dev = resolveDevice(device, undefined, 'attach');
    const st = deviceState(dev.index);
    const saved = readState(dev.index);
    if (st.pid !== undefined && saved && saved.identifier === st.backend && sameServer(saved, target, exportName)) {
      if (supervisorAlive(saved)) {
        throw new NbdError('NBD_E_DEVICE_ATTACHED', `attach: ${dev.path} is already attached to ${saved.server} and supervised by pid ${saved.pid}: nothing to do`);
      }
      return adopt(device, { target, exportName }, opts, rep, { ...how, mode: how.mode === 'handoff' ? 'foreground' : how.mode });
    }
  }

  await preflight({ device, useIoctl: false });
  // One supervisor per device. A named device is locked before the kernel is touched, so a refusal
  // changes nothing; one the kernel picks is locked right after (it was free a moment ago).
  const named = device !== undefined ? resolveDevice(device, undefined, 'attach') : undefined;
  let lock: DeviceLock | undefined = named ? lockDevice(named.index, named.path, 'attach') : undefined;
  mark('checks + lock');
  try {
    return await attachLocked();
  } catch (e) {
    lock?.release();
    throw e;
  }

  async function attachLocked(): Promise<number> {
    // Listen for LINK_DEAD before CONNECT so a link that dies at once is not missed (a supervisor
    // started beside us listens first and then looks at the sockets: src/supervisor/handoff.ts).
    const ops = new EarlySubscription(new NetlinkKernelOps());
    try {
      if (how.mode !== 'handoff') await ops.listen();
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
    mark('connect + handshake');
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
        keepFds: true,
      });
    } catch (e) {
      ops.close();
      throw e;
    }
    const name = source.endpoint === undefined ? oneLine(source.server) : `export ${exportName === '' ? '(default)' : `'${display(exportName)}'`}${tlsSummary(source)}`;
    const summary = `${r.device} attached: ${formatByteCount(r.sizeBytes)} (${r.sizeBytes} bytes), ${name}, block size ${r.blockSize}${r.readOnly ? ', read-only' : ''}, ${r.interface}`;
    if (r.interface === 'ioctl' || r.done) {
      // The kernel has no netlink family (very old kernel): attach() fell back to the ioctls and this
      // process holds the device; no reconnect (-L does reconnect: src/supervisor/ioctl-lifeline.ts).
      ops.close();
      residentProcessSetup({ swap: opts.swap, systemdMark: opts.systemdMark, device: r.device }, rep.note);
      rep.ready(`${summary}, no reconnect (ioctl fallback), supervisor pid ${process.pid}`);
      how.notifier?.ready(`${r.device}: ioctl fallback, no reconnect`);
      const end = await r.done!;
      return end.ret < 0 ? 5 : 0;
    }
    if (!lock) {
      try {
        lock = lockDevice(r.index, r.device, 'attach');
      } catch (e) {
        await ops.disconnect(r.index).catch(() => undefined); // nothing left half done
        ops.close();
        throw e;
      }
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
    const kept = r.keptFds ?? [];
    if (how.mode === 'handoff') {
      ops.close();
      writeState(base); // what the supervisor adopts; it rewrites it with its own pid
      const log = openLogFile(r.index, [logDir(), runDir()], onDevice(r.index));
      const pid = startSupervisor(r.device, { lockFd: lock.fd, logFd: log.fd, logFile: log.file, keptFds: kept }, { swap: opts.swap, systemdMark: opts.systemdMark });
      // From now on the state names the supervisor (starting), as `status` and a second attach see it.
      const started = processIdentity(pid)?.start;
      writeState({ ...base, pid, ...(started !== undefined ? { pidStart: started } : {}), logFile: log.file });
      rep.ready(`${summary}, connections ${connections}, supervisor pid ${pid}, log ${log.file}`);
      mark('supervisor started');
      const t = timingLine();
      if (t) process.stderr.write(`${t}\n`);
      return 0;
    }
    return supervise(
      base,
      ops,
      { source, reconnectTimeout: how.reconnectTimeout, keptFds: kept, ...(how.notifier ? { notifier: how.notifier } : {}) },
      rep,
      how.mode,
      `${summary}, connections ${connections}`,
    );
  }
}
