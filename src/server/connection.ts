// One client connection of the built-in server, and the one place that decides its life: its phases
// (handshake, waiting for earlier writes, transmission, closing, closed), what ends it (the
// handshake's end or deadline, NBD_CMD_DISC, the client's end, a protocol violation, a shutdown and
// its grace period) and when it is over: socket closed and every storage operation it started
// finished (`maybeOver`). It owns the socket and its events. The rest is split by phase, like
// nbdkit's server/ (handshake / transmission / replies) and ws (a Receiver that never touches a
// socket, a Sender):
//   handshake.ts     the option haggling (pure); tls-upgrade.ts wraps the socket after STARTTLS
//   transmission.ts  framing within the connection's bounds and the process's budget (budget.ts):
//                    pauses and resumes the socket, reports DISC, violations and a silent end
//   receiver.ts      where reads land, WRITE payloads, placement into storage (no socket);
//                    requests.ts frames and checks requests (pure)
//   dispatch.ts      runs requests against the export's storage, counts what is in flight;
//                    activity.ts orders a new connection after earlier writes
//   replies.ts       encodes replies and writes them in as few socket writes as possible
//   socket-edge.ts   the socket takeover (reads into our buffers) and the hang-up check
//   connection-options.ts  the options and their defaults, the handle a caller watches
// A protocol violation (bad request magic) closes this connection only.

import type { Duplex } from 'node:stream';
import createDebug from '../debug.ts';
import { activityOf } from './activity.ts';
import { type ConnectionOptions, type ConnectionPhase, type ConnectionSettings, type ServedConnection, withDefaults } from './connection-options.ts';
import { isReadOnly, type ServedExport } from './export.ts';
import { ServerHandshake } from './handshake.ts';
import { ReplySender } from './replies.ts';
import { takeOver } from './socket-edge.ts';
import { upgradeToTls } from './tls-upgrade.ts';
import { Transmission, type TransmissionEvents } from './transmission.ts';

export type { ConnectionOptions, ConnectionPhase, ServedConnection } from './connection-options.ts';

const log = createDebug('nbd:server');

/**
 * Where handshake reads land, shared by every connection of the process: what a read brings is
 * copied out on the same stack (onUserRead), so a connection that never reaches transmission costs
 * no buffer of its own.
 */
const handshakeRead = Buffer.allocUnsafeSlow(16 * 1024);
/** Why a connection ended when its client closed it while framing was paused (transmission.ts). */
export const ENDED_WHILE_PAUSED = 'client closed the connection while reading was paused; requests not yet started were not run';

/**
 * Serve one already-connected stream (TCP, Unix, or one end of a socketpair). The stream is taken
 * over: a net.Socket's handle is moved into a new wrapper that reads into our buffers, so the object
 * passed in may be destroyed (and emit 'close') at once. Watch `done`, and do not use the stream
 * afterwards. Pass `userBuffers: false` to keep the stream as it is.
 */
export function serveConnection(socket: Duplex, exports: readonly ServedExport[], opts: ConnectionOptions = {}): ServedConnection {
  return new Connection(socket, exports, opts);
}

class Connection implements ServedConnection {
  phase: ConnectionPhase = 'handshake';
  exportName: string | undefined;
  closeReason: string | undefined;
  readonly done: Promise<void>;

  private readonly cfg: ConnectionSettings;
  private readonly hs: ServerHandshake;
  /** The transmission phase's framing and requests (from the end of the negotiation). */
  private tx: Transmission | undefined;
  private exp: ServedExport | undefined;
  private readonly out: ReplySender;
  /** The client ended its side before transmission began: nothing it sent is run. */
  private endedEarly = false;
  private shuttingDown = false;
  private finishing = false;
  private graceTimer: NodeJS.Timeout | undefined;
  private resolveDone!: () => void;
  private socket: Duplex;
  private socketClosed = false;
  private over = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  /** Negotiated; waiting for earlier storage operations of the export before the final reply. */
  private entering = false;
  /** Bytes that arrived while entering (a client that did not wait for the reply). */
  private early: Buffer[] = [];
  private readonly userBuffers: boolean;

  constructor(socket: Duplex, exports: readonly ServedExport[], opts: ConnectionOptions) {
    const cfg = (this.cfg = withDefaults(opts));
    this.hs = new ServerHandshake(exports, { tls: cfg.tls?.mode ?? 'off' });
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    const hsLimit = cfg.handshakeTimeoutMs;
    if (hsLimit > 0) {
      this.handshakeTimer = setTimeout(() => {
        if (this.phase !== 'handshake' || this.entering) return;
        this.closeReason ??= `handshake did not finish within ${hsLimit / 1000} s`;
        log('%s', this.closeReason);
        this.phase = 'closing';
        this.socket.destroy();
      }, hsLimit);
      this.handshakeTimer.unref();
    }

    const onread = { buffer: () => this.nextReadBuffer(), callback: (n: number, buf: Uint8Array) => this.onUserRead(n, buf) };
    // TLS replaces the socket mid-handshake: plain stream events then.
    const taken = takeOver(socket, cfg.userBuffers && !cfg.tls ? onread : undefined, this.onDataEvent);
    this.socket = taken.socket;
    this.userBuffers = taken.userBuffers;
    this.out = new ReplySender(this.socket, cfg.pool, (cost) => this.release(cost));
    this.listen(this.socket);
    this.out.send([this.hs.greeting()]);
  }

  private readonly onDataEvent = (chunk: Buffer): void => this.onData(chunk);
  private readonly onEndEvent = (): void => this.onPeerEnd();
  private readonly onCloseEvent = (): void => this.onClose();
  private readonly onErrorEvent = (err: Error): void => {
    log('connection error: %s', err.message);
    this.closeReason ??= err.message;
  };

  private listen(socket: Duplex): void {
    socket.on('end', this.onEndEvent);
    socket.on('error', this.onErrorEvent);
    socket.on('close', this.onCloseEvent);
  }

  /** NBD_OPT_STARTTLS was acknowledged (the ACK is queued in clear): option haggling continues over TLS. */
  private startTls(): void {
    const raw = this.socket;
    raw.pause();
    raw.off('data', this.onDataEvent);
    raw.off('end', this.onEndEvent);
    upgradeToTls(raw, this.cfg.tls!, {
      wrapped: (secure) => {
        raw.off('close', this.onCloseEvent); // the TLS socket reports the close from now on
        this.socket = secure;
        this.out.socket = secure;
        secure.on('data', this.onDataEvent);
        this.listen(secure);
      },
      failed: (reason) => {
        this.closeReason ??= reason;
      },
      secured: () => this.hs.tlsStarted(),
    });
  }

  // -------------------------------------------------------------------------------------------
  // Input

  /** Node's onread asks where the next read lands: the handshake's shared buffer, or the receiver's choice. */
  private nextReadBuffer(): Uint8Array {
    return this.tx ? this.tx.readTarget() : handshakeRead;
  }

  private onUserRead(n: number, buf: Uint8Array): void {
    const tx = this.tx;
    if (!tx || buf === handshakeRead || this.phase === 'handshake') {
      // Handshake traffic is small: give the machine its own copy (its queue may keep bytes).
      this.onData(Buffer.from(buf.subarray(0, n)));
      return;
    }
    tx.received(n, buf);
  }

  private onData(chunk: Buffer): void {
    if (this.entering) {
      this.early.push(chunk);
      return;
    }
    if (this.phase === 'handshake') {
      const step = this.hs.push(chunk);
      if (step.negotiated && !step.close && !step.startTls) {
        this.enterTransmission(step.send, step.negotiated);
        return;
      }
      this.out.send(step.send);
      if (step.startTls) {
        this.startTls();
        return;
      }
      if (step.close) {
        log('handshake ended: %s', step.close.reason);
        this.closeReason = step.close.reason;
        this.phase = 'closing';
        this.endSocket();
        return;
      }
      return;
    }
    if (this.phase === 'transmission') this.tx?.push(chunk);
  }

  /**
   * The client chose an export. Its final reply (and so the client's first request) waits until
   * every storage operation started on the export before now has finished: a client that resends a
   * dropped connection's requests here must not be overtaken by the old connection's writes still
   * running (the kernel's request timeout does exactly that). Usually nothing is running.
   */
  private enterTransmission(reply: Buffer[], n: NonNullable<ReturnType<ServerHandshake['push']>['negotiated']>): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer); // the client did its part
    this.entering = true;
    this.socket.pause();
    const activity = activityOf(n.export.backend);
    const go = (waited: boolean): void => {
      this.entering = false;
      if (this.phase !== 'handshake' || this.socketClosed) return; // shut down or closed meanwhile
      this.out.send(reply);
      this.out.transmission = true;
      const backend = n.export.backend;
      this.exp = n.export;
      this.exportName = n.export.name;
      this.out.structured = n.structured;
      const { maxPayload, pool, budget, maxInFlight, maxInFlightBytes } = this.cfg;
      const limits = { size: backend.size, readOnly: isReadOnly(n.export), structured: n.structured, maxPayload };
      const { socket, out } = this;
      // With user buffers, received bytes live in the reused scratch buffer: payloads must be copies.
      const reusedInput = this.userBuffers;
      const tx = new Transmission({ socket, out, backend, limits, pool, budget, activity, reusedInput, maxInFlight, maxInFlightBytes, events: this.txEvents });
      this.tx = tx;
      this.phase = 'transmission';
      log('transmission: export %j structured=%s', n.export.name, n.structured);
      if (this.endedEarly) tx.stop();
      if (this.shuttingDown) this.beginTransmissionShutdown();
      // While we waited the socket was not read: a client that closed it meanwhile gets nothing run.
      tx.start(waited, n.leftover, this.early.splice(0));
    };
    if (activity.inProgress === 0) go(false);
    else {
      log('waiting for %d storage operation(s) of earlier connections before transmission', activity.inProgress);
      void activity.barrier().then(() => go(true));
    }
  }

  /** What the transmission phase reports; the connection decides what it means for its life. */
  private readonly txEvents: TransmissionEvents = {
    disconnect: () => {
      log('NBD_CMD_DISC');
      this.closeReason ??= 'client sent NBD_CMD_DISC';
      this.maybeFinish();
    },
    violation: (reason) => {
      log('protocol violation, closing connection: %s', reason);
      this.closeReason = `protocol violation: ${reason}`;
      this.phase = 'closing';
      this.socket.destroy();
    },
    endedWhilePaused: () => {
      this.closeReason ??= ENDED_WHILE_PAUSED;
      this.onPeerEnd();
    },
    opEnded: () => this.maybeOver(),
  };

  private onPeerEnd(): void {
    // The client closed its side: what is in flight still completes (and is answered if the
    // socket still allows it); nothing more will arrive.
    if (this.tx) this.tx.stop();
    else this.endedEarly = true;
    this.maybeFinish();
  }

  /** A reply has left (or cannot): the request no longer counts against the bounds. */
  private release(cost: number): void {
    this.tx?.released(cost);
    this.maybeFinish();
  }

  // -------------------------------------------------------------------------------------------
  // Ending

  shutdown(): Promise<void> {
    if (this.phase === 'closed') return this.done;
    if (!this.shuttingDown) {
      this.shuttingDown = true;
      this.graceTimer = setTimeout(() => {
        log('shutdown grace period over, closing connection');
        this.closeReason ??= 'server shut down';
        this.socket.destroy();
      }, this.cfg.shutdownGraceMs);
      this.graceTimer.unref();
      if (this.phase === 'handshake') {
        // Options from now on get NBD_REP_ERR_SHUTDOWN; an idle client is closed at once.
        this.hs.beginShutdown();
        this.closeReason ??= 'server shut down';
        this.phase = 'closing';
        this.endSocket();
      } else if (this.phase === 'transmission') {
        this.beginTransmissionShutdown();
      }
    }
    return this.done;
  }

  private beginTransmissionShutdown(): void {
    this.tx?.shutDown();
    this.closeReason ??= 'server shut down';
    this.maybeFinish();
  }

  /** Close once nothing is in flight and no more requests will be served. */
  private maybeFinish(): void {
    const tx = this.tx;
    if (this.finishing || this.phase !== 'transmission' || !tx) return;
    if (!(tx.stopped || this.shuttingDown) || tx.requests.inFlight > 0) return;
    this.finishing = true;
    this.phase = 'closing';
    tx.stop();
    if (!(this.shuttingDown && this.exp && !isReadOnly(this.exp))) {
      this.endSocket();
      return;
    }
    const op = tx.requests.beginOp(false);
    this.exp.backend
      .flush()
      .catch((err: unknown) => log('flush on close failed: %s', (err as Error).message))
      .finally(() => {
        this.endSocket();
        tx.requests.endOp(op);
      });
  }

  /** Half-close our side; a peer that never closes its side is cut off after the grace period. */
  private endSocket(): void {
    this.socket.end();
    // Keep reading (and ignoring) so the peer's close is seen and the socket can finish closing.
    this.socket.resume();
    const t = setTimeout(() => this.socket.destroy(), this.cfg.shutdownGraceMs);
    t.unref();
    this.socket.once('close', () => clearTimeout(t));
  }

  private onClose(): void {
    if (this.socketClosed) return;
    this.socketClosed = true;
    this.tx?.closed(); // no more framing; a payload being received will not be completed
    if (this.graceTimer) clearTimeout(this.graceTimer);
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.phase !== 'closed') this.phase = 'closing';
    this.closeReason ??= 'client closed the connection';
    const ops = this.tx?.requests.ops ?? 0;
    if (ops > 0) log('socket closed (%s); waiting for %d storage operation(s)', this.closeReason, ops);
    this.maybeOver();
  }

  /**
   * The one place that decides when a connection is over: its socket has closed and every storage
   * operation it started has finished. Until then a write of this connection may still land, so
   * `done` (which local attach and shutdown wait for) is not resolved.
   */
  private maybeOver(): void {
    if (this.over || !this.socketClosed || (this.tx?.requests.ops ?? 0) > 0) return;
    this.over = true;
    this.phase = 'closed';
    log('connection closed: %s', this.closeReason);
    this.resolveDone();
  }
}
