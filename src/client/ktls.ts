// Kernel TLS, the transport part: run the STARTTLS handshake (node:tls) over a stream of ours laid
// between the TLS socket and the TCP socket, which sees every record header in both directions, and
// collect the key log; after the NBD handshake, compute what the kernel needs to carry the connection
// on (the suite, each direction's keys and next record number, src/client/ktls-keys.ts) and let go of
// the TCP socket without a byte left unread or unsent. Installing the keys (setsockopt) is the
// kernel layer's (src/kernel/ktls.ts); when the kernel cannot take them the connection keeps the relay.

import { Duplex } from 'node:stream';
import type net from 'node:net';
import tls from 'node:tls';
import createDebug from '../debug.ts';
import {
  ContentType,
  type DirectionKeys,
  RecordSplitter,
  type Suite,
  TLS_1_3_VERSION,
  type TlsRecord,
  nextSequence,
  parseKeylogLine,
  serverHelloRandom,
  suiteFor,
  tls12Keys,
  tls13Keys,
} from './ktls-keys.ts';
import { startTls } from './tls.ts';

const debug = createDebug('nbd:ktls');

/** What the kernel needs for one connection (src/kernel/ktls.ts installs it). */
export interface KernelTlsParams {
  suite: Suite;
  tx: { keys: DirectionKeys; seq: bigint };
  rx: { keys: DirectionKeys; seq: bigint };
  /** For people: "TLS 1.3 AES-128-GCM". */
  description: string;
}

/** Records of the handshake kept for counting: a TLS handshake is a few records of a few KiB. */
const MAX_KEPT_RECORDS = 256;
const MAX_KEPT_BYTES = 1 << 20;

/** One direction of the connection as the tap sees it. */
class Direction {
  private readonly splitter = new RecordSplitter();
  /** Records since the last ChangeCipherSpec (TLS 1.2: those under the negotiated keys). */
  records: TlsRecord[] = [];
  private bytes = 0;
  /** Why the records cannot be counted (not TLS, too many); undefined while they can. */
  broken: string | undefined;
  first: TlsRecord | undefined;
  see(chunk: Buffer): void {
    if (this.broken) return;
    let got: TlsRecord[];
    try {
      got = this.splitter.push(chunk);
    } catch (e) {
      this.broken = (e as Error).message;
      this.records = [];
      return;
    }
    for (const r of got) {
      this.first ??= { type: r.type, bytes: Buffer.from(r.bytes) };
      if (r.type === ContentType.CHANGE_CIPHER_SPEC) {
        this.records = [];
        this.bytes = 0;
        continue;
      }
      this.records.push(r);
      this.bytes += r.bytes.length;
      if (this.records.length > MAX_KEPT_RECORDS || this.bytes > MAX_KEPT_BYTES) {
        this.broken = `more than ${MAX_KEPT_RECORDS} records or ${MAX_KEPT_BYTES} bytes in the handshake`;
        this.records = [];
      }
    }
  }
  get partial(): number {
    return this.splitter.partial;
  }
}

/** The stream node:tls runs over: passes bytes between it and the TCP socket, watching the records. */
class RecordTap extends Duplex {
  readonly tx = new Direction();
  readonly rx = new Direction();
  readonly keylog: Buffer[] = [];
  private detached = false;
  private readonly onData = (b: Buffer): void => {
    this.rx.see(b);
    if (!this.push(b)) this.tcp.pause();
  };
  private readonly onEnd = (): void => void this.push(null);
  private readonly onError = (e: Error): void => void this.destroy(e);
  private readonly onClose = (): void => void this.destroy();

  constructor(readonly tcp: net.Socket) {
    super({ allowHalfOpen: false });
    tcp.on('data', this.onData);
    tcp.on('end', this.onEnd);
    tcp.on('error', this.onError);
    tcp.on('close', this.onClose);
  }
  override _read(): void {
    if (!this.detached) this.tcp.resume();
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    if (this.detached) return cb();
    this.tx.see(chunk);
    if (this.tcp.write(chunk)) cb();
    else this.tcp.once('drain', () => cb());
  }
  override _final(cb: (e?: Error | null) => void): void {
    if (!this.detached) this.tcp.end();
    cb();
  }
  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (!this.detached) this.tcp.destroy(err ?? undefined);
    cb(err);
  }
  /** Stop passing bytes: the TCP socket is left paused (as a plain connection is), with its listeners gone. */
  detach(): void {
    this.detached = true;
    this.tcp.off('data', this.onData);
    this.tcp.off('end', this.onEnd);
    this.tcp.off('error', this.onError);
    this.tcp.off('close', this.onClose);
    this.tcp.pause();
  }
}

const taps = new WeakMap<tls.TLSSocket, RecordTap>();

/**
 * STARTTLS over a tap (see above): the same handshake and failures as startTls, with the records
 * and key log kept for kernelTlsHandoff.
 */
export async function startTlsTapped(plain: net.Socket, options: tls.ConnectionOptions, where: string): Promise<tls.TLSSocket> {
  const tap = new RecordTap(plain);
  // The key log is emitted during the handshake; startTls attaches it before the first round trip.
  const secure = await startTls(tap as unknown as net.Socket, options, where, (s) => s.on('keylog', (line: Buffer) => tap.keylog.push(line)));
  taps.set(secure, tap);
  return secure;
}

function describeSuite(s: Suite): string {
  const aead = { 'aes-128-gcm': 'AES-128-GCM', 'aes-256-gcm': 'AES-256-GCM', 'chacha20-poly1305': 'ChaCha20-Poly1305' }[s.aead];
  return `TLS ${s.version === TLS_1_3_VERSION ? '1.3' : '1.2'} ${aead}`;
}

/**
 * After the NBD handshake over `secure` (from startTlsTapped): what the kernel needs, and the TCP
 * socket itself, paused with nothing unread or unsent; `secure` is destroyed without a word on the
 * wire (no close_notify: the connection goes on in the kernel). Or, untouched, why the kernel cannot
 * take this connection (a suite it lacks, a key change, a count that does not check out).
 */
export async function kernelTlsHandoff(secure: tls.TLSSocket): Promise<{ socket: net.Socket; params: KernelTlsParams } | { refused: string }> {
  const tap = taps.get(secure);
  if (!tap) return { refused: 'the TLS connection was not set up for kernel TLS' };
  // The last option went out before its reply came in, but node:tls (over a JS stream) may not have
  // completed its write yet: wait for every layer to be empty, briefly.
  const unsent = (): number => secure.writableLength + tap.writableLength + tap.tx.partial + tap.tcp.writableLength;
  for (let i = 0; i < 100 && unsent() !== 0; i++) await new Promise((r) => setTimeout(r, i < 10 ? 0 : 10));
  const suite = suiteFor(secure.getProtocol(), secure.getCipher()?.standardName);
  if (typeof suite === 'string') return { refused: suite };
  const broken = tap.tx.broken ?? tap.rx.broken;
  if (broken) return { refused: `cannot follow the TLS records: ${broken}` };
  const log = new Map<string, ReturnType<typeof parseKeylogLine>>();
  for (const l of tap.keylog) {
    const p = parseKeylogLine(l);
    if (p) log.set(p.label, p);
  }
  let txKeys: DirectionKeys;
  let rxKeys: DirectionKeys;
  if (suite.version === TLS_1_3_VERSION) {
    const c = log.get('CLIENT_TRAFFIC_SECRET_0');
    const s = log.get('SERVER_TRAFFIC_SECRET_0');
    if (!c || !s) return { refused: 'node:tls logged no TLS 1.3 traffic secrets' };
    if (log.has('CLIENT_TRAFFIC_SECRET_1') || log.has('SERVER_TRAFFIC_SECRET_1')) return { refused: 'the keys were updated during the handshake' };
    txKeys = tls13Keys(suite, c.secret);
    rxKeys = tls13Keys(suite, s.secret);
  } else {
    const m = log.get('CLIENT_RANDOM');
    const serverRandom = tap.rx.first && serverHelloRandom(tap.rx.first.bytes);
    if (!m || !serverRandom) return { refused: 'node:tls logged no TLS 1.2 master secret' };
    const k = tls12Keys(suite, m.secret, m.clientRandom, serverRandom);
    txKeys = k.client;
    rxKeys = k.server;
  }
  const txSeq = nextSequence(suite, txKeys, tap.tx.records);
  const rxSeq = nextSequence(suite, rxKeys, tap.rx.records);
  if (txSeq === undefined || rxSeq === undefined) return { refused: `the ${txSeq === undefined ? 'sent' : 'received'} records do not check out under the negotiated keys` };
  const unread = secure.readableLength + tap.readableLength + tap.rx.partial + tap.tcp.readableLength;
  if (unread !== 0 || unsent() !== 0) return { refused: `${unread} bytes unread and ${unsent()} unsent at the end of the handshake` };
  tap.detach();
  secure.destroy();
  const description = describeSuite(suite);
  debug('handoff: %s, next records: sent %d, received %d', description, txSeq, rxSeq);
  return { socket: tap.tcp, params: { suite, tx: { keys: txKeys, seq: txSeq }, rx: { keys: rxKeys, seq: rxSeq }, description } };
}
