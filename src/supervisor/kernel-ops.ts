// The supervisor's kernel edge: one generic-netlink socket that listens for LINK_DEAD on the
// "nbd_mc_group" multicast group and sends RECONFIGURE / DISCONNECT; sysfs reads; socket tuning.

import type net from 'node:net';
import createDebug from '../debug.ts';
import { NbdError } from '../errors.ts';
import * as libc from '../../native-bindings/libc.ts';
import { GenlSocket } from '../../native-bindings/netlink.ts';
import {
  IPPROTO_TCP,
  NBD_GENL_FAMILY_NAME,
  NBD_GENL_MCAST_GROUP_NAME,
  SOL_SOCKET,
  SO_KEEPALIVE,
  TCP_KEEPCNT,
  TCP_KEEPIDLE,
  TCP_KEEPINTVL,
  TCP_USER_TIMEOUT,
} from '../kernel/constants.ts';
import { encodeDisconnect, encodeReconfigure, parseLinkDead } from '../kernel/netlink-codec.ts';
import { type Roots, DEFAULT_ROOTS, deviceState } from '../kernel/device.ts';
import { TCP_TUNING } from './policy.ts';

const debug = createDebug('nbd:supervisor');
const NETLINK_TIMEOUT_MS = 10_000;

export interface KernelOps {
  /** Call `onLinkDead(index)` for every LINK_DEAD multicast (any device). */
  subscribe(onLinkDead: (index: number) => void): Promise<void>;
  reconfigure(index: number, fds: readonly number[], change: { sizeBytes?: bigint; backend?: string }): Promise<void>;
  disconnect(index: number): Promise<void>;
  /** The device is still the one we set up: attached (sysfs pid) with exactly our backend identifier. */
  stillOurs(index: number, identifier: string | undefined): boolean;
  close(): void;
}

export class NetlinkKernelOps implements KernelOps {
  private sock: GenlSocket | undefined;
  private family: number | undefined;
  constructor(private readonly roots: Roots = DEFAULT_ROOTS) {}

  private async open(): Promise<{ sock: GenlSocket; family: number; group: number | undefined }> {
    const sock = (this.sock ??= new GenlSocket());
    const fam = await sock.resolveFamily(NBD_GENL_FAMILY_NAME, NETLINK_TIMEOUT_MS);
    this.family = fam.id;
    return { sock, family: fam.id, group: fam.groups.get(NBD_GENL_MCAST_GROUP_NAME) };
  }

  async subscribe(onLinkDead: (index: number) => void): Promise<void> {
    const { sock, group } = await this.open();
    if (group === undefined) throw new NbdError('NBD_E_KERNEL', `supervise: the kernel's nbd netlink family has no '${NBD_GENL_MCAST_GROUP_NAME}' multicast group: cannot watch for dead links`);
    sock.subscribe(group, (m) => {
      const index = parseLinkDead(m);
      debug('multicast cmd=%d index=%s', m.cmd, index);
      if (index !== undefined) onLinkDead(index);
    });
  }

  private async ensure(): Promise<{ sock: GenlSocket; family: number }> {
    if (this.sock && this.family !== undefined) return { sock: this.sock, family: this.family };
    const { sock, family } = await this.open();
    return { sock, family };
  }

  async reconfigure(index: number, fds: readonly number[], change: { sizeBytes?: bigint; backend?: string }): Promise<void> {
    const { sock, family } = await this.ensure();
    await sock.request(
      'netlink NBD_CMD_RECONFIGURE',
      (seq) =>
        encodeReconfigure({
          family,
          seq,
          index,
          fds,
          ...(change.backend !== undefined ? { backend: change.backend } : {}),
          ...(change.sizeBytes !== undefined ? { sizeBytes: change.sizeBytes } : {}),
        }),
      NETLINK_TIMEOUT_MS,
    );
  }

  async disconnect(index: number): Promise<void> {
    const { sock, family } = await this.ensure();
    await sock.request('netlink NBD_CMD_DISCONNECT', (seq) => encodeDisconnect({ family, seq, index }), NETLINK_TIMEOUT_MS);
  }

  stillOurs(index: number, identifier: string | undefined): boolean {
    const st = deviceState(index, this.roots);
    // Exactly our identifier: an empty or missing one is not ours (someone re-attached the index).
    return st.pid !== undefined && identifier !== undefined && st.backend === identifier;
  }

  close(): void {
    this.sock?.close();
    this.sock = undefined;
  }
}

/**
 * TCP keepalive and TCP_USER_TIMEOUT on a socket about to be handed to the kernel (which sets none):
 * a silent partition then errors the connection in seconds, the kernel marks the link dead and we
 * reconnect. Unix sockets are left alone.
 */
export function tuneSocket(socket: net.Socket): void {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0 || socket.remoteFamily === undefined) return; // unix socket or gone
  libc.setsockoptInt(fd, SOL_SOCKET, SO_KEEPALIVE, 1, 'SO_KEEPALIVE');
  libc.setsockoptInt(fd, IPPROTO_TCP, TCP_KEEPIDLE, TCP_TUNING.keepIdleS, 'TCP_KEEPIDLE');
  libc.setsockoptInt(fd, IPPROTO_TCP, TCP_KEEPINTVL, TCP_TUNING.keepIntervalS, 'TCP_KEEPINTVL');
  libc.setsockoptInt(fd, IPPROTO_TCP, TCP_KEEPCNT, TCP_TUNING.keepCount, 'TCP_KEEPCNT');
  libc.setsockoptInt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, TCP_TUNING.userTimeoutMs, 'TCP_USER_TIMEOUT');
}

/** Read back what tuneSocket set (tests). */
export function socketTuning(fd: number): { keepalive: number; idle: number; interval: number; count: number; userTimeoutMs: number } {
  return {
    keepalive: libc.getsockoptInt(fd, SOL_SOCKET, SO_KEEPALIVE),
    idle: libc.getsockoptInt(fd, IPPROTO_TCP, TCP_KEEPIDLE),
    interval: libc.getsockoptInt(fd, IPPROTO_TCP, TCP_KEEPINTVL),
    count: libc.getsockoptInt(fd, IPPROTO_TCP, TCP_KEEPCNT),
    userTimeoutMs: libc.getsockoptInt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT),
  };
}
