// nbd-client -c: is a device attached? Sysfs only (no netlink, no ioctl, no privilege): apart from
// src/kernel/attach.ts so that `nbd-attach check` loads nothing else.

import { type Roots, DEFAULT_ROOTS, deviceState, moduleInfo, moduleMissingError, parseDeviceName, resolveDevice } from './device.ts';

export interface CheckResult {
  index: number;
  device: string;
  /** Thread id from /sys/block/nbdN/pid when attached. */
  pid?: number;
  backend?: string;
  sizeBytes: bigint;
}

/** nbd-client -c: attached when sysfs has a pid. Needs no privilege. */
export function check(device: string, roots: Roots = DEFAULT_ROOTS): CheckResult {
  const op = 'check';
  if (!moduleInfo(roots).loaded) {
    // No module: nothing is attached. A path that is not nbdN is still examined (and refused if not nbd).
    const byName = parseDeviceName(device);
    if (byName !== undefined) return { index: byName, device, sizeBytes: 0n };
    resolveDevice(device, roots, op);
    throw moduleMissingError(op);
  }
  const dev = resolveDevice(device, roots, op);
  const st = deviceState(dev.index, roots);
  const r: CheckResult = { index: dev.index, device: dev.path, sizeBytes: st.sizeBytes };
  if (st.pid !== undefined) r.pid = st.pid;
  if (st.backend !== undefined) r.backend = st.backend;
  return r;
}
