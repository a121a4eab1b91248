// Server side of the fixed newstyle handshake as a pure state machine: bytes in, replies and a state
// out, no sockets (proto.md "Newstyle negotiation", "Fixed newstyle negotiation", "Option types").
//
// States:
//   client-flags ──4 bytes──▶ option-header ──16 bytes──▶ option-data ──length bytes──▶ option-header …
//                                    │                    option-discard ─────────────▶ option-header …
//                                    └──▶ transmission (GO acked / EXPORT_NAME answered) | closed
// STARTTLS (TlsMode 'on'/'require'): after its ACK the machine takes no input until the socket edge
// has run the TLS handshake and called tlsStarted(); option haggling then continues over TLS.
// Everything a client sends is bounded: at most MAX_OPTIONS options per connection, option data we
// parse is at most MAX_OPTION_DATA bytes, option data we reject is read and thrown away without
// buffering so the stream stays in step, and lengths above DISCARD_LIMIT are treated as abuse.

import {
  ClientFlag,
  HandshakeFlag,
  Info,
  MAX_STRING,
  Opt,
  Rep,
  RepErr,
  optName,
} from '../protocol/constants.ts';
import {
  OPTION_HEADER_LENGTH,
  decodeInfoRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNewstyleGreeting,
  encodeOptionReply,
  encodeRepServer,
} from '../protocol/codec.ts';
import { decodeWire } from '../text.ts';
import { ByteQueue } from './byte-queue.ts';
import { SERVER_BLOCK_SIZES, findExport, transmissionFlags, type ServedExport } from './export.ts';

/** nbdkit's cap, also ours: a client needs a handful of options; 32 leaves room for probing tools. */
export const MAX_OPTIONS = 32;
/**
 * Largest option payload we buffer and parse (NBD_OPT_GO/INFO: 4 + name ≤ 4096 (proto.md "Option
 * types", string limit) + 2 + info requests). Longer known options are discarded and answered
 * NBD_REP_ERR_TOO_BIG.
 */
export const MAX_OPTION_DATA = 8192;
/** Option lengths above this are a denial of service (proto.md "Termination … during option haggling"). */
export const DISCARD_LIMIT = 1 << 20;

/** Handshake flags we offer (proto.md "Handshake flags"). */
export const SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES;

export type HandshakeState =
  | { phase: 'client-flags' }
  | { phase: 'option-header' }
  | { phase: 'option-data'; option: number; length: number }
  | { phase: 'option-discard'; option: number; remaining: number; reply: number; message: string }
  | { phase: 'transmission' }
  | { phase: 'closed'; reason: string };

export interface Negotiated {
  export: ServedExport;
  /** NBD_OPT_STRUCTURED_REPLY was acknowledged. */
  structured: boolean;
  /** Transmission flags sent to the client. */
  flags: number;
  /** Bytes received after the handshake: the start of the transmission phase. */
  leftover: Buffer;
}

/**
 * TLS modes (proto.md "Server-side requirements"): 'off' = NOTLS; 'on' = SELECTIVETLS with no
 * TLS-only export (TLS offered, not required); 'require' = FORCEDTLS.
 */
export type TlsMode = 'off' | 'on' | 'require';

export interface HandshakeStep {
  /** Bytes to write to the client, in order. */
  send: Buffer[];
  /**
   * Set when NBD_OPT_STARTTLS was acknowledged: write `send` (in clear), then run the TLS handshake
   * on the socket, call `tlsStarted()`, and push the decrypted bytes from then on.
   */
  startTls?: true;
  /** Set when the handshake finished: write `send`, then serve the export. */
  negotiated?: Negotiated;
  /** Set when the connection must end after `send` is written. `soft`: client-requested (ABORT). */
  close?: { reason: string; soft: boolean };
}

/**
 * A client-given name in a reply or a log line: JSON-quoted, with the controls JSON leaves as they
 * are (DEL, C1, U+2028/2029) escaped too, so the text stays one printable line.
 */
function quoted(name: string): string {
  return JSON.stringify(name).replace(/[\u007f-\u009f\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

export class ServerHandshake {
  private readonly queue = new ByteQueue();
  private st: HandshakeState = { phase: 'client-flags' };
  private clientFlags = 0;
  private structured = false;
  private options = 0;
  private shuttingDown = false;
  private readonly tlsMode: TlsMode;
  private tlsActive = false;
  private awaitingTls = false;

  constructor(
    private readonly exports: readonly ServedExport[],
    opts: { tls?: TlsMode } = {},
  ) {
    this.tlsMode = opts.tls ?? 'off';
  }

  /** The TLS handshake that followed STARTTLS's ACK succeeded: options continue over TLS. */
  tlsStarted(): void {
    if (!this.awaitingTls) throw new Error('ServerHandshake.tlsStarted without an acknowledged NBD_OPT_STARTTLS');
    this.awaitingTls = false;
    this.tlsActive = true;
  }

  get state(): HandshakeState {
    return this.st;
  }

  /** The first bytes the server sends: NBDMAGIC, IHAVEOPT, handshake flags. */
  greeting(): Buffer {
    return encodeNewstyleGreeting(SERVER_HANDSHAKE_FLAGS);
  }

  /** From now on, options (other than ABORT) are answered NBD_REP_ERR_SHUTDOWN. */
  beginShutdown(): void {
    this.shuttingDown = true;
  }

  push(chunk: Uint8Array): HandshakeStep {
    const step: HandshakeStep = { send: [] };
    if (this.st.phase === 'transmission' || this.st.phase === 'closed') {
      throw new Error(`ServerHandshake.push in phase ${this.st.phase}`);
    }
    if (this.awaitingTls) throw new Error('ServerHandshake.push before tlsStarted()');
    this.queue.push(chunk);
    while (!step.close && !step.negotiated && !step.startTls && this.advance(step)) {
      /* each advance() consumes one unit of input */
    }
    return step;
  }

  /** One transition; false when more input is needed. */
  private advance(step: HandshakeStep): boolean {
    const st = this.st;
    switch (st.phase) {
      case 'client-flags': {
        if (this.queue.length < 4) return false;
        const flags = this.queue.take(4).readUInt32BE(0);
        const known = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES;
        // proto.md "Client flags": the server MUST drop the connection on unknown flags.
        if (flags & ~known) return this.fail(step, `client flags 0x${(flags >>> 0).toString(16)} include unknown bits`);
        this.clientFlags = flags;
        this.st = { phase: 'option-header' };
        return true;
      }
      case 'option-header': {
        if (this.queue.length < OPTION_HEADER_LENGTH) return false;
        let header: { option: number; length: number };
        try {
          header = decodeOptionHeader(this.queue.take(OPTION_HEADER_LENGTH));
        } catch {
          return this.fail(step, 'option header: bad magic (expected "IHAVEOPT")');
        }
        const { option, length } = header;
        this.options++;
        if (this.options > MAX_OPTIONS) return this.fail(step, `more than ${MAX_OPTIONS} options`);
        // A client that did not set C_FIXED_NEWSTYLE cannot parse option replies: only EXPORT_NAME.
        if (!(this.clientFlags & ClientFlag.C_FIXED_NEWSTYLE) && option !== Opt.EXPORT_NAME) {
          return this.fail(step, `${optName(option)} from a client without fixed newstyle`);
        }
        if (length > DISCARD_LIMIT) return this.fail(step, `${optName(option)} length ${length} exceeds ${DISCARD_LIMIT}`);
        // proto.md "FORCEDTLS mode": EXPORT_NAME cannot be answered with an error, so it ends the session.
        if (option === Opt.EXPORT_NAME && this.tlsMode === 'require' && !this.tlsActive) {
          return this.fail(step, 'NBD_OPT_EXPORT_NAME before TLS; this server requires TLS (NBD_OPT_STARTTLS first)');
        }
        // EXPORT_NAME cannot be answered with an error: a name over the string limit ends the session.
        if (option === Opt.EXPORT_NAME && length > MAX_STRING) {
          return this.fail(step, `NBD_OPT_EXPORT_NAME: name longer than ${MAX_STRING} bytes`);
        }
        this.st = this.planOption(option, length);
        return true;
      }
      case 'option-data': {
        if (this.queue.length < st.length) return false;
        const data = this.queue.take(st.length);
        this.st = { phase: 'option-header' };
        this.handleOption(step, st.option, data);
        return true;
      }
      case 'option-discard': {
        if (st.remaining > 0) {
          st.remaining -= this.queue.skip(st.remaining);
          if (st.remaining > 0) return false;
        }
        this.st = { phase: 'option-header' };
        if (st.option === Opt.ABORT) {
          this.handleOption(step, Opt.ABORT, Buffer.alloc(0));
          return true;
        }
        if (this.shuttingDown) this.reply(step, st.option, RepErr.SHUTDOWN, 'server is shutting down');
        else this.reply(step, st.option, st.reply, st.message);
        return true;
      }
      case 'transmission':
      case 'closed':
        return false;
    }
  }

  /** Decide whether to buffer an option's data (we parse it) or discard it and answer an error. */
  private planOption(option: number, length: number): HandshakeState {
    const discard = (reply: number, message: string): HandshakeState => ({
      phase: 'option-discard',
      option,
      remaining: length,
      reply,
      message,
    });
    // proto.md "FORCEDTLS mode": every option but STARTTLS and ABORT gets TLS_REQD until TLS runs.
    if (this.tlsMode === 'require' && !this.tlsActive && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      return discard(RepErr.TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
    }
    switch (option) {
      case Opt.EXPORT_NAME:
        return { phase: 'option-data', option, length };
      case Opt.ABORT:
        // proto.md "NBD_OPT_ABORT": data SHOULD be ignored, not rejected.
        return { phase: 'option-discard', option, remaining: length, reply: Rep.ACK, message: '' };
      case Opt.LIST:
      case Opt.STARTTLS:
      case Opt.STRUCTURED_REPLY:
        if (length !== 0) return discard(RepErr.INVALID, `${optName(option)} must not carry data`);
        return { phase: 'option-data', option, length: 0 };
      case Opt.INFO:
      case Opt.GO:
        if (length > MAX_OPTION_DATA) return discard(RepErr.TOO_BIG, `${optName(option)} data longer than ${MAX_OPTION_DATA} bytes`);
        return { phase: 'option-data', option, length };
      default:
        return discard(RepErr.UNSUP, `${optName(option)} is not supported by this server`);
    }
  }

  private handleOption(step: HandshakeStep, option: number, data: Buffer): void {
    if (option === Opt.ABORT) {
      this.reply(step, option, Rep.ACK);
      this.closeWith(step, 'client sent NBD_OPT_ABORT', true);
      return;
    }
    if (this.shuttingDown) {
      if (option === Opt.EXPORT_NAME) this.fail(step, 'server is shutting down');
      else this.reply(step, option, RepErr.SHUTDOWN, 'server is shutting down');
      return;
    }
    switch (option) {
      case Opt.EXPORT_NAME: {
        const name = decodeWire(data);
        const exp = findExport(this.exports, name);
        // proto.md "NBD_OPT_EXPORT_NAME": an unknown export MUST terminate the session.
        if (!exp) {
          this.fail(step, `NBD_OPT_EXPORT_NAME: unknown export ${quoted(name)}`);
          return;
        }
        const flags = transmissionFlags(exp, this.structured);
        const noZeroes = (this.clientFlags & ClientFlag.C_NO_ZEROES) !== 0;
        step.send.push(encodeExportNameReply(BigInt(exp.backend.size), flags, noZeroes));
        this.enterTransmission(step, exp, flags);
        return;
      }
      case Opt.LIST:
        for (const e of this.exports) step.send.push(encodeOptionReply(option, Rep.SERVER, encodeRepServer(e.name, e.description)));
        this.reply(step, option, Rep.ACK);
        return;
      case Opt.STARTTLS:
        // proto.md "NOTLS mode": POLICY when TLS is switched off by configuration.
        if (this.tlsMode === 'off') {
          this.reply(step, option, RepErr.POLICY, 'TLS is not enabled on this server (serve --tls)');
          return;
        }
        // proto.md "FORCEDTLS mode": a second STARTTLS is INVALID.
        if (this.tlsActive) {
          this.reply(step, option, RepErr.INVALID, 'TLS is already running');
          return;
        }
        // The client waits for this ACK before its TLS handshake: anything already queued is not NBD.
        if (this.queue.length > 0) {
          this.fail(step, 'data after NBD_OPT_STARTTLS before its reply');
          return;
        }
        this.reply(step, option, Rep.ACK);
        // proto.md "NBD_OPT_STARTTLS": no negotiation state survives the upgrade.
        this.structured = false;
        this.awaitingTls = true;
        step.startTls = true;
        return;
      case Opt.STRUCTURED_REPLY:
        if (this.structured) {
          this.reply(step, option, RepErr.INVALID, 'structured replies already negotiated');
          return;
        }
        this.structured = true;
        this.reply(step, option, Rep.ACK);
        return;
      case Opt.INFO:
      case Opt.GO:
        this.handleInfoOrGo(step, option, data);
        return;
      default:
        this.reply(step, option, RepErr.UNSUP, `${optName(option)} is not supported by this server`);
    }
  }

  private handleInfoOrGo(step: HandshakeStep, option: number, data: Buffer): void {
    let req: { name: string; infos: number[] };
    try {
      if (data.length >= 4 && data.readUInt32BE(0) > MAX_STRING) {
        this.reply(step, option, RepErr.INVALID, `${optName(option)}: export name longer than ${MAX_STRING} bytes`);
        return;
      }
      req = decodeInfoRequest(data);
    } catch (err) {
      this.reply(step, option, RepErr.INVALID, `${optName(option)}: ${(err as Error).message}`);
      return;
    }
    const exp = findExport(this.exports, req.name);
    if (!exp) {
      const names = this.exports.map((e) => quoted(e.name)).join(', ');
      this.reply(step, option, RepErr.UNKNOWN, `unknown export ${quoted(req.name)}; exports: ${names}`);
      return;
    }
    const flags = transmissionFlags(exp, this.structured);
    const info = (payload: Buffer): void => {
      step.send.push(encodeOptionReply(option, Rep.INFO, payload));
    };
    info(encodeInfoExport(BigInt(exp.backend.size), flags));
    const asked = new Set(req.infos);
    if (asked.has(Info.NAME)) info(encodeInfoString(Info.NAME, exp.name));
    if (asked.has(Info.DESCRIPTION)) info(encodeInfoString(Info.DESCRIPTION, exp.description));
    // Sent even unasked (allowed by proto.md "NBD_OPT_INFO"): the values are the defaults anyway.
    info(encodeInfoBlockSize(SERVER_BLOCK_SIZES));
    this.reply(step, option, Rep.ACK);
    if (option === Opt.GO) this.enterTransmission(step, exp, flags);
  }

  private enterTransmission(step: HandshakeStep, exp: ServedExport, flags: number): void {
    this.st = { phase: 'transmission' };
    step.negotiated = { export: exp, structured: this.structured, flags, leftover: this.queue.drain() };
  }

  private reply(step: HandshakeStep, option: number, type: number, message = ''): void {
    step.send.push(encodeOptionReply(option, type, message ? Buffer.from(message.slice(0, MAX_STRING), 'utf8') : undefined));
  }

  private closeWith(step: HandshakeStep, reason: string, soft: boolean): void {
    this.st = { phase: 'closed', reason };
    step.close = { reason, soft };
  }

  /** Hard disconnect: a protocol violation or a condition the client cannot be told about. */
  private fail(step: HandshakeStep, reason: string): false {
    this.closeWith(step, reason, false);
    return false;
  }
}
