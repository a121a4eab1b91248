// The server's receiver (src/server/receiver.ts) without sockets: a byte stream is delivered the way
// a socket reading into our buffers delivers it (into whatever `readTarget` gives, in reads of any
// size), and the requests and payloads that come out are compared with what was sent.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NbdError } from '../../src/errors.ts';
import { Cmd, CmdFlag } from '../../src/protocol/constants.ts';
import { encodeRequest, type Request } from '../../src/protocol/codec.ts';
import { MemoryBackend } from '../../src/server/backends.ts';
import { BufferPool } from '../../src/server/buffer-pool.ts';
import { RequestReceiver, SCRATCH_SIZE, SMALL_READ, type ReceiverOptions } from '../../src/server/receiver.ts';
import type { ExportLimits } from '../../src/server/requests.ts';

const SIZE = 8 * 1024 * 1024;
const limits: ExportLimits = { size: SIZE, readOnly: false, structured: false, maxPayload: 1024 * 1024 };

const req = (type: number, offset: number, length: number, cookie: bigint, flags = 0): Request => ({
  type,
  flags,
  cookie,
  offset: BigInt(offset),
  length,
});

/** A payload whose bytes say where they are, so a misplaced or stale byte shows. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
}

interface Sent {
  req: Request;
  payload?: Buffer;
}

/** The requests a client sends: small and large WRITEs (some back to back), READs, FLUSH, TRIM, and a final DISC. */
function clientStream(): { sent: Sent[]; bytes: Buffer } {
  const sent: Sent[] = [
    { req: req(Cmd.READ, 0, 4096, 1n) },
    { req: req(Cmd.WRITE, 4096, 512, 2n), payload: pattern(512, 2) },
    { req: req(Cmd.WRITE, 65536, 200_000, 3n), payload: pattern(200_000, 3) },
    { req: req(Cmd.WRITE, 300_000, 70_000, 4n, CmdFlag.FUA), payload: pattern(70_000, 4) },
    { req: req(Cmd.FLUSH, 0, 0, 5n) },
    { req: req(Cmd.WRITE, 1_000_000, 1, 6n), payload: pattern(1, 6) },
    { req: req(Cmd.WRITE, 2_000_000, 300_000, 7n), payload: pattern(300_000, 7) },
    { req: req(Cmd.TRIM, 0, 4096, 8n) },
    { req: req(Cmd.WRITE, 3_000_000, 16_384, 9n), payload: pattern(16_384, 9) },
    { req: req(Cmd.READ, 0, 1024 * 1024, 10n) },
    { req: req(Cmd.DISC, 0, 0, 11n) },
  ];
  return { sent, bytes: Buffer.concat(sent.flatMap((s) => (s.payload ? [encodeRequest(s.req), s.payload] : [encodeRequest(s.req)]))) };
}

/** Deterministic read sizes (xorshift), so a failure can be replayed. */
function readSizes(seed: number, max: number): () => number {
  let x = seed | 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return 1 + ((x >>> 0) % max);
  };
}

interface Got {
  req: Request;
  payload?: Buffer;
  transient?: boolean;
  placed?: boolean;
}

function receiver(opts: Partial<ReceiverOptions>, got: Got[]): RequestReceiver {
  const rx: RequestReceiver = new RequestReceiver({
    limits,
    pool: new BufferPool(),
    reusedInput: true,
    onFrame: () => {
      // As the connection does: take every complete request now; a transient payload is only
      // valid until the next read, so keep a copy of it (the dispatcher copies it or uses it at once).
      for (let item = rx.next(); item; item = rx.next()) {
        if (item.kind !== 'request') throw new Error(`unexpected ${item.kind}`);
        const { req: r, payload, transient, placed } = item;
        got.push({ req: r, ...(payload && { payload: transient ? Buffer.from(payload) : payload }), transient, placed });
      }
    },
    ...opts,
  });
  return rx;
}

/** Deliver `bytes` like a socket reading into our buffers: each read fills at most `size()` bytes of the target. */
function deliver(rx: RequestReceiver, bytes: Buffer, size: () => number, targets?: Uint8Array[]): void {
  let pos = 0;
  while (pos < bytes.length) {
    const target = rx.readTarget(true);
    targets?.push(target);
    const n = Math.min(target.length, size(), bytes.length - pos);
    bytes.copy(target, 0, pos, pos + n);
    pos += n;
    rx.received(n, target, true);
  }
}

describe('RequestReceiver: byte streams split anywhere', () => {
  const { sent, bytes } = clientStream();

  for (const [name, max] of [
    ['one byte at a time', 1],
    ['reads of up to 100 bytes', 100],
    ['reads of up to 5000 bytes', 5000],
    ['reads of up to 64 KiB', 65536],
    ['reads as large as the target', Number.MAX_SAFE_INTEGER],
  ] as const) {
    it(`${name}: the same requests and payloads come out, in order`, () => {
      for (const seed of [1, 2, 3, 0x5eed]) {
        const got: Got[] = [];
        deliver(receiver({}, got), bytes, readSizes(seed, max));
        assert.equal(got.length, sent.length, `seed ${seed}`);
        for (let i = 0; i < sent.length; i++) {
          assert.deepEqual(got[i]!.req, sent[i]!.req, `request ${i}, seed ${seed}`);
          assert.ok(got[i]!.payload === undefined ? sent[i]!.payload === undefined : got[i]!.payload!.equals(sent[i]!.payload!), `payload ${i}, seed ${seed}`);
        }
      }
    });
  }

  it('the same requests when bytes come in buffers of their own (push)', () => {
    const got: Got[] = [];
    const rx = receiver({ reusedInput: false }, got);
    const size = readSizes(7, 3000);
    for (let pos = 0; pos < bytes.length; ) {
      const n = Math.min(size(), bytes.length - pos);
      rx.push(Buffer.from(bytes.subarray(pos, pos + n)));
      pos += n;
      for (let item = rx.next(); item; item = rx.next()) if (item.kind === 'request') got.push(item);
    }
    assert.deepEqual(
      got.map((g) => [g.req, g.payload, g.transient ?? false]),
      sent.map((s) => [s.req, s.payload, false]),
    );
  });
});

describe('RequestReceiver: where reads land', () => {
  it('a large WRITE payload is read straight into its own buffer; the next header with a small read', () => {
    const w = req(Cmd.WRITE, 0, 200_000, 1n);
    const payload = pattern(200_000, 1);
    const got: Got[] = [];
    const rx = receiver({}, got);
    const targets: Uint8Array[] = [];
    deliver(rx, Buffer.concat([encodeRequest(w), payload]), () => 65536, targets);
    // The header and the payload's front land in the scratch buffer; the next reads straight in the
    // payload itself (same memory, no copy) while at least DIRECT_MIN bytes are missing; the tail
    // (200000 - 65508 - 2 * 65536 = 3420 bytes) in the scratch buffer again.
    assert.deepEqual(
      targets.map((t) => (t.buffer === got[0]!.payload!.buffer ? 'payload' : t.length === SCRATCH_SIZE ? 'scratch' : t.length)),
      ['scratch', 'payload', 'payload', 'scratch'],
    );
    assert.equal(got[0]!.transient, undefined);
    assert.ok(got[0]!.payload!.equals(payload));
    assert.equal(rx.readTarget(true).length, SMALL_READ);
    // A small request resets it.
    deliver(rx, encodeRequest(req(Cmd.READ, 0, 512, 2n)), () => 1 << 20);
    assert.equal(rx.readTarget(true).length, SCRATCH_SIZE);
  });

  it('a payload that fit in one read is a transient view of the scratch buffer; queued bytes survive its reuse', () => {
    const seen: Got[] = [];
    const rx: RequestReceiver = new RequestReceiver({
      limits,
      pool: new BufferPool(),
      reusedInput: true,
      onFrame: () => {
        for (let item = rx.next(); item; item = rx.next()) if (item.kind === 'request') seen.push(item);
      },
    });
    const next = encodeRequest(req(Cmd.READ, 0, 8, 2n));
    const first = rx.readTarget(true);
    const bytes = Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 100, 1n)), pattern(100, 1), next.subarray(0, 10)]);
    bytes.copy(first);
    rx.received(bytes.length, first, true);
    assert.equal(seen.length, 1);
    assert.equal(seen[0]!.transient, true);
    assert.equal(seen[0]!.payload!.buffer, first.buffer); // a view: no copy
    assert.ok(seen[0]!.payload!.equals(pattern(100, 1)));
    // The next read reuses the scratch buffer: the 10 header bytes still queued were copied out first.
    const second = rx.readTarget(true);
    assert.equal(second.buffer, first.buffer);
    second.fill(0xee);
    next.copy(second, 0, 10);
    rx.received(next.length - 10, second, true);
    assert.equal(seen.length, 2);
    assert.deepEqual(seen[1]!.req, req(Cmd.READ, 0, 8, 2n));
    // ...and the transient view now shows the new read: it was valid only until then.
    assert.equal(seen[0]!.payload![0], 0xee);
  });

  it('with framing stopped, reads are not framed and no payload is offered as a target', () => {
    const got: Got[] = [];
    const rx = receiver({}, got);
    deliver(rx, encodeRequest(req(Cmd.WRITE, 0, 100_000, 1n)), () => 1 << 20);
    assert.equal(rx.readTarget(true).length, 100_000); // the payload is wanted now
    const t = rx.readTarget(false);
    assert.equal(t.length, SCRATCH_SIZE);
    t.fill(1, 0, 50_000);
    rx.received(50_000, t, false);
    assert.equal(got.length, 0);
    assert.equal(rx.readTarget(true).length, 100_000); // nothing of it was taken
  });

  it('a bad request magic is a protocol error (the stream is out of step)', () => {
    const rx = receiver({}, []);
    const bad = encodeRequest(req(Cmd.READ, 0, 512, 1n));
    bad.writeUInt32BE(0xdeadbeef, 0);
    rx.push(bad);
    assert.throws(
      () => rx.next(),
      (err: unknown) => err instanceof NbdError && err.code === 'NBD_E_PROTOCOL',
    );
  });
});

/** A memory export that records the placement targets given back. */
class RecordingMemory extends MemoryBackend {
  readonly given: Buffer[] = [];
  readonly returned: Buffer[] = [];
  override writeTarget(offset: number, length: number): Buffer | undefined {
    const t = super.writeTarget(offset, length);
    if (t) this.given.push(t);
    return t;
  }
  writeTargetDone(target: Buffer): void {
    this.returned.push(target);
  }
}

describe('RequestReceiver: WRITE payloads placed into the storage', () => {
  it('a large WRITE in range is received into the export itself, split anywhere', () => {
    for (const seed of [1, 9, 42]) {
      const storage = new RecordingMemory(SIZE);
      const got: Got[] = [];
      const payload = pattern(100_000, seed);
      deliver(receiver({ storage }, got), Buffer.concat([encodeRequest(req(Cmd.WRITE, 4096, 100_000, 1n)), payload]), readSizes(seed, 40_000));
      assert.equal(got.length, 1);
      assert.equal(got[0]!.placed, true);
      assert.equal(got[0]!.payload, storage.given[0]); // the export's own memory
      const back = Buffer.alloc(100_000);
      storage.readNow(4096, back);
      assert.ok(back.equals(payload), `seed ${seed}`);
    }
  });

  it('small WRITEs, WRITEs past the end, and WRITEs after shutdown began are not placed', () => {
    const storage = new RecordingMemory(SIZE);
    const got: Got[] = [];
    const rx = receiver({ storage }, got);
    const send = (r: Request): void => deliver(rx, Buffer.concat([encodeRequest(r), pattern(r.length, 1)]), () => 1 << 20);
    send(req(Cmd.WRITE, 0, 64 * 1024, 1n)); // not longer than the inline maximum
    send(req(Cmd.WRITE, SIZE - 4096, 100_000, 2n)); // past the end: refused later, not placed
    send(req(Cmd.WRITE, 0, 64 * 1024 + 1, 3n));
    rx.stopPlacing();
    send(req(Cmd.WRITE, 0, 100_000, 4n));
    assert.deepEqual(
      got.map((g) => [g.req.cookie, g.placed ?? false]),
      [
        [1n, false],
        [2n, false],
        [3n, true],
        [4n, false],
      ],
    );
    assert.equal(storage.given.length, 1);
  });

  it('a payload cut off by the end of the stream gives its target back', () => {
    const storage = new RecordingMemory(SIZE);
    const rx = receiver({ storage }, []);
    deliver(rx, Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 100_000, 1n)), pattern(30_000, 1)]), () => 1 << 20);
    assert.equal(storage.given.length, 1);
    assert.equal(storage.returned.length, 0);
    rx.abandon();
    assert.deepEqual(storage.returned, storage.given);
    rx.abandon(); // nothing more to give back
    assert.equal(storage.returned.length, 1);
  });
});
