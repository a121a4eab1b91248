// Adoption: a new supervisor for a device that is attached but has none (killed, upgraded, the
// service restarted, the initramfs's supervisor replaced). It takes the device's lock first, checks
// the device is the one its state file describes (the kernel's backend identifier, exactly), and
// then repairs at once instead of waiting for a LINK_DEAD that may have come and gone while nobody
// listened: every connection slot is offered a fresh socket (RECONFIGURE fills dead slots only).

import { type Target, describeEndpoint } from '../address.ts';
import { negotiate } from '../client/negotiate.ts';
import { NbdError } from '../errors.ts';
import { display } from '../text.ts';
import { deviceState, resolveDevice } from '../kernel/device.ts';
import { NetlinkKernelOps } from './kernel-ops.ts';
import { remoteSource } from './source.ts';
import type { Reporter } from './reporter.ts';
import type { SupervisedAttachOptions } from './spec.ts';
import { DEFAULT_DEAD_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S } from './policy.ts';
import { type SupervisorState, readState, supervisorAlive } from './state.ts';
import { inheritedLock, lockDevice } from './lock.ts';
import type { Handoff } from './handoff.ts';
import { EarlySubscription, type ServiceNotifier, supervise } from './resident.ts';

export async function adopt(
  deviceArg: string,
  given: { target: Target; exportName: string } | undefined,
  opts: SupervisedAttachOptions,
  rep: Reporter,
  how: { mode: 'foreground' | 'background'; reconnectTimeout: number; notifier?: ServiceNotifier },
  /** From the attach command that started this supervisor beside it (src/supervisor/handoff.ts). */
  handoff?: Handoff,
): Promise<number> {
  const op = handoff ? 'supervise' : 'reattach';
  const dev = resolveDevice(deviceArg, undefined, op);
  const st = deviceState(dev.index);
  if (st.pid === undefined) throw new NbdError('NBD_E_DEVICE_NOT_ATTACHED', `${op}: ${dev.path} is not attached: attach it with 'nbd-attach HOST ${dev.path}'`);
  if (st.backend === undefined) throw new NbdError('NBD_E_DEVICE_NO_BACKEND', `${op}: ${dev.path} has no backend identifier (set up with ioctl, or by another tool): it cannot be reconfigured; detach and attach it again`);
  let saved = readState(dev.index);
  if (saved && saved.identifier !== st.backend) saved = undefined; // left over from an earlier attach
  if (saved?.local) {
    throw new NbdError('NBD_E_USAGE', `${op}: ${dev.path} was served by its own supervisor (${saved.server}), and that server is gone with it: detach it (nbd-attach -d ${dev.path}) and attach it again`);
  }
  if (handoff && !saved) throw new NbdError('NBD_E_FAILURE', `${op}: the attach command left no state for ${dev.path}: detach it and attach it again`);
  // Handed over: the state's pid is the attach command's, and the lock (inherited) is what counts.
  if (!handoff && saved && saved.pid !== process.pid && supervisorAlive(saved)) {
    throw new NbdError('NBD_E_DEVICE_SUPERVISED', `${op}: ${dev.path} is already supervised by pid ${saved.pid}: nothing to do`);
  }
  if (saved?.tls !== undefined && given !== undefined && given.target.tls === false) {
    throw new NbdError('NBD_E_USAGE', `${op}: ${dev.path} was attached over TLS: adopting it over plain text would downgrade it; give the same TLS options (or no server: the saved TLS settings are used)`);
  }
  const target: Target | undefined = given?.target ?? (saved?.endpoint ? { endpoint: saved.endpoint, tls: saved.tls ?? false } : undefined);
  const exportName = given?.exportName ?? saved?.export;
  if (!target || exportName === undefined) {
    throw new NbdError('NBD_E_USAGE', `${op}: no record of ${dev.path}'s server (no state file): give it: nbd-attach --reattach ${dev.path} HOST[:PORT] [-N EXPORT]`);
  }
  // One supervisor per device: whoever holds the lock wins; everyone else stops here, having changed nothing.
  if (handoff) inheritedLock(handoff.lockFd, dev.index, dev.path);
  else lockDevice(dev.index, dev.path, op);
  // Checked again under the lock: the device must still carry the identifier everything above read.
  if (deviceState(dev.index).backend !== st.backend) throw new NbdError('NBD_E_DEVICE_BUSY', `${op}: ${dev.path} changed while adopting it: try again`);

  const noOptGo = saved?.noOptGo ?? opts.optgo === false;
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
  const name = exportName === '' ? '(default)' : `'${display(exportName)}'`;
  const tls = target.tls !== false;
  // The TLS relay: the kernel's sockets were relayed by the previous supervisor and died with it:
  // replace them all (also for state files from before kernel TLS: no tlsPath). Kernel TLS sockets live on.
  const relayed = tls && saved?.tlsPath !== 'kernel';
  if (handoff) {
    return supervise(
      base,
      ops,
      {
        source: remoteSource(target, exportName, noOptGo),
        reconnectTimeout: how.reconnectTimeout,
        keptFds: handoff.keptFds,
        checkKept: true,
        log: { fd: handoff.logFd, file: handoff.logFile },
        ...(how.notifier ? { notifier: how.notifier } : {}),
      },
      rep,
      how.mode,
      `${dev.path} supervised: attached by pid ${saved?.pid} to server ${base.server}, export ${name}, connections ${connections}`,
    );
  }
  return supervise(
    base,
    ops,
    {
      source: remoteSource(target, exportName, noOptGo),
      reconnectTimeout: how.reconnectTimeout,
      replaceAll: relayed ? 'tls' : 'adopted',
      ...(how.notifier ? { notifier: how.notifier } : {}),
    },
    rep,
    how.mode,
    `${dev.path} adopted: server ${base.server}, export ${name}${tls ? ` over TLS (${relayed ? 'relay' : 'kernel TLS'})` : ''}, connections ${connections}`,
  );
}
