// Kernel-facing numbers: nbd ioctls, the "nbd" generic-netlink family, netlink framing, block ioctls,
// socket options. Sources are cited per group (Linux uapi headers, identical in 6.1, 6.12 and 7.x).
// Netlink headers are in host byte order (include/uapi/linux/netlink.h); NBD wire values are
// big-endian and live in src/protocol/constants.ts.

/** include/uapi/linux/major.h: NBD_MAJOR. Every nbd block node has this major number. */
export const NBD_MAJOR = 43;

/** Sector size the block layer counts in (include/linux/blk_types.h SECTOR_SHIFT = 9): sysfs `size`. */
export const SECTOR_SIZE = 512;

/** include/uapi/linux/nbd.h: `#define NBD_SET_SOCK _IO( 0xab, 0 )` … `NBD_SET_FLAGS _IO( 0xab, 10 )`. */
export const NbdIoctl = {
  SET_SOCK: 0xab00, // _IO(0xab, 0)
  SET_BLKSIZE: 0xab01, // _IO(0xab, 1)
  SET_SIZE: 0xab02, // _IO(0xab, 2)
  DO_IT: 0xab03, // _IO(0xab, 3)
  CLEAR_SOCK: 0xab04, // _IO(0xab, 4)
  CLEAR_QUE: 0xab05, // _IO(0xab, 5), no-op since 4.x
  PRINT_DEBUG: 0xab06, // _IO(0xab, 6), no-op
  SET_SIZE_BLOCKS: 0xab07, // _IO(0xab, 7)
  DISCONNECT: 0xab08, // _IO(0xab, 8)
  SET_TIMEOUT: 0xab09, // _IO(0xab, 9)
  SET_FLAGS: 0xab0a, // _IO(0xab, 10)
} as const;

/** include/uapi/linux/fs.h: `#define BLKROSET _IO(0x12,93)` (arg: int *), `BLKROGET _IO(0x12,94)`. */
export const BLKROSET = 0x125d;
export const BLKROGET = 0x125e;

/** include/uapi/linux/nbd.h: client flags (NBD_CFLAG_*), netlink CLIENT_FLAGS attribute. */
export const NbdClientFlag = {
  DESTROY_ON_DISCONNECT: 1 << 0, // NBD_CFLAG_DESTROY_ON_DISCONNECT
  DISCONNECT_ON_CLOSE: 1 << 1, // NBD_CFLAG_DISCONNECT_ON_CLOSE
} as const;

/** include/uapi/linux/nbd-netlink.h: NBD_GENL_FAMILY_NAME, NBD_GENL_VERSION, NBD_GENL_MCAST_GROUP_NAME. */
export const NBD_GENL_FAMILY_NAME = 'nbd';
export const NBD_GENL_VERSION = 0x1;
export const NBD_GENL_MCAST_GROUP_NAME = 'nbd_mc_group';

/** include/uapi/linux/nbd-netlink.h: enum { NBD_CMD_UNSPEC, NBD_CMD_CONNECT, … }. */
export const NbdGenlCmd = {
  UNSPEC: 0,
  CONNECT: 1,
  DISCONNECT: 2,
  RECONFIGURE: 3,
  LINK_DEAD: 4,
  STATUS: 5,
} as const;

/** include/uapi/linux/nbd-netlink.h: enum { NBD_ATTR_UNSPEC, NBD_ATTR_INDEX, … }. */
export const NbdAttr = {
  UNSPEC: 0,
  INDEX: 1, // u32
  SIZE_BYTES: 2, // u64
  BLOCK_SIZE_BYTES: 3, // u64
  TIMEOUT: 4, // u64, seconds
  SERVER_FLAGS: 5, // u64
  CLIENT_FLAGS: 6, // u64
  SOCKETS: 7, // nested: SOCK_ITEM*
  DEAD_CONN_TIMEOUT: 8, // u64, seconds
  DEVICE_LIST: 9, // nested: DEVICE_ITEM*
  BACKEND_IDENTIFIER: 10, // NUL-terminated string
} as const;

/** include/uapi/linux/nbd-netlink.h: NBD_SOCK_ITEM = 1 inside NBD_ATTR_SOCKETS; NBD_SOCK_FD = 1 (u32). */
export const NBD_SOCK_ITEM = 1;
export const NBD_SOCK_FD = 1;
/** include/uapi/linux/nbd-netlink.h: NBD_DEVICE_ITEM = 1; NBD_DEVICE_INDEX = 1 (u32), NBD_DEVICE_CONNECTED = 2 (u8). */
export const NBD_DEVICE_ITEM = 1;
export const NBD_DEVICE_INDEX = 1;
export const NBD_DEVICE_CONNECTED = 2;

// ---- netlink framing: include/uapi/linux/netlink.h ----
/** include/uapi/linux/netlink.h: NETLINK_GENERIC protocol number. */
export const NETLINK_GENERIC = 16;
/** include/linux/socket.h: AF_NETLINK = PF_NETLINK = 16. */
export const AF_NETLINK = 16;
/** include/linux/socket.h: AF_UNIX = AF_LOCAL = 1 (local attach's socketpair). */
export const AF_UNIX = 1;
/** include/uapi/linux/netlink.h: NLMSG_ALIGNTO = 4, NLMSG_HDRLEN = 16 (struct nlmsghdr). */
export const NLMSG_ALIGNTO = 4;
export const NLMSG_HDRLEN = 16;
/** include/uapi/linux/netlink.h: NLA_ALIGNTO = 4, NLA_HDRLEN = 4 (struct nlattr). */
export const NLA_ALIGNTO = 4;
export const NLA_HDRLEN = 4;
/** include/uapi/linux/netlink.h: NLA_F_NESTED (1 << 15), NLA_F_NET_BYTEORDER (1 << 14), NLA_TYPE_MASK. */
export const NLA_F_NESTED = 1 << 15;
export const NLA_F_NET_BYTEORDER = 1 << 14;
export const NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xffff; // 0x3fff
/** include/uapi/linux/netlink.h: NLMSG_NOOP 1, NLMSG_ERROR 2, NLMSG_DONE 3, NLMSG_OVERRUN 4. */
export const NlmsgType = { NOOP: 1, ERROR: 2, DONE: 3, OVERRUN: 4 } as const;
/** include/uapi/linux/netlink.h: NLM_F_REQUEST 1, NLM_F_MULTI 2, NLM_F_ACK 4, NLM_F_ECHO 8, NLM_F_DUMP 0x300;
 *  for NLMSG_ERROR: NLM_F_CAPPED 0x100, NLM_F_ACK_TLVS 0x200. */
export const NlmFlag = {
  REQUEST: 0x1,
  MULTI: 0x2,
  ACK: 0x4,
  ECHO: 0x8,
  DUMP: 0x300,
  CAPPED: 0x100,
  ACK_TLVS: 0x200,
} as const;
/** include/uapi/linux/netlink.h: enum nlmsgerr_attrs { NLMSGERR_ATTR_UNUSED, NLMSGERR_ATTR_MSG (string), … }. */
export const NLMSGERR_ATTR_MSG = 1;
/** include/uapi/linux/netlink.h: SOL_NETLINK options NETLINK_ADD_MEMBERSHIP 1, NETLINK_DROP_MEMBERSHIP 2,
 *  NETLINK_EXT_ACK 11, NETLINK_CAP_ACK 10. (SOL_NETLINK = 270 from include/linux/socket.h.) */
export const SOL_NETLINK = 270;
export const NETLINK_ADD_MEMBERSHIP = 1;
export const NETLINK_DROP_MEMBERSHIP = 2;
export const NETLINK_CAP_ACK = 10;
export const NETLINK_EXT_ACK = 11;

// ---- generic netlink: include/uapi/linux/genetlink.h ----
/** include/uapi/linux/genetlink.h: GENL_HDRLEN = 4 (struct genlmsghdr: u8 cmd, u8 version, u16 reserved). */
export const GENL_HDRLEN = 4;
/** include/uapi/linux/genetlink.h: GENL_ID_CTRL = NLMSG_MIN_TYPE = 0x10. */
export const GENL_ID_CTRL = 0x10;
/** include/uapi/linux/genetlink.h: CTRL_CMD_GETFAMILY = 3 (enum CTRL_CMD_UNSPEC, NEWFAMILY, DELFAMILY, GETFAMILY…). */
export const CTRL_CMD_GETFAMILY = 3;
/** include/uapi/linux/genetlink.h: enum CTRL_ATTR_UNSPEC, FAMILY_ID (u16), FAMILY_NAME (string), VERSION (u32),
 *  HDRSIZE, MAXATTR, OPS, MCAST_GROUPS (nested). */
export const CtrlAttr = {
  FAMILY_ID: 1,
  FAMILY_NAME: 2,
  VERSION: 3,
  HDRSIZE: 4,
  MAXATTR: 5,
  OPS: 6,
  MCAST_GROUPS: 7,
} as const;
/** include/uapi/linux/genetlink.h: enum CTRL_ATTR_MCAST_GRP_UNSPEC, NAME (string), ID (u32). */
export const CtrlAttrMcastGrp = { NAME: 1, ID: 2 } as const;

// ---- sockets, signals (x86_64 / generic Linux ABI) ----
/** include/uapi/asm-generic/socket.h: SOL_SOCKET 1, SO_RCVTIMEO_OLD 20, SO_SNDTIMEO_OLD 21, SO_RCVBUF 8. */
export const SOL_SOCKET = 1;
export const SO_RCVBUF = 8;
export const SO_RCVTIMEO = 20;
/** include/linux/net.h: SOCK_RAW 3; include/uapi/asm-generic/fcntl.h: SOCK_CLOEXEC = O_CLOEXEC 0o2000000,
 *  SOCK_NONBLOCK = O_NONBLOCK 0o4000. */
export const SOCK_RAW = 3;
/** include/linux/net.h: SOCK_STREAM 1. */
export const SOCK_STREAM = 1;
/** include/linux/net.h: SOCK_DGRAM 2 (sd_notify's datagrams). */
export const SOCK_DGRAM = 2;
/** include/uapi/linux/un.h: UNIX_PATH_MAX 108, the size of sockaddr_un's sun_path (after the u16 family). */
export const UNIX_PATH_MAX = 108;
export const SOCK_CLOEXEC = 0o2000000;
export const SOCK_NONBLOCK = 0o4000;
/** include/linux/socket.h: MSG_PEEK 2, MSG_TRUNC 0x20, MSG_DONTWAIT 0x40. */
export const MSG_PEEK = 0x2;
export const MSG_TRUNC = 0x20;
export const MSG_DONTWAIT = 0x40;
/** include/uapi/asm-generic/signal-defs.h: SIG_BLOCK 0, SIG_UNBLOCK 1, SIG_SETMASK 2. */
export const SIG_BLOCK = 0;
export const SIG_SETMASK = 2;
/** include/uapi/linux/stat.h: S_IFBLK 0o060000, S_IFMT 0o170000. */
export const S_IFBLK = 0o060000;
export const S_IFMT = 0o170000;
/** include/uapi/linux/capability.h: CAP_SYS_ADMIN = 21 (bit in /proc/self/status CapEff). */
export const CAP_SYS_ADMIN = 21;

// ---- TCP liveness options set on every socket before handoff (supervisor) ----
/** include/uapi/linux/in.h: IPPROTO_TCP = 6. include/uapi/asm-generic/socket.h: SO_KEEPALIVE = 9. */
export const IPPROTO_TCP = 6;
export const SO_KEEPALIVE = 9;
/** include/uapi/linux/tcp.h: TCP_KEEPIDLE 4, TCP_KEEPINTVL 5, TCP_KEEPCNT 6, TCP_USER_TIMEOUT 18 (milliseconds). */
export const TCP_KEEPIDLE = 4;
export const TCP_KEEPINTVL = 5;
export const TCP_KEEPCNT = 6;
export const TCP_USER_TIMEOUT = 18;

// ---- Kernel TLS on a connection handed to the nbd driver (src/kernel/ktls.ts) ----
/** include/uapi/linux/tcp.h: TCP_ULP = 31 (attach an upper-layer protocol by name: "tls"). */
export const TCP_ULP = 31;
/** include/linux/socket.h: SOL_TLS = 282. */
export const SOL_TLS = 282;
/** include/uapi/linux/tls.h: TLS_TX = 1, TLS_RX = 2 (set transmit / receive parameters). */
export const TLS_TX = 1;
export const TLS_RX = 2;
