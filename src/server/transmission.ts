// The transmission phase of one server connection (nbdkit's protocol.c loop): requests are framed
// out of what the receiver holds (receiver.ts) and handed to the dispatcher (dispatch.ts) while the
// connection is within its bounds: at most `maxInFlight` requests and `maxInFlightBytes` payload
// bytes, and the process's budget (budget.ts). Past a bound the socket is paused and framing stops
// until replies drain; before framing resumes, the paused socket is asked whether the client ended
// it meanwhile. The replies of one burst of framing leave together (ReplySender.burst).
//
// It decides nothing about the connection's life: NBD_CMD_DISC, a protocol violation and an end
// seen while paused are reported to the connection (connection.ts), which tells it to `stop`.

import type { Duplex } from 'node:stream';
import createDebug from '../debug.ts';
import { Cmd } from '../protocol/constants.ts';
import type { ExportActivity } from './activity.ts';
import type { BufferPool } from './buffer-pool.ts';
import type { PayloadBudget } from './budget.ts';
import { Dispatcher } from './dispatch.ts';
import type { Backend } from './export.ts';
import { RequestReceiver } from './receiver.ts';
import type { ReplySender } from './replies.ts';
import type { ExportLimits, Incoming } from './requests.ts';
import { peerHasEnded } from './socket-edge.ts';

const log = createDebug('nbd:server');

export interface TransmissionEvents {
  /** NBD_CMD_DISC was framed (reading has stopped, the socket is paused). */
  disconnect(): void;
  /** The stream is out of step (bad request magic); reading has stopped. */
  violation(reason: string): void;
  /** The client had ended the socket while framing was paused: nothing it sent that was not framed is run. */
  endedWhilePaused(): void;
  /** A storage operation finished (Dispatcher.ops went down). */
  opEnded(): void;
}

export interface TransmissionOptions {
  /** The connection's socket (it no longer changes in transmission). */
  socket: Duplex;
  out: ReplySender;
  backend: Backend;
  limits: ExportLimits;
  pool: BufferPool;
  budget: PayloadBudget;
  activity: ExportActivity;
  /** Reads land in our reused buffers (receiver.ts `reusedInput`). */
  reusedInput: boolean;
  maxInFlight: number;
  maxInFlightBytes: number;
  events: TransmissionEvents;
}

export class Transmission {
  /** Runs requests against the export and counts what is in flight. */
  readonly requests: Dispatcher;
  private readonly receiver: RequestReceiver;
  private readonly socket: Duplex;
  private readonly out: ReplySender;
  private readonly budget: PayloadBudget;
  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;
  private readonly events: TransmissionEvents;
  /** No more requests are framed: NBD_CMD_DISC, the peer ended, a violation, or the connection is closing. */
  private halted = false;
  /** The socket is paused (it was, while the connection waited to enter transmission). */
  private paused = true;
  /** The socket was found live in this loop turn (endedWhilePaused). */
  private liveThisTurn = false;

  constructor(opts: TransmissionOptions) {
    this.socket = opts.socket;
    this.out = opts.out;
    this.budget = opts.budget;
    this.maxInFlight = opts.maxInFlight;
    this.maxInFlightBytes = opts.maxInFlightBytes;
    this.events = opts.events;
    const { limits, pool, out, budget, activity, backend } = opts;
    this.receiver = new RequestReceiver({ limits, pool, storage: backend, reusedInput: opts.reusedInput, onFrame: this.pump });
    this.requests = new Dispatcher({ backend, limits, out, pool, budget, activity, opEnded: opts.events.opEnded });
  }

  get stopped(): boolean {
    return this.halted;
  }

  /** Frame no more requests (those dispatched complete). */
  stop(): void {
    this.halted = true;
  }

  /** The socket has closed: no more framing, no budget wake-up, and a payload being received is abandoned. */
  closed(): void {
    this.halted = true;
    this.budget.forget(this.onBudget);
    this.receiver.abandon();
  }

  /** Requests framed from now on are answered ESHUTDOWN, and WRITE payloads are no longer placed. */
  shutDown(): void {
    this.receiver.stopPlacing();
    this.requests.shutDown();
  }

  /**
   * The first bytes: those that followed the negotiation, and those that arrived while the connection
   * waited to enter. `waited`: the socket was not read meanwhile, so ask it first whether the client
   * has closed it (then nothing is run).
   */
  start(waited: boolean, leftover: Buffer, early: readonly Buffer[]): void {
    if (waited && this.endedWhilePaused()) return;
    if (leftover.length > 0) this.receiver.push(leftover);
    for (const c of early) this.receiver.push(c);
    this.pump();
    if (!this.halted && !this.paused) this.socket.resume();
  }

  /** Where the next socket read lands (Node's onread). */
  readTarget(): Uint8Array {
    return this.receiver.readTarget(!this.halted);
  }

  /** A socket read brought `n` bytes into `buf` (from readTarget); frames what is complete. */
  received(n: number, buf: Uint8Array): void {
    this.receiver.received(n, buf, !this.halted);
  }

  /** Bytes in a buffer of their own (a stream's 'data' event); frames what is complete. */
  push(chunk: Buffer): void {
    if (this.halted) return;
    this.receiver.push(chunk);
    this.pump();
  }

  /** A reply has left (or cannot): the request no longer counts against the bounds; framing may resume. */
  released(cost: number): void {
    this.requests.released(cost);
    this.resumeFraming();
  }

  /** Frame and dispatch requests while within bounds; their replies leave together (ReplySender.burst). */
  private readonly pump = (): void => this.out.burst(this.frame);

  private readonly frame = (): void => {
    const rx = this.receiver;
    const requests = this.requests;
    while (!this.halted) {
      if (this.socket.destroyed) {
        // A reply could not be written (the peer is gone): what is still buffered is not served.
        this.halted = true;
        return;
      }
      if (requests.inFlight >= this.maxInFlight || requests.inFlightBytes >= this.maxInFlightBytes) {
        this.pause();
        return;
      }
      if (!this.budget.allows(requests.inFlightBytes)) {
        this.pause();
        this.budget.wait(this.onBudget);
        return;
      }
      let item: Incoming | null;
      try {
        item = rx.next();
      } catch (err) {
        this.halted = true;
        this.events.violation((err as Error).message);
        return;
      }
      if (!item) break;
      if (item.kind === 'request' && item.req.type === Cmd.DISC) {
        // proto.md "NBD_CMD_DISC": handle outstanding requests, then close. No reply.
        this.halted = true;
        this.pause();
        this.events.disconnect();
        return;
      }
      requests.run(item);
    }
    // Framing caught up: let more bytes in, but never hold more than one partial WRITE payload.
    if (!this.halted) this.resume();
  };

  private readonly onBudget = (): void => this.resumeFraming();

  /**
   * Framing restarts after a pause (bounds, budget). The paused socket was not read, so a client
   * that closed it meanwhile has not been noticed: what it sent is still in our receiver and the
   * socket buffer, and the kernel's nbd driver resends such requests on another connection after
   * its request timeout (drivers/block/nbd.c nbd_xmit_timeout: nbd_mark_nsock_dead shuts the socket
   * down, nbd_requeue_cmd). Ask the socket before framing any of it.
   */
  private resumeFraming(): void {
    if (!this.paused || this.halted) return;
    if (this.endedWhilePaused()) return;
    this.pump();
  }

  /**
   * Has the client ended the socket while we were not reading it? Then the connection ends like on
   * the peer's end (requests already dispatched complete), and nothing not yet framed is run,
   * NBD_CMD_DISC among it or not (docs/decisions.md "connection lifecycle"). False (nothing done)
   * when the socket is live or cannot be asked (a stream without a descriptor). Asked at most once
   * per loop turn: a connection held at its bound resumes on nearly every reply (≈2 µs a poll
   * through koffi on the host). An end that arrives later in the turn is seen at the next resume; a
   * client that resends elsewhere must first negotiate a new connection, which takes round trips
   * (several turns).
   */
  private endedWhilePaused(): boolean {
    if (this.liveThisTurn) return false;
    if (!peerHasEnded(this.socket)) {
      this.liveThisTurn = true;
      setImmediate(this.forgetLive);
      return false;
    }
    log('the client ended the connection while framing was paused: its unframed requests are not run');
    this.events.endedWhilePaused();
    return true;
  }

  private readonly forgetLive = (): void => {
    this.liveThisTurn = false;
  };

  private pause(): void {
    if (!this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private resume(): void {
    if (this.paused) {
      this.paused = false;
      this.socket.resume();
    }
  }
}
