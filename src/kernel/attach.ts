// Handing negotiated sockets to the kernel nbd driver, and the other kernel-side operations
// (detach, check). Netlink first (include/uapi/linux/nbd-netlink.h NBD_CMD_CONNECT: the device then
// lives on without us); the ioctl interface with -L/--ioctl or when the kernel has no "nbd" netlink
// family (then DO_IT blocks a thread for the device's life: see doit-worker.ts).
//
// Handoff without losing a byte: the socket is paused with nothing buffered in either direction; we
// dup() its fd, destroy() the Node socket (close, never end(): no FIN while the dup keeps the file
// open), give the dup to the kernel, and close the dup once the kernel holds its own reference.

import fs from 'node:fs';
import type net from 'node:net';
import { randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import type { Worker } from 'node:worker_threads';
import createDebug from '../debug.ts';
import { NbdError } from '../errors.ts';
import { mark } from '../timing.ts';
import { TransmissionFlag } from '../protocol/constants.ts';
import type { Connection } from '../client/negotiate.ts';
import * as libc from '../../native-bindings/libc.ts';
import { GenlSocket, NetlinkError, NetlinkTimeoutError } from '../../native-bindings/netlink.ts';
import { BLKROSET, NBD_GENL_FAMILY_NAME, NbdIoctl } from './constants.ts';
import { type GenlMessage, encodeConnect, encodeDisconnect, parseIndex } from './netlink-codec.ts';
import { chooseBlockSize } from './blocksize.ts';
import { type QueueLimitsPlan, applyQueueLimits, planQueueLimits } from './queue-limits.ts';
import {
  type DeviceRef,
  type Roots,
  DEFAULT_ROOTS,
  deviceState,
  listDevices,
  moduleInfo,
  moduleMissingError,
  parseDeviceName,
  requireAdmin,
  resolveDevice,
} from './device.ts';
import type { DoItMessage, DoItRequest } from './doit-worker.ts';
import { type DeviceUser, describeUser, deviceUsers } from './users.ts';

const debug = createDebug('nbd:kernel');

export type KernelInterface = 'netlink' | 'ioctl';

export interface AttachOptions {
  /** Negotiated connections (one, or several when the export allows multi-conn). */
  connections: readonly Pick<Connection, 'socket' | 'info'>[];
  /** /dev/nbdN, nbdN or a major-43 node; omitted: the kernel (netlink) or we (ioctl) pick a free one. */
  device?: string | undefined;
  /** -b */
  blockSize?: number | 'preferred' | undefined;
  /** -R */
  readOnly: boolean;
  /** -t: request timeout in seconds (0/undefined: none). */
  timeout?: number | undefined;
  /** -i: backend identifier (netlink); random when not given. */
  identifier?: string | undefined;
  /** -L */
  useIoctl: boolean;
  /** Netlink DEAD_CONN_TIMEOUT seconds (later supervisor issue); omitted: not sent. */
  deadConnTimeout?: number | undefined;
  /** One-line notices for stderr (fallbacks, block-size explanations). */
  notice?: ((message: string) => void) | undefined;
  /** Bound on waiting for the device to become usable. */
  readyTimeoutMs?: number | undefined;
  /** Keep a duplicate of each socket given to the kernel (AttachResult.keptFds), e.g. to shut it down. */
  keepFds?: boolean | undefined;
  roots?: Roots | undefined;
}

export interface AttachResult {
  index: number;
  device: string;
  interface: KernelInterface;
  blockSize: number;
  sizeBytes: bigint;
  readOnly: boolean;
  /** Backend identifier given to the kernel (netlink only). */
  identifier?: string;
  /** ioctl only: settles when NBD_DO_IT returns (the device was disconnected). */
  done?: Promise<{ ret: number; message?: string }>;
  /** The server's limits as applied to the request queue (queue-limits.ts). */
  limits: QueueLimitsPlan;
  /** keepFds: duplicates of the sockets the kernel holds, ours to shut down (netlink only). */
  keptFds?: number[];
}

const DEFAULT_READY_TIMEOUT_MS = 10_000;
const NETLINK_TIMEOUT_MS = 10_000;

// ---------------------------------------------------------------------------------------------
// Socket handoff

interface HandleWithFd {
  fd?: number;
}

/** Take the fd out of a negotiated socket: dup it, check nothing is buffered, destroy the Node socket. */
export function takeSocketFd(socket: net.Socket): number {
  const handle = (socket as unknown as { _handle?: HandleWithFd | null })._handle;
  const fd = handle?.fd;
  if (socket.destroyed || typeof fd !== 'number' || fd < 0) {
    throw new NbdError('NBD_E_KERNEL_HANDOFF', 'attach: the server connection closed before it could be handed to the kernel: try again');
  }
  if (socket.readableLength !== 0 || socket.writableLength !== 0) {
    throw new NbdError(
      'NBD_E_KERNEL_HANDOFF',
      `attach: ${socket.readableLength} unread and ${socket.writableLength} unsent bytes on the connection after the handshake: refusing to hand a desynchronised socket to the kernel`,
    );
  }
  const dupFd = libc.dup(fd);
  // Close our copy without shutdown(): destroy() closes the fd; the dup keeps the connection open.
  socket.destroy();
  debug('socket fd %d duplicated as %d, Node socket destroyed', fd, dupFd);
  return dupFd;
}

function closeQuietly(fd: number): void {
  try {
    libc.close(fd);
  } catch {
    /* already closed */
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers

function notAttachable(op: string, dev: DeviceRef, roots: Roots): void {
  const st = deviceState(dev.index, roots);
  if (st.pid !== undefined) {
    throw new NbdError('NBD_E_DEVICE_ATTACHED', `${op}: ${dev.path} is already attached (pid ${st.pid}): detach it first with 'nbd-attach -d ${dev.path}'`);
  }
}

/** What uses a device that is not (yet) ours, without opening it (an open would make CONNECT fail). */
function busyReasons(index: number, roots: Roots): string[] {
  return deviceUsers(index, `/dev/nbd${index}`, { roots, probeClaim: false }).map(describeUser);
}

function busyError(op: string, dev: { index: number; path: string }, roots: Roots, detail?: string): NbdError {
  const reasons = busyReasons(dev.index, roots);
  const why = reasons.length ? reasons.join(', ') : 'something has it open or is setting it up';
  return new NbdError('NBD_E_DEVICE_BUSY', `${op}: ${dev.path} is busy (${why})${detail ? `: ${detail}` : ''}: free it or pick another device`);
}

/** Map a kernel refusal to an error a person can act on. */
function kernelError(op: string, e: unknown, dev: { index: number; path: string } | undefined, roots: Roots, context: string): NbdError {
  const errno = e instanceof NetlinkError || e instanceof libc.SyscallError ? e.code : undefined;
  const raw = e instanceof Error ? e.message : String(e);
  if (errno === 'EPERM' || errno === 'EACCES') return new NbdError('NBD_E_PERMISSION', `${op}: needs root or CAP_SYS_ADMIN (${raw})`, { cause: e });
  if (errno === 'EBUSY' && dev) return busyError(op, dev, roots, raw);
  if (errno === 'EBUSY') return new NbdError('NBD_E_DEVICE_BUSY', `${op}: the kernel says the device is busy (${raw}): pick another device`, { cause: e });
  if (errno === 'EINVAL') return new NbdError('NBD_E_KERNEL_INVALID', `${op}: the kernel refused the configuration (${context}): ${raw}; see dmesg`, { cause: e });
  if (e instanceof NetlinkTimeoutError) return new NbdError('NBD_E_KERNEL_TIMEOUT', `${op}: ${raw}`, { cause: e });
  return new NbdError('NBD_E_KERNEL', `${op}: ${raw}`, { cause: e });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Wait, bounded, until sysfs shows the device started: `pid` present and `size` set. */
export async function waitUsable(index: number, timeoutMs: number, roots: Roots = DEFAULT_ROOTS, expectBytes?: bigint): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (let i = 0; i < 10_000; i++) {
    const st = deviceState(index, roots);
    const sized = expectBytes === undefined ? st.sizeBytes > 0n : st.sizeBytes === expectBytes - (expectBytes % 512n);
    if (st.pid !== undefined && sized) return true;
    if (Date.now() >= deadline) return false;
    await sleep(i < 20 ? 5 : 25);
  }
  return false;
}

/** Resolve the "nbd" family; undefined when the kernel has none (ENOENT): module missing or too old. */
async function nbdFamily(sock: GenlSocket): Promise<number | undefined> {
  try {
    return (await sock.resolveFamily(NBD_GENL_FAMILY_NAME, NETLINK_TIMEOUT_MS)).id;
  } catch (e) {
    if (e instanceof NetlinkError && e.code === 'ENOENT') return undefined;
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// attach

export async function attach(opts: AttachOptions): Promise<AttachResult> {
  const roots = opts.roots ?? DEFAULT_ROOTS;
  const notice = opts.notice ?? ((): void => {});
  const op = 'attach';
  if (opts.connections.length === 0) throw new NbdError('NBD_E_USAGE', 'attach: no connection to hand to the kernel');
  const info = opts.connections[0]!.info;
  const fail = (e: unknown): never => {
    for (const c of opts.connections) c.socket.destroy();
    throw e;
  };

  // Everything that can be refused is checked before the sockets are touched.
  let dev: DeviceRef | undefined;
  let family: number | undefined;
  let nl: GenlSocket | undefined;
  let iface: KernelInterface = opts.useIoctl ? 'ioctl' : 'netlink';
  let blockSize: number;
  let limits: QueueLimitsPlan;
  const readOnly = opts.readOnly || (info.flags & TransmissionFlag.READ_ONLY) !== 0;
  try {
    requireAdmin(op, roots);
    if (opts.connections.length > 1 && !(info.flags & TransmissionFlag.CAN_MULTI_CONN)) {
      throw new NbdError('NBD_E_USAGE', `attach: the server does not allow several connections to this export (no CAN_MULTI_CONN): use one connection`);
    }
    if (iface === 'netlink') {
      nl = new GenlSocket();
      family = await nbdFamily(nl); // on 6.12+ this also auto-loads the module
      if (family === undefined) {
        nl.close();
        nl = undefined;
        if (!moduleInfo(roots).loaded) throw moduleMissingError(op);
        iface = 'ioctl';
        notice(`the kernel has no '${NBD_GENL_FAMILY_NAME}' netlink family (kernel older than 4.12?): falling back to the ioctl interface, which keeps this process in the foreground`);
      }
    } else if (!moduleInfo(roots).loaded) {
      throw moduleMissingError(op);
    }
    if (opts.device !== undefined) {
      dev = resolveDevice(opts.device, roots, op);
      notAttachable(op, dev, roots);
      if (busyReasons(dev.index, roots).length > 0 && iface === 'ioctl') throw busyError(op, dev, roots);
    }
    const page = libc.getpagesize();
    const choice = chooseBlockSize({ size: info.size, server: info.blockSize, requested: opts.blockSize, pageSize: page });
    blockSize = choice.blockSize;
    if (choice.note) notice(choice.note);
    limits = planQueueLimits({ blockSize, server: info.blockSize, flags: info.flags, pageSize: page });
    if (iface === 'ioctl' && dev === undefined) dev = pickFreeDevice(roots);
    if (iface === 'ioctl' && !fs.existsSync(dev!.path)) {
      throw new NbdError('NBD_E_DEVICE_MISSING', `attach: ${dev!.path} does not exist (no udev?): create the nodes with 'nbd-attach mknod'`);
    }
  } catch (e) {
    nl?.close();
    return fail(e);
  }

  // From here the sockets belong to us as fds.
  const fds: number[] = [];
  try {
    for (const c of opts.connections) fds.push(takeSocketFd(c.socket));
  } catch (e) {
    fds.forEach(closeQuietly);
    nl?.close();
    return fail(e);
  }

  const readyTimeout = opts.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS;
  if (iface === 'netlink') {
    // A writable attach must not inherit the device's own read-only flag (BLKROSET) from an earlier
    // -R -L attach or `blockdev --setro`: it outlives disconnects. Cleared now, while the device is
    // not connected (opening it does no I/O); an auto-picked device is cleared when it is opened below.
    if (dev && !readOnly) clearReadOnlyFlag(dev.path);
    const identifier = opts.identifier ?? randomUUID();
    let serverFlags = readOnly ? info.flags | TransmissionFlag.READ_ONLY : info.flags;
    if (limits.maskWriteZeroes) serverFlags &= ~TransmissionFlag.SEND_WRITE_ZEROES;
    // A device named in advance gets its request size limit before it is connected, so not even the
    // first read (udev's probe, the partition scan) exceeds the server's maximum.
    if (dev && limits.bounded) {
      try {
        applyQueueLimits(dev.index, limits, { roots, discard: false });
      } catch (e) {
        fds.forEach(closeQuietly);
        nl!.close();
        throw e;
      }
    }
    const kept: number[] = [];
    const context = `size ${info.size}, block size ${blockSize}, ${fds.length} socket(s)`;
    let index: number | undefined;
    try {
      // EBUSY with nothing visible holding the device is usually a passing udev/blkid probe: retry, bounded.
      const connect = async (): Promise<GenlMessage[]> => {
        for (let attempt = 1; ; attempt++) {
          try {
            return await connectOnce();
          } catch (e) {
            const transient = e instanceof NetlinkError && e.code === 'EBUSY' && dev !== undefined && busyReasons(dev.index, roots).length === 0;
            if (!transient || attempt >= 5) throw e;
            debug('CONNECT: EBUSY with no visible holder, retry %d', attempt);
            await sleep(100 * attempt);
          }
        }
      };
      const connectOnce = (): Promise<GenlMessage[]> => nl!.request(
        'netlink NBD_CMD_CONNECT',
        (seq) =>
          encodeConnect({
            family: family!,
            seq,
            ...(dev ? { index: dev.index } : {}),
            sizeBytes: info.size,
            blockSize,
            timeout: opts.timeout ?? 0,
            serverFlags,
            ...(opts.deadConnTimeout ? { deadConnTimeout: opts.deadConnTimeout } : {}),
            backend: identifier,
            fds,
          }),
        NETLINK_TIMEOUT_MS,
      );
      const replies = await connect();
      index = replies.map(parseIndex).find((i) => i !== undefined) ?? dev?.index;
      if (index === undefined) throw new NbdError('NBD_E_KERNEL', 'attach: the kernel accepted NBD_CMD_CONNECT but did not say which device it used');
    } catch (e) {
      nl!.close();
      throw e instanceof NbdError ? e : kernelError(op, e, dev, roots, context);
    } finally {
      // The kernel took its own references during CONNECT; keepFds keeps ours on success.
      if (opts.keepFds && index !== undefined) kept.push(...fds);
      else fds.forEach(closeQuietly);
    }
    const device = dev && dev.index === index ? dev.path : `/dev/nbd${index}`;
    try {
      applyQueueLimits(index, limits, { roots });
    } catch (e) {
      kept.forEach(closeQuietly);
      await netlinkDisconnect(nl!, family!, index).catch(() => {});
      nl!.close();
      throw e;
    }
    mark('kernel CONNECT');
    const ok = await waitUsable(index, readyTimeout, roots);
    mark('device ready');
    if (!ok) {
      kept.forEach(closeQuietly);
      await netlinkDisconnect(nl!, family!, index).catch(() => {});
      nl!.close();
      throw new NbdError('NBD_E_KERNEL_TIMEOUT', `attach: ${device} did not become ready within ${readyTimeout} ms (no pid/size in /sys/block/nbd${index}): disconnected it again; see dmesg`);
    }
    nl!.close();
    await scanPartitions(device, dev === undefined && !readOnly);
    debug('attached %s via netlink', device);
    return { index, device, interface: 'netlink', blockSize, sizeBytes: info.size, readOnly, identifier, limits, ...(opts.keepFds ? { keptFds: kept } : {}) };
  }

  // ioctl: one Worker thread does every ioctl and then blocks in DO_IT.
  if (opts.identifier !== undefined) notice('-i/--identifier is ignored with the ioctl interface (it cannot set a backend identifier)');
  if (opts.deadConnTimeout) notice('the dead-connection timeout is ignored with the ioctl interface');
  if (fds.length > 1) notice(`the ioctl interface is used with one connection; ${fds.length - 1} more closed`);
  return ioctlAttach({ dev: dev!, fd: fds[0]!, extraFds: fds.slice(1), blockSize, info, readOnly, timeout: opts.timeout ?? 0, readyTimeout, roots, limits });
}

/** How long attach waits for the partition scan before returning anyway. */
const PARTITION_SCAN_WAIT_MS = 10_000;

/** BLKROSET 0 on the device node (best effort: a failure only leaves it as it was). */
function clearReadOnlyFlag(devicePath: string, fd?: number): void {
  let own = -1;
  try {
    if (fd === undefined) own = fs.openSync(devicePath, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    libc.ioctl(fd ?? own, BLKROSET, Buffer.alloc(4), 'BLKROSET');
  } catch (e) {
    debug('clearing the read-only flag of %s: %s', devicePath, (e as Error).message);
  } finally {
    if (own >= 0) fs.closeSync(own);
  }
}

/**
 * The kernel reads the partition table of a newly sized nbd device on its next open (nbd_set_size
 * sets GD_NEED_PART_SCAN). With udev something opens it at once; on a machine without udev
 * (diskless boot) nothing does, and /dev/nbd0p1 would not appear. Open it once, read-only, so the
 * partitions exist when attach returns. Asynchronous on purpose: the open reads from the server,
 * which for local attach is this very process. Bounded: a slow server does not hold attach up.
 * `clearReadOnly`: BLKROSET 0 through that open (an auto-picked device is known only now).
 */
async function scanPartitions(devicePath: string, clearReadOnly = false): Promise<void> {
  if (!fs.existsSync(devicePath)) return;
  // Opened off the event loop: the open reads the partition table through the connection, which
  // may be relayed by this very process (TLS, local attach).
  const open = fs.promises.open(devicePath, fs.constants.O_RDONLY).then(
    (fh) => {
      if (clearReadOnly) clearReadOnlyFlag(devicePath, fh.fd);
      return fh.close().then(() => true);
    },
    (e: Error) => {
      debug('partition scan open %s: %s', devicePath, e.message);
      return false;
    },
  );
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<undefined>((r) => (timer = setTimeout(r, PARTITION_SCAN_WAIT_MS, undefined)));
  const done = await Promise.race([open, limit]);
  clearTimeout(timer);
  if (done === undefined) debug('partition scan of %s still running after %d ms', devicePath, PARTITION_SCAN_WAIT_MS);
}

function pickFreeDevice(roots: Roots): DeviceRef {
  for (const index of listDevices(roots)) {
    const st = deviceState(index, roots);
    if (st.pid !== undefined || st.sizeBytes > 0n) continue;
    if (busyReasons(index, roots).length > 0) continue;
    return { index, path: `${roots.dev}/nbd${index}` };
  }
  throw new NbdError('NBD_E_DEVICE_NONE_FREE', 'attach: every nbd device is in use: detach one, or load the module with more (modprobe nbd nbds_max=32)');
}

function startWorker(req: DoItRequest): Worker {
  // node:worker_threads loads here, for -L (or a kernel without netlink) only, not at every detach.
  const { Worker } = createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');
  // Built (scripts/build.mjs), this module is in dist/nbd-attach-cli.cjs and the worker's own
  // entry, doit-worker.mjs, sits beside it.
  if (!import.meta.url.endsWith('.ts')) return new Worker(new URL('./doit-worker.mjs', import.meta.url), { workerData: req });
  // Workers do not inherit tsx's loader hooks: register them in the worker, then load the TS entry.
  const api = import.meta.resolve('tsx/esm/api');
  const entry = new URL('./doit-worker.ts', import.meta.url).href;
  const code = `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`;
  return new Worker(code, { eval: true, workerData: req });
}

async function ioctlAttach(a: {
  dev: DeviceRef;
  fd: number;
  extraFds: number[];
  blockSize: number;
  info: Connection['info'];
  readOnly: boolean;
  timeout: number;
  readyTimeout: number;
  roots: Roots;
  limits: QueueLimitsPlan;
}): Promise<AttachResult> {
  const op = 'attach';
  if (a.limits.bounded) {
    try {
      applyQueueLimits(a.dev.index, a.limits, { roots: a.roots, discard: false });
    } catch (e) {
      closeQuietly(a.fd);
      a.extraFds.forEach(closeQuietly);
      throw e;
    }
  }
  a.extraFds.forEach(closeQuietly); // the ioctl path uses one connection (multi-conn needs netlink)
  const req: DoItRequest = {
    devicePath: a.dev.path,
    sockFd: a.fd,
    blockSize: a.blockSize,
    sizeBytes: a.info.size.toString(),
    serverFlags: a.limits.maskWriteZeroes ? a.info.flags & ~TransmissionFlag.SEND_WRITE_ZEROES : a.info.flags,
    readOnly: a.readOnly,
    timeout: a.timeout,
  };
  const worker = startWorker(req);
  let resolveDone!: (v: { ret: number; message?: string }) => void;
  const done = new Promise<{ ret: number; message?: string }>((r) => (resolveDone = r));
  const started = new Promise<void>((resolve, reject) => {
    worker.on('message', (m: DoItMessage) => {
      if (m.type === 'started') resolve();
      else if (m.type === 'error') {
        reject(
          m.errno !== undefined
            ? kernelError(op, new libc.SyscallError(m.stage, m.errno), a.dev, a.roots, `block size ${a.blockSize}, size ${a.info.size}`)
            : new NbdError('NBD_E_KERNEL', `${op}: ${m.stage}: ${m.message}`),
        );
      } else if (m.type === 'ended') {
        resolveDone(m.message !== undefined ? { ret: m.ret, message: m.message } : { ret: m.ret });
      }
    });
    worker.on('error', (e) => {
      closeQuietly(a.fd);
      reject(new NbdError('NBD_E_KERNEL', `${op}: the ioctl thread failed: ${e.message}`, { cause: e }));
      resolveDone({ ret: -1, message: e.message });
    });
    worker.on('exit', (code) => {
      reject(new NbdError('NBD_E_KERNEL', `${op}: the ioctl thread exited (${code}) before the device started`));
      resolveDone({ ret: -1, message: `ioctl thread exited with ${code}` });
    });
  });
  await started;
  const ok = await waitUsable(a.dev.index, a.readyTimeout, a.roots);
  if (!ok) {
    try {
      ioctlDisconnect(a.dev.path);
    } catch {
      /* best effort */
    }
    await Promise.race([done, sleep(5000)]);
    throw new NbdError('NBD_E_KERNEL_TIMEOUT', `${op}: ${a.dev.path} did not become ready within ${a.readyTimeout} ms: disconnected it again; see dmesg`);
  }
  try {
    applyQueueLimits(a.dev.index, a.limits, { roots: a.roots });
  } catch (e) {
    try {
      ioctlDisconnect(a.dev.path);
    } catch {
      /* best effort */
    }
    await Promise.race([done, sleep(5000)]);
    throw e;
  }
  await scanPartitions(a.dev.path);
  return { index: a.dev.index, device: a.dev.path, interface: 'ioctl', blockSize: a.blockSize, sizeBytes: a.info.size, readOnly: a.readOnly, done, limits: a.limits };
}

// ---------------------------------------------------------------------------------------------
// detach / check

async function netlinkDisconnect(sock: GenlSocket, family: number, index: number): Promise<void> {
  await sock.request('netlink NBD_CMD_DISCONNECT', (seq) => encodeDisconnect({ family, seq, index }), NETLINK_TIMEOUT_MS);
}

/** ioctl DISCONNECT + CLEAR_SOCK on the node (works for netlink-made devices too). */
export function ioctlDisconnect(devicePath: string): void {
  const fd = fs.openSync(devicePath, fs.constants.O_RDWR);
  try {
    libc.ioctl(fd, NbdIoctl.DISCONNECT, 0, 'NBD_DISCONNECT');
    try {
      libc.ioctl(fd, NbdIoctl.CLEAR_SOCK, 0, 'NBD_CLEAR_SOCK');
    } catch (e) {
      // A netlink-configured device refuses CLEAR_SOCK from another task (EBUSY/EINVAL): DISCONNECT was enough.
      debug('CLEAR_SOCK after DISCONNECT: %s', (e as Error).message);
    }
  } finally {
    fs.closeSync(fd);
  }
}

export interface DetachOptions {
  device: string;
  /** Detach even when mounted (the filesystem then sees I/O errors). */
  force?: boolean;
  useIoctl?: boolean;
  notice?: (message: string) => void;
  timeoutMs?: number;
  roots?: Roots;
  /** Called with the device index just before the disconnect is sent. */
  beforeDisconnect?: (index: number) => void;
  /** Processes whose opens of the device do not count as use (the caller itself). */
  selfPids?: ReadonlySet<number>;
}

/** The process (thread group) a thread id belongs to, from /proc/TID/status. */
function threadGroupOf(tid: number, roots: Roots): number | undefined {
  try {
    const m = /^Tgid:\s*(\d+)$/m.exec(fs.readFileSync(`${roots.proc}/${tid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** The refusal of a disconnect that would take a disk from its user. */
export function inUseError(op: string, device: string, users: readonly DeviceUser[]): NbdError {
  return new NbdError(
    'NBD_E_DEVICE_BUSY',
    `${op}: ${device} is in use (${users.map(describeUser).join('; ')}): unmount it, swapoff it or stop its user first (or --force to cut it off anyway)`,
  );
}

export interface DetachResult {
  index: number;
  device: string;
  wasAttached: boolean;
  interface?: KernelInterface;
}

export async function detach(opts: DetachOptions): Promise<DetachResult> {
  const roots = opts.roots ?? DEFAULT_ROOTS;
  const op = 'detach';
  requireAdmin(op, roots);
  if (!moduleInfo(roots).loaded) throw moduleMissingError(op);
  const dev = resolveDevice(opts.device, roots, op);
  const st = deviceState(dev.index, roots);
  if (st.pid === undefined) return { index: dev.index, device: dev.path, wasAttached: false };
  if (!opts.force) {
    // A refusal sends nothing to the kernel: the device keeps serving exactly as before.
    // The process holding NBD_DO_IT (-L) has the device open by design: it is the device's lifeline, not a user.
    const own = new Set([process.pid, ...(opts.selfPids ?? [])]);
    const holder = threadGroupOf(st.pid, roots);
    if (holder !== undefined) own.add(holder);
    const users = deviceUsers(dev.index, dev.path, { roots, selfPids: own });
    if (users.length) throw inUseError(op, dev.path, users);
  }
  opts.beforeDisconnect?.(dev.index);
  let iface: KernelInterface = opts.useIoctl ? 'ioctl' : 'netlink';
  if (iface === 'netlink') {
    const sock = new GenlSocket();
    try {
      const family = await nbdFamily(sock);
      if (family === undefined) {
        iface = 'ioctl';
        opts.notice?.(`the kernel has no '${NBD_GENL_FAMILY_NAME}' netlink family: disconnecting through the ioctl interface`);
      } else {
        await netlinkDisconnect(sock, family, dev.index);
      }
    } catch (e) {
      throw kernelError(op, e, dev, roots, `device ${dev.index}`);
    } finally {
      sock.close();
    }
  }
  if (iface === 'ioctl') {
    if (!fs.existsSync(dev.path)) throw new NbdError('NBD_E_DEVICE_MISSING', `${op}: ${dev.path} does not exist: create it with 'nbd-attach mknod'`);
    try {
      ioctlDisconnect(dev.path);
    } catch (e) {
      throw kernelError(op, e, dev, roots, `device ${dev.index}`);
    }
  }
  // Bounded wait until the kernel has let go (pid disappears once the last opener closes).
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  while (deviceState(dev.index, roots).pid !== undefined) {
    if (Date.now() >= deadline) throw busyError(op, dev, roots, 'disconnect sent, but the device is still held open');
    await sleep(20);
  }
  return { index: dev.index, device: dev.path, wasAttached: true, interface: iface };
}

// check: src/kernel/check.ts (sysfs only; `nbd-attach check` loads nothing else).
export { type CheckResult, check } from './check.ts';

/**
 * Checks worth failing on before connecting to the server: privilege, module, device argument
 * (refused before any ioctl when it is not an nbd device), device already attached.
 */
export async function preflight(opts: { device?: string | undefined; useIoctl: boolean; roots?: Roots }): Promise<void> {
  const roots = opts.roots ?? DEFAULT_ROOTS;
  const op = 'attach';
  requireAdmin(op, roots);
  // A device that is not an nbd device is refused first, whatever else is wrong.
  const dev = opts.device !== undefined && moduleInfo(roots).loaded ? resolveDevice(opts.device, roots, op) : undefined;
  if (opts.device !== undefined && dev === undefined && parseDeviceName(opts.device) === undefined) resolveDevice(opts.device, roots, op);
  if (!moduleInfo(roots).loaded) {
    // Linux 6.12+ loads the module on demand when its netlink family is asked for.
    let family: number | undefined;
    if (!opts.useIoctl) {
      const sock = new GenlSocket();
      try {
        family = await nbdFamily(sock);
      } catch {
        family = undefined;
      } finally {
        sock.close();
      }
    }
    if (family === undefined || !moduleInfo(roots).loaded) throw moduleMissingError(op);
  }
  if (opts.device !== undefined) notAttachable(op, dev ?? resolveDevice(opts.device, roots, op), roots);
}
