// Property-based tests of the server's request framing and checks (src/server/requests.ts,
// src/server/byte-queue.ts) against a hostile client in the transmission phase.
//
// Inputs are request streams: valid requests of every type (and unknown ones) with hostile offsets
// (around 2^53 and 2^64) and lengths, WRITEs within and beyond the maximum payload with their data
// or part of it, bad magics; then mutated and delivered in arbitrary chunks, the ways the
// connection delivers them: plain chunks, a reused read buffer (detach() then overwrite), direct
// reads into the payload being assembled (directTarget/filledDirect), payloads placed in storage.
// Properties:
//   1. the reader hands out requests or throws NbdError('NBD_E_PROTOCOL') (bad magic: the stream is
//      out of step); never another exception, never an allocation above the maximum payload, never
//      more than one partial header buffered;
//   2. every delivery gives the same requests, payloads and end as the whole stream at once;
//   3. checkRequest agrees with an exact (BigInt) model: a request it passes is in range, has only
//      allowed flags and a payload within the maximum; one it refuses says why with an NBD error.
// Budget: ~10 s for the file by default. Longer: FUZZ_SECONDS=N (seconds per property) or
// FUZZ_RUNS=N (inputs per property); replay a failure with the FUZZ_SEED=… FUZZ_PATH=… it printed
// (test/lib/fuzz.ts; `FUZZ_SECONDS=300 npm run test:fuzz` runs every fuzz file).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { NbdError } from '../../src/errors.ts';
import { encodeRequest, type Request } from '../../src/protocol/codec.ts';
import { Cmd, CmdFlag, REQUEST_LENGTH, WireErr } from '../../src/protocol/constants.ts';
import { RequestReader, checkRequest, discardedWriteVerdict, type ExportLimits } from '../../src/server/requests.ts';
import { bytes, check, cuts, hostileU32, hostileU64, mutate, mutations, split, typedError } from '../lib/fuzz.ts';

type Delivery = 'plain' | 'reused' | 'direct' | 'placed';

interface Read {
  items: string[];
  end: string;
}

/** Feed `chunks` to a reader as the connection would in `mode`; the requests out, as text. */
function read(chunks: Buffer[], maxPayload: number, mode: Delivery): Read {
  const allocs: number[] = [];
  const alloc = (n: number): Buffer => {
    assert.ok(n > 0 && n <= maxPayload, `allocation of ${n} bytes (max payload ${maxPayload})`);
    allocs.push(n);
    return Buffer.allocUnsafe(n);
  };
  const place =
    mode === 'placed'
      ? (req: Request): Buffer | undefined => {
          assert.equal(req.type, Cmd.WRITE);
          assert.ok(req.length > 0 && req.length <= maxPayload, `place asked for ${req.length} bytes`);
          return req.cookie % 2n === 0n ? Buffer.alloc(req.length) : undefined;
        }
      : undefined;
  const reused = mode === 'reused';
  const r = new RequestReader(maxPayload, alloc, reused, place);
  const scratch = new ArrayBuffer(Math.max(1, ...chunks.map((c) => c.length)));
  const items: string[] = [];
  const drain = (): void => {
    for (let guard = 0; ; guard++) {
      assert.ok(guard < 100_000, 'next() does not stop');
      const n = r.next();
      if (!n) break;
      const { req } = n;
      const payload = n.kind === 'request' && n.payload ? ` payload=${n.payload.toString('hex')}` : '';
      if (n.kind === 'request' && n.payload) assert.equal(n.payload.length, req.length);
      items.push(`${n.kind} type=${req.type} flags=${req.flags} cookie=${req.cookie} offset=${req.offset} length=${req.length}${payload}`);
    }
    assert.ok(r.buffered < REQUEST_LENGTH, `${r.buffered} bytes buffered after next() returned null`);
    assert.ok(r.pendingPayload <= maxPayload);
  };
  try {
    for (let chunk of chunks) {
      if (mode === 'direct') {
        const target = r.directTarget(1);
        if (target) {
          const n = Math.min(target.length, chunk.length);
          chunk.copy(target, 0, 0, n);
          r.filledDirect(n);
          chunk = chunk.subarray(n);
        }
      }
      if (reused) {
        const view = Buffer.from(scratch, 0, chunk.length);
        chunk.copy(view);
        r.push(view);
      } else {
        r.push(chunk);
      }
      drain();
      if (reused) {
        // The read buffer is about to be reused: whatever the reader keeps must be its own copy.
        r.detach(scratch);
        new Uint8Array(scratch).fill(0xee);
      }
    }
    return { items, end: `waiting, ${r.buffered} buffered, ${r.pendingPayload} pending` };
  } catch (err) {
    const e = typedError(err, NbdError);
    assert.match(e, /^NBD_E_PROTOCOL: request: bad magic/);
    return { items, end: e };
  }
}

// ---------------------------------------------------------------------------------------------
// Request streams

const u16 = fc.integer({ min: 0, max: 0xffff });
const cmd = fc.oneof({ arbitrary: fc.constantFrom(...Object.values(Cmd)), weight: 5 }, u16);
const cmdFlags = fc.oneof({ arbitrary: fc.constantFrom(0, CmdFlag.FUA), weight: 3 }, fc.constantFrom(...Object.values(CmdFlag)), u16);
const maxPayloadArb = fc.constantFrom(16, 64, 1000, 1 << 25);

/** One request with what follows it: a WRITE's payload, whole or cut short. */
const request = (maxPayload: number): fc.Arbitrary<Buffer> =>
  fc.oneof(
    { arbitrary: fc.record({ type: cmd, flags: cmdFlags, cookie: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), offset: hostileU64, length: hostileU32 }).map((q) => encodeRequest(q.type === Cmd.WRITE ? { ...q, length: 0 } : q)), weight: 3 },
    // WRITE within the maximum, with its payload.
    { arbitrary: fc.tuple(fc.bigInt({ min: 0n, max: 9n }), cmdFlags, hostileU64, bytes(Math.min(maxPayload, 80))).map(([cookie, flags, offset, data]) => Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags, cookie, offset, length: data.length }), data])), weight: 3 },
    // WRITE beyond the maximum: its data is read and discarded (all of it here, or the start of it).
    fc.tuple(fc.integer({ min: 1, max: 200 }), fc.boolean()).map(([over, whole]) => {
      const length = maxPayload + over;
      const data = Buffer.alloc(whole && length <= 4096 ? length : Math.min(length, 100), 0x5a);
      return Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 0n, length }), data]);
    }),
    // A WRITE whose length field is hostile, followed by a little data.
    fc.tuple(hostileU32, bytes(40)).map(([length, data]) => Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 3n, offset: 0n, length }), data])),
    bytes(40),
  );

const stream = maxPayloadArb.chain((maxPayload) =>
  fc.tuple(fc.constant(maxPayload), fc.array(request(maxPayload), { maxLength: 8 }), mutations(), fc.constantFrom(0, REQUEST_LENGTH)).map(([m, reqs, muts, keep]) => ({
    maxPayload: m,
    input: mutate(Buffer.concat(reqs), muts, keep),
  })),
);
const delivery = fc.constantFrom<Delivery>('plain', 'reused', 'direct', 'placed');

// ---------------------------------------------------------------------------------------------
// checkRequest's exact model (proto.md "Request types", "Error values"; the server's choices)

function model(req: Request, lim: ExportLimits): boolean {
  const supported: number[] = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.FLUSH];
  if (!supported.includes(req.type)) return false;
  let allowed: number = CmdFlag.FUA;
  if (req.type === Cmd.READ && lim.structured) allowed |= CmdFlag.DF;
  if (req.type === Cmd.WRITE_ZEROES) allowed |= CmdFlag.NO_HOLE;
  if (req.flags & ~allowed) return false;
  if (req.type === Cmd.FLUSH) return true;
  if ((req.type === Cmd.WRITE || req.type === Cmd.TRIM || req.type === Cmd.WRITE_ZEROES) && lim.readOnly) return false;
  if ((req.type === Cmd.READ || req.type === Cmd.WRITE) && req.length > lim.maxPayload) return false;
  return req.offset + BigInt(req.length) <= BigInt(lim.size);
}

const limits: fc.Arbitrary<ExportLimits> = fc.record({
  size: fc.oneof(fc.constantFrom(0, 512, 1 << 20, 2 ** 53 - 1, 2 ** 53 - 4096, 2 ** 32), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER })),
  readOnly: fc.boolean(),
  structured: fc.boolean(),
  maxPayload: fc.constantFrom(4096, 1 << 25),
});

/** Requests near the end of the export and around Number's precision, where rounding could hide an overflow. */
const edgeRequest = (size: number): fc.Arbitrary<Request> =>
  fc.record({
    type: cmd,
    flags: cmdFlags,
    cookie: fc.constant(0n),
    offset: fc.oneof(hostileU64, fc.bigInt({ min: -8192n, max: 8192n }).map((d) => BigInt.asUintN(64, BigInt(size) + d))),
    length: fc.oneof(hostileU32, fc.integer({ min: 0, max: 8192 })),
  }, { noNullPrototype: true });

describe('server requests: hostile request streams', () => {
  it('any bytes, any chunks, any delivery: requests or NBD_E_PROTOCOL, allocations within the maximum payload', () => {
    check(2000, [maxPayloadArb, bytes(300), cuts, delivery], (maxPayload, input, at, mode) => {
      read(split(input, at), maxPayload, mode);
    });
  });

  it('request streams split anywhere and delivered any way read like the whole stream', () => {
    check(2500, [stream, cuts, delivery], ({ maxPayload, input }, at, mode) => {
      assert.deepEqual(read(split(input, at), maxPayload, mode), read([input], maxPayload, 'plain'));
    });
  });

  it('checkRequest agrees with the exact model, offsets up to 2^64 included', () => {
    check(5000, [limits.chain((lim) => fc.tuple(fc.constant(lim), edgeRequest(lim.size)))], ([lim, req]) => {
      const v = checkRequest(req, lim);
      assert.equal(v.error === 0, model(req, lim), `${JSON.stringify({ ...req, cookie: 0, offset: String(req.offset) })} → ${v.message}`);
      if (v.error !== 0) {
        assert.ok(Object.values(WireErr).includes(v.error as never), `error ${v.error} is an NBD error value`);
        assert.match(v.message, /^NBD_CMD_\w+: \S/);
      }
      const d = discardedWriteVerdict(req, lim);
      assert.ok(d.error === WireErr.EINVAL || d.error === WireErr.EPERM);
    });
  });
});

// Sanity of the generator: streams reach every kind of outcome (else the properties prove little).
it('request fuzz inputs reach requests, WRITE payloads, discarded WRITEs, bad magics and partial input', () => {
  const seen = new Set<string>();
  for (const [{ maxPayload, input }, at] of fc.sample(fc.tuple(stream, cuts), { numRuns: 400, seed: 42 })) {
    const r = read(split(input, at), maxPayload, 'plain');
    for (const i of r.items) seen.add(i.includes(' payload=') ? 'write payload' : i.split(' ')[0]!);
    seen.add(r.end.startsWith('NBD_E_PROTOCOL') ? 'bad magic' : r.end.startsWith('waiting, 0 buffered, 0') ? 'idle' : 'partial');
  }
  assert.deepEqual([...seen].sort(), ['bad magic', 'discarded-write', 'idle', 'partial', 'request', 'write payload']);
});
