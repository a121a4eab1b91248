// Kernel TLS, the pure part: which negotiated suites the kernel can carry, the traffic keys of each
// direction (TLS 1.3: HKDF-Expand-Label of the traffic secrets, RFC 8446 section 7.3; TLS 1.2: the
// PRF key block of the master secret, RFC 5246 section 6.3 and RFC 5288/7905 for the AEAD nonces),
// the record framing seen on the wire (RFC 8446 section 5.1, RFC 5246 section 6.2), the check that a
// record was sealed under a given key and sequence number (AEAD), and the `struct tls12_crypto_info_*`
// the kernel takes with setsockopt(SOL_TLS, TLS_TX/TLS_RX) (include/uapi/linux/tls.h). No sockets here.

import { createCipheriv, createDecipheriv, createHmac } from 'node:crypto';

/** include/uapi/linux/tls.h: TLS_1_2_VERSION, TLS_1_3_VERSION (major << 8 | minor). */
export const TLS_1_2_VERSION = 0x0303;
export const TLS_1_3_VERSION = 0x0304;
/** include/uapi/linux/tls.h: TLS_CIPHER_AES_GCM_128, TLS_CIPHER_AES_GCM_256, TLS_CIPHER_CHACHA20_POLY1305. */
export const TLS_CIPHER_AES_GCM_128 = 51;
export const TLS_CIPHER_AES_GCM_256 = 52;
export const TLS_CIPHER_CHACHA20_POLY1305 = 54;

/** Record content types (RFC 8446 section 5.1; RFC 5246 section 6.2.1). */
export const ContentType = { CHANGE_CIPHER_SPEC: 20, ALERT: 21, HANDSHAKE: 22, APPLICATION_DATA: 23 } as const;
/** The largest record on the wire: 2^14 plaintext + 2048 expansion (RFC 5246 section 6.2.3; TLS 1.3 allows less). */
export const MAX_RECORD_BODY = (1 << 14) + 2048;
const TAG = 16;

export type AeadName = 'aes-128-gcm' | 'aes-256-gcm' | 'chacha20-poly1305';
export type HashName = 'sha256' | 'sha384';

export interface Suite {
  version: typeof TLS_1_2_VERSION | typeof TLS_1_3_VERSION;
  aead: AeadName;
  /** TLS 1.3: the HKDF hash; TLS 1.2: the PRF hash. */
  hash: HashName;
  keyLength: number;
  /** The kernel's cipher_type. */
  kernelCipher: number;
}

const aeads: Record<AeadName, { keyLength: number; kernelCipher: number }> = {
  'aes-128-gcm': { keyLength: 16, kernelCipher: TLS_CIPHER_AES_GCM_128 },
  'aes-256-gcm': { keyLength: 32, kernelCipher: TLS_CIPHER_AES_GCM_256 },
  'chacha20-poly1305': { keyLength: 32, kernelCipher: TLS_CIPHER_CHACHA20_POLY1305 },
};

function suite(version: Suite['version'], aead: AeadName, hash: HashName): Suite {
  return { version, aead, hash, ...aeads[aead] };
}

/**
 * The suite as the kernel knows it, from node:tls's getProtocol() and getCipher().standardName
 * (IANA names), or a reason why the kernel cannot carry it (AES-CBC, CCM, …).
 */
export function suiteFor(protocol: string | null, standardName: string | undefined): Suite | string {
  const name = standardName ?? '';
  if (protocol === 'TLSv1.3') {
    if (name === 'TLS_AES_128_GCM_SHA256') return suite(TLS_1_3_VERSION, 'aes-128-gcm', 'sha256');
    if (name === 'TLS_AES_256_GCM_SHA384') return suite(TLS_1_3_VERSION, 'aes-256-gcm', 'sha384');
    if (name === 'TLS_CHACHA20_POLY1305_SHA256') return suite(TLS_1_3_VERSION, 'chacha20-poly1305', 'sha256');
    return `TLS 1.3 suite ${name || '(unknown)'} has no kernel cipher`;
  }
  if (protocol === 'TLSv1.2') {
    const gcm = /_WITH_AES_(128|256)_GCM_SHA(256|384)$/.exec(name);
    if (gcm) return suite(TLS_1_2_VERSION, gcm[1] === '128' ? 'aes-128-gcm' : 'aes-256-gcm', gcm[2] === '384' ? 'sha384' : 'sha256');
    if (/_WITH_CHACHA20_POLY1305_SHA256$/.test(name)) return suite(TLS_1_2_VERSION, 'chacha20-poly1305', 'sha256');
    return `TLS 1.2 suite ${name || '(unknown)'} is not AES-GCM or ChaCha20-Poly1305`;
  }
  return `protocol ${protocol ?? '(none)'} is not TLS 1.2 or 1.3`;
}

/** HKDF-Expand (RFC 5869 section 2.3): T(1) | T(2) | … truncated to `length`. */
export function hkdfExpand(hash: HashName, prk: Uint8Array, info: Uint8Array, length: number): Buffer {
  const out: Buffer[] = [];
  let t: Buffer = Buffer.alloc(0);
  let have = 0;
  for (let i = 1; have < length; i++) {
    t = createHmac(hash, prk).update(t).update(info).update(Buffer.of(i)).digest();
    out.push(t);
    have += t.length;
  }
  return Buffer.concat(out).subarray(0, length);
}

/** HKDF-Expand-Label (RFC 8446 section 7.1): HkdfLabel = length(2) | "tls13 " + label (1+n) | context (1+n). */
export function hkdfExpandLabel(hash: HashName, secret: Uint8Array, label: string, context: Uint8Array, length: number): Buffer {
  const full = Buffer.from(`tls13 ${label}`, 'latin1');
  const info = Buffer.concat([Buffer.from([length >> 8, length & 0xff, full.length]), full, Buffer.from([context.length]), context]);
  return hkdfExpand(hash, secret, info, length);
}

export interface DirectionKeys {
  key: Buffer;
  /** TLS 1.3 and TLS 1.2 ChaCha: the 12-byte IV; TLS 1.2 AES-GCM: the 4-byte implicit part (salt). */
  iv: Buffer;
}

/** TLS 1.3 write key and IV from a traffic secret (RFC 8446 section 7.3). */
export function tls13Keys(s: Suite, secret: Uint8Array): DirectionKeys {
  return { key: hkdfExpandLabel(s.hash, secret, 'key', Buffer.alloc(0), s.keyLength), iv: hkdfExpandLabel(s.hash, secret, 'iv', Buffer.alloc(0), 12) };
}

/** The TLS 1.2 PRF, P_hash(secret, label + seed) (RFC 5246 section 5). */
export function tls12Prf(hash: HashName, secret: Uint8Array, label: string, seed: Uint8Array, length: number): Buffer {
  const ls = Buffer.concat([Buffer.from(label, 'latin1'), seed]);
  const out: Buffer[] = [];
  let a: Buffer = ls;
  let have = 0;
  while (have < length) {
    a = createHmac(hash, secret).update(a).digest();
    const p = createHmac(hash, secret).update(a).update(ls).digest();
    out.push(p);
    have += p.length;
  }
  return Buffer.concat(out).subarray(0, length);
}

/**
 * TLS 1.2 AEAD keys (RFC 5246 section 6.3; no MAC keys for AEAD suites): key block = PRF(master,
 * "key expansion", server_random + client_random) = client key | server key | client IV | server IV,
 * the IVs 4 bytes for AES-GCM (RFC 5288 section 3) and 12 for ChaCha20-Poly1305 (RFC 7905 section 2).
 */
export function tls12Keys(s: Suite, master: Uint8Array, clientRandom: Uint8Array, serverRandom: Uint8Array): { client: DirectionKeys; server: DirectionKeys } {
  const ivLength = s.aead === 'chacha20-poly1305' ? 12 : 4;
  const kb = tls12Prf(s.hash, master, 'key expansion', Buffer.concat([serverRandom, clientRandom]), 2 * s.keyLength + 2 * ivLength);
  const k = s.keyLength;
  return {
    client: { key: kb.subarray(0, k), iv: kb.subarray(2 * k, 2 * k + ivLength) },
    server: { key: kb.subarray(k, 2 * k), iv: kb.subarray(2 * k + ivLength, 2 * k + 2 * ivLength) },
  };
}

function seqBytes(seq: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(seq);
  return b;
}

/** The 12-byte IV XOR the sequence number, left-padded (RFC 8446 section 5.3; RFC 7905 for TLS 1.2 ChaCha). */
function xorNonce(iv: Uint8Array, seq: bigint): Buffer {
  const n = Buffer.from(iv);
  const s = seqBytes(seq);
  for (let i = 0; i < 8; i++) n[4 + i]! ^= s[i]!;
  return n;
}

type Aead = {
  setAAD(b: Buffer, o?: unknown): void;
  setAuthTag(b: Buffer): void;
  getAuthTag(): Buffer;
  update(b: Buffer): Buffer;
  final(): Buffer;
};

/** Nonce and additional data of record `seq` (RFC 8446 section 5.2; RFC 5246 section 6.2.3.3, RFC 5288, RFC 7905). */
function recordAead(s: Suite, keys: DirectionKeys, seq: bigint, header: Buffer, explicitNonce: Buffer | undefined, plainLength: number): { nonce: Buffer; aad: Buffer } {
  if (s.version === TLS_1_3_VERSION) return { nonce: xorNonce(keys.iv, seq), aad: header };
  const nonce = explicitNonce ? Buffer.concat([keys.iv, explicitNonce]) : xorNonce(keys.iv, seq);
  return { nonce, aad: Buffer.concat([seqBytes(seq), header.subarray(0, 3), Buffer.from([plainLength >> 8, plainLength & 0xff])]) };
}

/** Bytes of explicit nonce at the start of a record body: 8 for TLS 1.2 AES-GCM, else none. */
function explicitLength(s: Suite): number {
  return s.version !== TLS_1_3_VERSION && s.aead !== 'chacha20-poly1305' ? 8 : 0;
}

/**
 * Open record number `seq` (header and body, as on the wire) under `keys`: its content type and
 * plaintext (TLS 1.3: the inner type, padding removed), or undefined when it does not authenticate.
 */
export function openRecord(s: Suite, keys: DirectionKeys, seq: bigint, record: Uint8Array): { type: number; plaintext: Buffer } | undefined {
  const header = Buffer.from(record.subarray(0, 5));
  const body = Buffer.from(record.subarray(5));
  const ex = explicitLength(s);
  if (body.length < ex + TAG + (s.version === TLS_1_3_VERSION ? 1 : 0)) return undefined;
  const sealed = body.subarray(ex, body.length - TAG);
  const { nonce, aad } = recordAead(s, keys, seq, header, ex ? body.subarray(0, ex) : undefined, sealed.length);
  let plain: Buffer;
  try {
    const d = createDecipheriv(s.aead, keys.key, nonce, { authTagLength: TAG } as never) as unknown as Aead;
    d.setAAD(aad, { plaintextLength: sealed.length });
    d.setAuthTag(body.subarray(body.length - TAG));
    plain = Buffer.concat([d.update(sealed), d.final()]);
  } catch {
    return undefined;
  }
  if (s.version !== TLS_1_3_VERSION) return { type: header[0]!, plaintext: plain };
  let end = plain.length - 1;
  while (end >= 0 && plain[end] === 0) end--; // RFC 8446 section 5.4: zero padding after the type
  if (end < 0) return undefined;
  return { type: plain[end]!, plaintext: plain.subarray(0, end) };
}

/** True when `record` authenticates under `keys` as record number `seq`: which key sealed it, and where its direction's count stands. */
export function opens(s: Suite, keys: DirectionKeys, seq: bigint, record: Uint8Array): boolean {
  return openRecord(s, keys, seq, record) !== undefined;
}

/** Seal `plaintext` as record number `seq` of `type` (what the kernel does on transmit; for tests and checks). */
export function sealRecord(s: Suite, keys: DirectionKeys, seq: bigint, type: number, plaintext: Uint8Array): Buffer {
  const ex = explicitLength(s);
  const inner = s.version === TLS_1_3_VERSION ? Buffer.concat([plaintext, Buffer.of(type)]) : Buffer.from(plaintext);
  const outerType = s.version === TLS_1_3_VERSION ? ContentType.APPLICATION_DATA : type;
  const bodyLength = ex + inner.length + TAG;
  const header = Buffer.from([outerType, 3, 3, bodyLength >> 8, bodyLength & 0xff]);
  const explicit = ex ? seqBytes(seq) : undefined;
  const { nonce, aad } = recordAead(s, keys, seq, header, explicit, inner.length);
  const c = createCipheriv(s.aead, keys.key, nonce, { authTagLength: TAG } as never) as unknown as Aead;
  c.setAAD(aad, { plaintextLength: inner.length });
  const ct = Buffer.concat([c.update(inner), c.final()]);
  return Buffer.concat([header, explicit ?? Buffer.alloc(0), ct, c.getAuthTag()]);
}

/**
 * The kernel's struct for one direction (include/uapi/linux/tls.h): `struct tls_crypto_info
 * { __u16 version; __u16 cipher_type; }` in host order, then for AES-GCM-128/256 `iv[8] key[16|32]
 * salt[4] rec_seq[8]`, for ChaCha20-Poly1305 `iv[12] key[32] rec_seq[8]` (no salt). TLS 1.3 and
 * TLS 1.2 ChaCha: salt | iv is the 12-byte IV. TLS 1.2 AES-GCM: salt is the implicit IV and iv the
 * next record's explicit nonce, which is the sequence number (as OpenSSL and GnuTLS send it, and
 * unique per key whatever it starts from). rec_seq: the next record's number, big-endian.
 */
export function cryptoInfo(s: Suite, keys: DirectionKeys, seq: bigint): Buffer {
  const head = Buffer.alloc(4);
  head.writeUInt16LE(s.version, 0); // host order: the supported targets are little-endian
  head.writeUInt16LE(s.kernelCipher, 2);
  const rec = seqBytes(seq);
  if (s.aead === 'chacha20-poly1305') return Buffer.concat([head, keys.iv, keys.key, rec]);
  if (s.version === TLS_1_3_VERSION) return Buffer.concat([head, keys.iv.subarray(4, 12), keys.key, keys.iv.subarray(0, 4), rec]);
  return Buffer.concat([head, rec, keys.key, keys.iv, rec]);
}

export interface TlsRecord {
  type: number;
  /** Header and body, as on the wire. */
  bytes: Buffer;
}

/**
 * Splits one direction of a TLS connection into records (5-byte headers are plain text). Holds at
 * most one partial record; a header that is not TLS (unknown type, version not 3.x, oversized body)
 * is an error: nothing a peer sends makes it buffer more than one record.
 */
export class RecordSplitter {
  private pending: Buffer = Buffer.alloc(0);
  push(chunk: Uint8Array): TlsRecord[] {
    this.pending = this.pending.length ? Buffer.concat([this.pending, chunk]) : Buffer.from(chunk);
    const out: TlsRecord[] = [];
    for (;;) {
      if (this.pending.length < 5) break;
      const type = this.pending[0]!;
      const len = this.pending.readUInt16BE(3);
      if (type < ContentType.CHANGE_CIPHER_SPEC || type > ContentType.APPLICATION_DATA || this.pending[1] !== 3 || len > MAX_RECORD_BODY) {
        throw new Error(`not a TLS record header: ${this.pending.subarray(0, 5).toString('hex')}`);
      }
      if (this.pending.length < 5 + len) break;
      out.push({ type, bytes: this.pending.subarray(0, 5 + len) });
      this.pending = this.pending.subarray(5 + len);
    }
    return out;
  }
  /** Bytes of a record not yet complete. */
  get partial(): number {
    return this.pending.length;
  }
}

/** server_random from a plain ServerHello record (RFC 5246 section 7.4.1.3): header 5, type 1, length 3, version 2, random 32. */
export function serverHelloRandom(record: Uint8Array): Buffer | undefined {
  if (record.length < 5 + 4 + 2 + 32 || record[0] !== ContentType.HANDSHAKE || record[5] !== 2) return undefined;
  return Buffer.from(record.subarray(11, 43));
}

/** One NSS key log line (`LABEL <client_random hex> <secret hex>`), as node:tls emits in 'keylog'. */
export function parseKeylogLine(line: Uint8Array): { label: string; clientRandom: Buffer; secret: Buffer } | undefined {
  const m = /^(\w+) ([0-9a-fA-F]{64}) ([0-9a-fA-F]+)\s*$/.exec(Buffer.from(line).toString('latin1'));
  if (!m) return undefined;
  return { label: m[1]!, clientRandom: Buffer.from(m[2]!, 'hex'), secret: Buffer.from(m[3]!, 'hex') };
}

/**
 * Where one direction's count stands at handoff: the number of the next record under `keys`.
 * TLS 1.3: the records of one direction sealed with application_traffic_secret_0 are the last ones
 * (those before used the handshake keys), so the count starts at the first that opens as record 0.
 * TLS 1.2: the records after ChangeCipherSpec count from 0. Either way the last record must open
 * at its number, else (a KeyUpdate, a renegotiation, a miscount) undefined: the kernel cannot
 * take the connection.
 */
export function nextSequence(s: Suite, keys: DirectionKeys, encrypted: readonly TlsRecord[]): bigint | undefined {
  let first = 0;
  if (s.version === TLS_1_3_VERSION) {
    first = encrypted.findIndex((r) => r.type === ContentType.APPLICATION_DATA && opens(s, keys, 0n, r.bytes));
    if (first < 0) return undefined;
  }
  const count = encrypted.length - first;
  if (count === 0) return 0n;
  return opens(s, keys, BigInt(count - 1), encrypted[encrypted.length - 1]!.bytes) ? BigInt(count) : undefined;
}
