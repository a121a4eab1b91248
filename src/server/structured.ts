// Structured reply chunks, server side only (proto.md "Structured reply chunk message",
// "Structured reply types"). Pure encoders; the caller writes the READ data after the header itself
// so payloads are never copied.

import { ReplyFlag, ReplyType, STRUCTURED_REPLY_MAGIC } from '../protocol/constants.ts';

/** proto.md "Structured reply chunk message": magic, u16 flags, u16 type, u64 cookie, u32 length. */
export const STRUCTURED_HEADER_LENGTH = 20;

export function encodeChunkHeader(flags: number, type: number, cookie: bigint, length: number): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_LENGTH);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** NBD_REPLY_TYPE_OFFSET_DATA header + u64 offset; `dataLength` bytes of data follow it on the wire. */
export function encodeOffsetDataHeader(cookie: bigint, offset: bigint, dataLength: number, done: boolean): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_LENGTH + 8);
  encodeChunkHeader(done ? ReplyFlag.DONE : 0, ReplyType.OFFSET_DATA, cookie, 8 + dataLength).copy(b, 0);
  b.writeBigUInt64BE(offset, STRUCTURED_HEADER_LENGTH);
  return b;
}

/** NBD_REPLY_TYPE_OFFSET_HOLE: `size` bytes at `offset` read as zeros (size MUST be nonzero). */
export function encodeOffsetHole(cookie: bigint, offset: bigint, size: number, done: boolean): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_LENGTH + 12);
  encodeChunkHeader(done ? ReplyFlag.DONE : 0, ReplyType.OFFSET_HOLE, cookie, 12).copy(b, 0);
  b.writeBigUInt64BE(offset, STRUCTURED_HEADER_LENGTH);
  b.writeUInt32BE(size, STRUCTURED_HEADER_LENGTH + 8);
  return b;
}

/** NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE (its only legal form). */
export function encodeNone(cookie: bigint): Buffer {
  return encodeChunkHeader(ReplyFlag.DONE, ReplyType.NONE, cookie, 0);
}

/** proto.md "NBD_REPLY_TYPE_ERROR": u32 error, u16 message length, message (≤ 4096 bytes). */
export function encodeErrorChunk(cookie: bigint, error: number, message: string, done = true): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > 4096) msg = msg.subarray(0, 4096);
  const b = Buffer.alloc(STRUCTURED_HEADER_LENGTH + 6 + msg.length);
  encodeChunkHeader(done ? ReplyFlag.DONE : 0, ReplyType.ERROR, cookie, 6 + msg.length).copy(b, 0);
  b.writeUInt32BE(error, STRUCTURED_HEADER_LENGTH);
  b.writeUInt16BE(msg.length, STRUCTURED_HEADER_LENGTH + 4);
  msg.copy(b, STRUCTURED_HEADER_LENGTH + 6);
  return b;
}
