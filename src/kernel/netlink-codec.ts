// Pure generic-netlink codec: nlmsghdr, genlmsghdr, attributes (incl. nested), NLMSG_ERROR acks, and
// the messages of the "nbd" and "nlctrl" families. Bytes in, values out; no sockets.
//
// Layouts: include/uapi/linux/netlink.h (struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq,
// u32 pid; struct nlattr: u16 len, u16 type; struct nlmsgerr: int error, struct nlmsghdr msg),
// include/uapi/linux/genetlink.h (struct genlmsghdr: u8 cmd, u8 version, u16 reserved).
// Rules (kernel-interface.md, verified on 6.1): headers in host byte order; nla_len = 4 + payload
// without padding; the next attribute starts at (len + 3) & ~3; padding bytes are zero; the type is
// masked with 0x3fff when parsing (NLA_F_NESTED / NLA_F_NET_BYTEORDER stripped).

import { endianness } from 'node:os';
import {
  CTRL_CMD_GETFAMILY,
  CtrlAttr,
  CtrlAttrMcastGrp,
  GENL_HDRLEN,
  GENL_ID_CTRL,
  NBD_DEVICE_CONNECTED,
  NBD_DEVICE_INDEX,
  NBD_DEVICE_ITEM,
  NBD_GENL_VERSION,
  NBD_SOCK_FD,
  NBD_SOCK_ITEM,
  NLA_ALIGNTO,
  NLA_F_NESTED,
  NLA_HDRLEN,
  NLA_TYPE_MASK,
  NLMSG_ALIGNTO,
  NLMSG_HDRLEN,
  NLMSGERR_ATTR_MSG,
  NbdAttr,
  NbdGenlCmd,
  NlmFlag,
  NlmsgType,
} from './constants.ts';

/** Netlink integers are host byte order. */
export const HOST_LE = endianness() === 'LE';

export class NetlinkCodecError extends Error {
  constructor(message: string) {
    super(`netlink: ${message}`);
    this.name = 'NetlinkCodecError';
  }
}

// NLMSG_ALIGN / NLA_ALIGN in arithmetic, not bitwise: a length read from the kernel is a u32, and
// JavaScript's `&` works on int32, so (0x7ffffffd + 3) & ~3 would be negative.
export const nlmsgAlign = (n: number): number => Math.ceil(n / NLMSG_ALIGNTO) * NLMSG_ALIGNTO;
export const nlaAlign = (n: number): number => Math.ceil(n / NLA_ALIGNTO) * NLA_ALIGNTO;

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  HOST_LE ? b.writeUInt16LE(v) : b.writeUInt16BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  HOST_LE ? b.writeUInt32LE(v >>> 0) : b.writeUInt32BE(v >>> 0);
  return b;
}
function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  const x = BigInt.asUintN(64, BigInt(v));
  HOST_LE ? b.writeBigUInt64LE(x) : b.writeBigUInt64BE(x);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Attributes

/** One attribute: header (len, type), payload, zero padding to 4 bytes. */
export function encodeAttr(type: number, payload: Uint8Array, flags = 0): Buffer {
  const len = NLA_HDRLEN + payload.length;
  if (len > 0xffff) throw new NetlinkCodecError(`attribute ${type} too long (${len} bytes)`);
  const out = Buffer.alloc(nlaAlign(len));
  if (HOST_LE) {
    out.writeUInt16LE(len, 0);
    out.writeUInt16LE((type & NLA_TYPE_MASK) | flags, 2);
  } else {
    out.writeUInt16BE(len, 0);
    out.writeUInt16BE((type & NLA_TYPE_MASK) | flags, 2);
  }
  out.set(payload, NLA_HDRLEN);
  return out;
}
export const attrU8 = (type: number, v: number): Buffer => encodeAttr(type, Buffer.from([v & 0xff]));
export const attrU16 = (type: number, v: number): Buffer => encodeAttr(type, u16(v));
export const attrU32 = (type: number, v: number): Buffer => encodeAttr(type, u32(v));
export const attrU64 = (type: number, v: bigint | number): Buffer => encodeAttr(type, u64(v));
/** NLA_NUL_STRING / NLA_STRING: the kernel's policies accept a trailing NUL; we always send one. */
export const attrString = (type: number, s: string): Buffer =>
  encodeAttr(type, Buffer.concat([Buffer.from(s, 'utf8'), Buffer.from([0])]));
/** A nest. `flagged` sets NLA_F_NESTED (accepted by nbd on 6.1; the kernel itself builds nests without it). */
export const attrNested = (type: number, children: readonly Uint8Array[], flagged = true): Buffer =>
  encodeAttr(type, Buffer.concat(children), flagged ? NLA_F_NESTED : 0);

export interface NlAttr {
  /** Type with NLA_F_NESTED / NLA_F_NET_BYTEORDER masked off. */
  type: number;
  nestedFlag: boolean;
  payload: Buffer;
}

/** Parse a run of attributes. Throws on a length that is too short or runs past the buffer. */
export function parseAttrs(buf: Uint8Array): NlAttr[] {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  const out: NlAttr[] = [];
  let off = 0;
  while (off + NLA_HDRLEN <= b.length) {
    const len = HOST_LE ? b.readUInt16LE(off) : b.readUInt16BE(off);
    const rawType = HOST_LE ? b.readUInt16LE(off + 2) : b.readUInt16BE(off + 2);
    if (len < NLA_HDRLEN) throw new NetlinkCodecError(`attribute length ${len} < ${NLA_HDRLEN} at offset ${off}`);
    if (off + len > b.length) throw new NetlinkCodecError(`attribute of ${len} bytes at offset ${off} runs past ${b.length}`);
    out.push({ type: rawType & NLA_TYPE_MASK, nestedFlag: (rawType & NLA_F_NESTED) !== 0, payload: b.subarray(off + NLA_HDRLEN, off + len) });
    off += nlaAlign(len);
  }
  return out;
}

export function findAttr(attrs: readonly NlAttr[], type: number): NlAttr | undefined {
  return attrs.find((a) => a.type === type);
}

function needLen(a: NlAttr, n: number, what: string): void {
  if (a.payload.length < n) throw new NetlinkCodecError(`${what}: attribute ${a.type} has ${a.payload.length} bytes, need ${n}`);
}
export function readU8(a: NlAttr): number {
  needLen(a, 1, 'u8');
  return a.payload.readUInt8(0);
}
export function readU16(a: NlAttr): number {
  needLen(a, 2, 'u16');
  return HOST_LE ? a.payload.readUInt16LE(0) : a.payload.readUInt16BE(0);
}
export function readU32(a: NlAttr): number {
  needLen(a, 4, 'u32');
  return HOST_LE ? a.payload.readUInt32LE(0) : a.payload.readUInt32BE(0);
}
export function readU64(a: NlAttr): bigint {
  needLen(a, 8, 'u64');
  return HOST_LE ? a.payload.readBigUInt64LE(0) : a.payload.readBigUInt64BE(0);
}
/** A string attribute, up to its first NUL. */
export function readString(a: NlAttr): string {
  const nul = a.payload.indexOf(0);
  return a.payload.subarray(0, nul < 0 ? a.payload.length : nul).toString('utf8');
}

// ---------------------------------------------------------------------------------------------
// Messages

export interface NlMessage {
  type: number;
  flags: number;
  seq: number;
  pid: number;
  /** Everything after the 16-byte nlmsghdr, without trailing padding. */
  payload: Buffer;
}

/** nlmsghdr + payload, padded to 4 bytes. */
export function encodeMessage(m: { type: number; flags: number; seq: number; pid?: number; payload: Uint8Array }): Buffer {
  const len = NLMSG_HDRLEN + m.payload.length;
  const out = Buffer.alloc(nlmsgAlign(len));
  if (HOST_LE) {
    out.writeUInt32LE(len, 0);
    out.writeUInt16LE(m.type, 4);
    out.writeUInt16LE(m.flags, 6);
    out.writeUInt32LE(m.seq >>> 0, 8);
    out.writeUInt32LE((m.pid ?? 0) >>> 0, 12);
  } else {
    out.writeUInt32BE(len, 0);
    out.writeUInt16BE(m.type, 4);
    out.writeUInt16BE(m.flags, 6);
    out.writeUInt32BE(m.seq >>> 0, 8);
    out.writeUInt32BE((m.pid ?? 0) >>> 0, 12);
  }
  out.set(m.payload, NLMSG_HDRLEN);
  return out;
}

/** Split one datagram into its messages. Throws on a header that lies about its length. */
export function parseMessages(buf: Uint8Array): NlMessage[] {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  const out: NlMessage[] = [];
  let off = 0;
  while (off + NLMSG_HDRLEN <= b.length) {
    const len = HOST_LE ? b.readUInt32LE(off) : b.readUInt32BE(off);
    if (len < NLMSG_HDRLEN) throw new NetlinkCodecError(`message length ${len} < ${NLMSG_HDRLEN} at offset ${off}`);
    if (off + len > b.length) throw new NetlinkCodecError(`message of ${len} bytes at offset ${off} runs past ${b.length}`);
    const r16 = (o: number): number => (HOST_LE ? b.readUInt16LE(off + o) : b.readUInt16BE(off + o));
    const r32 = (o: number): number => (HOST_LE ? b.readUInt32LE(off + o) : b.readUInt32BE(off + o));
    out.push({ type: r16(4), flags: r16(6), seq: r32(8), pid: r32(12), payload: b.subarray(off + NLMSG_HDRLEN, off + len) });
    off += nlmsgAlign(len);
  }
  return out;
}

export interface GenlRequest {
  family: number;
  cmd: number;
  version: number;
  seq: number;
  flags?: number; // default NLM_F_REQUEST | NLM_F_ACK
  attrs: readonly Uint8Array[];
}

/** nlmsghdr + genlmsghdr + attributes. */
export function encodeGenl(r: GenlRequest): Buffer {
  const genl = Buffer.from([r.cmd & 0xff, r.version & 0xff, 0, 0]);
  return encodeMessage({
    type: r.family,
    flags: r.flags ?? NlmFlag.REQUEST | NlmFlag.ACK,
    seq: r.seq,
    payload: Buffer.concat([genl, ...r.attrs]),
  });
}

export interface GenlMessage {
  cmd: number;
  version: number;
  attrs: NlAttr[];
}
export function parseGenl(m: NlMessage): GenlMessage {
  if (m.payload.length < GENL_HDRLEN) throw new NetlinkCodecError(`generic netlink message of ${m.payload.length} bytes has no genlmsghdr`);
  return { cmd: m.payload.readUInt8(0), version: m.payload.readUInt8(1), attrs: parseAttrs(m.payload.subarray(GENL_HDRLEN)) };
}

export interface NlAck {
  /** 0 for success, else a negative errno (struct nlmsgerr.error). */
  error: number;
  /** Sequence number of the request this acknowledges (from the echoed header). */
  requestSeq: number;
  /** Extended-ack message (NLMSGERR_ATTR_MSG), when the kernel gave one. */
  message?: string;
}

/** Decode an NLMSG_ERROR payload: int error, the request's nlmsghdr, [its payload], [ext-ack TLVs]. */
export function parseAck(m: NlMessage): NlAck {
  if (m.type !== NlmsgType.ERROR) throw new NetlinkCodecError(`not an NLMSG_ERROR (type ${m.type})`);
  const p = m.payload;
  if (p.length < 4 + NLMSG_HDRLEN) throw new NetlinkCodecError(`NLMSG_ERROR of ${p.length} bytes is too short`);
  const error = HOST_LE ? p.readInt32LE(0) : p.readInt32BE(0);
  const origLen = HOST_LE ? p.readUInt32LE(4) : p.readUInt32BE(4);
  const requestSeq = HOST_LE ? p.readUInt32LE(12) : p.readUInt32BE(12);
  const ack: NlAck = { error, requestSeq };
  if (m.flags & NlmFlag.ACK_TLVS) {
    // The original message is echoed in full unless NLM_F_CAPPED (always capped for a successful ack).
    const tlvOff = m.flags & NlmFlag.CAPPED ? 4 + NLMSG_HDRLEN : 4 + nlmsgAlign(origLen);
    if (tlvOff <= p.length) {
      const msg = findAttr(parseAttrs(p.subarray(tlvOff)), NLMSGERR_ATTR_MSG);
      if (msg) ack.message = readString(msg);
    }
  }
  return ack;
}

// ---------------------------------------------------------------------------------------------
// nlctrl: resolve a family (include/uapi/linux/genetlink.h)

export function encodeGetFamily(seq: number, name: string): Buffer {
  return encodeGenl({ family: GENL_ID_CTRL, cmd: CTRL_CMD_GETFAMILY, version: 1, seq, attrs: [attrString(CtrlAttr.FAMILY_NAME, name)] });
}

export interface FamilyInfo {
  id: number;
  name: string;
  version: number;
  /** Multicast group name → id. */
  groups: Map<string, number>;
}

export function parseFamily(g: GenlMessage): FamilyInfo {
  const id = findAttr(g.attrs, CtrlAttr.FAMILY_ID);
  if (!id) throw new NetlinkCodecError('CTRL_CMD_NEWFAMILY reply without CTRL_ATTR_FAMILY_ID');
  const name = findAttr(g.attrs, CtrlAttr.FAMILY_NAME);
  const version = findAttr(g.attrs, CtrlAttr.VERSION);
  const groups = new Map<string, number>();
  const mc = findAttr(g.attrs, CtrlAttr.MCAST_GROUPS);
  if (mc) {
    for (const grp of parseAttrs(mc.payload)) {
      const inner = parseAttrs(grp.payload);
      const gname = findAttr(inner, CtrlAttrMcastGrp.NAME);
      const gid = findAttr(inner, CtrlAttrMcastGrp.ID);
      if (gname && gid) groups.set(readString(gname), readU32(gid));
    }
  }
  return { id: readU16(id), name: name ? readString(name) : '', version: version ? readU32(version) : 0, groups };
}

// ---------------------------------------------------------------------------------------------
// The "nbd" family (include/uapi/linux/nbd-netlink.h)

export interface ConnectParams {
  family: number;
  seq: number;
  /** Omitted: the kernel picks a free device and returns its index. */
  index?: number;
  sizeBytes: bigint;
  blockSize: number;
  /** Request timeout in seconds; omitted or 0: no timeout attribute. */
  timeout?: number;
  /** Server transmission flags (u16 from the handshake), passed through unchanged. */
  serverFlags: number;
  clientFlags?: number;
  deadConnTimeout?: number;
  backend?: string;
  fds: readonly number[];
}

function socketsAttr(fds: readonly number[]): Buffer {
  return attrNested(NbdAttr.SOCKETS, fds.map((fd) => attrNested(NBD_SOCK_ITEM, [attrU32(NBD_SOCK_FD, fd)])));
}

export function encodeConnect(p: ConnectParams): Buffer {
  if (p.fds.length === 0) throw new NetlinkCodecError('CONNECT needs at least one socket');
  const attrs: Buffer[] = [];
  if (p.index !== undefined) attrs.push(attrU32(NbdAttr.INDEX, p.index));
  attrs.push(attrU64(NbdAttr.SIZE_BYTES, p.sizeBytes));
  attrs.push(attrU64(NbdAttr.BLOCK_SIZE_BYTES, p.blockSize));
  attrs.push(attrU64(NbdAttr.SERVER_FLAGS, p.serverFlags));
  if (p.timeout) attrs.push(attrU64(NbdAttr.TIMEOUT, p.timeout));
  if (p.clientFlags) attrs.push(attrU64(NbdAttr.CLIENT_FLAGS, p.clientFlags));
  if (p.deadConnTimeout) attrs.push(attrU64(NbdAttr.DEAD_CONN_TIMEOUT, p.deadConnTimeout));
  if (p.backend !== undefined) attrs.push(attrString(NbdAttr.BACKEND_IDENTIFIER, p.backend));
  attrs.push(socketsAttr(p.fds));
  return encodeGenl({ family: p.family, cmd: NbdGenlCmd.CONNECT, version: NBD_GENL_VERSION, seq: p.seq, attrs });
}

export function encodeDisconnect(p: { family: number; seq: number; index: number }): Buffer {
  return encodeGenl({ family: p.family, cmd: NbdGenlCmd.DISCONNECT, version: NBD_GENL_VERSION, seq: p.seq, attrs: [attrU32(NbdAttr.INDEX, p.index)] });
}

export function encodeStatus(p: { family: number; seq: number; index?: number }): Buffer {
  const attrs = p.index === undefined ? [] : [attrU32(NbdAttr.INDEX, p.index)];
  return encodeGenl({ family: p.family, cmd: NbdGenlCmd.STATUS, version: NBD_GENL_VERSION, seq: p.seq, attrs });
}

/** The INDEX attribute of a CONNECT reply (or a LINK_DEAD multicast). */
export function parseIndex(g: GenlMessage): number | undefined {
  const a = findAttr(g.attrs, NbdAttr.INDEX);
  return a ? readU32(a) : undefined;
}

export interface DeviceStatus {
  index: number;
  connected: boolean;
}
/** STATUS reply: DEVICE_LIST{ DEVICE_ITEM{ DEVICE_INDEX u32, DEVICE_CONNECTED u8 } … }. */
export function parseStatus(g: GenlMessage): DeviceStatus[] {
  const list = findAttr(g.attrs, NbdAttr.DEVICE_LIST);
  if (!list) return [];
  const out: DeviceStatus[] = [];
  for (const item of parseAttrs(list.payload)) {
    if (item.type !== NBD_DEVICE_ITEM) continue;
    const inner = parseAttrs(item.payload);
    const idx = findAttr(inner, NBD_DEVICE_INDEX);
    const con = findAttr(inner, NBD_DEVICE_CONNECTED);
    if (idx) out.push({ index: readU32(idx), connected: con ? readU8(con) !== 0 : false });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Supervisor additions: RECONFIGURE and the LINK_DEAD multicast (include/uapi/linux/nbd-netlink.h)

export interface ReconfigureParams {
  family: number;
  seq: number;
  index: number;
  /** New sockets: the kernel puts each into the first dead slot (dropped silently when none is dead). */
  fds: readonly number[];
  /** Must equal the identifier given at CONNECT when one was given (the kernel checks). */
  backend?: string;
  /** New size, when the export changed size. */
  sizeBytes?: bigint;
  timeout?: number;
  deadConnTimeout?: number;
  clientFlags?: number;
}

/** NBD_CMD_RECONFIGURE{INDEX, [BACKEND_IDENTIFIER], [SIZE_BYTES], [TIMEOUT], [DEAD_CONN_TIMEOUT], [CLIENT_FLAGS], [SOCKETS]}. */
export function encodeReconfigure(p: ReconfigureParams): Buffer {
  const attrs: Buffer[] = [attrU32(NbdAttr.INDEX, p.index)];
  if (p.backend !== undefined) attrs.push(attrString(NbdAttr.BACKEND_IDENTIFIER, p.backend));
  if (p.sizeBytes !== undefined) attrs.push(attrU64(NbdAttr.SIZE_BYTES, p.sizeBytes));
  if (p.timeout !== undefined) attrs.push(attrU64(NbdAttr.TIMEOUT, p.timeout));
  if (p.deadConnTimeout !== undefined) attrs.push(attrU64(NbdAttr.DEAD_CONN_TIMEOUT, p.deadConnTimeout));
  if (p.clientFlags !== undefined) attrs.push(attrU64(NbdAttr.CLIENT_FLAGS, p.clientFlags));
  if (p.fds.length > 0) attrs.push(socketsAttr(p.fds));
  return encodeGenl({ family: p.family, cmd: NbdGenlCmd.RECONFIGURE, version: NBD_GENL_VERSION, seq: p.seq, attrs });
}

/** The device index of an NBD_CMD_LINK_DEAD multicast; undefined for any other message. */
export function parseLinkDead(g: GenlMessage): number | undefined {
  return g.cmd === NbdGenlCmd.LINK_DEAD ? parseIndex(g) : undefined;
}
