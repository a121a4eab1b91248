// Byte-for-byte tests of the generic-netlink codec (src/kernel/netlink-codec.ts).
// Netlink headers are host byte order; these vectors are little-endian (x86_64, aarch64).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { endianness } from 'node:os';
import {
  attrNested,
  attrString,
  attrU32,
  attrU64,
  attrU8,
  encodeAttr,
  encodeConnect,
  encodeDisconnect,
  encodeGetFamily,
  encodeMessage,
  encodeStatus,
  findAttr,
  nlaAlign,
  parseAck,
  parseAttrs,
  parseFamily,
  parseGenl,
  parseIndex,
  parseMessages,
  parseStatus,
  readString,
  readU16,
  readU32,
  readU64,
  NetlinkCodecError,
} from '../../src/kernel/netlink-codec.ts';
import { NbdAttr, NlmFlag, NlmsgType } from '../../src/kernel/constants.ts';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

test('vectors assume a little-endian host', () => {
  assert.equal(endianness(), 'LE');
});

test('attribute: length excludes padding, padding is zero, next attribute 4-aligned', () => {
  assert.deepEqual(attrU8(2, 0xab), hex('0500 0200 ab000000'));
  assert.deepEqual(attrU32(1, 0x01020304), hex('0800 0100 04030201'));
  assert.deepEqual(attrU64(2, 0x100000n), hex('0c00 0200 0000100000000000'));
  // "nbd" + NUL = 4 bytes payload → len 8, no padding
  assert.deepEqual(attrString(2, 'nbd'), hex('0800 0200 6e626400'));
  // "ab" + NUL = 3 bytes → len 7, one zero pad byte
  assert.deepEqual(attrString(10, 'ab'), hex('0700 0a00 61620000'));
  assert.deepEqual(encodeAttr(3, Buffer.alloc(0)), hex('0400 0300'));
  assert.equal(nlaAlign(5), 8);
  assert.equal(nlaAlign(8), 8);
});

test('nested attribute sets NLA_F_NESTED unless asked not to', () => {
  const inner = attrU32(1, 5);
  assert.deepEqual(attrNested(1, [inner]), hex('0c00 0180 0800 0100 05000000'));
  assert.deepEqual(attrNested(1, [inner], false), hex('0c00 0100 0800 0100 05000000'));
});

test('parseAttrs masks NLA_F_NESTED off the type and walks padding', () => {
  const buf = Buffer.concat([attrString(10, 'ab'), attrNested(7, [attrU32(1, 9)]), attrU64(2, 7n)]);
  const a = parseAttrs(buf);
  assert.deepEqual(a.map((x) => [x.type, x.nestedFlag]), [[10, false], [7, true], [2, false]]);
  assert.equal(readString(a[0]!), 'ab');
  assert.equal(readU32(parseAttrs(a[1]!.payload)[0]!), 9);
  assert.equal(readU64(a[2]!), 7n);
});

test('parseAttrs rejects lengths that lie', () => {
  assert.throws(() => parseAttrs(hex('0200 0100')), NetlinkCodecError); // len < 4
  assert.throws(() => parseAttrs(hex('0c00 0100 00000000')), NetlinkCodecError); // runs past the end
  assert.deepEqual(parseAttrs(hex('0400')), []); // trailing bytes shorter than a header are ignored
});

test('readers refuse short payloads', () => {
  const [a] = parseAttrs(attrU8(1, 1));
  assert.throws(() => readU32(a!), NetlinkCodecError);
  assert.throws(() => readU16(parseAttrs(hex('0400 0100'))[0]!), NetlinkCodecError);
});

test('CTRL_CMD_GETFAMILY("nbd") request, byte for byte', () => {
  assert.deepEqual(
    encodeGetFamily(0x11223344, 'nbd'),
    hex(
      '1c000000 1000 0500 44332211 00000000' + // nlmsghdr: len 28, GENL_ID_CTRL, REQUEST|ACK, seq, pid 0
        '03 01 0000' + // genlmsghdr: CTRL_CMD_GETFAMILY, version 1
        '0800 0200 6e626400', // CTRL_ATTR_FAMILY_NAME "nbd\0"
    ),
  );
});

test('NBD_CMD_CONNECT without INDEX (the kernel picks the device), byte for byte', () => {
  const msg = encodeConnect({ family: 32, seq: 7, sizeBytes: 0x100000n, blockSize: 512, serverFlags: 0x0003, backend: 'ab', fds: [5] });
  assert.deepEqual(
    msg,
    hex(
      '50000000 2000 0500 07000000 00000000' + // len 80, family 32, REQUEST|ACK, seq 7
        '01 01 0000' + // NBD_CMD_CONNECT, version 1
        '0c00 0200 0000100000000000' + // SIZE_BYTES 1 MiB
        '0c00 0300 0002000000000000' + // BLOCK_SIZE_BYTES 512
        '0c00 0500 0300000000000000' + // SERVER_FLAGS
        '0700 0a00 61620000' + // BACKEND_IDENTIFIER "ab\0" + pad
        '1000 0780 0c00 0180 0800 0100 05000000', // SOCKETS{ SOCK_ITEM{ SOCK_FD 5 } }
    ),
  );
  const g = parseGenl(parseMessages(msg)[0]!);
  assert.equal(findAttr(g.attrs, NbdAttr.INDEX), undefined);
});

test('NBD_CMD_CONNECT with INDEX, timeout, dead timeout and two sockets', () => {
  const msg = encodeConnect({ family: 40, seq: 1, index: 3, sizeBytes: 4096n, blockSize: 4096, serverFlags: 0x103, timeout: 30, deadConnTimeout: 60, fds: [7, 8] });
  const [m] = parseMessages(msg);
  assert.equal(m!.type, 40);
  assert.equal(m!.flags, NlmFlag.REQUEST | NlmFlag.ACK);
  const g = parseGenl(m!);
  assert.equal(g.cmd, 1);
  assert.deepEqual(g.attrs.map((a) => a.type), [NbdAttr.INDEX, NbdAttr.SIZE_BYTES, NbdAttr.BLOCK_SIZE_BYTES, NbdAttr.SERVER_FLAGS, NbdAttr.TIMEOUT, NbdAttr.DEAD_CONN_TIMEOUT, NbdAttr.SOCKETS]);
  assert.equal(readU32(findAttr(g.attrs, NbdAttr.INDEX)!), 3);
  assert.equal(readU64(findAttr(g.attrs, NbdAttr.TIMEOUT)!), 30n);
  assert.equal(readU64(findAttr(g.attrs, NbdAttr.DEAD_CONN_TIMEOUT)!), 60n);
  const items = parseAttrs(findAttr(g.attrs, NbdAttr.SOCKETS)!.payload);
  assert.deepEqual(items.map((i) => readU32(parseAttrs(i.payload)[0]!)), [7, 8]);
  assert.throws(() => encodeConnect({ family: 40, seq: 1, sizeBytes: 1n, blockSize: 512, serverFlags: 0, fds: [] }), NetlinkCodecError);
});

test('NBD_CMD_DISCONNECT and NBD_CMD_STATUS, byte for byte', () => {
  assert.deepEqual(encodeDisconnect({ family: 32, seq: 2, index: 1 }), hex('1c000000 2000 0500 02000000 00000000 02 01 0000 0800 0100 01000000'));
  assert.deepEqual(encodeStatus({ family: 32, seq: 3 }), hex('14000000 2000 0500 03000000 00000000 05 01 0000'));
});

test('parseMessages splits a datagram with a reply and an ack, padding included', () => {
  // CONNECT reply: genl cmd 1, INDEX 4
  const reply = encodeMessage({ type: 32, flags: 0, seq: 9, pid: 0, payload: Buffer.concat([hex('01010000'), attrU32(NbdAttr.INDEX, 4)]) });
  const ackPayload = Buffer.concat([hex('00000000'), reply.subarray(0, 16)]);
  const ack = encodeMessage({ type: NlmsgType.ERROR, flags: NlmFlag.CAPPED, seq: 9, payload: ackPayload });
  const msgs = parseMessages(Buffer.concat([reply, ack]));
  assert.equal(msgs.length, 2);
  assert.equal(parseIndex(parseGenl(msgs[0]!)), 4);
  assert.deepEqual(parseAck(msgs[1]!), { error: 0, requestSeq: 9 });
});

test('parseMessages rejects a header that lies about its length', () => {
  assert.throws(() => parseMessages(hex('08000000 1000 0000 00000000 00000000')), NetlinkCodecError);
  assert.throws(() => parseMessages(hex('40000000 1000 0000 00000000 00000000')), NetlinkCodecError);
});

test('parseAck: negative errno and the extended-ack message', () => {
  // error -16 (EBUSY), echoed header (capped), then NLMSGERR_ATTR_MSG "busy"
  const payload = Buffer.concat([hex('f0ffffff'), hex('1c000000 2000 0500 05000000 00000000'), attrString(1, 'busy')]);
  const m = parseMessages(encodeMessage({ type: NlmsgType.ERROR, flags: NlmFlag.CAPPED | NlmFlag.ACK_TLVS, seq: 5, payload }))[0]!;
  assert.deepEqual(parseAck(m), { error: -16, requestSeq: 5, message: 'busy' });
  // uncapped: the original message (28 bytes) is echoed in full before the TLVs
  const full = Buffer.concat([hex('feffffff'), encodeDisconnect({ family: 32, seq: 6, index: 0 }), attrString(1, 'x')]);
  const m2 = parseMessages(encodeMessage({ type: NlmsgType.ERROR, flags: NlmFlag.ACK_TLVS, seq: 6, payload: full }))[0]!;
  assert.deepEqual(parseAck(m2), { error: -2, requestSeq: 6, message: 'x' });
  assert.throws(() => parseAck({ ...m2, type: 32 }), NetlinkCodecError);
});

test('parseFamily: id (u16), version, multicast groups', () => {
  const groups = attrNested(7, [attrNested(1, [attrU32(2, 9), attrString(1, 'nbd_mc_group')], false)], false);
  const payload = Buffer.concat([hex('01020000'), attrString(2, 'nbd'), encodeAttr(1, hex('2000')), attrU32(3, 1), groups]);
  const f = parseFamily(parseGenl(parseMessages(encodeMessage({ type: 0x10, flags: 0, seq: 1, payload }))[0]!));
  assert.equal(f.id, 32);
  assert.equal(f.name, 'nbd');
  assert.equal(f.version, 1);
  assert.equal(f.groups.get('nbd_mc_group'), 9);
  assert.throws(() => parseFamily({ cmd: 1, version: 1, attrs: [] }), NetlinkCodecError);
});

test('parseStatus: DEVICE_LIST of DEVICE_ITEMs (nests without NLA_F_NESTED, as the kernel builds them)', () => {
  const item = (i: number, c: number): Buffer => attrNested(1, [attrU32(1, i), attrU8(2, c)], false);
  const payload = Buffer.concat([hex('05010000'), attrNested(NbdAttr.DEVICE_LIST, [item(0, 1), item(1, 0)], false)]);
  const g = parseGenl(parseMessages(encodeMessage({ type: 32, flags: 0, seq: 1, payload }))[0]!);
  assert.deepEqual(parseStatus(g), [
    { index: 0, connected: true },
    { index: 1, connected: false },
  ]);
  assert.deepEqual(parseStatus({ cmd: 5, version: 1, attrs: [] }), []);
});
