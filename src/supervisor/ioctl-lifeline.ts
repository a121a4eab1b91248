// -L/--ioctl: the device lives through NBD_DO_IT, which blocks a (signal-free) thread of this
// process for the device's whole life (src/kernel/doit-worker.ts); when the process ends, so does
// the device. Like nbd-client -nonetlink, the command returns once the device is usable and this
// lifeline stays in the background (-n keeps it in the foreground). When the link dies it
// reconnects with backoff; the kernel cannot hold I/O in ioctl mode, so requests issued meanwhile
// fail with EIO (netlink keeps them waiting: docs/decisions.md).
//
// Stop signals: exiting would take the disk away, so while the device is in use the lifeline keeps
// running and says why; when nothing uses it, it disconnects cleanly.

import { NbdError } from '../errors.ts';
import { display, oneLine } from '../text.ts';
import { attach, ioctlDisconnect, preflight } from '../kernel/attach.ts';
import { describeUser, deviceUsers } from '../kernel/users.ts';
import { resolveDevice } from '../kernel/device.ts';
import { formatByteCount } from '../server/size.ts';
import { type ConnectionSource, tlsSummary } from './source.ts';
import type { Reporter } from './reporter.ts';
import type { SupervisedAttachOptions } from './spec.ts';
import { RECONNECT_ATTEMPT_TIMEOUT_MS, backoffDelay } from './policy.ts';
import { takeDetachRequested } from './state.ts';
import { lockDevice } from './lock.ts';
import { type ServiceNotifier, openResidentLog, residentProcessSetup } from './resident.ts';
import { createNotifier } from '../systemd/notify.ts';

type DoItEnd = { ret: number; message?: string };

export async function ioctlLifeline(
  source: ConnectionSource,
  device: string | undefined,
  opts: SupervisedAttachOptions,
  rep: Reporter,
  how: { mode: 'foreground' | 'background'; notifier?: ServiceNotifier },
): Promise<number> {
  const useIoctl = true;
  if ((opts.connections ?? 1) > 1) throw new NbdError('NBD_E_USAGE', 'attach: -C/--connections needs netlink; drop -L/--ioctl');
  await preflight({ device, useIoctl });
  // A named device is locked before the kernel is touched (a refusal changes nothing).
  const named = device !== undefined ? resolveDevice(device, undefined, 'attach') : undefined;
  const early = named ? lockDevice(named.index, named.path, 'attach') : undefined;
  let conn;
  let r;
  try {
    conn = await source.connect(opts.connectTimeout);
    r = await attach({
      connections: [conn],
      device,
      blockSize: opts.blockSize,
      readOnly: opts.readOnly === true,
      timeout: opts.timeout,
      identifier: opts.identifier,
      useIoctl,
      notice: rep.note,
    });
  } catch (e) {
    early?.release();
    throw e;
  }
  const name = source.endpoint === undefined ? oneLine(source.server) : `export ${conn.info.name === '' ? '(default)' : `'${display(conn.info.name)}'`}${tlsSummary(source)}`;
  const summary = `${r.device} attached: ${formatByteCount(r.sizeBytes)} (${r.sizeBytes} bytes), ${name}, block size ${r.blockSize}${r.readOnly ? ', read-only' : ''}, ${r.interface}`;
  if (!r.done) {
    rep.ready(summary);
    return 0;
  }
  if (!early) {
    try {
      lockDevice(r.index, r.device, 'attach');
    } catch (e) {
      ioctlDisconnect(r.device); // nothing left half done
      throw e;
    }
  }
  const { sink, where } = openResidentLog(r.index, how.mode);
  const log = (m: string): void => sink.write(m);
  const notifier: ServiceNotifier = how.notifier ?? (await createNotifier({ log }));
  residentProcessSetup({ swap: opts.swap, systemdMark: opts.systemdMark, device: r.device }, log);
  takeDetachRequested(r.index); // a marker left by an earlier detach of this device is not for us
  let stopping = false;
  const selfPids = new Set([process.pid]);
  const onSignal = (sig: NodeJS.Signals): void => {
    if (stopping) return;
    const users = deviceUsers(r.index, r.device, { selfPids }).map(describeUser);
    if (users.length > 0) {
      log(`${sig}: ${r.device} is in use (${users.join('; ')}) and lives in this process (ioctl): not stopping; unmount it or stop its user, then nbd-attach -d ${r.device}`);
      return;
    }
    stopping = true;
    notifier.stopping(`${r.device}: ${sig}, disconnecting`);
    log(`${sig}: ${r.device} is not in use: disconnecting it`);
    try {
      ioctlDisconnect(r.device);
    } catch (e) {
      log(`disconnect ${r.device} failed: ${(e as Error).message}`);
    }
  };
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(s, onSignal);
  log(`${summary}; holding it (pid ${process.pid}); reconnects when the link dies`);
  rep.ready(`${summary}, supervisor pid ${process.pid}, ${where}`);
  notifier.ready(`${r.device}: ${source.server}, ioctl`);
  try {
    let done: Promise<DoItEnd> = r.done;
    for (;;) {
      const end = await done;
      // DO_IT returns 0 both after a DISCONNECT and when the connection died: `nbd-attach -d` leaves a
      // marker (takeDetachRequested), a signal sets `stopping`. Otherwise the link died: reconnect.
      if (stopping || takeDetachRequested(r.index)) {
        if (end.ret < 0 && end.message) log(`${r.device}: ${end.message}`);
        break;
      }
      log(`${r.device}: the connection died${end.message ? ` (${end.message})` : ''}: reconnecting (ioctl mode: I/O fails until then)`);
      notifier.status(`${r.device}: reconnecting`);
      const again = await reconnect(source, r.device, opts, log, () => stopping);
      if (!again) break;
      log(`${r.device} reconnected`);
      notifier.status(`${r.device}: ${source.server}, ioctl`);
      done = again.done;
    }
  } finally {
    for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.off(s, onSignal);
  }
  log(`${r.device} disconnected`);
  notifier.stopping(`${r.device}: disconnected`);
  await notifier.flush();
  notifier.close();
  await sink.close();
  return 0;
}

/** Negotiate and hand a new connection to the same device with the ioctls, retrying with backoff. */
async function reconnect(
  source: ConnectionSource,
  device: string,
  opts: SupervisedAttachOptions,
  log: (m: string) => void,
  stopping: () => boolean,
): Promise<{ done: Promise<DoItEnd> } | undefined> {
  for (let attempt = 0; !stopping(); attempt++) {
    try {
      const conn = await source.connect(Math.min(opts.connectTimeout, RECONNECT_ATTEMPT_TIMEOUT_MS));
      const r = await attach({ connections: [conn], device, blockSize: opts.blockSize, readOnly: opts.readOnly === true, timeout: opts.timeout, useIoctl: true, notice: log });
      if (!r.done) throw new Error('the kernel did not start NBD_DO_IT');
      return { done: r.done }; // wrapped: an async function would otherwise wait for DO_IT to end
    } catch (e) {
      if (attempt % 10 === 0) log(`${device}: reconnect failed: ${(e as Error).message}`);
      await new Promise((res) => setTimeout(res, backoffDelay(attempt, Math.random())));
    }
  }
  return undefined;
}
