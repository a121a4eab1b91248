// Every number of the NBD wire protocol that nbd-attach uses, in one place.
//
// Source: NetworkBlockDevice/nbd doc/proto.md (read at upstream commit 89ba7b5); section names are
// given with each group. All integers on the wire are big-endian (proto.md "Conventions").
// Kernel-side numbers (ioctl, netlink) live in src/kernel/constants.ts.

/** proto.md "Oldstyle negotiation" / "Newstyle negotiation": the first 8 bytes a server sends. */
export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
/** proto.md "Newstyle negotiation": second magic of a newstyle server, and prefix of every option. */
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
/** proto.md "Oldstyle negotiation": second magic of an oldstyle server. */
export const CLISERV_MAGIC = 0x00420281861253n;
/** proto.md "Fixed newstyle negotiation": magic at the start of every option reply. */
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;

/** proto.md "Transmission" / "Request message". */
export const REQUEST_MAGIC = 0x25609513;
/** proto.md "Simple reply message". */
export const SIMPLE_REPLY_MAGIC = 0x67446698;
/** proto.md "Structured reply chunk message". */
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** proto.md "Reserved Magic values": the 1997 protocol (32-bit offsets); never spoken today. */
export const HISTORIC_REQUEST_MAGIC = 0x12560953;
export const HISTORIC_REPLY_MAGIC = 0x96744668;

/** IANA-assigned port, proto.md "Introduction" and uri.md. */
export const DEFAULT_PORT = 10809;

/** Oldstyle greeting: 8 magic + 8 magic + 8 size + 4 flags + 124 zeros (proto.md "Oldstyle negotiation"). */
export const OLDSTYLE_GREETING_LENGTH = 152;
/** Newstyle greeting: 8 magic + 8 IHAVEOPT + 2 handshake flags. */
export const NEWSTYLE_GREETING_LENGTH = 18;
/** Option reply header: 8 magic + 4 option + 4 type + 4 length (proto.md "Fixed newstyle negotiation"). */
export const OPT_REPLY_HEADER_LENGTH = 20;
/** Reply to NBD_OPT_EXPORT_NAME: 8 size + 2 flags, then 124 zeros unless NO_ZEROES was agreed. */
export const EXPORT_NAME_REPLY_LENGTH = 10;
export const EXPORT_NAME_REPLY_ZEROES = 124;
/** proto.md "Request message": 28 bytes; "Simple reply message": 16 bytes. */
export const REQUEST_LENGTH = 28;
export const SIMPLE_REPLY_LENGTH = 16;

/** proto.md "Values" › "Handshake flags" (u16 the server sends). */
export const HandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** proto.md "Values" › "Client flags" (u32 the client answers). */
export const ClientFlag = {
  C_FIXED_NEWSTYLE: 1 << 0,
  C_NO_ZEROES: 1 << 1,
} as const;

/** proto.md "Values" › "Transmission flags" (u16). */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

/** proto.md "Option types". */
export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4, // withdrawn
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8, // never negotiated by us: the kernel speaks simple replies only
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11, // experimental; never negotiated by us
} as const;

/** proto.md "Option reply types". Error replies have bit 31 set. */
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
} as const;

export const REP_ERROR_BIT = 0x80000000;

export const RepErr = {
  UNSUP: 0x80000001,
  POLICY: 0x80000002,
  INVALID: 0x80000003,
  PLATFORM: 0x80000004,
  TLS_REQD: 0x80000005,
  UNKNOWN: 0x80000006,
  SHUTDOWN: 0x80000007,
  BLOCK_SIZE_REQD: 0x80000008,
  TOO_BIG: 0x80000009,
  EXT_HEADER_REQD: 0x8000000a,
} as const;

/** proto.md "Option reply types" › NBD_REP_INFO information types. */
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** proto.md "Request types". */
export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** proto.md "Command flags" (u16 in the request). */
export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

/** proto.md "Structured reply flags" and "Structured reply types" (server side only). */
export const ReplyFlag = { DONE: 1 << 0 } as const;
export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 32769, // 2^15 + 1
  ERROR_OFFSET: 32770, // 2^15 + 2
} as const;

/** proto.md "Error values" (errno numbers on the wire, whatever the host's). */
export const WireErr = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** proto.md "Size constraints": defaults when a server advertises none. */
export const DEFAULT_MIN_BLOCK = 1;
export const DEFAULT_PREFERRED_BLOCK = 4096;
export const DEFAULT_MAX_PAYLOAD = 1 << 25; // 32 MiB
/** proto.md "Option types": names and option data are at most 4096 bytes for servers to accept. */
export const MAX_STRING = 4096;

/** Reverse lookup so logs and errors never show bare numbers. */
function reverse<T extends Record<string, number>>(table: T, prefix: string): (n: number) => string {
  const byValue = new Map<number, string>();
  for (const [k, v] of Object.entries(table)) byValue.set(v, `${prefix}${k}`);
  return (n: number) => byValue.get(n) ?? `${prefix}${n}`;
}

export const optName = reverse(Opt, 'NBD_OPT_');
export const repName = (n: number): string =>
  n & REP_ERROR_BIT ? reverse(RepErr, 'NBD_REP_ERR_')(n >>> 0) : reverse(Rep, 'NBD_REP_')(n);
export const infoName = reverse(Info, 'NBD_INFO_');
export const cmdName = reverse(Cmd, 'NBD_CMD_');
export const wireErrName = reverse(WireErr, '');

/** Names of the transmission flags set in `flags`, e.g. ["READ_ONLY", "SEND_FLUSH"] (HAS_FLAGS omitted). */
export function transmissionFlagNames(flags: number): string[] {
  const names: string[] = [];
  for (const [k, v] of Object.entries(TransmissionFlag)) {
    if (v !== TransmissionFlag.HAS_FLAGS && flags & v) names.push(k);
  }
  const known = Object.values(TransmissionFlag).reduce((a, b) => a | b, 0);
  const unknown = flags & ~known & 0xffff;
  if (unknown) names.push(`0x${unknown.toString(16)}`);
  return names;
}
