// The receiving side of one server connection in transmission (ws's Receiver): where each socket
// read lands and what becomes of the bytes. It owns the connection's read buffer (scratch), direct
// reads into the WRITE payload being assembled, and the placement of large WRITE payloads straight
// into the export's storage (Backend.writeTarget). Bytes in, framed requests with their payloads out
// (RequestReader does the framing). It never touches a socket: the connection (or a test) asks it
// where the next read goes (`readTarget`), reports what arrived (`received`, or `push` for bytes in
// buffers of their own), and pulls requests (`next`) when told there may be some (`onFrame`).

import { Cmd } from '../protocol/constants.ts';
import type { Request } from '../protocol/codec.ts';
import type { BufferPool } from './buffer-pool.ts';
import type { Backend } from './export.ts';
import { INLINE_WRITE_MAX_BYTES } from './inline-io.ts';
import { RequestReader, checkRequest, type ExportLimits, type Incoming } from './requests.ts';

/** Per-connection read buffer when reads cannot land in a payload directly (allocated at transmission). */
export const SCRATCH_SIZE = 256 * 1024;
/** Below this many missing payload bytes, read into the scratch buffer instead. */
export const DIRECT_MIN = 16 * 1024;
/**
 * After a large WRITE, the next request's header is read with a small read, so that little of the
 * payload that likely follows lands in the scratch buffer (to be copied) instead of straight in
 * its own buffer. (In the test VM's profile of 1 MiB writes, ~11% of the loop's time went to copying
 * payload fronts out of a full-size scratch read; the throughput gain of this was within the noise.)
 */
export const SMALL_READ = 4096;
export const BIG_WRITE = 64 * 1024;
/** WRITEs longer than this are received straight into the export's storage when it offers it (placeWrite). */
export const PLACE_MIN_EXCLUSIVE = INLINE_WRITE_MAX_BYTES;

export interface ReceiverOptions {
  limits: ExportLimits;
  /** Where payload buffers come from. */
  pool: BufferPool;
  /**
   * The storage, when large WRITE payloads may be received into it (it has `writeTarget`). Targets
   * it hands out are given back through `writeTargetDone` when a stream ends before they are full.
   */
  storage?: Backend;
  /**
   * Bytes reach `received` in the reused scratch buffer (a socket reading into our buffers): payloads
   * that are views of it are marked `transient`. False when bytes come in buffers of their own (`push`).
   */
  reusedInput: boolean;
  /** There may be requests to take with `next` (called from `received` after a read). */
  onFrame: () => void;
}

export class RequestReceiver {
  private readonly reader: RequestReader;
  private readonly scratch = Buffer.allocUnsafeSlow(SCRATCH_SIZE);
  private readonly scratchSmall = this.scratch.subarray(0, SMALL_READ);
  /** The rest of a WRITE payload that the current read was told to fill (readTarget). */
  private direct: Buffer | undefined;
  /** The last request framed was a large WRITE: read the next header with a small read. */
  private afterBigWrite = false;
  /** Large WRITEs may be received into the storage (not once the connection is shutting down). */
  private placing = true;
  private readonly limits: ExportLimits;
  private readonly storage: Backend | undefined;
  private readonly onFrame: () => void;

  constructor(opts: ReceiverOptions) {
    this.limits = opts.limits;
    this.onFrame = opts.onFrame;
    const pool = opts.pool;
    this.storage = opts.storage?.writeTarget ? opts.storage : undefined;
    const place = this.storage ? (req: Request) => this.placeWrite(req) : undefined;
    this.reader = new RequestReader(opts.limits.maxPayload, (len) => pool.take(len), opts.reusedInput, place);
  }

  /**
   * Where the next read lands: the unfilled rest of a WRITE payload when `framing` and enough of it
   * is missing, else the scratch buffer (its first SMALL_READ bytes after a large WRITE).
   */
  readTarget(framing: boolean): Uint8Array {
    this.direct = framing ? this.reader.directTarget(DIRECT_MIN) : undefined;
    return this.direct ?? (this.afterBigWrite ? this.scratchSmall : this.scratch);
  }

  /**
   * `n` bytes arrived in `buf`, which `readTarget` gave. With `framing` false they are dropped
   * (the connection reads no more requests). `onFrame` runs when a request may be complete; after it
   * returns, what is still queued from the scratch buffer is copied out (the next read reuses it).
   */
  received(n: number, buf: Uint8Array, framing: boolean): void {
    if (this.direct && buf === this.direct) {
      this.direct = undefined;
      // Mid-payload there is nothing to frame: go straight back to reading (a 1 MiB payload
      // arrives in ~16 reads; under emulation each pump costs tens of µs).
      if (framing && this.reader.filledDirect(n)) this.onFrame();
      return;
    }
    if (framing) {
      this.reader.push(Buffer.from(buf.buffer, buf.byteOffset, n));
      this.onFrame();
    }
    this.reader.detach(buf.buffer);
  }

  /** Bytes in a buffer of their own (a stream's 'data' event, handshake leftovers); then take requests with `next`. */
  push(chunk: Buffer): void {
    this.reader.push(chunk);
  }

  /**
   * The next complete request, or null if more bytes are needed. Throws NbdError('NBD_E_PROTOCOL')
   * on a bad magic: the stream is out of step and must be closed.
   */
  next(): Incoming | null {
    const item = this.reader.next();
    if (item) this.afterBigWrite = item.req.type === Cmd.WRITE && item.req.length >= BIG_WRITE;
    return item;
  }

  /** From now on WRITE payloads are not placed into the storage (shutdown: they may be refused). */
  stopPlacing(): void {
    this.placing = false;
  }

  /** The stream has ended: a payload being received into the storage will not be completed. */
  abandon(): void {
    const target = this.reader.abandon();
    if (target) this.storage?.writeTargetDone?.(target);
  }

  /**
   * A WRITE's payload is received straight into the export's storage (Backend.writeTarget) when the
   * request will be executed: it passed every check and the server is not shutting down. On a tmpfs
   * file this saves a copy and the pool round trip per request; the write is done when the last
   * byte has arrived (dispatch.ts placedWrite).
   */
  private placeWrite(req: Request): Buffer | undefined {
    // Small WRITEs keep the inline path, and their replies leave with their burst: placing 4 KiB
    // random writes (a mincore call each, replies held) measured slower in the VM.
    if (req.length <= PLACE_MIN_EXCLUSIVE || !this.placing || checkRequest(req, this.limits).error !== 0) return undefined;
    return this.storage!.writeTarget!(Number(req.offset), req.length);
  }
}
