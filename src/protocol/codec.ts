// Pure encoders and decoders for NBD messages, both directions (client and built-in server).
// Bytes in, typed values out; no sockets. Layouts from doc/proto.md, sections named per function.
// Decoders take exactly the bytes of one message (the caller knows the length from the header) and
// throw NbdError('NBD_E_PROTOCOL') on malformed input; they never allocate more than they are given.

import { NbdError } from '../errors.ts';
import { decodeWire, encodeWire } from '../text.ts';
import {
  CLISERV_MAGIC,
  EXPORT_NAME_REPLY_LENGTH,
  EXPORT_NAME_REPLY_ZEROES,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  OLDSTYLE_GREETING_LENGTH,
  OPT_REPLY_HEADER_LENGTH,
  OPT_REPLY_MAGIC,
  REQUEST_LENGTH,
  REQUEST_MAGIC,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  infoName,
} from './constants.ts';

function protocolError(message: string): NbdError {
  return new NbdError('NBD_E_PROTOCOL', message);
}

function need(buf: Uint8Array, n: number, what: string): void {
  if (buf.length < n) throw protocolError(`${what}: need ${n} bytes, got ${buf.length}`);
}

const view = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);
// Names and descriptions: exact bytes both ways, invalid UTF-8 included (src/text.ts).
const text = decodeWire;

// ---------------------------------------------------------------------------------------------
// Greetings (proto.md "Oldstyle negotiation", "Newstyle negotiation")

export function encodeNewstyleGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeOldstyleGreeting(size: bigint, flags: number): Buffer {
  const b = Buffer.alloc(OLDSTYLE_GREETING_LENGTH);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(CLISERV_MAGIC, 8);
  b.writeBigUInt64BE(size, 16);
  b.writeUInt32BE(flags >>> 0, 24);
  return b;
}

export type GreetingKind = 'newstyle' | 'oldstyle';

/** The first 16 bytes a server sends: NBDMAGIC then IHAVEOPT (newstyle) or the oldstyle magic. */
export function decodeGreetingStart(b: Uint8Array): GreetingKind {
  need(b, 16, 'greeting');
  const v = view(b);
  const m1 = v.getBigUint64(0);
  if (m1 !== NBDMAGIC) {
    throw protocolError(
      `greeting: not an NBD server (first bytes ${Buffer.from(b.subarray(0, 8)).toString('hex')}, expected "NBDMAGIC")`,
    );
  }
  const m2 = v.getBigUint64(8);
  if (m2 === IHAVEOPT) return 'newstyle';
  if (m2 === CLISERV_MAGIC) return 'oldstyle';
  throw protocolError(`greeting: unknown second magic 0x${m2.toString(16)}`);
}

/** The 136 bytes after the two oldstyle magics: u64 size, u32 flags, 124 zeros. */
export function decodeOldstyleRest(b: Uint8Array): { size: bigint; flags: number } {
  need(b, OLDSTYLE_GREETING_LENGTH - 16, 'oldstyle greeting');
  const v = view(b);
  const flags32 = v.getUint32(8);
  // proto.md "Oldstyle negotiation": the low 16 bits are the transmission flags.
  return { size: v.getBigUint64(0), flags: flags32 & 0xffff };
}

// ---------------------------------------------------------------------------------------------
// Options (proto.md "Newstyle negotiation": IHAVEOPT, u32 option, u32 length, data)

export const OPTION_HEADER_LENGTH = 16;

export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, 16);
  return b;
}

export function decodeOptionHeader(b: Uint8Array): { option: number; length: number } {
  need(b, OPTION_HEADER_LENGTH, 'option header');
  const v = view(b);
  if (v.getBigUint64(0) !== IHAVEOPT) throw protocolError('option header: bad magic (expected "IHAVEOPT")');
  return { option: v.getUint32(8), length: v.getUint32(12) };
}

/** NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count × u16 info requests. */
export function encodeInfoRequest(name: string, infos: readonly number[]): Buffer {
  const nameBytes = encodeWire(name);
  const b = Buffer.alloc(4 + nameBytes.length + 2 + 2 * infos.length);
  b.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + nameBytes.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + nameBytes.length + 2 * i));
  return b;
}

export function decodeInfoRequest(b: Uint8Array): { name: string; infos: number[] } {
  need(b, 6, 'NBD_OPT_GO data');
  const v = view(b);
  const nameLen = v.getUint32(0);
  if (nameLen > b.length - 6) throw protocolError('NBD_OPT_GO data: name length exceeds option length');
  const name = text(b.subarray(4, 4 + nameLen));
  const count = v.getUint16(4 + nameLen);
  if (6 + nameLen + 2 * count !== b.length) throw protocolError('NBD_OPT_GO data: info request count does not match length');
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(v.getUint16(6 + nameLen + 2 * i));
  return { name, infos };
}

/** Client flags (u32) sent after the newstyle greeting. */
export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Option replies (proto.md "Fixed newstyle negotiation": magic, u32 option, u32 type, u32 length, data)

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function encodeOptionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(OPT_REPLY_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

export function decodeOptionReplyHeader(b: Uint8Array): OptionReplyHeader {
  need(b, OPT_REPLY_HEADER_LENGTH, 'option reply');
  const v = view(b);
  const magic = v.getBigUint64(0);
  if (magic !== OPT_REPLY_MAGIC) throw protocolError(`option reply: bad magic 0x${magic.toString(16)}`);
  return { option: v.getUint32(8), type: v.getUint32(12), length: v.getUint32(16) };
}

/** NBD_REP_SERVER data: u32 name length, name, rest is the description (proto.md "Option reply types"). */
export function encodeRepServer(name: string, description = ''): Buffer {
  const n = encodeWire(name);
  const d = encodeWire(description);
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function decodeRepServer(b: Uint8Array): { name: string; description: string } {
  need(b, 4, 'NBD_REP_SERVER');
  const nameLen = view(b).getUint32(0);
  if (nameLen > b.length - 4) throw protocolError('NBD_REP_SERVER: name length exceeds reply length');
  return { name: text(b.subarray(4, 4 + nameLen)), description: text(b.subarray(4 + nameLen)) };
}

export interface BlockSizes {
  min: number;
  preferred: number;
  max: number;
}

export type InfoItem =
  | { type: typeof Info.EXPORT; size: bigint; flags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | ({ type: typeof Info.BLOCK_SIZE } & BlockSizes)
  | { type: 'unknown'; infoType: number };

/** NBD_REP_INFO data: u16 info type + payload (proto.md "NBD_REP_INFO"). Unknown types are returned as such. */
export function decodeRepInfo(b: Uint8Array): InfoItem {
  need(b, 2, 'NBD_REP_INFO');
  const v = view(b);
  const t = v.getUint16(0);
  switch (t) {
    case Info.EXPORT:
      if (b.length !== 12) throw protocolError(`${infoName(t)}: length must be 12, got ${b.length}`);
      return { type: Info.EXPORT, size: v.getBigUint64(2), flags: v.getUint16(10) };
    case Info.NAME:
      return { type: Info.NAME, name: text(b.subarray(2)) };
    case Info.DESCRIPTION:
      return { type: Info.DESCRIPTION, description: text(b.subarray(2)) };
    case Info.BLOCK_SIZE:
      if (b.length !== 14) throw protocolError(`${infoName(t)}: length must be 14, got ${b.length}`);
      return { type: Info.BLOCK_SIZE, min: v.getUint32(2), preferred: v.getUint32(6), max: v.getUint32(10) };
    default:
      return { type: 'unknown', infoType: t };
  }
}

export function encodeInfoExport(size: bigint, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(size, 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoString(type: typeof Info.NAME | typeof Info.DESCRIPTION, value: string): Buffer {
  const s = encodeWire(value);
  const b = Buffer.alloc(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(sizes.min, 2);
  b.writeUInt32BE(sizes.preferred, 6);
  b.writeUInt32BE(sizes.max, 10);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, and 124 zeros unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: bigint, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_LENGTH + (noZeroes ? 0 : EXPORT_NAME_REPLY_ZEROES));
  b.writeBigUInt64BE(size, 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function decodeExportNameReply(b: Uint8Array): { size: bigint; flags: number } {
  need(b, EXPORT_NAME_REPLY_LENGTH, 'NBD_OPT_EXPORT_NAME reply');
  const v = view(b);
  return { size: v.getBigUint64(0), flags: v.getUint16(8) };
}

// ---------------------------------------------------------------------------------------------
// Transmission (proto.md "Request message", "Simple reply message")

export interface Request {
  flags: number; // u16 command flags
  type: number; // u16 command
  cookie: bigint;
  offset: bigint;
  length: number;
}

export function encodeRequest(r: Request): Buffer {
  const b = Buffer.alloc(REQUEST_LENGTH);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

export function decodeRequest(b: Uint8Array): Request {
  need(b, REQUEST_LENGTH, 'request');
  // Buffer's own readers: no DataView per request (the server decodes one per request).
  const v = Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  const magic = v.readUInt32BE(0);
  if (magic !== REQUEST_MAGIC) throw protocolError(`request: bad magic 0x${magic.toString(16)}`);
  return {
    flags: v.readUInt16BE(4),
    type: v.readUInt16BE(6),
    cookie: v.readBigUInt64BE(8),
    offset: v.readBigUInt64BE(16),
    length: v.readUInt32BE(24),
  };
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_LENGTH);
  encodeSimpleReplyInto(b, 0, error, cookie);
  return b;
}

/** Write a simple reply header (SIMPLE_REPLY_LENGTH bytes) into `b` at `at`. */
export function encodeSimpleReplyInto(b: Buffer, at: number, error: number, cookie: bigint): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeBigUInt64BE(cookie, at + 8);
}

export function decodeSimpleReply(b: Uint8Array): { error: number; cookie: bigint } {
  need(b, SIMPLE_REPLY_LENGTH, 'simple reply');
  const v = view(b);
  const magic = v.getUint32(0);
  if (magic !== SIMPLE_REPLY_MAGIC) throw protocolError(`simple reply: bad magic 0x${magic.toString(16)}`);
  return { error: v.getUint32(4), cookie: v.getBigUint64(8) };
}
