// Property-based tests of the generic-netlink codec (src/kernel/netlink-codec.ts), which parses
// what the kernel sends back: replies, acks (NLMSG_ERROR with extended-ack TLVs), multicasts.
//
// Inputs are datagrams: random bytes, and valid ones (genl messages with nested attributes, acks
// capped or not, with or without TLVs, nlctrl family replies, nbd STATUS replies) then mutated.
// Properties:
//   1. every parser returns a value or throws NetlinkCodecError (the codec's typed error); never
//      another exception; parsed payloads lie inside the datagram;
//   2. parseAck agrees with an exact model of struct nlmsgerr (where the TLVs start, in plain
//      arithmetic), whatever the echoed length says;
//   3. encode → parse is the identity for attributes, nests, messages, CONNECT and RECONFIGURE.
// Budget: ~10 s for the file by default. Longer: FUZZ_SECONDS=N (seconds per property) or
// FUZZ_RUNS=N (inputs per property); replay a failure with the FUZZ_SEED=… FUZZ_PATH=… it printed
// (test/lib/fuzz.ts; `FUZZ_SECONDS=300 npm run test:fuzz` runs every fuzz file).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import {
  CTRL_CMD_GETFAMILY,
  CtrlAttr,
  CtrlAttrMcastGrp,
  GENL_ID_CTRL,
  NBD_DEVICE_CONNECTED,
  NBD_DEVICE_INDEX,
  NBD_DEVICE_ITEM,
  NLMSG_HDRLEN,
  NLMSGERR_ATTR_MSG,
  NbdAttr,
  NbdGenlCmd,
  NlmFlag,
  NlmsgType,
} from '../../src/kernel/constants.ts';
import {
  HOST_LE,
  NetlinkCodecError,
  attrNested,
  attrString,
  attrU16,
  attrU32,
  attrU8,
  encodeAttr,
  encodeConnect,
  encodeGenl,
  encodeMessage,
  encodeReconfigure,
  findAttr,
  parseAck,
  parseAttrs,
  parseFamily,
  parseGenl,
  parseIndex,
  parseLinkDead,
  parseMessages,
  parseStatus,
  readString,
  readU32,
  readU64,
  type NlMessage,
} from '../../src/kernel/netlink-codec.ts';
import { bytes, check, mutate, mutations, typedError } from '../lib/fuzz.ts';

const u8 = fc.integer({ min: 0, max: 0xff });
const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const nlString = fc.string({ unit: 'grapheme-ascii', maxLength: 20 }).map((s) => s.replace(/\0/g, ''));

/** Run `f`; a NetlinkCodecError is an outcome, anything else fails. */
function attempt<T>(f: () => T): T | string {
  try {
    return f();
  } catch (err) {
    return typedError(err, NetlinkCodecError);
  }
}

// ---------------------------------------------------------------------------------------------
// Valid datagrams

/** Attributes, nested up to two levels. */
const attr: fc.Arbitrary<Buffer> = fc.letrec((tie) => ({
  leaf: fc.oneof(
    fc.tuple(u16, u8).map(([t, v]) => attrU8(t, v)),
    fc.tuple(u16, u16).map(([t, v]) => attrU16(t, v)),
    fc.tuple(u16, u32).map(([t, v]) => attrU32(t, v)),
    fc.tuple(u16, nlString).map(([t, s]) => attrString(t, s)),
    fc.tuple(u16, bytes(12)).map(([t, b]) => encodeAttr(t, b)),
  ),
  node: fc.oneof({ maxDepth: 2, depthIdentifier: 'attr' }, tie('leaf'), fc.tuple(u16, fc.array(tie('node') as fc.Arbitrary<Buffer>, { maxLength: 3 }), fc.boolean()).map(([t, c, f]) => attrNested(t, c, f))),
})).node as fc.Arbitrary<Buffer>;

const genl = fc.record({ family: u16, cmd: u8, version: u8, seq: u32, attrs: fc.array(attr, { maxLength: 4 }) }).map((r) => encodeGenl(r));

/** NLMSG_ERROR: error, the echoed request (whole, or its header when capped), TLVs. */
const ack = fc
  .record({ error: fc.oneof(fc.constant(0), fc.integer({ min: -4095, max: -1 })), request: genl, capped: fc.boolean(), tlvs: fc.boolean(), msg: nlString, extra: fc.array(attr, { maxLength: 2 }) })
  .map(({ error, request, capped, tlvs, msg, extra }) => {
    const e = Buffer.alloc(4);
    HOST_LE ? e.writeInt32LE(error) : e.writeInt32BE(error);
    const echoed = capped ? request.subarray(0, NLMSG_HDRLEN) : request;
    const flags = (capped ? NlmFlag.CAPPED : 0) | (tlvs ? NlmFlag.ACK_TLVS : 0);
    const payload = Buffer.concat([e, echoed, ...(tlvs ? [...extra, attrString(NLMSGERR_ATTR_MSG, msg)] : [])]);
    return encodeMessage({ type: NlmsgType.ERROR, flags, seq: 1, payload });
  });

const family = fc
  .record({ id: u16, name: nlString, version: u32, groups: fc.array(fc.tuple(nlString, u32), { maxLength: 3 }) })
  .map(({ id, name, version, groups }) =>
    encodeGenl({
      family: GENL_ID_CTRL,
      cmd: CTRL_CMD_GETFAMILY,
      version: 1,
      seq: 0,
      attrs: [
        attrU16(CtrlAttr.FAMILY_ID, id),
        attrString(CtrlAttr.FAMILY_NAME, name),
        attrU32(CtrlAttr.VERSION, version),
        attrNested(CtrlAttr.MCAST_GROUPS, groups.map(([n, g], i) => attrNested(i + 1, [attrString(CtrlAttrMcastGrp.NAME, n), attrU32(CtrlAttrMcastGrp.ID, g)]))),
      ],
    }),
  );

const status = fc.array(fc.tuple(u32, fc.boolean()), { maxLength: 4 }).map((devs) =>
  encodeGenl({
    family: 30,
    cmd: NbdGenlCmd.STATUS,
    version: 1,
    seq: 0,
    attrs: [attrNested(NbdAttr.DEVICE_LIST, devs.map(([i, c]) => attrNested(NBD_DEVICE_ITEM, [attrU32(NBD_DEVICE_INDEX, i), attrU8(NBD_DEVICE_CONNECTED, c ? 1 : 0)])))],
  }),
);

const datagram = fc.array(fc.oneof(genl, ack, family, status), { minLength: 1, maxLength: 3 }).map((ms) => Buffer.concat(ms));
const hostileDatagram = fc.oneof(bytes(200), fc.tuple(datagram, mutations(), fc.constantFrom(0, NLMSG_HDRLEN)).map(([d, m, k]) => mutate(d, m, k)));

// ---------------------------------------------------------------------------------------------
// The exact model of parseAck (include/uapi/linux/netlink.h, struct nlmsgerr; kernel-interface.md)

function modelAck(m: NlMessage): { error: number; requestSeq: number; message?: string } | 'short' {
  const p = m.payload;
  if (p.length < 4 + NLMSG_HDRLEN) return 'short';
  const error = HOST_LE ? p.readInt32LE(0) : p.readInt32BE(0);
  const origLen = HOST_LE ? p.readUInt32LE(4) : p.readUInt32BE(4);
  const requestSeq = HOST_LE ? p.readUInt32LE(12) : p.readUInt32BE(12);
  const out: { error: number; requestSeq: number; message?: string } = { error, requestSeq };
  if (m.flags & NlmFlag.ACK_TLVS) {
    // Plain arithmetic: origLen is any u32, its 4-byte alignment up to 2^32 + 0.
    const tlvOff = m.flags & NlmFlag.CAPPED ? 4 + NLMSG_HDRLEN : 4 + Math.ceil(origLen / 4) * 4;
    if (tlvOff <= p.length) {
      const msg = findAttr(parseAttrs(p.subarray(tlvOff)), NLMSGERR_ATTR_MSG);
      if (msg) out.message = readString(msg);
    }
  }
  return out;
}

describe('netlink codec: hostile datagrams', () => {
  it('every parser: a value or NetlinkCodecError; payloads inside the datagram', () => {
    check(3000, [hostileDatagram], (d) => {
      const msgs = attempt(() => parseMessages(d));
      if (typeof msgs === 'string') return;
      assert.ok(msgs.length <= Math.floor(d.length / NLMSG_HDRLEN));
      for (const m of msgs) {
        assert.equal(m.payload.buffer, d.buffer, 'payload is a view of the datagram');
        assert.ok(m.payload.byteOffset + m.payload.length <= d.byteOffset + d.length);
        if (m.type === NlmsgType.ERROR) {
          const got = attempt(() => parseAck(m));
          const want = attempt(() => {
            const r = modelAck(m);
            if (r === 'short') throw new NetlinkCodecError(`NLMSG_ERROR of ${m.payload.length} bytes is too short`);
            return r;
          });
          assert.deepEqual(got, want);
          continue;
        }
        const g = attempt(() => parseGenl(m));
        if (typeof g === 'string') continue;
        attempt(() => parseFamily(g));
        attempt(() => parseStatus(g));
        attempt(() => parseIndex(g));
        attempt(() => parseLinkDead(g));
        for (const a of g.attrs) {
          attempt(() => parseAttrs(a.payload));
          readString(a);
        }
      }
    });
  });

  it('parseAck reads the message after the echoed request, whatever length the echo claims', () => {
    check(3000, [ack, u32, fc.boolean()], (a, origLen, setLen) => {
      const b = Buffer.from(a);
      // Overwrite the echoed request's nlmsg_len (offset 16 + 4 in the datagram) with any u32.
      if (setLen) HOST_LE ? b.writeUInt32LE(origLen, NLMSG_HDRLEN + 4) : b.writeUInt32BE(origLen, NLMSG_HDRLEN + 4);
      const [m] = parseMessages(b);
      assert.deepEqual(attempt(() => parseAck(m!)), attempt(() => modelAck(m!)));
    });
  });
});

describe('netlink codec: encode → parse is the identity', () => {
  it('attributes, nests and messages', () => {
    check(1000, [u16, bytes(40), fc.array(fc.tuple(u16, u32), { maxLength: 4 }), u16, u16, u32, u32], (type, payload, kids, mtype, mflags, seq, pid) => {
      const [a] = parseAttrs(encodeAttr(type, payload));
      assert.equal(a!.type, type & 0x3fff);
      assert.deepEqual(a!.payload, payload);
      const nest = parseAttrs(attrNested(type, kids.map(([t, v]) => attrU32(t, v))))[0]!;
      assert.equal(nest.nestedFlag, true);
      assert.deepEqual(parseAttrs(nest.payload).map((k) => [k.type, readU32(k)]), kids.map(([t, v]) => [t & 0x3fff, v]));
      const msgs = parseMessages(Buffer.concat([encodeMessage({ type: mtype, flags: mflags, seq, pid, payload }), encodeMessage({ type: 3, flags: 0, seq: 0, payload: Buffer.alloc(0) })]));
      assert.equal(msgs.length, 2);
      assert.deepEqual({ ...msgs[0]!, payload: Buffer.from(msgs[0]!.payload) }, { type: mtype, flags: mflags, seq, pid, payload });
    });
  });

  it('NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE carry what they were given', () => {
    check(500, [u16, u32, u64, u32, u16, fc.array(fc.integer({ min: 0, max: 0x7fffffff }), { minLength: 1, maxLength: 4 }), nlString, fc.option(u32, { nil: undefined })], (fam, seq, size, blockSize, serverFlags, fds, backend, index) => {
      const c = parseGenl(parseMessages(encodeConnect({ family: fam, seq, sizeBytes: size, blockSize, serverFlags, fds, backend, ...(index !== undefined && { index }) }))[0]!);
      assert.equal(c.cmd, NbdGenlCmd.CONNECT);
      assert.equal(readU64(findAttr(c.attrs, NbdAttr.SIZE_BYTES)!), size);
      assert.equal(readU64(findAttr(c.attrs, NbdAttr.BLOCK_SIZE_BYTES)!), BigInt(blockSize));
      assert.equal(readU64(findAttr(c.attrs, NbdAttr.SERVER_FLAGS)!), BigInt(serverFlags));
      assert.equal(readString(findAttr(c.attrs, NbdAttr.BACKEND_IDENTIFIER)!), backend);
      assert.equal(parseIndex(c), index);
      const socks = parseAttrs(findAttr(c.attrs, NbdAttr.SOCKETS)!.payload).map((s) => readU32(parseAttrs(s.payload)[0]!));
      assert.deepEqual(socks, fds);
      const r = parseGenl(parseMessages(encodeReconfigure({ family: fam, seq, index: index ?? 0, fds, sizeBytes: size, backend }))[0]!);
      assert.equal(r.cmd, NbdGenlCmd.RECONFIGURE);
      assert.equal(parseIndex(r), index ?? 0);
      assert.equal(readU64(findAttr(r.attrs, NbdAttr.SIZE_BYTES)!), size);
    });
  });
});

describe('netlink codec: regressions found by fuzzing', () => {
  it('an ack whose echoed length is near 2^31 has no extended-ack message (was: a negative offset, a parse error)', () => {
    // Found: nlmsgAlign(0x7ffffffd) was negative (bitwise & on int32), so parseAck looked for the
    // TLVs at the start of the payload and failed on the errno read as an attribute.
    const ack = Buffer.from(
      '30000000' + '0200' + '0002' + '01000000' + '00000000' + // nlmsghdr: len 48, NLMSG_ERROR, ACK_TLVS, seq 1
        'ffffffff' + // error -1
        'fdffff7f' + '1400' + '0000' + '00000500' + '00000000' + // echoed nlmsghdr, nlmsg_len 0x7ffffffd
        '00000000' + '05000100' + '00000000', // 4 bytes of the echo, then a 1-byte NLMSGERR_ATTR_MSG
      'hex',
    );
    assert.ok(HOST_LE, 'vectors assume a little-endian host');
    const [m] = parseMessages(ack);
    assert.deepEqual(parseAck(m!), { error: -1, requestSeq: 0x50000 });
  });
});
