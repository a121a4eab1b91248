// What `serveConnection` (connection.ts) takes and gives: the options of one served connection and
// their defaults in one place (`withDefaults`), its phases, and the handle a caller watches. No
// behaviour beyond filling in defaults.

import { DEFAULT_MAX_PAYLOAD } from '../protocol/constants.ts';
import { BufferPool } from './buffer-pool.ts';
import { type PayloadBudget, processBudget } from './budget.ts';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS } from './defaults.ts';
import type { ServerTlsOptions } from './tls-upgrade.ts';

/** Shared by all connections of the process: idle payload buffers for reuse (bounded). */
const sharedPool = new BufferPool();

export interface ConnectionOptions {
  /** Requests executing or waiting for their reply to be written (default 64). */
  maxInFlight?: number;
  /** Payload bytes (READ data, WRITE data) held by in-flight requests (default 64 MiB). */
  maxInFlightBytes?: number;
  /** Payload bytes held by all connections together (default: the process's budget, 64 MiB). */
  budget?: PayloadBudget;
  /** Option haggling must end within this (default 10 s); 0: no limit. */
  handshakeTimeoutMs?: number;
  /** Largest READ/WRITE accepted (default and advertised: 32 MiB, proto.md "Size constraints"). */
  maxPayload?: number;
  /** How long a shutdown waits for in-flight requests and idle handshakes before closing (default 5 s). */
  shutdownGraceMs?: number;
  /** Where payload buffers come from (default: one pool shared by the process). */
  pool?: BufferPool;
  /** Read into our own buffers (and straight into WRITE payloads) when the socket allows (default true). */
  userBuffers?: boolean;
  /**
   * TLS (`serve --tls`): offered ('on') or required ('require') through NBD_OPT_STARTTLS, with this
   * server certificate. The TLS handshake must finish within `handshakeTimeoutMs` (default 30 s).
   */
  tls?: ServerTlsOptions;
}

/** The options with every default filled in. */
export type ConnectionSettings = Required<Omit<ConnectionOptions, 'tls'>> & Pick<ConnectionOptions, 'tls'>;

export function withDefaults(opts: ConnectionOptions): ConnectionSettings {
  return {
    maxInFlight: opts.maxInFlight ?? 64,
    maxInFlightBytes: opts.maxInFlightBytes ?? 64 * 1024 * 1024,
    budget: opts.budget ?? processBudget,
    handshakeTimeoutMs: opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
    maxPayload: opts.maxPayload ?? DEFAULT_MAX_PAYLOAD,
    shutdownGraceMs: opts.shutdownGraceMs ?? 5000,
    pool: opts.pool ?? sharedPool,
    userBuffers: opts.userBuffers ?? true,
    tls: opts.tls,
  };
}

export type ConnectionPhase = 'handshake' | 'transmission' | 'closing' | 'closed';

export interface ServedConnection {
  readonly phase: ConnectionPhase;
  /** Export chosen by the client, once in transmission. */
  readonly exportName: string | undefined;
  /** Why the connection ended (set when closed). */
  readonly closeReason: string | undefined;
  /**
   * Resolves when the connection is over: its socket has closed and every storage operation it
   * started has finished. Never rejects.
   */
  readonly done: Promise<void>;
  /** Finish in-flight requests (later ones get ESHUTDOWN), flush, close. Resolves when closed. */
  shutdown(): Promise<void>;
}
