// The resident supervisor of one device: listens for LINK_DEAD on our index, replaces dead
// connections (Reconnector), notices when someone else detached the device, answers a stop signal
// with a clean disconnect when nothing uses the device (and leaves a device in use attached), and keeps the state file current. Kernel, handshake, time and the state
// writer are injected so unit tests drive it without a kernel.

import { NbdError } from '../errors.ts';
import type { BlockSizes } from '../protocol/codec.ts';
import type { KernelOps } from './kernel-ops.ts';
import { type Candidate, Reconnector } from './reconnector.ts';
import { type Backoff, RESTART_WINDOW_MS } from './policy.ts';
import { type KeptSockets, type KmsgWatch, isShutdownReply, parseServerError } from './shutdown-watch.ts';

export interface SupervisorConfig {
  index: number;
  device: string;
  identifier: string | undefined;
  connections: number;
  size: bigint;
  flags: number;
  deadTimeoutS: number;
  /**
   * What a stop signal does while the device is in use: 'leave' it attached and exit (the kernel
   * keeps serving; a later supervisor adopts it), or 'stay' running (local attach: the server lives
   * in this process, so exiting would take the disk away).
   */
  whenBusy?: 'leave' | 'stay';
  /** The device's logical block size (a new export size must be a multiple of it). */
  blockSize?: number;
  /** Duplicates of the sockets given to the kernel at attach, for `sockets` to hold. */
  keptFds?: readonly number[];
  /** How often to check that the device is still attached (detached from another shell). */
  watchIntervalMs?: number;
  backoff?: Backoff;
}

export interface SupervisorDeps<C extends Candidate> {
  kernel: KernelOps;
  now(): number;
  sleep(ms: number): Promise<void>;
  random(): number;
  /** Negotiate a replacement connection. */
  negotiate(): Promise<C>;
  /** Hand the candidate's socket to the kernel: take its fd (the candidate no longer owns it). */
  takeFd(c: C): number;
  closeFd(fd: number): void;
  log(message: string): void;
  /** Called once a stop signal is going to end this supervisor (systemd's STOPPING=1). */
  stopping?(): void;
  /** Who uses the device now (mounts in any namespace, holders, swap, openers), one phrase each; empty: nobody. */
  users(): string[];
  /** Persist the visible state (reconnects, last error, live connections). */
  saveState(s: { reconnects: number; lastError: string | undefined; liveConnections: number; sizeBytes: bigint }): void;
  /** Repeating timer; returns a cancel function. */
  every(ms: number, fn: () => void): () => void;
  /**
   * Give the device's request queue the limits of the server behind `c` (src/kernel/queue-limits.ts):
   * before RECONFIGURE (`discard` false) and after it (RECONFIGURE with a new size resets the TRIM
   * limit). Throws NbdError when the kernel cannot honour them; returns a line for the log.
   */
  applyLimits?(index: number, c: { blockSizes?: BlockSizes | undefined; flags: number }, discard: boolean): string | undefined;
  /** Keep duplicates of the kernel's sockets, to end them when the server asks us to leave. */
  sockets?: KeptSockets;
  /**
   * Probe an idle device now and then (src/supervisor/shutdown-watch.ts startIdleProbe), so a server
   * waiting for its clients to leave answers NBD_ESHUTDOWN; `linksUp` says when a probe cannot stall.
   */
  startIdleProbe?(linksUp: () => boolean): { close(): void };
  /** Follow the kernel log (each record to `onRecord`); undefined when it cannot be read. */
  watchKernelLog?(onRecord: (record: string) => void, log: (m: string) => void): KmsgWatch | undefined;
}

/** A candidate that may carry the server's block-size constraints (NBD_INFO_BLOCK_SIZE). */
type WithLimits = { blockSizes?: BlockSizes | undefined };

export type SupervisorEnd =
  | { reason: 'signal'; signal: string; code: 0 }
  | { reason: 'detached'; code: 0 }
  | { reason: 'left'; signal: string; users: string[]; code: 0 }
  | { reason: 'gave-up'; error: NbdError; code: number }
  | { reason: 'error'; error: Error; code: number };

export class Supervisor<C extends Candidate> {
  readonly reconnector: Reconnector<C>;
  private ending = false;
  private cancelWatch: (() => void) | undefined;
  private kmsg: KmsgWatch | undefined;
  private idleProbe: { close(): void } | undefined;
  private resolveEnd!: (e: SupervisorEnd) => void;
  /** Settles once, when the supervisor is finished; `code` is the process exit code. */
  readonly ended: Promise<SupervisorEnd>;

  constructor(
    private readonly cfg: SupervisorConfig,
    private readonly deps: SupervisorDeps<C>,
  ) {
    this.ended = new Promise((r) => (this.resolveEnd = r));
    this.reconnector = new Reconnector<C>(
      {
        now: deps.now,
        sleep: deps.sleep,
        random: deps.random,
        negotiate: deps.negotiate,
        prepare: (c) => {
          deps.applyLimits?.(cfg.index, c as C & WithLimits, false);
        },
        reconfigure: async (c, change) => {
          const fd = deps.takeFd(c);
          let keep = false;
          try {
            await deps.kernel.reconfigure(cfg.index, [fd], {
              ...(change.sizeBytes !== undefined ? { sizeBytes: change.sizeBytes } : {}),
              ...(cfg.identifier !== undefined ? { backend: cfg.identifier } : {}),
            });
            keep = deps.sockets !== undefined;
          } finally {
            // The kernel holds its own reference after RECONFIGURE; ours is kept only to end it later.
            if (keep) deps.sockets!.add(fd);
            else deps.closeFd(fd);
          }
          try {
            const line = deps.applyLimits?.(cfg.index, c as C & WithLimits, true);
            if (line) deps.log(line);
          } catch (e) {
            deps.log(`after reconnect: ${(e as Error).message}`);
          }
        },
        log: deps.log,
        changed: () => this.save(),
        gaveUp: (error) => this.finish({ reason: 'gave-up', error, code: error.exitCode }),
      },
      {
        deadTimeoutMs: cfg.deadTimeoutS * 1000,
        size: cfg.size,
        flags: cfg.flags,
        connections: cfg.connections,
        ...(cfg.blockSize !== undefined ? { blockSize: cfg.blockSize } : {}),
        ...(cfg.backoff ? { backoff: cfg.backoff } : {}),
      },
    );
  }

  /** Subscribe to LINK_DEAD and start watching the device. */
  async start(): Promise<void> {
    for (const fd of this.cfg.keptFds ?? []) {
      if (this.deps.sockets) this.deps.sockets.add(fd);
      else this.deps.closeFd(fd);
    }
    await this.deps.kernel.subscribe((index) => this.onLinkDead(index));
    if (this.deps.sockets) this.kmsg = this.deps.watchKernelLog?.((r) => this.onKernelRecord(r), this.deps.log);
    if (this.kmsg) this.idleProbe = this.deps.startIdleProbe?.(() => !this.ending && this.reconnector.pending === 0);
    this.cancelWatch = this.deps.every(this.cfg.watchIntervalMs ?? 500, () => this.checkDevice());
    this.save();
  }

  onLinkDead(index: number): void {
    if (index !== this.cfg.index || this.ending) return;
    this.deps.sockets?.prune(); // the kernel shut the dead socket down: let go of our copy
    this.reconnector.linkDead();
  }

  /**
   * A kernel log record. NBD_ESHUTDOWN from our server: it is shutting down and waits for its clients
   * to leave; end our connections now, so the kernel requeues and the reconnect path finds the next
   * server (src/supervisor/shutdown-watch.ts).
   */
  onKernelRecord(record: string): void {
    if (this.ending || !this.deps.sockets) return;
    if (!isShutdownReply(parseServerError(record), this.cfg.index)) return;
    const n = this.deps.sockets.dropAll();
    if (n === 0) return;
    this.reconnector.hurry(RESTART_WINDOW_MS);
    this.deps.log(`the server is shutting down (it answered NBD_ESHUTDOWN): ending ${n} connection(s) to reconnect`);
  }

  /** Periodic: the device was detached (nbd-attach -d, another tool) or re-used by someone else. */
  checkDevice(): void {
    if (this.ending) return;
    if (!this.deps.kernel.stillOurs(this.cfg.index, this.cfg.identifier)) {
      this.deps.log(`${this.cfg.device} was detached: supervisor exiting`);
      this.finish({ reason: 'detached', code: 0 });
    }
  }

  /**
   * SIGTERM/SIGINT/SIGHUP. Only `detach` takes a disk from its user: while the device is in use
   * (mounted anywhere, stacked on, swap, open), stop without disconnecting and leave it to the next
   * supervisor, or with `whenBusy: 'stay'` keep running. Otherwise stop reconnecting, disconnect
   * cleanly and end with exit code 0. The log says which, and why.
   */
  async terminate(signal: string): Promise<void> {
    if (this.ending) return;
    let users: string[];
    try {
      users = this.deps.users();
    } catch (e) {
      users = [`cannot tell who uses it (${(e as Error).message}): assumed in use`];
    }
    if (users.length > 0) {
      if (this.cfg.whenBusy === 'stay') {
        this.deps.log(`${signal}: ${this.cfg.device} is in use (${users.join('; ')}) and served by this process: not stopping; unmount it or stop its user, then nbd-attach -d ${this.cfg.device}`);
        return;
      }
      this.ending = true;
      this.deps.stopping?.();
      this.cancelWatch?.();
      await this.reconnector.stop();
      this.deps.log(`${signal}: ${this.cfg.device} is in use (${users.join('; ')}): leaving it attached and exiting; nbd-attach --reattach ${this.cfg.device} (or its service) supervises it again`);
      this.ending = false;
      this.finish({ reason: 'left', signal, users, code: 0 });
      return;
    }
    this.ending = true;
    this.deps.stopping?.();
    this.deps.log(`${signal}: ${this.cfg.device} is not in use: disconnecting it`);
    this.cancelWatch?.();
    await this.reconnector.stop();
    try {
      if (this.deps.kernel.stillOurs(this.cfg.index, this.cfg.identifier)) await this.deps.kernel.disconnect(this.cfg.index);
    } catch (e) {
      this.deps.log(`disconnect ${this.cfg.device} failed: ${(e as Error).message}`);
      this.ending = false;
      this.finish({ reason: 'error', error: e as Error, code: 5 });
      return;
    }
    this.deps.log(`${this.cfg.device} disconnected`);
    this.ending = false;
    this.finish({ reason: 'signal', signal, code: 0 });
  }

  private finish(e: SupervisorEnd): void {
    if (this.ending) return;
    this.ending = true;
    this.cancelWatch?.();
    this.kmsg?.close();
    this.idleProbe?.close();
    this.deps.sockets?.closeAll();
    void this.reconnector.stop();
    this.deps.kernel.close();
    this.resolveEnd(e);
  }

  private save(): void {
    const r = this.reconnector;
    try {
      this.deps.saveState({ reconnects: r.reconnects, lastError: r.lastError, liveConnections: this.cfg.connections - r.pending, sizeBytes: r.size });
    } catch (e) {
      this.deps.log(`cannot write the state file: ${(e as Error).message}`);
    }
  }
}
