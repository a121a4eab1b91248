// Transmission-phase input on the server: framing requests (and WRITE payloads) out of a byte
// stream, and checking each request against the export before it reaches a backend. Pure.
// proto.md "Request message", "Request types", "Error values", "Size constraints".

import { Cmd, CmdFlag, REQUEST_LENGTH, WireErr, cmdName } from '../protocol/constants.ts';
import { decodeRequest, type Request } from '../protocol/codec.ts';
import { ByteQueue } from './byte-queue.ts';

export type Incoming =
  /**
   * A request; WRITE carries its payload (a view into the received chunk when it fit in one).
   * `transient`: the payload is a view of memory the reader's owner reuses (a read buffer), valid
   * only until it is handed more input; copy it to keep it longer. `placed`: the payload was
   * received straight into the buffer the `place` hook gave (the export's storage): not the
   * reader's to recycle.
   */
  | { kind: 'request'; req: Request; payload?: Buffer; transient?: boolean; placed?: boolean }
  /** A WRITE longer than the maximum payload: its data was read and discarded, answer EINVAL. */
  | { kind: 'discarded-write'; req: Request };

type ReaderState =
  | { phase: 'header' }
  | { phase: 'payload'; req: Request; buf: Buffer; filled: number; placed: boolean }
  | { phase: 'discard'; req: Request; remaining: number };

export class RequestReader {
  private readonly queue = new ByteQueue();
  private st: ReaderState = { phase: 'header' };

  constructor(
    private readonly maxPayload: number,
    /** Allocates payload buffers (a pool in the server; plain allocation by default). */
    private readonly alloc: (n: number) => Buffer = (n) => Buffer.allocUnsafe(n),
    /**
     * The memory of pushed chunks gets reused: payloads that are views of it are marked `transient`
     * (and payloads spanning several reads are assembled in `alloc`ed buffers).
     */
    private readonly reusedInput = false,
    /**
     * Where a WRITE's payload may be received directly instead (Backend.writeTarget): a buffer of
     * exactly `req.length` bytes, or undefined to use `alloc`. Asked once per WRITE header.
     */
    private readonly place?: (req: Request) => Buffer | undefined,
  ) {}

  /**
   * Where the next socket read may land directly: the unfilled rest of a WRITE payload being
   * assembled (so the kernel copies straight into it), when nothing else is buffered and at least
   * `min` bytes are missing. Report what arrived with `filledDirect`.
   */
  directTarget(min: number): Buffer | undefined {
    const st = this.st;
    if (st.phase !== 'payload' || this.queue.length > 0 || st.buf.length - st.filled < min) return undefined;
    return st.buf.subarray(st.filled);
  }

  /** Returns true when the payload is now complete (next() will hand it out). */
  filledDirect(n: number): boolean {
    const st = this.st;
    if (st.phase !== 'payload' || st.filled + n > st.buf.length) throw new Error('RequestReader.filledDirect out of step');
    st.filled += n;
    return st.filled === st.buf.length;
  }

  /** See ByteQueue.detach: call before the memory of pushed chunks is reused. */
  detach(scratch: ArrayBufferLike): void {
    this.queue.detach(scratch);
  }

  /** Bytes received but not yet handed out (excluding a payload being assembled). */
  get buffered(): number {
    return this.queue.length;
  }

  /** Bytes of a WRITE payload being assembled (allocated up front). */
  get pendingPayload(): number {
    return this.st.phase === 'payload' ? this.st.buf.length : 0;
  }

  /**
   * The stream has ended: drop any partial payload. Returns it when it was a `place`d target, which
   * its owner must then be told about.
   */
  abandon(): Buffer | undefined {
    const st = this.st;
    this.st = { phase: 'header' };
    return st.phase === 'payload' && st.placed ? st.buf : undefined;
  }

  push(chunk: Uint8Array): void {
    this.queue.push(chunk);
  }

  /**
   * The next complete request, or null if more bytes are needed.
   * Throws NbdError('NBD_E_PROTOCOL') on a bad magic: the stream is out of step and must be closed.
   */
  next(): Incoming | null {
    for (;;) {
      const st = this.st;
      switch (st.phase) {
        case 'header': {
          if (this.queue.length < REQUEST_LENGTH) return null;
          const req = decodeRequest(this.queue.take(REQUEST_LENGTH));
          if (req.type !== Cmd.WRITE || req.length === 0) return { kind: 'request', req };
          if (req.length > this.maxPayload) {
            this.st = { phase: 'discard', req, remaining: req.length };
            continue;
          }
          const target = this.place?.(req);
          if (target) {
            if (this.queue.length >= req.length) {
              this.queue.copyInto(target, 0, req.length);
              return { kind: 'request', req, payload: target, placed: true };
            }
            this.st = { phase: 'payload', req, buf: target, filled: 0, placed: true };
            continue;
          }
          if (this.queue.length >= req.length) {
            // Whole payload already here: a view when it sits in one chunk, else one copy.
            return { kind: 'request', req, payload: this.queue.take(req.length), ...(this.reusedInput && { transient: true }) };
          }
          this.st = { phase: 'payload', req, buf: this.alloc(req.length), filled: 0, placed: false };
          continue;
        }
        case 'payload': {
          st.filled += this.queue.copyInto(st.buf, st.filled, st.buf.length - st.filled);
          if (st.filled < st.buf.length) return null;
          this.st = { phase: 'header' };
          return st.placed ? { kind: 'request', req: st.req, payload: st.buf, placed: true } : { kind: 'request', req: st.req, payload: st.buf };
        }
        case 'discard': {
          st.remaining -= this.queue.skip(st.remaining);
          if (st.remaining > 0) return null;
          this.st = { phase: 'header' };
          return { kind: 'discarded-write', req: st.req };
        }
      }
    }
  }
}

export interface ExportLimits {
  size: number;
  readOnly: boolean;
  structured: boolean;
  maxPayload: number;
}

export interface Verdict {
  /** 0 when the request may be executed; otherwise the NBD error to answer with. */
  error: number;
  message: string;
}

/** The verdict of a request that may be executed. */
export const OK: Verdict = { error: 0, message: '' };

function refuse(type: number, error: number, message: string): Verdict {
  return { error, message: `${cmdName(type)}: ${message}` };
}

/** Command flags each command accepts (proto.md "Command flags"); FUA is valid on every command. */
function allowedFlags(type: number, structured: boolean): number {
  switch (type) {
    case Cmd.READ:
      return CmdFlag.FUA | (structured ? CmdFlag.DF : 0);
    case Cmd.WRITE_ZEROES:
      // FAST_ZERO is rejected: NBD_FLAG_SEND_FAST_ZERO is not advertised (proto.md "NBD_CMD_WRITE_ZEROES").
      return CmdFlag.FUA | CmdFlag.NO_HOLE;
    default:
      return CmdFlag.FUA;
  }
}

/**
 * Decide the NBD error for a request, before any I/O. Errors per proto.md "Error values": EPERM for
 * writes on a read-only export, ENOSPC for writes past the end, EINVAL for reads/trims past the end,
 * unknown commands and flags, and payloads over the maximum.
 */
export function checkRequest(req: Request, lim: ExportLimits): Verdict {
  // (No closures in this per-request path: tsx's keepNames makes each one a defineProperty call.)
  switch (req.type) {
    case Cmd.READ:
    case Cmd.WRITE:
    case Cmd.TRIM:
    case Cmd.WRITE_ZEROES:
    case Cmd.CACHE:
    case Cmd.FLUSH:
      break;
    default:
      return refuse(req.type, WireErr.EINVAL, 'unsupported command');
  }
  const extra = req.flags & ~allowedFlags(req.type, lim.structured);
  if (extra) return refuse(req.type, WireErr.EINVAL, `flags 0x${extra.toString(16)} not valid for this command`);
  if (req.type === Cmd.FLUSH) return OK; // offset and length are reserved: ignored
  const writes = req.type === Cmd.WRITE || req.type === Cmd.TRIM || req.type === Cmd.WRITE_ZEROES;
  if (writes && lim.readOnly) return refuse(req.type, WireErr.EPERM, 'export is read-only');
  if ((req.type === Cmd.READ || req.type === Cmd.WRITE) && req.length > lim.maxPayload) {
    // Structured replies may split a READ; we refuse instead (EOVERFLOW, proto.md "NBD_CMD_READ").
    const err = req.type === Cmd.READ && lim.structured ? WireErr.EOVERFLOW : WireErr.EINVAL;
    return refuse(req.type, err, `length ${req.length} exceeds the maximum payload ${lim.maxPayload}`);
  }
  // In Numbers (no BigInt per request): lim.size is a safe integer, and an offset too large to be one
  // still rounds to a value above it.
  if (Number(req.offset) + req.length > lim.size) {
    const err = req.type === Cmd.WRITE || req.type === Cmd.WRITE_ZEROES ? WireErr.ENOSPC : WireErr.EINVAL;
    return refuse(req.type, err, `offset ${req.offset} + length ${req.length} is beyond the export size ${lim.size}`);
  }
  return OK;
}

/** The error for a WRITE whose oversized payload was discarded. */
export function discardedWriteVerdict(req: Request, lim: ExportLimits): Verdict {
  if (lim.readOnly) return { error: WireErr.EPERM, message: 'NBD_CMD_WRITE: export is read-only' };
  return {
    error: WireErr.EINVAL,
    message: `NBD_CMD_WRITE: length ${req.length} exceeds the maximum payload ${lim.maxPayload}`,
  };
}

/** Map a backend failure (Node errno code) to an NBD error (proto.md "Error values"). */
export function wireErrorOf(err: unknown): number {
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return WireErr.ENOSPC;
    case 'EROFS':
    case 'EPERM':
    case 'EACCES':
      return WireErr.EPERM;
    case 'ENOMEM':
      return WireErr.ENOMEM;
    default:
      return WireErr.EIO;
  }
}
