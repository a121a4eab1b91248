// Defaults and pure policy for the resident supervisor: backoff, flag compatibility, socket tuning
// values. Why these numbers: docs/decisions.md "Supervisor defaults".

import { TransmissionFlag } from '../protocol/constants.ts';

/** Kernel request timeout (netlink TIMEOUT, seconds) when -t is not given: bounds the stall of a
 *  request already sent on a connection that died (the kernel requeues it at this tick). */
export const DEFAULT_REQUEST_TIMEOUT_S = 10;
/** Netlink DEAD_CONN_TIMEOUT (seconds) when --dead-timeout is not given: how long I/O waits in the
 *  kernel for a reconnect before it fails with EIO. */
export const DEFAULT_DEAD_TIMEOUT_S = 60;

/** Capped exponential backoff between reconnect attempts. */
export interface Backoff {
  initialMs: number;
  maxMs: number;
  factor: number;
}
export const DEFAULT_BACKOFF: Backoff = { initialMs: 50, maxMs: 1000, factor: 2 };
/**
 * After a server said it is shutting down (NBD_ESHUTDOWN, src/supervisor/shutdown-watch.ts) a new one
 * is about to listen (`systemctl restart`): retry at most every 200 ms for RESTART_WINDOW_MS, so the
 * device is served again well within 2 s of the new server listening. A refused connect costs the
 * server nothing; 30 s of them is 150 SYNs.
 */
export const RESTART_BACKOFF: Backoff = { initialMs: 50, maxMs: 200, factor: 2 };
export const RESTART_WINDOW_MS = 30_000;
/**
 * An idle device is probed with one direct read of its first block this often, so a server that
 * waits for its clients to leave (nbdkit after SIGTERM) answers NBD_ESHUTDOWN and is let go
 * (src/supervisor/shutdown-watch.ts): a graceful restart then waits at most this long for us.
 */
export const IDLE_PROBE_MS = 2000;

/** Per-attempt bound on connect + handshake while reconnecting (a SYN lost in a partition is retried
 *  by TCP after 1 s and 3 s; a fresh attempt after this long catches a link that came back). */
export const RECONNECT_ATTEMPT_TIMEOUT_MS = 3000;

/**
 * Delay before retry number `attempt` (0-based): min(max, initial·factor^attempt), then "equal jitter":
 * uniformly in [d/2, d], so many clients do not retry in step yet no delay exceeds the cap.
 * `random` returns [0, 1).
 */
export function backoffDelay(attempt: number, random: number, b: Backoff = DEFAULT_BACKOFF): number {
  const n = Math.max(0, Math.min(attempt, 60));
  const d = Math.min(b.maxMs, b.initialMs * b.factor ** n);
  const r = Math.min(Math.max(random, 0), 1);
  return Math.round(d / 2 + (d / 2) * r);
}

/** Flags whose loss on a reconnect would make the kernel send requests the server now refuses. */
const MUST_KEEP = TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES;

/**
 * Compare the transmission flags of a new connection with those the device was set up with.
 * Returns undefined when the new connection can replace a dead one, else why not.
 */
export function flagsProblem(before: number, after: number, connections: number): string | undefined {
  if ((after & TransmissionFlag.READ_ONLY) && !(before & TransmissionFlag.READ_ONLY)) return 'the export became read-only';
  const lost = before & MUST_KEEP & ~after;
  if (lost) return `the export no longer supports some commands the kernel uses (flags 0x${before.toString(16)} → 0x${after.toString(16)})`;
  if (connections > 1 && !(after & TransmissionFlag.CAN_MULTI_CONN)) return 'the export no longer allows several connections (CAN_MULTI_CONN gone)';
  return undefined;
}

/** TCP liveness knobs applied to every socket before the kernel gets it (see decisions.md). */
export const TCP_TUNING = {
  keepIdleS: 5,
  keepIntervalS: 2,
  keepCount: 3,
  /** TCP_USER_TIMEOUT: unacknowledged data (or failed keepalives) this long ⇒ the connection errors. */
  userTimeoutMs: 10_000,
} as const;
