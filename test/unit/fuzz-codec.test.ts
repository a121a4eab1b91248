// Property-based tests of the NBD codec (src/protocol/codec.ts): every decoder, given any bytes,
// returns a value or throws NbdError('NBD_E_PROTOCOL'); decoders read only the bytes they are given
// (a view inside a larger buffer decodes like a copy); encode → decode is the identity.
// Budget: ~10 s for the file by default. Longer: FUZZ_SECONDS=N (seconds per property) or
// FUZZ_RUNS=N (inputs per property); replay a failure with the FUZZ_SEED=… FUZZ_PATH=… it printed
// (test/lib/fuzz.ts; `FUZZ_SECONDS=300 npm run test:fuzz` runs every fuzz file).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { NbdError } from '../../src/errors.ts';
import {
  decodeExportNameReply,
  decodeGreetingStart,
  decodeInfoRequest,
  decodeOldstyleRest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRepInfo,
  decodeRepServer,
  decodeRequest,
  decodeSimpleReply,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeInfoString,
  encodeNewstyleGreeting,
  encodeOldstyleGreeting,
  encodeOption,
  encodeOptionReply,
  encodeRepServer,
  encodeRequest,
  encodeSimpleReply,
} from '../../src/protocol/codec.ts';
import { Info } from '../../src/protocol/constants.ts';
import { bytes, check, hostileU32, hostileU64, mutate, mutations, typedError } from '../lib/fuzz.ts';

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
/** Names and descriptions: any code points (UTF-8 round-trips them), up to a few hundred. */
const text = fc.string({ unit: 'binary', maxLength: 64 });

const DECODERS: Record<string, (b: Uint8Array) => unknown> = {
  decodeGreetingStart,
  decodeOldstyleRest,
  decodeOptionHeader,
  decodeInfoRequest,
  decodeOptionReplyHeader,
  decodeRepServer,
  decodeRepInfo,
  decodeExportNameReply,
  decodeRequest,
  decodeSimpleReply,
};

/** A decoder's outcome as plain data: the value, or the error's code and message. */
function outcome(decode: (b: Uint8Array) => unknown, b: Uint8Array): unknown {
  try {
    return { value: decode(b) };
  } catch (err) {
    const e = typedError(err, NbdError);
    assert.ok(e.startsWith('NBD_E_PROTOCOL: '), e);
    return { error: e };
  }
}

/** Valid encodings of every message type, with arbitrary field values: seeds for mutation. */
const validMessage: fc.Arbitrary<Buffer> = fc.oneof(
  u16.map((f) => encodeNewstyleGreeting(f)),
  fc.tuple(u64, u32).map(([s, f]) => encodeOldstyleGreeting(s, f)),
  fc.tuple(u32, bytes(64)).map(([o, d]) => encodeOption(o, d)),
  fc.tuple(text, fc.array(u16, { maxLength: 8 })).map(([n, i]) => encodeInfoRequest(n, i)),
  fc.tuple(u32, u32, bytes(64)).map(([o, t, d]) => encodeOptionReply(o, t, d)),
  fc.tuple(text, text).map(([n, d]) => encodeRepServer(n, d)),
  fc.tuple(u64, u16).map(([s, f]) => encodeInfoExport(s, f)),
  fc.tuple(fc.constantFrom(Info.NAME, Info.DESCRIPTION), text).map(([t, s]) => encodeInfoString(t, s)),
  fc.tuple(u32, u32, u32).map(([min, preferred, max]) => encodeInfoBlockSize({ min, preferred, max })),
  fc.tuple(u64, u16, fc.boolean()).map(([s, f, z]) => encodeExportNameReply(s, f, z)),
  fc.record({ flags: u16, type: u16, cookie: u64, offset: hostileU64, length: hostileU32 }, { noNullPrototype: true }).map(encodeRequest),
  fc.tuple(u32, u64).map(([e, c]) => encodeSimpleReply(e, c)),
);

/** Inputs for the decoders: random bytes, or a valid message of any type with a few mutations. */
const decoderInput: fc.Arbitrary<Buffer> = fc.oneof(bytes(200), fc.tuple(validMessage, mutations()).map(([m, e]) => mutate(m, e)));

describe('codec: decoders on hostile bytes', () => {
  for (const [name, decode] of Object.entries(DECODERS)) {
    it(`${name}: a value or NBD_E_PROTOCOL, the same for a view inside a larger buffer as for a copy`, () => {
      check(1500, [decoderInput, bytes(16), bytes(16)], (input, before, after) => {
        const alone = outcome(decode, Uint8Array.from(input));
        // The same bytes as a view with neighbours: a decoder that reads past its view (or ignores
        // byteOffset) decodes differently.
        const big = Buffer.concat([before, input, after]);
        const view = big.subarray(before.length, before.length + input.length);
        assert.deepEqual(outcome(decode, view), alone);
        assert.deepEqual(outcome(decode, new Uint8Array(big.buffer, big.byteOffset + before.length, input.length)), alone);
      });
    });
  }
});

describe('codec: encode → decode is the identity', () => {
  it('greetings', () => {
    check(300, [u16, u64, u32], (hflags, size, flags) => {
      const n = encodeNewstyleGreeting(hflags);
      assert.equal(decodeGreetingStart(n.subarray(0, 16)), 'newstyle');
      assert.equal(n.readUInt16BE(16), hflags);
      const o = encodeOldstyleGreeting(size, flags);
      assert.equal(decodeGreetingStart(o.subarray(0, 16)), 'oldstyle');
      // proto.md "Oldstyle negotiation": only the low 16 bits are transmission flags.
      assert.deepEqual(decodeOldstyleRest(o.subarray(16)), { size, flags: flags & 0xffff });
    });
  });

  it('options and NBD_OPT_GO/INFO data', () => {
    check(300, [u32, bytes(100), text, fc.array(u16, { maxLength: 20 })], (option, data, name, infos) => {
      const o = encodeOption(option, data);
      assert.deepEqual(decodeOptionHeader(o), { option, length: data.length });
      assert.deepEqual(o.subarray(16), data);
      assert.deepEqual(decodeInfoRequest(encodeInfoRequest(name, infos)), { name, infos });
    });
  });

  it('option replies, NBD_REP_SERVER, NBD_REP_INFO items, the EXPORT_NAME reply', () => {
    check(300, [u32, u32, bytes(100), text, text, u64, u16, u32, u32, u32, fc.boolean()], (option, type, data, name, desc, size, flags, min, preferred, max, noZeroes) => {
      const r = encodeOptionReply(option, type, data);
      assert.deepEqual(decodeOptionReplyHeader(r), { option, type, length: data.length });
      assert.deepEqual(r.subarray(20), data);
      assert.deepEqual(decodeRepServer(encodeRepServer(name, desc)), { name, description: desc });
      assert.deepEqual(decodeRepInfo(encodeInfoExport(size, flags)), { type: Info.EXPORT, size, flags });
      assert.deepEqual(decodeRepInfo(encodeInfoString(Info.NAME, name)), { type: Info.NAME, name });
      assert.deepEqual(decodeRepInfo(encodeInfoString(Info.DESCRIPTION, desc)), { type: Info.DESCRIPTION, description: desc });
      assert.deepEqual(decodeRepInfo(encodeInfoBlockSize({ min, preferred, max })), { type: Info.BLOCK_SIZE, min, preferred, max });
      const e = encodeExportNameReply(size, flags, noZeroes);
      assert.equal(e.length, noZeroes ? 10 : 134);
      assert.deepEqual(decodeExportNameReply(e), { size, flags });
    });
  });

  it('requests and simple replies (any offset, length, cookie), as Buffer and as plain Uint8Array', () => {
    check(500, [fc.record({ flags: u16, type: u16, cookie: u64, offset: hostileU64, length: hostileU32 }, { noNullPrototype: true }), u32, u64], (req, error, cookie) => {
      const b = encodeRequest(req);
      assert.deepEqual(decodeRequest(b), req);
      assert.deepEqual(decodeRequest(Uint8Array.from(b)), req);
      assert.deepEqual(decodeSimpleReply(encodeSimpleReply(error, cookie)), { error, cookie });
    });
  });
});
