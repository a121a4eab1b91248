// The reconnect engine: pure-ish, everything with side effects injected (time, randomness, the
// handshake, the kernel), so tests drive it without sockets or waiting (style.md item 9).
//
// One LINK_DEAD = one connection to replace (the kernel does not say which socket died; RECONFIGURE
// puts a new socket into the first dead slot). Replacements run one after another; between failed
// attempts we back off (capped, jittered). Errors that retrying may fix (refused, timeout, reset) are
// retried for ever: the kernel fails queued I/O after its dead timeout, and a later RECONFIGURE
// revives the device. Errors that mean "this is not the disk we had" (export gone, flags changed)
// are retried until the dead timeout has passed since the outage began, then we give up.
// A changed size is one of those when the export shrank (a mounted filesystem may reach past the new
// end) or is no longer a whole number of the device's blocks; growth is applied and logged.

import { NbdError } from '../errors.ts';
import { type Backoff, DEFAULT_BACKOFF, RESTART_BACKOFF, backoffDelay, flagsProblem } from './policy.ts';

/** A negotiated replacement connection, not yet given to the kernel. */
export interface Candidate {
  size: bigint;
  flags: number;
  /** Give up this connection (the kernel did not take it). */
  discard(): void;
}

/** Why a new size cannot replace the device's, or undefined when it can (equal or grown). */
export function sizeProblem(before: bigint, after: bigint, blockSize: number): string | undefined {
  if (after < before) return `the export shrank from ${before} to ${after} bytes (a filesystem on the device may reach past the new end)`;
  if (after % BigInt(blockSize) !== 0n) return `the export's new size ${after} bytes is not a multiple of the device's block size ${blockSize}`;
  return undefined;
}

export interface ReconnectorDeps<C extends Candidate = Candidate> {
  now(): number;
  sleep(ms: number): Promise<void>;
  random(): number;
  /** Connect and negotiate the same export; rejects with NbdError on failure. */
  negotiate(): Promise<C>;
  /**
   * Before RECONFIGURE: prepare the device for this connection (the server's request limits) or
   * refuse it by throwing NbdError (NBD_E_EXPORT_CHANGED: retried until the dead timeout).
   */
  prepare?(c: C): void;
  /** RECONFIGURE the candidate in (with the new size when it changed). Takes ownership of it on success. */
  reconfigure(c: C, change: { sizeBytes?: bigint }): Promise<void>;
  log(message: string): void;
  /** Called after every state change (reconnect done, error) so the state file can be rewritten. */
  changed?(): void;
  /** Called once when retrying stops for good. */
  gaveUp?(error: NbdError): void;
}

export interface ReconnectorConfig {
  /** Netlink DEAD_CONN_TIMEOUT in ms (0: the kernel fails I/O at once; we still retry). */
  deadTimeoutMs: number;
  /** Size and flags the device was set up with. */
  size: bigint;
  flags: number;
  /** The device's logical block size (a new size must be a multiple of it); 512 when not given. */
  blockSize?: number;
  /** Total connections of the device. */
  connections: number;
  backoff?: Backoff;
}

/** Error codes meaning "the server is up but it is not serving our disk any more". */
const FATAL_AFTER_DEADLINE = new Set(['NBD_E_EXPORT_UNKNOWN', 'NBD_E_EXPORT_CHANGED', 'NBD_E_TLS_REQUIRED', 'NBD_E_TLS', 'NBD_E_OPTION']);

export class Reconnector<C extends Candidate = Candidate> {
  /** Dead connections not replaced yet. */
  pending = 0;
  reconnects = 0;
  attempts = 0;
  lastError: string | undefined;
  /** Since when at least one connection has been dead (undefined: all live). */
  outageSince: number | undefined;
  size: bigint;
  readonly flags: number;
  private stopped = false;
  private gaveUpError: NbdError | undefined;
  private running: Promise<void> | undefined;
  private readonly backoff: Backoff;
  /** Until then (deps.now()), retry on RESTART_BACKOFF: a restarted server is expected. */
  private hurryUntil = -Infinity;

  constructor(
    private readonly deps: ReconnectorDeps<C>,
    private readonly cfg: ReconnectorConfig,
  ) {
    this.size = cfg.size;
    this.flags = cfg.flags;
    this.backoff = cfg.backoff ?? DEFAULT_BACKOFF;
  }

  get isStopped(): boolean {
    return this.stopped;
  }
  get failure(): NbdError | undefined {
    return this.gaveUpError;
  }

  /** The kernel reported a dead link on our device: replace one connection. */
  linkDead(): void {
    if (this.stopped) return;
    if (this.pending >= this.cfg.connections) {
      // More LINK_DEADs than connections (a connection that died again before we noticed): cap it,
      // RECONFIGURE cannot add sockets beyond the dead slots anyway.
      this.deps.log(`link dead again (already replacing ${this.pending} of ${this.cfg.connections})`);
      return;
    }
    this.pending++;
    if (this.outageSince === undefined) this.outageSince = this.deps.now();
    this.deps.log(`connection lost: reconnecting (${this.pending} of ${this.cfg.connections} to replace)`);
    this.deps.changed?.();
    this.running ??= this.loop().finally(() => {
      this.running = undefined;
    });
  }

  /** The server said it is going away and a new one is expected: retry quickly for `forMs`. */
  hurry(forMs: number): void {
    this.hurryUntil = this.deps.now() + forMs;
  }

  /** Stop retrying (SIGTERM, device gone). Resolves once the loop has noticed. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.running;
  }

  /** Resolves when there is nothing left to do (all replaced, or stopped). For tests and shutdown. */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (this.pending > 0 && !this.stopped) {
      this.attempts++;
      let cand: C | undefined;
      try {
        cand = await this.deps.negotiate();
        if (this.stopped) {
          cand.discard();
          break;
        }
        const problem = flagsProblem(this.flags, cand.flags, this.cfg.connections);
        if (problem) throw new NbdError('NBD_E_EXPORT_CHANGED', `reconnect: ${problem}: not handing this connection to the kernel`);
        const sizeWrong = sizeProblem(this.size, cand.size, this.cfg.blockSize ?? 512);
        if (sizeWrong) throw new NbdError('NBD_E_EXPORT_CHANGED', `reconnect: ${sizeWrong}: not handing this connection to the kernel`);
        this.deps.prepare?.(cand);
        const change: { sizeBytes?: bigint } = {};
        if (cand.size !== this.size) change.sizeBytes = cand.size;
        await this.deps.reconfigure(cand, change);
        cand = undefined; // the kernel owns it now
        if (change.sizeBytes !== undefined) {
          this.deps.log(`export grew from ${this.size} to ${change.sizeBytes} bytes: applied to the device`);
          this.size = change.sizeBytes;
        }
        this.pending--;
        this.reconnects++;
        failures = 0;
        const outage = this.outageSince === undefined ? 0 : this.deps.now() - this.outageSince;
        if (this.pending === 0) this.outageSince = undefined;
        this.deps.log(`reconnected after ${outage} ms (reconnect #${this.reconnects}${this.pending ? `, ${this.pending} more to replace` : ''})`);
        this.deps.changed?.();
      } catch (e) {
        cand?.discard();
        const err = e instanceof NbdError ? e : new NbdError('NBD_E_RECONNECT', `reconnect: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
        this.lastError = err.message;
        const since = this.outageSince ?? this.deps.now();
        const elapsed = this.deps.now() - since;
        if (FATAL_AFTER_DEADLINE.has(err.code) && elapsed >= this.cfg.deadTimeoutMs) {
          this.stopped = true;
          this.gaveUpError = new NbdError(err.code, `${err.message}; giving up after ${Math.round(elapsed / 1000)} s (dead timeout ${Math.round(this.cfg.deadTimeoutMs / 1000)} s)`, { cause: err });
          this.lastError = this.gaveUpError.message;
          this.deps.log(this.gaveUpError.message);
          this.deps.changed?.();
          this.deps.gaveUp?.(this.gaveUpError);
          break;
        }
        const delay = backoffDelay(failures, this.deps.random(), this.deps.now() < this.hurryUntil ? RESTART_BACKOFF : this.backoff);
        failures++;
        this.deps.log(`reconnect attempt ${this.attempts} failed: ${err.message}; next try in ${delay} ms`);
        this.deps.changed?.();
        await this.deps.sleep(delay);
      }
    }
  }
}
