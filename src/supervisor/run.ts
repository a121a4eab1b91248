// The entry of an attach that stays resident: netlink with a supervisor (src/supervisor/attach-new.ts,
// adopt.ts, resident.ts) or -L's ioctl lifeline (ioctl-lifeline.ts). Three ways to run it:
// - background (default): the command starts itself detached (launcher.ts) and returns once the
//   device is usable, with the resident process's report;
// - the background process itself (--supervisor-child): reports over the pipe (reporter.ts);
// - foreground (-n/--foreground, systemd's Type=notify): everything in this process, log on stderr.

import createDebug from '../debug.ts';
import { NbdError, exitCodeOf } from '../errors.ts';
import { mark } from '../timing.ts';
import { type ConnectionSource, localSource, remoteSource } from './source.ts';
import { RECONNECT_ATTEMPT_TIMEOUT_MS } from './policy.ts';
import { type Reporter, consoleReporter, pipeReporter } from './reporter.ts';
import { launchBackground } from './launcher.ts';
import type { AttachSpec, SupervisedAttachOptions } from './spec.ts';
import { attachNew } from './attach-new.ts';
import { adopt } from './adopt.ts';
import { ioctlLifeline } from './ioctl-lifeline.ts';
import type { ServiceNotifier } from './resident.ts';
import { HANDOFF_ENV, handoffFailed, parseHandoff } from './handoff.ts';
import { deviceState, parseDeviceName } from '../kernel/device.ts';

export type { AttachSpec, SupervisedAttachOptions } from './spec.ts';

const debug = createDebug('nbd:supervisor');

export async function runSupervisedAttach(spec: AttachSpec, opts: SupervisedAttachOptions, notifier?: ServiceNotifier): Promise<void> {
  mark('loaded');
  if (opts.supervisorChild) {
    const handoff = parseHandoff(process.env[HANDOFF_ENV]);
    delete process.env[HANDOFF_ENV];
    if (handoff) {
      // Started beside the attach command, which has already returned: nobody to report to but the log.
      const quiet: Reporter = { note: () => undefined, ready: () => undefined };
      const reconnectTimeout = Math.min(opts.connectTimeout ?? 10_000, RECONNECT_ATTEMPT_TIMEOUT_MS);
      let code: number;
      try {
        code = await adopt(handoff.device, undefined, opts, quiet, { mode: 'background', reconnectTimeout }, handoff);
      } catch (e) {
        debug('supervisor failed: %O', e);
        handoffFailed(handoff, e);
        code = exitCodeOf(e);
      }
      process.exit(code);
    }
    const rep = pipeReporter();
    let code: number;
    try {
      code = await attachAndStay(spec, opts, rep, 'background', notifier);
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
    process.exitCode = await attachAndStay(spec, opts, consoleReporter(), 'foreground', notifier);
    return;
  }
  if (handsOff(spec, opts)) {
    // Attach here and start the supervisor beside us: one Node start on the way to a usable device.
    process.exitCode = await attachAndStay(spec, opts, consoleReporter(), 'handoff', notifier);
    return;
  }
  await launchBackground((opts.connectTimeout ?? 10_000) * Math.max(1, opts.connections ?? 1) + 60_000);
}

/**
 * Attach and stay resident in this process, reporting to `rep`, logging to a file as a background
 * supervisor does (nbdN.log under the log directory): the initramfs's single process
 * (src/commands/boot.ts), started in the background of the boot script. Throws when the attach fails;
 * returns the exit code once supervising ends.
 */
export async function runResident(spec: AttachSpec, opts: SupervisedAttachOptions, rep: Reporter): Promise<number> {
  mark('loaded');
  return attachAndStay(spec, opts, rep, 'background', undefined);
}

/**
 * Whether the command can attach by itself and hand the device to a supervisor started beside it.
 * Not when the resident process must also carry the data path: local attach (the server), TLS (the
 * relay), -L (NBD_DO_IT); not for adoption (nothing to attach).
 */
function handsOff(spec: AttachSpec, opts: SupervisedAttachOptions): boolean {
  if (spec.kind !== 'remote' || spec.target.tls !== false || opts.ioctl === true) return false;
  // A named device that is attached already: an adoption (or a refusal), which the launcher runs.
  const index = spec.device !== undefined ? parseDeviceName(spec.device) : undefined;
  return index === undefined || deviceState(index).pid === undefined;
}

/** Where the connections come from; a local source opens the image (or allocates memory) now. */
async function openSource(spec: Exclude<AttachSpec, { kind: 'reattach' }>, opts: SupervisedAttachOptions): Promise<ConnectionSource> {
  if (spec.kind === 'local') return localSource({ file: spec.file, memory: spec.memory, readOnly: opts.readOnly === true });
  return remoteSource(spec.target, spec.exportName, opts.optgo === false);
}

async function attachAndStay(
  spec: AttachSpec,
  opts: SupervisedAttachOptions,
  rep: Reporter,
  mode: 'foreground' | 'background' | 'handoff',
  notifier: ServiceNotifier | undefined,
): Promise<number> {
  const reconnectTimeout = Math.min(opts.connectTimeout ?? 10_000, RECONNECT_ATTEMPT_TIMEOUT_MS);
  const resident = mode === 'handoff' ? 'foreground' : mode;
  const how = { mode: resident, reconnectTimeout, ...(notifier ? { notifier } : {}) };
  if (spec.kind === 'reattach') {
    if (opts.ioctl) throw new NbdError('NBD_E_USAGE', '--reattach adopts a netlink device: drop -L/--ioctl');
    return adopt(spec.device, spec.given, opts, rep, how);
  }
  const source = await openSource(spec, opts);
  try {
    if (opts.ioctl) return await ioctlLifeline(source, spec.device, opts, rep, how);
    return await attachNew(source, spec.device, spec.kind === 'remote' ? spec.target : undefined, opts, rep, { ...how, mode });
  } finally {
    await source.close();
  }
}
