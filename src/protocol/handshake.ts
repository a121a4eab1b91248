// The client side of the NBD handshake as a pure state machine: no sockets, no timers.
//
// The driver (src/client/negotiate.ts) asks `want` bytes, reads exactly that many from the socket,
// hands them to `receive()`, writes whatever comes back in `send`, and repeats until `done`. On EOF it
// calls `eof()`, which says what the close means in the current state. Nothing past the handshake is
// ever read, so the socket can go to the kernel with no byte lost.
//
// States follow doc/proto.md "Handshake": GREETING → (OLDSTYLE | HS_FLAGS) → option exchanges
// (OPT_REPLY ⇄ OPT_DATA) or EXPORT_NAME_REPLY (+ EXPORT_NAME_ZEROES) → DONE. Structured replies and
// extended headers are never negotiated: the socket goes to the kernel, which speaks simple replies only.
//
// TLS (goal.tls): NBD_OPT_STARTTLS is the first option (proto.md "NBD_OPT_STARTTLS"); on its ACK the
// step says `startTls`, the driver runs the TLS handshake on the same socket and calls `tlsDone()`,
// and option haggling starts over inside TLS. A server that cannot do TLS fails the handshake: there
// is no fallback to plain text (uri.md: "If encryption cannot be negotiated then the connection MUST fail").

import createDebug from '../debug.ts';
import { NbdError } from '../errors.ts';
import { decodeWire, display, encodeWire, wireLength } from '../text.ts';
import {
  ClientFlag,
  EXPORT_NAME_REPLY_LENGTH,
  EXPORT_NAME_REPLY_ZEROES,
  HandshakeFlag,
  Info,
  MAX_STRING,
  OLDSTYLE_GREETING_LENGTH,
  OPT_REPLY_HEADER_LENGTH,
  Opt,
  REP_ERROR_BIT,
  Rep,
  RepErr,
  optName,
  repName,
} from './constants.ts';
import {
  type BlockSizes,
  decodeExportNameReply,
  decodeGreetingStart,
  decodeOldstyleRest,
  decodeOptionReplyHeader,
  decodeRepInfo,
  decodeRepServer,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOption,
} from './codec.ts';

const debug = createDebug('nbd:handshake');

export interface ExportInfo {
  /** The name we asked for (what the kernel/supervisor re-negotiates later). */
  name: string;
  size: bigint;
  /** Transmission flags (u16), passed to the kernel unchanged. */
  flags: number;
  blockSize?: BlockSizes;
  description?: string;
  /** NBD_INFO_NAME when the server sent one and it differs from `name`. */
  canonicalName?: string;
}

export type ServerStyle = 'oldstyle' | 'newstyle' | 'fixed-newstyle';
export type Via = 'NBD_OPT_GO' | 'NBD_OPT_INFO' | 'NBD_OPT_EXPORT_NAME' | 'oldstyle';

export interface ExportListing {
  name: string;
  description: string;
  info?: ExportInfo;
  /** Why NBD_OPT_INFO failed for this export, when it did. */
  infoError?: string;
}

export type HandshakeGoal = (
  /** Enter transmission with this export (then hand the socket to the kernel). */
  | { kind: 'go'; name: string; noOptGo?: boolean }
  /** Learn about one export without entering transmission where the server allows it. */
  | { kind: 'info'; name: string }
  /** List every export, with NBD_OPT_INFO details for each when the server supports it. */
  | { kind: 'list'; details?: boolean }
) & {
  /** Negotiate TLS first (NBD_OPT_STARTTLS), and fail if the server cannot. */
  tls?: boolean;
};

export interface HandshakeResult {
  goal: HandshakeGoal['kind'];
  style: ServerStyle;
  via: Via;
  /** For go/info: the export. */
  info?: ExportInfo;
  /** For list. */
  exports?: ExportListing[];
  /** Something the user should know (e.g. "server cannot list exports"). */
  note?: string;
  /**
   * True when the connection is in the transmission phase: for `go` the socket is ready for the
   * kernel; for `info`/`list` the driver must send NBD_CMD_DISC before closing.
   */
  transmission: boolean;
}

export interface Step {
  /** Bytes to write, in order, before reading again. */
  send: Buffer[];
  /** Bytes to read next (0 when done or when starting TLS). */
  want: number;
  done?: HandshakeResult;
  /** The server accepted NBD_OPT_STARTTLS: run the TLS handshake on the socket, then call tlsDone(). */
  startTls?: true;
}

/** Limits on what a server may make us hold. All are generous for real servers. */
export interface HandshakeLimits {
  /** Largest option reply payload accepted (names and descriptions are ≤ 4 KiB in practice). */
  maxReplyLength: number;
  /** Most replies accepted to one option (LIST: one per export). */
  maxRepliesPerOption: number;
  /** Most exports whose details `list` asks for with NBD_OPT_INFO. */
  maxInfoQueries: number;
  /** Most bytes of option reply payload kept over the whole handshake (a `list` of many long names). */
  maxKeptBytes: number;
}

export const DEFAULT_LIMITS: HandshakeLimits = {
  maxReplyLength: 64 * 1024,
  maxRepliesPerOption: 10_000,
  maxInfoQueries: 1_000,
  // 4096 exports with 4 KiB names and descriptions (proto.md's string limit) fit; 10 000 × 64 KiB do not.
  maxKeptBytes: 32 * 1024 * 1024,
};

/** Info types we ask for. BLOCK_SIZE: we honour the server's constraints (proto.md "Size constraints"). */
const GO_INFOS = [Info.BLOCK_SIZE] as const;
const INFO_INFOS = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE] as const;

type State =
  | { t: 'GREETING' }
  | { t: 'OLDSTYLE' }
  | { t: 'HS_FLAGS' }
  | { t: 'OPT_REPLY'; opt: number }
  | { t: 'OPT_DATA'; opt: number; type: number }
  | { t: 'EXPORT_NAME_REPLY' }
  | { t: 'EXPORT_NAME_ZEROES'; size: bigint; flags: number }
  | { t: 'TLS' }
  | { t: 'DONE' };

export type StateName = State['t'];

/** Per-option accumulator for multi-reply options (INFO/GO/LIST). */
interface Pending {
  name: string;
  replies: number;
  info: Partial<ExportInfo> & { sizeSeen?: boolean };
}

export class ClientHandshake {
  private state: State = { t: 'GREETING' };
  private style: ServerStyle = 'newstyle';
  private noZeroes = false;
  private pending: Pending = { name: '', replies: 0, info: {} };
  private listed: ExportListing[] = [];
  /** Option reply payload bytes received so far (bounded by maxKeptBytes). */
  private keptBytes = 0;
  private infoQueue: number[] = [];
  private infoIndex = -1;
  private note: string | undefined;
  private result: HandshakeResult | undefined;
  private tlsUp = false;

  constructor(
    readonly goal: HandshakeGoal,
    private readonly limits: HandshakeLimits = DEFAULT_LIMITS,
  ) {
    const name = goal.kind === 'list' ? '' : goal.name;
    if (wireLength(name) > MAX_STRING) {
      throw new NbdError('NBD_E_USAGE', `export name is longer than ${MAX_STRING} bytes`);
    }
  }

  get stateName(): StateName {
    return this.state.t;
  }

  start(): Step {
    return { send: [], want: 16 };
  }

  receive(bytes: Uint8Array): Step {
    const s = this.state;
    switch (s.t) {
      case 'GREETING': {
        const kind = decodeGreetingStart(bytes);
        if (kind === 'oldstyle') {
          this.style = 'oldstyle';
          this.state = { t: 'OLDSTYLE' };
          return { send: [], want: OLDSTYLE_GREETING_LENGTH - 16 };
        }
        this.state = { t: 'HS_FLAGS' };
        return { send: [], want: 2 };
      }
      case 'OLDSTYLE':
        return this.oldstyle(decodeOldstyleRest(bytes));
      case 'HS_FLAGS':
        return this.handshakeFlags(Buffer.from(bytes).readUInt16BE(0));
      case 'OPT_REPLY': {
        const h = decodeOptionReplyHeader(bytes);
        if (h.option !== s.opt) {
          throw protocol(`server answered ${optName(h.option)} while we asked ${optName(s.opt)}`);
        }
        if (++this.pending.replies > this.limits.maxRepliesPerOption) {
          throw protocol(`server sent more than ${this.limits.maxRepliesPerOption} replies to ${optName(s.opt)}`);
        }
        if (h.length > this.limits.maxReplyLength) {
          throw protocol(`server sent a ${h.length}-byte reply to ${optName(s.opt)} (limit ${this.limits.maxReplyLength})`);
        }
        this.keptBytes += h.length;
        if (this.keptBytes > this.limits.maxKeptBytes) {
          throw protocol(`server sent more than ${this.limits.maxKeptBytes} bytes of option replies (limit of what we keep for one handshake)`);
        }
        if (h.length === 0) return this.optionReply(s.opt, h.type, new Uint8Array(0));
        this.state = { t: 'OPT_DATA', opt: s.opt, type: h.type };
        return { send: [], want: h.length };
      }
      case 'OPT_DATA':
        return this.optionReply(s.opt, s.type, bytes);
      case 'EXPORT_NAME_REPLY': {
        const { size, flags } = decodeExportNameReply(bytes);
        if (this.noZeroes) return this.finishExportName(size, flags);
        this.state = { t: 'EXPORT_NAME_ZEROES', size, flags };
        return { send: [], want: EXPORT_NAME_REPLY_ZEROES };
      }
      case 'EXPORT_NAME_ZEROES':
        // proto.md: "124 bytes, zeroes (reserved)". Not checked: the spec reserves them, and being
        // strict here would only break on a server that puts something harmless there.
        return this.finishExportName(s.size, s.flags);
      case 'TLS':
        throw new Error('handshake: receive() before tlsDone()');
      case 'DONE':
        throw new Error('handshake: receive() after done');
    }
  }

  /** The TLS handshake the last step asked for succeeded: start option haggling again, inside TLS. */
  tlsDone(): Step {
    if (this.state.t !== 'TLS') throw new Error('handshake: tlsDone() without a STARTTLS step');
    debug('TLS established; negotiating inside it');
    this.tlsUp = true;
    return this.firstOption([]);
  }

  /**
   * The server closed the connection. Returns a step when that is a normal end (after ABORT),
   * otherwise throws the error that explains it.
   */
  eof(): Step {
    const s = this.state;
    if (s.t === 'OPT_REPLY' && s.opt === Opt.ABORT && this.result) return this.finish(this.result);
    if (s.t === 'OPT_REPLY' && s.opt === Opt.STARTTLS) {
      throw new NbdError('NBD_E_TLS', 'server closed the connection on NBD_OPT_STARTTLS: it does not offer TLS; connect without TLS, or enable TLS on the server');
    }
    if (this.tlsUp) {
      // With TLS 1.3 a server that rejects our client certificate says so only by closing after the
      // TLS handshake; this is not an old server refusing NBD_OPT_GO (no retry without it).
      throw new NbdError(
        'NBD_E_SERVER_CLOSED',
        `server closed the connection right after TLS (${s.t}): it may not accept our client certificate (give one with -F/--certfile and -K/--keyfile, or tls-certificates=DIR)`,
      );
    }
    if (s.t === 'OPT_REPLY' && s.opt === Opt.GO) {
      const err = new NbdError(
        'NBD_E_SERVER_CLOSED',
        `server closed the connection on NBD_OPT_GO (an old server that does not know it); retry with -g/--no-optgo`,
      );
      (err as NbdError & { goRejectedByClose?: boolean }).goRejectedByClose = true;
      throw err;
    }
    if (s.t === 'EXPORT_NAME_REPLY') {
      const name = this.pending.name;
      throw new NbdError(
        'NBD_E_EXPORT_UNKNOWN',
        `server closed the connection on NBD_OPT_EXPORT_NAME: it refused export '${display(name)}' (unknown name or not allowed); run 'nbd-attach list HOST' to see the exports`,
      );
    }
    if (s.t === 'GREETING') {
      throw new NbdError('NBD_E_SERVER_CLOSED', 'server closed the connection before its greeting: is it an NBD server, and does it allow this client?');
    }
    throw new NbdError('NBD_E_SERVER_CLOSED', `server closed the connection during the handshake (${s.t})`);
  }

  // -------------------------------------------------------------------------------------------

  private oldstyle(g: { size: bigint; flags: number }): Step {
    if (this.goal.tls) throw noTls('the oldstyle handshake');
    const name = this.goal.kind === 'list' ? '' : this.goal.name;
    if (name !== '') {
      throw new NbdError(
        'NBD_E_UNSUPPORTED',
        `server speaks the oldstyle handshake, which has no export names: drop -N/--name '${display(name)}' (it serves one export)`,
      );
    }
    const info: ExportInfo = { name: '', size: g.size, flags: g.flags };
    // Oldstyle servers go straight to transmission.
    if (this.goal.kind === 'list') {
      return this.finish({
        goal: 'list',
        style: 'oldstyle',
        via: 'oldstyle',
        exports: [{ name: '', description: '', info }],
        note: 'server speaks the oldstyle handshake: one unnamed export, no list',
        transmission: true,
      });
    }
    return this.finish({ goal: this.goal.kind, style: 'oldstyle', via: 'oldstyle', info, transmission: true });
  }

  private handshakeFlags(hflags: number): Step {
    const fixed = (hflags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
    this.style = fixed ? 'fixed-newstyle' : 'newstyle';
    // proto.md "Client flags": C_NO_ZEROES MUST NOT be set unless the server offered NO_ZEROES.
    this.noZeroes = (hflags & HandshakeFlag.NO_ZEROES) !== 0;
    const cflags = (fixed ? ClientFlag.C_FIXED_NEWSTYLE : 0) | (this.noZeroes ? ClientFlag.C_NO_ZEROES : 0);
    debug('handshake flags 0x%s (%s), answering 0x%s', hflags.toString(16), this.style, cflags.toString(16));
    const send = [encodeClientFlags(cflags)];
    const g = this.goal;
    if (!fixed) {
      if (g.tls) throw noTls('non-fixed newstyle');
      // proto.md "Newstyle negotiation": in non-fixed newstyle only NBD_OPT_EXPORT_NAME may be sent.
      if (g.kind === 'list') this.note = 'server speaks non-fixed newstyle, which cannot list exports: showing the default export';
      return this.exportName(g.kind === 'list' ? '' : g.name, send);
    }
    // proto.md "NBD_OPT_STARTTLS": no data; everything else is negotiated again once TLS is up.
    if (g.tls) return this.option(Opt.STARTTLS, '', send);
    return this.firstOption(send);
  }

  /** The option that starts the goal (after the client flags, or again inside TLS). */
  private firstOption(send: Buffer[]): Step {
    const g = this.goal;
    if (g.kind === 'go') {
      return g.noOptGo ? this.exportName(g.name, send) : this.option(Opt.GO, g.name, send);
    }
    if (g.kind === 'info') return this.option(Opt.INFO, g.name, send);
    return this.option(Opt.LIST, '', send);
  }

  private exportName(name: string, send: Buffer[]): Step {
    this.pending = { name, replies: 0, info: {} };
    send.push(encodeOption(Opt.EXPORT_NAME, encodeWire(name)));
    this.state = { t: 'EXPORT_NAME_REPLY' };
    return { send, want: EXPORT_NAME_REPLY_LENGTH };
  }

  private option(opt: number, name: string, send: Buffer[] = []): Step {
    this.pending = { name, replies: 0, info: {} };
    let data: Buffer | undefined;
    if (opt === Opt.GO) data = encodeInfoRequest(name, GO_INFOS);
    else if (opt === Opt.INFO) data = encodeInfoRequest(name, INFO_INFOS);
    debug('send %s %s', optName(opt), opt === Opt.GO || opt === Opt.INFO ? `'${display(name)}'` : '');
    send.push(encodeOption(opt, data));
    this.state = { t: 'OPT_REPLY', opt };
    return { send, want: OPT_REPLY_HEADER_LENGTH };
  }

  private nextReply(opt: number): Step {
    this.state = { t: 'OPT_REPLY', opt };
    return { send: [], want: OPT_REPLY_HEADER_LENGTH };
  }

  private optionReply(opt: number, type: number, data: Uint8Array): Step {
    debug('reply %s to %s (%d bytes)', repName(type), optName(opt), data.length);
    // Any reply to ABORT, error or not, ends the session (proto.md "Termination of the session during option haggling").
    if (opt === Opt.ABORT) return this.finish(this.result!);
    if (type & REP_ERROR_BIT) return this.optionError(opt, type >>> 0, data);
    switch (opt) {
      case Opt.STARTTLS:
        if (type === Rep.ACK) {
          this.state = { t: 'TLS' };
          return { send: [], want: 0, startTls: true };
        }
        break;
      case Opt.GO:
      case Opt.INFO:
        if (type === Rep.INFO) {
          this.infoItem(data);
          return this.nextReply(opt);
        }
        if (type === Rep.ACK) return this.infoDone(opt);
        break;
      case Opt.LIST:
        if (type === Rep.SERVER) {
          const { name, description } = decodeRepServer(data);
          this.listed.push({ name, description });
          return this.nextReply(opt);
        }
        if (type === Rep.ACK) return this.listDone();
        break;
    }
    throw protocol(`unexpected ${repName(type)} in answer to ${optName(opt)}`);
  }

  private infoItem(data: Uint8Array): void {
    const item = decodeRepInfo(data);
    const info = this.pending.info;
    switch (item.type) {
      case Info.EXPORT:
        info.size = item.size;
        info.flags = item.flags;
        info.sizeSeen = true;
        break;
      case Info.NAME:
        if (item.name !== this.pending.name) info.canonicalName = item.name;
        break;
      case Info.DESCRIPTION:
        info.description = item.description;
        break;
      case Info.BLOCK_SIZE:
        info.blockSize = validateBlockSizes(item);
        break;
      default:
        // proto.md: a client MUST ignore information types it does not recognise.
        debug('ignoring unknown info type %d', item.infoType);
    }
  }

  private collectInfo(): ExportInfo {
    const p = this.pending.info;
    if (!p.sizeSeen || p.size === undefined || p.flags === undefined) {
      throw protocol(`server acknowledged export '${display(this.pending.name)}' without sending NBD_INFO_EXPORT (size and flags)`);
    }
    const info: ExportInfo = { name: this.pending.name, size: p.size, flags: p.flags };
    if (p.blockSize) info.blockSize = p.blockSize;
    if (p.description !== undefined) info.description = p.description;
    if (p.canonicalName !== undefined) info.canonicalName = p.canonicalName;
    return info;
  }

  private infoDone(opt: number): Step {
    const info = this.collectInfo();
    if (opt === Opt.GO) {
      const r: HandshakeResult = { goal: this.goal.kind, style: this.style, via: 'NBD_OPT_GO', info, transmission: true };
      if (this.note) r.note = this.note;
      return this.finish(r);
    }
    if (this.goal.kind === 'list') {
      const entry = this.listed[this.infoIndex]!;
      entry.info = info;
      return this.nextInfoQuery();
    }
    if (info.size === 0n) {
      // nbd-server 3.24 answers NBD_OPT_INFO with size 0 (it does not open the export for INFO), while
      // NBD_OPT_GO gives the real size. An empty export is rare enough that asking GO to confirm is cheap.
      this.note = "server's NBD_OPT_INFO answer said size 0: size confirmed with NBD_OPT_GO";
      return this.option(Opt.GO, this.pending.name);
    }
    return this.abort({ goal: 'info', style: this.style, via: 'NBD_OPT_INFO', info, transmission: false });
  }

  private listDone(): Step {
    const details = this.goal.kind === 'list' && this.goal.details !== false;
    if (details) {
      this.infoQueue = this.listed.slice(0, this.limits.maxInfoQueries).map((_, i) => i);
    }
    return this.nextInfoQuery();
  }

  private nextInfoQuery(): Step {
    const next = this.infoQueue.shift();
    if (next === undefined) {
      const r: HandshakeResult = { goal: 'list', style: this.style, via: 'NBD_OPT_INFO', exports: this.listed, transmission: false };
      if (this.note) r.note = this.note;
      return this.abort(r);
    }
    this.infoIndex = next;
    return this.option(Opt.INFO, this.listed[next]!.name);
  }

  private abort(result: HandshakeResult): Step {
    this.result = result;
    // proto.md: NBD_OPT_ABORT; the server may reply with ACK or just close. Either ends the session.
    return this.option(Opt.ABORT, '');
  }

  private optionError(opt: number, type: number, data: Uint8Array): Step {
    // The server's text, one line: line breaks become spaces here, anything else unprintable is escaped where it is quoted.
    const message = decodeWire(data).replace(/[\r\n]+/g, ' ').trim();
    const g = this.goal;
    const name = this.pending.name;
    // Fallbacks the spec allows: NBD_OPT_GO / NBD_OPT_INFO unknown to the server → NBD_OPT_EXPORT_NAME.
    if (opt === Opt.STARTTLS) throw tlsRefusedBy(type, message);
    if (type === RepErr.UNSUP && opt === Opt.GO) {
      debug('server lacks NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME');
      return this.exportName(name, []);
    }
    if (type === RepErr.UNSUP && opt === Opt.INFO) {
      if (g.kind === 'list') {
        this.note = 'server does not support NBD_OPT_INFO: names only';
        this.infoQueue = [];
        return this.nextInfoQuery();
      }
      this.note = 'server does not support NBD_OPT_INFO: details from NBD_OPT_EXPORT_NAME';
      return this.exportName(name, []);
    }
    if (type === RepErr.UNSUP && opt === Opt.LIST) {
      this.note = 'server does not support NBD_OPT_LIST';
      return this.nextInfoQuery();
    }
    if (opt === Opt.INFO && g.kind === 'list' && this.infoIndex >= 0) {
      // One export's details failed (e.g. TLS required for it): note it and go on with the others.
      this.listed[this.infoIndex]!.infoError = describeOptionError(type, opt, name, message).message;
      return this.nextInfoQuery();
    }
    throw describeOptionError(type, opt, name, message);
  }

  private finishExportName(size: bigint, flags: number): Step {
    const g = this.goal;
    const info: ExportInfo = { name: this.pending.name, size, flags };
    const r: HandshakeResult = {
      goal: g.kind,
      style: this.style,
      via: 'NBD_OPT_EXPORT_NAME',
      transmission: true,
    };
    if (g.kind === 'list') r.exports = [{ name: '', description: '', info }];
    else r.info = info;
    if (this.note) r.note = this.note;
    return this.finish(r);
  }

  private finish(result: HandshakeResult): Step {
    this.state = { t: 'DONE' };
    this.result = result;
    return { send: [], want: 0, done: result };
  }
}

/** How much of a server's error text an error message quotes. */
const SERVER_TEXT_MAX = 500;

/** TLS was asked for but the server's handshake style has no NBD_OPT_STARTTLS. */
function noTls(style: string): NbdError {
  return new NbdError('NBD_E_TLS', `server speaks ${style}, which cannot do TLS (no NBD_OPT_STARTTLS): connect without TLS, or use a server that offers it`);
}

/** An error reply to NBD_OPT_STARTTLS (proto.md: UNSUP when the server has no TLS, POLICY, INVALID). */
function tlsRefusedBy(type: number, serverText: string): NbdError {
  const said = serverText ? ` (server says: ${display(serverText, SERVER_TEXT_MAX)})` : '';
  if (type === RepErr.UNSUP) return new NbdError('NBD_E_TLS', `server does not offer TLS${said}: connect without TLS, or enable TLS on the server`);
  if (type === RepErr.POLICY) return new NbdError('NBD_E_TLS', `server refused TLS by policy${said}`);
  return new NbdError('NBD_E_TLS', `server refused NBD_OPT_STARTTLS with ${repName(type)}${said}`);
}

function protocol(message: string): NbdError {
  return new NbdError('NBD_E_PROTOCOL', `protocol error: ${message}`);
}

/**
 * proto.md "Size constraints": minimum a power of two ≥ 1, preferred a power of two ≥ minimum
 * (and ≥ 512 in practice), maximum ≥ preferred. A server breaking these is refused rather than obeyed.
 */
export function validateBlockSizes(b: BlockSizes): BlockSizes {
  const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(b.min) || b.min > 65536) throw protocol(`server's minimum block size ${b.min} is not a power of two ≤ 64 KiB`);
  if (!pow2(b.preferred) || b.preferred < b.min || b.preferred > 32 * 1024 * 1024) {
    throw protocol(`server's preferred block size ${b.preferred} is not a power of two between ${b.min} and 32 MiB`);
  }
  if (b.max < b.preferred && b.max !== 0xffffffff) {
    throw protocol(`server's maximum payload ${b.max} is below its preferred block size ${b.preferred}`);
  }
  return { min: b.min, preferred: b.preferred, max: b.max };
}

/** One line a person understands for each error reply, with the server's own text when it sent one. */
export function describeOptionError(type: number, opt: number, name: string, serverText: string): NbdError {
  const said = serverText ? ` (server says: ${display(serverText, SERVER_TEXT_MAX)})` : '';
  const shown = display(name);
  const what = opt === Opt.LIST ? 'listing exports' : opt === Opt.ABORT ? 'ending the handshake' : `export '${shown}'`;
  switch (type) {
    case RepErr.UNKNOWN:
      return new NbdError('NBD_E_EXPORT_UNKNOWN', `server has no export named '${shown}'${said}; run 'nbd-attach list HOST' to see the exports`);
    case RepErr.TLS_REQD:
      return new NbdError(
        'NBD_E_TLS_REQUIRED',
        `server requires TLS for ${what}${said}: connect with TLS (-x/--tls with -A CA-FILE, or an nbds:// URI)`,
      );
    case RepErr.POLICY:
      return new NbdError('NBD_E_OPTION', `server refused ${what} by policy${said}; check the server's access rules for this client`);
    case RepErr.INVALID:
      return new NbdError('NBD_E_OPTION', `server rejected the request for ${what} as invalid${said}`);
    case RepErr.PLATFORM:
      return new NbdError('NBD_E_OPTION', `server cannot serve ${what} on its platform${said}`);
    case RepErr.SHUTDOWN:
      return new NbdError('NBD_E_OPTION', `server is shutting down${said}; try again when it is back`);
    case RepErr.BLOCK_SIZE_REQD:
      return new NbdError('NBD_E_OPTION', `server requires block-size negotiation for ${what}${said}; do not use -g/--no-optgo`);
    case RepErr.TOO_BIG:
      return new NbdError('NBD_E_OPTION', `server says the request for ${what} is too big${said}`);
    case RepErr.UNSUP:
      return new NbdError('NBD_E_UNSUPPORTED', `server does not support ${optName(opt)}${said}`);
    default:
      return new NbdError('NBD_E_OPTION', `server answered ${repName(type)} to ${optName(opt)} for ${what}${said}`);
  }
}
