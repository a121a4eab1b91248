// Property-based tests of the server handshake (src/server/handshake.ts) against a hostile client.
//
// Inputs are client byte streams: random bytes, and "mostly valid" sequences of options (real
// NBD_OPT_GO/INFO/EXPORT_NAME/LIST/... with export names that exist or not, unknown options,
// hostile length fields) then mutated, all pushed in arbitrary chunks.
// Properties:
//   1. push() never throws: every outcome is replies, negotiated, close or waiting for more;
//   2. what it buffers stays bounded (≤ MAX_OPTION_DATA while waiting), it answers at most
//      MAX_OPTIONS options, and everything it sends is a well-formed option reply (or the
//      NBD_OPT_EXPORT_NAME reply that ends the handshake) with a printable message;
//   3. without TLS, the same bytes pushed whole or split anywhere give the same replies and the
//      same end (the bytes after the handshake, `leftover` plus what was not pushed, included).
// Budget: ~10 s for the file by default. Longer: FUZZ_SECONDS=N (seconds per property) or
// FUZZ_RUNS=N (inputs per property); replay a failure with the FUZZ_SEED=… FUZZ_PATH=… it printed
// (test/lib/fuzz.ts; `FUZZ_SECONDS=300 npm run test:fuzz` runs every fuzz file).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { decodeOptionReplyHeader, encodeClientFlags, encodeInfoRequest, encodeOption } from '../../src/protocol/codec.ts';
import { EXPORT_NAME_REPLY_LENGTH, EXPORT_NAME_REPLY_ZEROES, MAX_STRING, Opt, OPT_REPLY_HEADER_LENGTH, OPT_REPLY_MAGIC, Rep } from '../../src/protocol/constants.ts';
import { MemoryBackend } from '../../src/server/backends.ts';
import type { ServedExport } from '../../src/server/export.ts';
import { MAX_OPTIONS, MAX_OPTION_DATA, ServerHandshake, type TlsMode } from '../../src/server/handshake.ts';
import { bytes, check, cuts, hostileU32, mutate, mutations, split } from '../lib/fuzz.ts';

const EXPORTS: ServedExport[] = [
  { name: 'disk', description: 'a disk', backend: new MemoryBackend(1 << 20), readOnly: false },
  { name: 'ro', description: '', backend: new MemoryBackend(4096), readOnly: true },
  { name: 'é\u0000x', description: 'odd name', backend: new MemoryBackend(0), readOnly: false },
];

/** Control characters: line breaks, terminal escapes (C0, DEL, C1), the Unicode line separators. */
const PRINTABLE_VIOLATION = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/;

interface Run {
  /** Everything the server wrote, in order (hex). */
  sent: string;
  /** How it ended: negotiated (export, flags, structured, the bytes after), closed, or waiting. */
  end: string;
}

/**
 * Option replies, then possibly one NBD_OPT_EXPORT_NAME reply: parse `sent` and check each. Returns
 * how many options were answered (each option ends with exactly one ACK or error reply).
 */
function checkReplies(sent: Buffer[]): number {
  let answered = 0;
  for (const b of sent) {
    if (b.length >= 8 && b.readBigUInt64BE(0) === OPT_REPLY_MAGIC) {
      const h = decodeOptionReplyHeader(b);
      assert.equal(b.length, OPT_REPLY_HEADER_LENGTH + h.length, 'one reply per buffer, length field right');
      assert.ok(h.length <= 4 * MAX_STRING, `reply of ${h.length} bytes`);
      if (h.type & 0x80000000) {
        // Error replies carry a message for people: one printable line.
        assert.doesNotMatch(b.subarray(20).toString('utf8'), PRINTABLE_VIOLATION, 'error text is one printable line');
      }
      if (h.type === Rep.ACK || h.type & 0x80000000) answered++;
    } else {
      assert.ok(b.length === EXPORT_NAME_REPLY_LENGTH || b.length === EXPORT_NAME_REPLY_LENGTH + EXPORT_NAME_REPLY_ZEROES, `unexpected ${b.length}-byte write`);
    }
  }
  return answered;
}

/**
 * Push `chunks` into a fresh handshake, the way the connection does: stop at close or negotiated;
 * on startTls, call tlsStarted() (the TLS layer is not modelled: the bytes go on in clear).
 */
function serve(chunks: Buffer[], tls: TlsMode, shutdownBefore = Infinity): Run {
  const hs = new ServerHandshake(EXPORTS, { tls });
  const sent: Buffer[] = [];
  let answered = 0;
  for (let i = 0; i < chunks.length; i++) {
    if (i === shutdownBefore) hs.beginShutdown();
    const step = hs.push(chunks[i]!);
    sent.push(...step.send);
    answered += checkReplies(step.send);
    const queued = hs['queue'].length;
    const rest = () => Buffer.concat(chunks.slice(i + 1));
    if (step.negotiated) {
      const n = step.negotiated;
      const after = Buffer.concat([n.leftover, rest()]).toString('hex');
      return { sent: Buffer.concat(sent).toString('hex'), end: `negotiated ${JSON.stringify(n.export.name)} flags=${n.flags} structured=${n.structured} then=${after}` };
    }
    if (step.close) {
      assert.ok(answered <= MAX_OPTIONS, `${answered} options answered`);
      assert.doesNotMatch(step.close.reason, PRINTABLE_VIOLATION, 'the close reason (logged) is one printable line');
      return { sent: Buffer.concat(sent).toString('hex'), end: `close soft=${step.close.soft}: ${step.close.reason}` };
    }
    if (step.startTls) {
      // The ACK is the last thing before TLS, and nothing may be queued behind STARTTLS.
      assert.equal(queued, 0);
      hs.tlsStarted();
      continue;
    }
    assert.ok(queued <= MAX_OPTION_DATA, `${queued} bytes buffered while waiting for more`);
  }
  assert.ok(answered <= MAX_OPTIONS, `${answered} options answered`);
  return { sent: Buffer.concat(sent).toString('hex'), end: `waiting in ${hs.state.phase}` };
}

// ---------------------------------------------------------------------------------------------
// A hostile client that mostly speaks the protocol

const u16 = fc.integer({ min: 0, max: 0xffff });
const exportName = fc.oneof(
  fc.constantFrom('disk', 'ro', '', 'é\u0000x', 'nope', 'a\nb', 'a\u007fb', '\u009b2J', 'a\u2028b'),
  fc.string({ unit: 'binary', maxLength: 10 }),
  fc.string({ unit: 'binary-ascii', maxLength: 6 }),
);
const optionNumber = fc.oneof(
  { arbitrary: fc.constantFrom(...Object.values(Opt)), weight: 4 },
  fc.constantFrom(0, 12, 0x7fffffff, 0xffffffff),
  fc.integer({ min: 0, max: 0xffffffff }),
);

const optionData: fc.Arbitrary<Buffer> = fc.oneof(
  fc.tuple(exportName, fc.array(u16, { maxLength: 6 })).map(([n, i]) => encodeInfoRequest(n, i)),
  exportName.map((n) => Buffer.from(n, 'utf8')),
  fc.constant(Buffer.alloc(0)),
  bytes(40),
);

/** One option: usually its own length; sometimes a lying length field (the stream goes out of step). */
const option: fc.Arbitrary<Buffer> = fc.oneof(
  { arbitrary: fc.tuple(optionNumber, optionData).map(([o, d]) => encodeOption(o, d)), weight: 6 },
  fc.tuple(optionNumber, hostileU32, bytes(40)).map(([o, len, d]) => {
    const b = encodeOption(o, d);
    b.writeUInt32BE(len, 12);
    return b;
  }),
  // A long option (over MAX_OPTION_DATA or the string limit) that is read and thrown away.
  fc.tuple(optionNumber, fc.constantFrom(MAX_STRING + 1, MAX_OPTION_DATA + 1, 20000)).map(([o, n]) => encodeOption(o, Buffer.alloc(n, 0x61))),
);

const clientFlags = fc.oneof({ arbitrary: fc.constantFrom(3, 1), weight: 4 }, fc.constantFrom(0, 2), fc.integer({ min: 0, max: 0xffffffff }));

const client: fc.Arbitrary<Buffer> = fc
  .tuple(clientFlags, fc.array(option, { maxLength: 12 }), bytes(30))
  .map(([f, opts, tail]) => Buffer.concat([encodeClientFlags(f), ...opts, tail]));

const tlsMode = fc.constantFrom<TlsMode>('off', 'on', 'require');
const keep = fc.constantFrom(0, 4);

describe('server handshake: hostile client', () => {
  it('random bytes in any chunks: replies, negotiated, close or waiting; never an exception', () => {
    const prefix = fc.constantFrom(Buffer.alloc(0), encodeClientFlags(3), Buffer.concat([encodeClientFlags(1), Buffer.from('IHAVEOPT')]));
    check(2000, [prefix, bytes(300), cuts, tlsMode], (pre, rest, at, tls) => {
      serve(split(Buffer.concat([pre, rest]), at), tls);
    });
  });

  it('mutated option streams, any chunks, any TLS mode, shutdown at any point: bounded and well-formed', () => {
    check(2500, [client, mutations(), keep, cuts, tlsMode, fc.nat({ max: 14 })], (c, muts, k, at, tls, shutdownBefore) => {
      serve(split(mutate(c, muts, k), at), tls, shutdownBefore);
    });
  });

  it('the same bytes pushed whole or split anywhere give the same replies and end', () => {
    check(2000, [client, mutations(), keep, cuts], (c, muts, k, at) => {
      const input = mutate(c, muts, k);
      assert.deepEqual(serve(split(input, at), 'off'), serve([input], 'off'));
    });
  });

  it('more than MAX_OPTIONS options end the session, whatever the options', () => {
    check(200, [fc.array(fc.tuple(optionNumber.filter((o) => o !== Opt.ABORT && o !== Opt.GO && o !== Opt.EXPORT_NAME), bytes(8)), { minLength: MAX_OPTIONS + 1, maxLength: MAX_OPTIONS + 5 }), cuts], (opts, at) => {
      const input = Buffer.concat([encodeClientFlags(3), ...opts.map(([o, d]) => encodeOption(o, d))]);
      const r = serve(split(input, at), 'off');
      assert.match(r.end, /^close soft=false: more than 32 options$/);
    });
  });
});

// Sanity of the generator: it does reach the end states (else the properties above prove little).
it('server handshake fuzz inputs reach negotiation, closes and waiting', () => {
  const ends = new Set<string>();
  for (const [c, muts, k] of fc.sample(fc.tuple(client, mutations(), keep), { numRuns: 1000, seed: 42 })) {
    ends.add(serve([mutate(c, muts, k)], 'off').end.split(/[ :]/)[0]!);
  }
  assert.deepEqual([...ends].sort(), ['close', 'negotiated', 'waiting']);
});

describe('server handshake: regressions found by fuzzing', () => {
  it('a client-given name with DEL, C1 CSI or U+2028 is escaped in the reply and in the close reason', () => {
    // Found: JSON.stringify leaves DEL, C1 controls and U+2028/2029 as they are.
    const go = serve([Buffer.concat([encodeClientFlags(3), encodeOption(Opt.GO, encodeInfoRequest('a\u007f\u009b\u2028b', []))])], 'off');
    assert.ok(go.sent.includes(Buffer.from('unknown export "a\\u007f\\u009b\\u2028b"; exports: "disk", "ro", "é\\u0000x"').toString('hex')));
    const name = serve([Buffer.concat([encodeClientFlags(3), encodeOption(Opt.EXPORT_NAME, Buffer.from('x\u009by'))])], 'off');
    assert.equal(name.end, 'close soft=false: NBD_OPT_EXPORT_NAME: unknown export "x\\u009by"');
  });
});
