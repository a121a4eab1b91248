// One client connection of the built-in server, and the one place that decides its life: phases
// (handshake, waiting for earlier writes, transmission, closing, closed) and when it is over (socket
// closed and every storage operation it started finished: `maybeOver`). Around it: the pure
// handshake (handshake.ts), request framing and checks (requests.ts), the reply side (replies.ts),
// the socket takeover (socket-edge.ts), per-export storage activity (activity.ts) and the process's
// payload budget (budget.ts).
//
// Transmission: requests are dispatched as soon as they are framed and run concurrently; each reply
// is written when its request completes (completion order, proto.md "Transmission"). Memory is
// bounded: at most `maxInFlight` requests and `maxInFlightBytes` payload bytes per connection, and
// the process's budget for all together, are held (counted until the reply has left the socket);
// past a bound the socket is paused and framing stops until replies drain. A paused socket is not
// read, so before framing resumes the socket is asked whether the client has ended it meanwhile; if
// so nothing it sent that was not framed yet is run (resumeFraming). A protocol violation (bad
// request magic) closes this connection only.

import type net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import createDebug from '../debug.ts';
import { Cmd, CmdFlag, DEFAULT_MAX_PAYLOAD, WireErr, cmdName, wireErrName } from '../protocol/constants.ts';
import type { Request } from '../protocol/codec.ts';
import { activityOf, type ExportActivity } from './activity.ts';
import { BufferPool } from './buffer-pool.ts';
import { type PayloadBudget, processBudget } from './budget.ts';
import { isReadOnly, type ServedExport } from './export.ts';
import { ServerHandshake, type TlsMode } from './handshake.ts';
import { INLINE_WRITE_MAX_BYTES } from './inline-io.ts';
import { OK, RequestReader, checkRequest, discardedWriteVerdict, wireErrorOf, type ExportLimits, type Incoming } from './requests.ts';
import { ARENA_READ_MAX, ReplySender } from './replies.ts';
import { adoptWithUserBuffers, peerHasEnded, peerVerificationError } from './socket-edge.ts';

const log = createDebug('nbd:server');

/** Shared by all connections of the process: idle payload buffers for reuse (bounded). */
const sharedPool = new BufferPool();

/** Per-connection read buffer when reads cannot land in a payload directly (allocated at transmission). */
const SCRATCH_SIZE = 256 * 1024;
/**
 * Where handshake reads land, shared by every connection of the process: what a read brings is
 * copied out on the same stack (onUserRead), so a connection that never reaches transmission costs
 * no buffer of its own.
 */
const handshakeRead = Buffer.allocUnsafeSlow(16 * 1024);
/** Default time from accept to the end of option haggling (qemu-nbd's --handshake-limit is 10 s too). */
export { DEFAULT_HANDSHAKE_TIMEOUT_MS } from './defaults.ts';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS } from './defaults.ts';
/** Below this many missing payload bytes, read into the scratch buffer instead. */
const DIRECT_MIN = 16 * 1024;
/**
 * After a large WRITE, the next request's header is read with a small read, so that little of the
 * payload that likely follows lands in the scratch buffer (to be copied) instead of straight in
 * its own buffer. (In the test VM's profile of 1 MiB writes, ~11% of the loop's time went to copying
 * payload fronts out of a full-size scratch read; the throughput gain of this was within the noise.)
 */
const SMALL_READ = 4096;
const BIG_WRITE = 64 * 1024;
/** WRITEs longer than this are received straight into the export's storage when it offers it (placeWrite). */
const PLACE_MIN_EXCLUSIVE = INLINE_WRITE_MAX_BYTES;
/** Why a connection ended when its client closed it while framing was paused (resumeFraming). */
export const ENDED_WHILE_PAUSED = 'client closed the connection while reading was paused; requests not yet started were not run';

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
  tls?: {
    mode: Exclude<TlsMode, 'off'>;
    context: tls.SecureContext;
    handshakeTimeoutMs?: number;
    /** Require a client certificate that verifies against the context's CA (nbdkit's --tls-verify-peer). */
    verifyPeer?: boolean;
    /** Pre-shared keys by identity (nbdkit's --tls-psk) instead of certificates; `context` then allows PSK suites. */
    psk?: ReadonlyMap<string, Buffer>;
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

  private readonly maxInFlight: number;
  private readonly maxInFlightBytes: number;
  private readonly maxPayload: number;
  private readonly graceMs: number;
  private readonly hs: ServerHandshake;
  private readonly pool: BufferPool;
  private reader: RequestReader | undefined;
  private exp: ServedExport | undefined;
  private limits: ExportLimits | undefined;
  private readonly out: ReplySender;
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  private stopReading = false; // DISC received, peer ended, or protocol violation
  private shuttingDown = false;
  private finishing = false;
  private graceTimer: NodeJS.Timeout | undefined;
  private resolveDone!: () => void;
  private socket: Duplex;
  private readonly tlsOptions: ConnectionOptions['tls'];
  private scratch: Buffer | undefined;
  private scratchSmall: Buffer | undefined;
  private readonly budget: PayloadBudget;
  /** Storage operations of the export (all connections): transmission starts after earlier ones end. */
  private activity: ExportActivity | undefined;
  /** Storage operations this connection started that have not finished. */
  private ops = 0;
  private socketClosed = false;
  private over = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  /** Negotiated; waiting for earlier storage operations of the export before the final reply. */
  private entering = false;
  /** Bytes that arrived while entering (a client that did not wait for the reply). */
  private early: Buffer[] = [];
  /** The last request framed was a large WRITE: read the next header with a small read. */
  private afterBigWrite = false;
  private direct: Buffer | undefined;
  /** Large WRITEs for the pool, sent at the end of this loop turn (queueWrite). */
  private queuedWrites: { req: Request; payload: Buffer; cost: number; op: number }[] = [];
  private readonly userBuffers: boolean;
  /** The socket was found live in this loop turn (endedWhilePaused). */
  private liveThisTurn = false;
  private readonly forgetLive = (): void => {
    this.liveThisTurn = false;
  };

  constructor(
    socket: Duplex,
    private readonly exports: readonly ServedExport[],
    opts: ConnectionOptions,
  ) {
    this.maxInFlight = opts.maxInFlight ?? 64;
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 64 * 1024 * 1024;
    this.maxPayload = opts.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.graceMs = opts.shutdownGraceMs ?? 5000;
    this.tlsOptions = opts.tls;
    this.hs = new ServerHandshake(exports, { tls: opts.tls?.mode ?? 'off' });
    this.pool = opts.pool ?? sharedPool;
    this.budget = opts.budget ?? processBudget;
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    const hsLimit = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
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

    const adopted =
      opts.userBuffers === false || opts.tls // TLS replaces the socket mid-handshake: plain stream events
        ? undefined
        : adoptWithUserBuffers(socket, { buffer: () => this.nextReadBuffer(), callback: (n, buf) => this.onUserRead(n, buf) });
    this.socket = adopted ?? socket;
    this.out = new ReplySender(this.socket, this.pool, (cost) => this.release(cost));
    this.userBuffers = adopted !== undefined;
    socket = this.socket;
    const s = socket as Duplex & { setNoDelay?: (v: boolean) => void };
    s.setNoDelay?.(true); // proto.md "Protocol phases": both sides SHOULD disable Nagle
    if (adopted) adopted.resume(); // flowing, so that 'end' is emitted (data goes through onread)
    else {
      socket.on('data', this.onDataEvent);
      socket.resume(); // a socket accepted with pauseOnConnect does not start flowing on its own
    }
    this.listen(socket);
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

  /**
   * NBD_OPT_STARTTLS was acknowledged (the ACK is queued in clear): run the TLS handshake on the
   * socket and continue the option haggling over it (proto.md "TLS support"). The client sends
   * nothing until it has read the ACK, so no bytes are in flight between the two.
   */
  private upgradeToTls(): void {
    const opts = this.tlsOptions!;
    const raw = this.socket;
    raw.pause();
    raw.off('data', this.onDataEvent);
    raw.off('end', this.onEndEvent);
    const wrap = (): void => {
      raw.off('close', this.onCloseEvent); // the TLS socket reports the close from now on
      const verify = opts.verifyPeer === true;
      const psk = opts.psk;
      const secure = new tls.TLSSocket(raw as net.Socket, {
        isServer: true,
        secureContext: opts.context,
        requestCert: verify,
        rejectUnauthorized: verify,
        ...(psk && {
          pskCallback: (_socket: tls.TLSSocket, identity: string): Buffer | null => {
            const key = psk.get(identity) ?? null;
            if (!key) this.closeReason ??= `TLS: unknown PSK identity ${JSON.stringify(identity)}`;
            return key;
          },
        }),
      } as tls.TLSSocketOptions);
      this.socket = secure;
      this.out.socket = secure;
      const timer = setTimeout(() => {
        this.closeReason ??= 'TLS handshake did not finish in time';
        secure.destroy();
      }, opts.handshakeTimeoutMs ?? 30_000);
      timer.unref();
      secure.once('secure', () => {
        clearTimeout(timer);
        if (verify) {
          const refused = peerVerificationError(secure);
          if (refused) {
            this.closeReason ??= `TLS client certificate refused: ${refused}`;
            log('%s', this.closeReason);
            secure.destroy();
            return;
          }
        }
        log('TLS established: %s %s', secure.getProtocol(), secure.getCipher()?.name);
        this.hs.tlsStarted();
      });
      secure.once('close', () => clearTimeout(timer));
      secure.on('data', this.onDataEvent);
      this.listen(secure);
    };
    // The ACK must leave in clear before TLS takes the socket over.
    if (raw.writableLength > 0) raw.once('drain', wrap);
    else wrap();
  }

  // -------------------------------------------------------------------------------------------
  // Input

  /** Node's onread asks where the next read lands: the rest of a WRITE payload, or the scratch buffer. */
  private nextReadBuffer(): Uint8Array {
    if (!this.scratch) return handshakeRead;
    this.direct = this.reader && !this.stopReading ? this.reader.directTarget(DIRECT_MIN) : undefined;
    return this.direct ?? (this.afterBigWrite ? this.scratchSmall! : this.scratch);
  }

  private onUserRead(n: number, buf: Uint8Array): void {
    if (this.direct && buf === this.direct) {
      this.direct = undefined;
      if (this.phase !== 'transmission' || this.stopReading) return;
      // Mid-payload there is nothing to frame: go straight back to reading (a 1 MiB payload
      // arrives in ~16 reads; under emulation each pump costs tens of µs).
      if (this.reader!.filledDirect(n)) this.pump();
      return;
    }
    if (buf === handshakeRead || this.phase === 'handshake') {
      // Handshake traffic is small: give the machine its own copy (its queue may keep bytes).
      this.onData(Buffer.from(buf.subarray(0, n)));
      return;
    }
    this.onData(Buffer.from(buf.buffer, buf.byteOffset, n));
    // The scratch buffer is reused for the next read: copy out whatever is still queued.
    this.reader?.detach(buf.buffer);
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
        this.upgradeToTls();
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
    if (this.phase === 'transmission' && this.reader && !this.stopReading) {
      this.reader.push(chunk);
      this.pump();
    }
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
    this.pause();
    const activity = activityOf(n.export.backend);
    const go = (waited: boolean): void => {
      this.entering = false;
      if (this.phase !== 'handshake' || this.socketClosed) return; // shut down or closed meanwhile
      this.out.send(reply);
      this.out.transmission = true;
      this.activity = activity;
      this.exp = n.export;
      this.exportName = n.export.name;
      this.out.structured = n.structured;
      this.limits = {
        size: n.export.backend.size,
        readOnly: isReadOnly(n.export),
        structured: n.structured,
        maxPayload: this.maxPayload,
      };
      this.scratch = Buffer.allocUnsafeSlow(SCRATCH_SIZE);
      this.scratchSmall = this.scratch.subarray(0, SMALL_READ);
      // With user buffers, received bytes live in the reused scratch buffer: payloads must be copies.
      const place = n.export.backend.writeTarget ? (req: Request) => this.placeWrite(req) : undefined;
      this.reader = new RequestReader(this.maxPayload, (len) => this.pool.take(len), this.userBuffers, place);
      this.phase = 'transmission';
      log('transmission: export %j structured=%s', n.export.name, n.structured);
      if (this.shuttingDown) this.beginTransmissionShutdown();
      // While we waited the socket was not read: a client that closed it meanwhile gets nothing run.
      if (waited && this.endedWhilePaused()) return;
      if (n.leftover.length > 0) this.reader.push(n.leftover);
      for (const c of this.early.splice(0)) this.reader.push(c);
      this.pump();
      if (!this.stopReading && !this.paused) this.socket.resume();
    };
    if (activity.inProgress === 0) go(false);
    else {
      log('waiting for %d storage operation(s) of earlier connections before transmission', activity.inProgress);
      void activity.barrier().then(() => go(true));
    }
  }

  /** Frame and dispatch requests while within bounds; their replies leave together (ReplySender.burst). */
  private pump(): void {
    const reader = this.reader;
    if (!reader) return;
    this.out.burst(() => this.frame(reader));
  }

  /**
   * Fast path for a small READ with simple replies: data read inline straight into the arena behind
   * its header. False: the backend would block (or has no inline path); use the general path.
   */
  private readIntoArena(req: Request, cost: number): boolean {
    const b = this.exp!.backend;
    const readNow = b.readNow;
    if (!readNow) return false;
    try {
      return this.out.readIntoArena(req, cost, (into) => readNow.call(b, Number(req.offset), into));
    } catch (err) {
      this.failed(req, undefined, undefined, err, cost);
      return true;
    }
  }

  private frame(reader: RequestReader): void {
    while (!this.stopReading) {
      if (this.socket.destroyed) {
        // A reply could not be written (the peer is gone): what is still buffered is not served.
        this.stopReading = true;
        return;
      }
      if (this.inFlight >= this.maxInFlight || this.inFlightBytes >= this.maxInFlightBytes) {
        this.pause();
        return;
      }
      if (!this.budget.allows(this.inFlightBytes)) {
        this.pause();
        this.budget.wait(this.onBudget);
        return;
      }
      let item: Incoming | null;
      try {
        item = reader.next();
      } catch (err) {
        this.protocolViolation((err as Error).message);
        return;
      }
      if (!item) break;
      this.dispatch(item);
    }
    // Framing caught up: let more bytes in, but never hold more than one partial WRITE payload.
    if (!this.stopReading) this.resume();
  }

  private readonly onBudget = (): void => this.resumeFraming();

  /**
   * Framing restarts after a pause (bounds, budget). The paused socket was not read, so a client
   * that closed it meanwhile has not been noticed: what it sent is still in our reader and the
   * socket buffer, and the kernel's nbd driver resends such requests on another connection after
   * its request timeout (drivers/block/nbd.c nbd_xmit_timeout: nbd_mark_nsock_dead shuts the socket
   * down, nbd_requeue_cmd). Ask the socket before framing any of it.
   */
  private resumeFraming(): void {
    if (!this.paused || this.stopReading) return;
    if (this.endedWhilePaused()) return;
    this.pump();
  }

  /**
   * The client has ended the socket while we were not reading it: end like onPeerEnd (requests
   * already dispatched complete), and run nothing not yet framed, NBD_CMD_DISC among it or not
   * (docs/decisions.md "connection lifecycle"). False (nothing done) when the socket is live or
   * cannot be asked (a stream without a descriptor). Asked at most once per loop turn: a connection
   * held at its bound resumes on nearly every reply (≈2 µs a poll through koffi on the host). An end
   * that arrives later in the turn is seen at the next resume; a client that resends elsewhere must
   * first negotiate a new connection, which takes round trips (several turns).
   */
  private endedWhilePaused(): boolean {
    if (this.liveThisTurn) return false;
    if (!peerHasEnded(this.socket)) {
      this.liveThisTurn = true;
      setImmediate(this.forgetLive);
      return false;
    }
    log('the client ended the connection while framing was paused: its unframed requests are not run');
    this.closeReason ??= ENDED_WHILE_PAUSED;
    this.onPeerEnd();
    return true;
  }

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

  private onPeerEnd(): void {
    // The client closed its side: what is in flight still completes (and is answered if the
    // socket still allows it); nothing more will arrive.
    this.stopReading = true;
    this.maybeFinish();
  }

  private protocolViolation(reason: string): void {
    log('protocol violation, closing connection: %s', reason);
    this.closeReason = `protocol violation: ${reason}`;
    this.stopReading = true;
    this.phase = 'closing';
    this.socket.destroy();
  }

  // -------------------------------------------------------------------------------------------
  // Requests

  private dispatch(item: Incoming): void {
    const { req } = item;
    this.afterBigWrite = req.type === Cmd.WRITE && req.length >= BIG_WRITE;
    const lim = this.limits!;
    if (item.kind === 'request' && req.type === Cmd.DISC) {
      // proto.md "NBD_CMD_DISC": handle outstanding requests, then close. No reply.
      log('NBD_CMD_DISC');
      this.closeReason ??= 'client sent NBD_CMD_DISC';
      this.stopReading = true;
      this.pause();
      this.maybeFinish();
      return;
    }
    // A placed WRITE passed checkRequest when it was placed (placeWrite); only shutdown can refuse it now.
    let verdict =
      item.kind === 'discarded-write' ? discardedWriteVerdict(req, lim) : item.placed ? OK : checkRequest(req, lim);
    if (verdict.error === 0 && this.shuttingDown) {
      verdict = { error: WireErr.ESHUTDOWN, message: 'server is shutting down' };
    }
    const payload = item.kind === 'request' ? item.payload : undefined;
    const cost = (payload?.length ?? 0) + (req.type === Cmd.READ && verdict.error === 0 ? req.length : 0);
    this.inFlight++;
    this.inFlightBytes += cost;
    this.budget.take(cost);
    if (item.kind === 'request' && item.placed) {
      this.placedWrite(req, payload!, verdict.error, verdict.message, cost); // never a pool buffer
      return;
    }
    if (verdict.error !== 0) {
      if (payload) this.pool.give(payload);
      log('%s cookie %s: %s (%s)', cmdName(req.type), req.cookie, wireErrName(verdict.error), verdict.message);
      this.out.error(req, verdict.error, verdict.message, cost);
      return;
    }
    // Fast path: a backend that can answer without blocking (page cache, memory) does so here, and
    // the reply joins the others of this burst (arena, or pump's cork).
    if (this.out.inBurst && req.type === Cmd.READ && !this.out.structured && req.length > 0 && req.length <= ARENA_READ_MAX) {
      if (this.readIntoArena(req, cost)) return;
    }
    const readBuf = req.type === Cmd.READ && req.length > 0 ? this.pool.take(req.length) : undefined;
    let now: boolean;
    try {
      now = this.executeNow(req, payload, readBuf);
    } catch (err) {
      this.failed(req, payload, readBuf, err, cost);
      return;
    }
    if (now) {
      this.succeeded(req, payload, readBuf, cost);
      return;
    }
    let kept = payload;
    if (payload && item.kind === 'request' && item.transient) {
      // The payload is a view of the read buffer, which the next socket read overwrites.
      kept = this.pool.take(payload.length);
      payload.copy(kept);
    }
    if (kept && req.type === Cmd.WRITE && (req.flags & CmdFlag.FUA) === 0 && this.exp!.backend.writev) {
      this.queueWrite(req, kept, cost);
      return;
    }
    const op = this.beginOp(req.type === Cmd.WRITE || req.type === Cmd.WRITE_ZEROES || req.type === Cmd.TRIM);
    this.execute(req, kept, readBuf).then(
      () => {
        this.succeeded(req, kept, readBuf, cost);
        this.endOp(op);
      },
      (err: unknown) => {
        this.failed(req, kept, readBuf, err, cost);
        this.endOp(op);
      },
    );
  }

  /**
   * WRITEs that go to the pool (large ones, FUA aside, on a disk file) wait for the end of this loop
   * turn, and those that continue one another (a sequential stream, which the kernel splits into
   * 128 KiB requests) go in one writev of at most 64 buffers: one pool round trip per run instead of
   * one per request. Image on ext4 in the VM, 1 MiB writes: medians 74 vs 68 MB/s (decisions.md).
   */
  private queueWrite(req: Request, payload: Buffer, cost: number): void {
    this.queuedWrites.push({ req, payload, cost, op: this.beginOp(true) });
    if (this.queuedWrites.length === 1) setImmediate(this.flushWrites);
  }

  private readonly flushWrites = (): void => {
    const q = this.queuedWrites;
    this.queuedWrites = [];
    let i = 0;
    while (i < q.length) {
      let j = i + 1;
      let end = Number(q[i]!.req.offset) + q[i]!.payload.length;
      while (j < q.length && Number(q[j]!.req.offset) === end && j - i < 64) {
        end += q[j]!.payload.length;
        j++;
      }
      const run = q.slice(i, j);
      this.exp!.backend.writev!(Number(run[0]!.req.offset), run.map((w) => w.payload)).then(
        () => {
          for (const w of run) this.succeeded(w.req, w.payload, undefined, w.cost);
          for (const w of run) this.endOp(w.op);
        },
        (err: unknown) => {
          for (const w of run) this.failed(w.req, w.payload, undefined, err, w.cost);
          for (const w of run) this.endOp(w.op);
        },
      );
      i = j;
    }
  };

  /**
   * A WRITE's payload is received straight into the export's storage (Backend.writeTarget) when the
   * request will be executed: it passed every check and the server is not shutting down. On a tmpfs
   * file this saves a copy and the pool round trip per request; the write is done when the last
   * byte has arrived.
   */
  private placeWrite(req: Request): Buffer | undefined {
    // Small WRITEs keep the inline path, and their replies leave with their burst: placing 4 KiB
    // random writes (a mincore call each, replies held) measured slower in the VM.
    if (req.length <= PLACE_MIN_EXCLUSIVE || this.shuttingDown || checkRequest(req, this.limits!).error !== 0) return undefined;
    return this.exp!.backend.writeTarget!(Number(req.offset), req.length);
  }

  /** The payload was received into the export's storage: the write is done, but FUA still asks for a flush. */
  private placedWrite(req: Request, target: Buffer, error: number, message: string, cost: number): void {
    const b = this.exp!.backend;
    b.writeTargetDone?.(target);
    if (error !== 0) {
      // Shutdown began while the payload arrived: the client is told the write failed (its data may
      // or may not be there, as for any failed write, proto.md "Error values").
      this.out.error(req, error, message, cost);
    } else if ((req.flags & CmdFlag.FUA) === 0) {
      // Held like a pool completion: a payload completes on nearly every socket read of a stream of
      // large WRITEs, and one reply per socket write is what ReplySender.hold measured as costly.
      this.out.hold();
      this.out.ok(req, undefined, cost);
    } else {
      const op = this.beginOp(false);
      b.flush().then(
        () => {
          this.out.ok(req, undefined, cost);
          this.endOp(op);
        },
        (err: unknown) => {
          this.failed(req, undefined, undefined, err, cost);
          this.endOp(op);
        },
      );
    }
  }

  /**
   * A storage operation starts (on the pool): the connection is not over until it ends. Those that
   * change the data (`changes`) also hold back later connections' transmission (enterTransmission);
   * READs and FLUSHes cannot be overtaken harmfully.
   */
  private beginOp(changes: boolean): number {
    this.ops++;
    return changes ? this.activity!.begin() : -1;
  }

  private endOp(id: number): void {
    this.ops--;
    if (id >= 0) this.activity!.end(id);
    this.maybeOver();
  }

  /** A reply has left (or cannot): the request no longer counts against the bounds. */
  private release(cost: number): void {
    this.inFlight--;
    this.inFlightBytes -= cost;
    this.budget.give(cost);
    this.resumeFraming();
    this.maybeFinish();
  }

  private succeeded(req: Request, payload: Buffer | undefined, data: Buffer | undefined, cost: number): void {
    if (payload) this.pool.give(payload); // the backend is done with it
    this.out.ok(req, data, cost);
  }

  private failed(req: Request, payload: Buffer | undefined, data: Buffer | undefined, err: unknown, cost: number): void {
    if (payload) this.pool.give(payload);
    if (data) this.pool.give(data);
    const code = wireErrorOf(err);
    log('%s cookie %s failed: %s', cmdName(req.type), req.cookie, (err as Error)?.message);
    this.out.error(req, code, `${cmdName(req.type)}: ${(err as Error)?.message ?? String(err)}`, cost);
  }

  /** Run a READ or WRITE now if the backend can without blocking; false: use `execute`. Throws on I/O errors. */
  private executeNow(req: Request, payload: Buffer | undefined, readBuf: Buffer | undefined): boolean {
    const b = this.exp!.backend;
    switch (req.type) {
      case Cmd.READ:
        return readBuf === undefined || (b.readNow?.(Number(req.offset), readBuf) ?? false);
      case Cmd.WRITE:
        return !payload || payload.length === 0 || (b.writeNow?.(Number(req.offset), payload, (req.flags & CmdFlag.FUA) !== 0) ?? false);
      default:
        return false;
    }
  }

  private async execute(req: Request, payload: Buffer | undefined, readBuf: Buffer | undefined): Promise<void> {
    const b = this.exp!.backend;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    const offset = Number(req.offset);
    switch (req.type) {
      case Cmd.READ:
        if (readBuf) await b.read(offset, readBuf);
        return;
      case Cmd.WRITE:
        if (payload && payload.length > 0) await b.write(offset, payload, fua);
        return;
      case Cmd.WRITE_ZEROES:
        if (req.length > 0) await b.writeZeroes(offset, req.length, fua, (req.flags & CmdFlag.NO_HOLE) === 0);
        return;
      case Cmd.TRIM:
        if (req.length > 0) await b.trim(offset, req.length, fua);
        return;
      case Cmd.FLUSH:
        await b.flush();
        return;
      case Cmd.CACHE:
        return; // a hint; the page cache does the rest
      default:
        throw new Error(`unexpected ${cmdName(req.type)}`);
    }
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
      }, this.graceMs);
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
    this.closeReason ??= 'server shut down';
    this.maybeFinish();
  }

  /** Close once nothing is in flight and no more requests will be served. */
  private maybeFinish(): void {
    if (this.finishing || this.phase !== 'transmission') return;
    if (!(this.stopReading || this.shuttingDown) || this.inFlight > 0) return;
    this.finishing = true;
    this.phase = 'closing';
    this.stopReading = true;
    if (!(this.shuttingDown && this.exp && !isReadOnly(this.exp))) {
      this.endSocket();
      return;
    }
    const op = this.beginOp(false);
    this.exp.backend
      .flush()
      .catch((err: unknown) => log('flush on close failed: %s', (err as Error).message))
      .finally(() => {
        this.endSocket();
        this.endOp(op);
      });
  }

  /** Half-close our side; a peer that never closes its side is cut off after the grace period. */
  private endSocket(): void {
    this.socket.end();
    // Keep reading (and ignoring) so the peer's close is seen and the socket can finish closing.
    this.paused = false;
    this.socket.resume();
    const t = setTimeout(() => this.socket.destroy(), this.graceMs);
    t.unref();
    this.socket.once('close', () => clearTimeout(t));
  }

  private onClose(): void {
    if (this.socketClosed) return;
    this.socketClosed = true;
    this.stopReading = true;
    this.budget.forget(this.onBudget);
    if (this.graceTimer) clearTimeout(this.graceTimer);
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    const target = this.reader?.abandon(); // a payload that will not be completed
    if (target) this.exp?.backend.writeTargetDone?.(target);
    if (this.phase !== 'closed') this.phase = 'closing';
    this.closeReason ??= 'client closed the connection';
    if (this.ops > 0) log('socket closed (%s); waiting for %d storage operation(s)', this.closeReason, this.ops);
    this.maybeOver();
  }

  /**
   * The one place that decides when a connection is over: its socket has closed and every storage
   * operation it started has finished. Until then a write of this connection may still land, so
   * `done` (which local attach and shutdown wait for) is not resolved.
   */
  private maybeOver(): void {
    if (this.over || !this.socketClosed || this.ops > 0) return;
    this.over = true;
    this.phase = 'closed';
    log('connection closed: %s', this.closeReason);
    this.resolveDone();
  }
}
