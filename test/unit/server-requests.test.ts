// Server request framing, request checks, structured reply chunks (proto.md "Transmission").

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NbdError } from '../../src/errors.ts';
import { Cmd, CmdFlag, WireErr } from '../../src/protocol/constants.ts';
import { encodeRequest, type Request } from '../../src/protocol/codec.ts';
import { ByteQueue } from '../../src/server/byte-queue.ts';
import { RequestReader, checkRequest, discardedWriteVerdict, wireErrorOf, type ExportLimits, type Incoming } from '../../src/server/requests.ts';
import { encodeErrorChunk, encodeNone, encodeOffsetDataHeader, encodeOffsetHole } from '../../src/server/structured.ts';

const req = (type: number, offset: number, length: number, flags = 0, cookie = 7n): Request => ({
  type,
  flags,
  cookie,
  offset: BigInt(offset),
  length,
});

function drain(r: RequestReader): Incoming[] {
  const out: Incoming[] = [];
  for (let i = 0; i < 1000; i++) {
    const n = r.next();
    if (!n) return out;
    out.push(n);
  }
  throw new Error('reader did not stop');
}

describe('ByteQueue', () => {
  it('takes across chunk boundaries, views within one chunk', () => {
    const q = new ByteQueue();
    const a = Buffer.from('abcdef');
    q.push(a);
    q.push(Buffer.from('ghij'));
    const v = q.take(3);
    assert.equal(v.toString(), 'abc');
    assert.equal(v.buffer, a.buffer); // no copy
    assert.equal(q.take(5).toString(), 'defgh');
    assert.equal(q.length, 2);
    assert.equal(q.skip(10), 2);
    assert.equal(q.length, 0);
    assert.throws(() => q.take(1), RangeError);
  });
});

describe('ByteQueue.detach', () => {
  it('copies out bytes that live in a buffer about to be reused, and only those', () => {
    const q = new ByteQueue();
    const own = Buffer.from('own');
    const scratch = Buffer.from('abcdef');
    q.push(own);
    q.push(scratch);
    q.take(4); // 'own' + 'a'
    q.detach(scratch.buffer);
    scratch.fill(0x2a); // the scratch buffer gets reused
    assert.equal(q.take(5).toString(), 'bcdef');
  });
});

describe('RequestReader: direct reads and copied payloads', () => {
  it('offers the unfilled rest of a payload as a read target', () => {
    const r = new RequestReader(1 << 20);
    const w = req(Cmd.WRITE, 0, 40_000, 0, 1n);
    r.push(Buffer.concat([encodeRequest(w), Buffer.alloc(1000, 1)]));
    assert.equal(r.next(), null);
    const t = r.directTarget(16 * 1024)!;
    assert.equal(t.length, 39_000);
    t.fill(2, 0, 30_000); // "the kernel read 30000 bytes into it"
    r.filledDirect(30_000);
    assert.equal(r.directTarget(16 * 1024), undefined); // 9000 left: below the minimum
    r.push(Buffer.alloc(9000, 3));
    const got = r.next() as { payload: Buffer };
    assert.deepEqual(got.payload, Buffer.concat([Buffer.alloc(1000, 1), Buffer.alloc(30_000, 2), Buffer.alloc(9000, 3)]));
    assert.throws(() => r.filledDirect(1));
  });

  it('with reused input, marks payload views of a pushed chunk transient; assembled payloads are not', () => {
    const r = new RequestReader(1 << 20, undefined, true);
    const chunk = Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 4, 0, 1n)), Buffer.from('data')]);
    r.push(chunk);
    const got = r.next() as { payload: Buffer; transient?: boolean };
    assert.equal(got.transient, true);
    assert.equal(got.payload.buffer, chunk.buffer, 'a view, no copy');
    // A payload that spans two reads is assembled in memory of its own.
    const first = Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 8, 0, 2n)), Buffer.from('abcd')]);
    r.push(first);
    assert.equal(r.next(), null);
    first.fill(0); // the read buffer gets reused
    r.push(Buffer.from('efgh'));
    const second = r.next() as { payload: Buffer; transient?: boolean };
    assert.equal(second.transient, undefined);
    assert.equal(second.payload.toString(), 'abcdefgh');
  });
});

describe('RequestReader: payloads placed in the storage (Backend.writeTarget)', () => {
  it('receives a payload into the placed buffer, directly or copied, and says so', () => {
    const storage = Buffer.alloc(64 * 1024);
    const asked: bigint[] = [];
    const place = (r: Request): Buffer | undefined => {
      asked.push(r.cookie);
      return r.cookie === 3n ? undefined : storage.subarray(Number(r.offset), Number(r.offset) + r.length);
    };
    const r = new RequestReader(1 << 20, undefined, true, place);
    // Whole payload already buffered: copied into the target (the pushed chunk is reused memory).
    const chunk = Buffer.concat([encodeRequest(req(Cmd.WRITE, 100, 4, 0, 1n)), Buffer.from('abcd')]);
    r.push(chunk);
    const one = r.next() as { payload: Buffer; placed?: boolean; transient?: boolean };
    assert.equal(one.placed, true);
    assert.equal(one.transient, undefined);
    assert.equal(one.payload.buffer, storage.buffer, 'the payload is the storage');
    assert.equal(storage.subarray(100, 104).toString(), 'abcd');
    // Arriving over several reads: the unfilled rest of the target is the direct read target.
    r.push(Buffer.concat([encodeRequest(req(Cmd.WRITE, 32 * 1024, 20_000, 0, 2n)), Buffer.alloc(1000, 7)]));
    assert.equal(r.next(), null);
    const direct = r.directTarget(16 * 1024)!;
    assert.equal(direct.buffer, storage.buffer);
    assert.equal(direct.byteOffset, storage.byteOffset + 32 * 1024 + 1000);
    direct.fill(8); // "the kernel read 19000 bytes into it"
    assert.equal(r.filledDirect(19_000), true);
    const two = r.next() as { payload: Buffer; placed?: boolean };
    assert.equal(two.placed, true);
    assert.deepEqual(storage.subarray(32 * 1024, 32 * 1024 + 20_000), Buffer.concat([Buffer.alloc(1000, 7), Buffer.alloc(19_000, 8)]));
    // Declined: the ordinary path, storage untouched.
    r.push(Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 4, 0, 3n)), Buffer.from('wxyz')]));
    const three = r.next() as { payload: Buffer; placed?: boolean };
    assert.equal(three.placed, undefined);
    assert.equal(three.payload.toString(), 'wxyz');
    assert.deepEqual(storage.subarray(0, 4), Buffer.alloc(4));
    // Only WRITEs with a payload within the maximum are offered.
    r.push(Buffer.concat([encodeRequest(req(Cmd.READ, 0, 4, 0, 4n)), encodeRequest(req(Cmd.WRITE, 0, 0, 0, 5n))]));
    assert.equal(drain(r).length, 2);
    assert.deepEqual(asked, [1n, 2n, 3n]);
  });

  it('abandon() hands back a placed payload that will not be completed, and nothing else', () => {
    const storage = Buffer.alloc(8192);
    const r = new RequestReader(1 << 20, undefined, false, (w) => (w.cookie === 1n ? storage : undefined));
    r.push(Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 8192, 0, 1n)), Buffer.alloc(100)]));
    assert.equal(r.next(), null);
    assert.equal(r.abandon(), storage);
    assert.equal(r.abandon(), undefined);
    const plain = new RequestReader(1 << 20, undefined, false, () => undefined);
    plain.push(Buffer.concat([encodeRequest(req(Cmd.WRITE, 0, 8192, 0, 2n)), Buffer.alloc(100)]));
    assert.equal(plain.next(), null);
    assert.equal(plain.abandon(), undefined, 'a pool buffer is not handed back');
  });
});

describe('RequestReader', () => {
  const write = req(Cmd.WRITE, 4096, 8, CmdFlag.FUA, 1n);
  const payload = Buffer.from('01020304050607ff', 'hex');
  const read = req(Cmd.READ, 0, 512, 0, 2n);
  const stream = Buffer.concat([encodeRequest(write), payload, encodeRequest(read), encodeRequest(req(Cmd.DISC, 0, 0, 0, 3n))]);

  it('frames requests and WRITE payloads; payload is a view when it sits in one chunk', () => {
    const r = new RequestReader(1 << 25);
    r.push(stream);
    const items = drain(r);
    assert.equal(items.length, 3);
    assert.deepEqual(items[0], { kind: 'request', req: write, payload });
    assert.equal((items[0] as { payload: Buffer }).payload.buffer, stream.buffer);
    assert.deepEqual(items[1], { kind: 'request', req: read });
    assert.equal(items[2]!.req.type, Cmd.DISC);
    assert.equal(r.buffered, 0);
  });

  it('gives the same requests whatever the split points', () => {
    for (let cut = 1; cut < stream.length; cut++) {
      for (const step of [1, 7, cut]) {
        const r = new RequestReader(1 << 25);
        const got: Incoming[] = [];
        for (let i = 0; i < stream.length; i += step) {
          r.push(stream.subarray(i, Math.min(i + step, stream.length)));
          got.push(...drain(r));
        }
        assert.equal(got.length, 3, `cut ${cut} step ${step}`);
        assert.deepEqual((got[0] as { payload: Buffer }).payload, payload);
        assert.deepEqual(got[1]!.req, read);
      }
    }
  });

  it('discards an oversized WRITE payload and stays in step', () => {
    const r = new RequestReader(16);
    const big = req(Cmd.WRITE, 0, 100, 0, 9n);
    r.push(Buffer.concat([encodeRequest(big), Buffer.alloc(60)]));
    assert.deepEqual(drain(r), []);
    assert.equal(r.pendingPayload, 0); // never buffered
    r.push(Buffer.concat([Buffer.alloc(40), encodeRequest(read)]));
    const items = drain(r);
    assert.deepEqual(items, [{ kind: 'discarded-write', req: big }, { kind: 'request', req: read }]);
  });

  it('assembles a payload that spans chunks into one buffer', () => {
    const r = new RequestReader(1 << 20);
    const w = req(Cmd.WRITE, 0, 3000, 0, 4n);
    const data = Buffer.alloc(3000, 0x5a);
    r.push(encodeRequest(w));
    r.push(data.subarray(0, 1000));
    assert.deepEqual(drain(r), []);
    assert.equal(r.pendingPayload, 3000);
    r.push(data.subarray(1000));
    assert.deepEqual(drain(r), [{ kind: 'request', req: w, payload: data }]);
  });

  it('bad request magic is a protocol error', () => {
    const r = new RequestReader(1 << 20);
    const b = encodeRequest(read);
    b.writeUInt32BE(0x12560953, 0); // the historic 1997 magic
    r.push(b);
    assert.throws(() => r.next(), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_PROTOCOL');
  });
});

describe('checkRequest', () => {
  const rw: ExportLimits = { size: 1 << 20, readOnly: false, structured: false, maxPayload: 1 << 16 };
  const ro: ExportLimits = { ...rw, readOnly: true };
  const sr: ExportLimits = { ...rw, structured: true };
  const cases: [string, Request, ExportLimits, number][] = [
    ['read in range', req(Cmd.READ, 0, 4096), rw, 0],
    ['read to the end', req(Cmd.READ, (1 << 20) - 512, 512), rw, 0],
    ['read past the end: EINVAL', req(Cmd.READ, (1 << 20) - 511, 512), rw, WireErr.EINVAL],
    ['read at a huge offset: EINVAL', { ...req(Cmd.READ, 0, 1), offset: 0xffffffffffffffffn }, rw, WireErr.EINVAL],
    ['read too large: EINVAL', req(Cmd.READ, 0, (1 << 16) + 1), rw, WireErr.EINVAL],
    ['structured read too large: EOVERFLOW', req(Cmd.READ, 0, (1 << 16) + 1), sr, WireErr.EOVERFLOW],
    ['read with DF, simple replies: EINVAL', req(Cmd.READ, 0, 512, CmdFlag.DF), rw, WireErr.EINVAL],
    ['read with DF, structured: ok', req(Cmd.READ, 0, 512, CmdFlag.DF), sr, 0],
    ['read with FUA: ok (valid on every command)', req(Cmd.READ, 0, 512, CmdFlag.FUA), rw, 0],
    ['read on read-only: ok', req(Cmd.READ, 0, 512), ro, 0],
    ['write in range', req(Cmd.WRITE, 512, 512, CmdFlag.FUA), rw, 0],
    ['write past the end: ENOSPC', req(Cmd.WRITE, 1 << 20, 1), rw, WireErr.ENOSPC],
    ['write on read-only: EPERM', req(Cmd.WRITE, 0, 512), ro, WireErr.EPERM],
    ['write too large: EINVAL', req(Cmd.WRITE, 0, (1 << 16) + 1), rw, WireErr.EINVAL],
    ['write with NO_HOLE: EINVAL', req(Cmd.WRITE, 0, 1, CmdFlag.NO_HOLE), rw, WireErr.EINVAL],
    ['trim past the end: EINVAL', req(Cmd.TRIM, 1 << 19, 1 << 20), rw, WireErr.EINVAL],
    ['trim on read-only: EPERM', req(Cmd.TRIM, 0, 512), ro, WireErr.EPERM],
    ['trim larger than max payload: ok', req(Cmd.TRIM, 0, 1 << 20), rw, 0],
    ['write zeroes past the end: ENOSPC', req(Cmd.WRITE_ZEROES, 1 << 19, 1 << 20), rw, WireErr.ENOSPC],
    ['write zeroes NO_HOLE: ok', req(Cmd.WRITE_ZEROES, 0, 1 << 20, CmdFlag.NO_HOLE), rw, 0],
    ['write zeroes FAST_ZERO (not advertised): EINVAL', req(Cmd.WRITE_ZEROES, 0, 512, CmdFlag.FAST_ZERO), rw, WireErr.EINVAL],
    ['write zeroes on read-only: EPERM', req(Cmd.WRITE_ZEROES, 0, 512), ro, WireErr.EPERM],
    ['flush: ok, offset/length ignored', req(Cmd.FLUSH, 5, 5), rw, 0],
    ['flush on read-only: ok', req(Cmd.FLUSH, 0, 0), ro, 0],
    ['cache in range: ok', req(Cmd.CACHE, 0, 4096), rw, 0],
    ['cache past the end: EINVAL', req(Cmd.CACHE, 1 << 20, 1), rw, WireErr.EINVAL],
    ['block status (not negotiable here): EINVAL', req(Cmd.BLOCK_STATUS, 0, 512), sr, WireErr.EINVAL],
    ['unknown command: EINVAL', req(42, 0, 0), rw, WireErr.EINVAL],
  ];
  for (const [what, r, lim, want] of cases) {
    it(what, () => {
      const v = checkRequest(r, lim);
      assert.equal(v.error, want, v.message);
      if (want !== 0) assert.match(v.message, /^NBD_CMD_/);
    });
  }

  it('discarded writes: EPERM on read-only, else EINVAL', () => {
    assert.equal(discardedWriteVerdict(req(Cmd.WRITE, 0, 1 << 30), ro).error, WireErr.EPERM);
    assert.equal(discardedWriteVerdict(req(Cmd.WRITE, 0, 1 << 30), rw).error, WireErr.EINVAL);
  });

  it('maps backend errno codes to NBD errors', () => {
    assert.equal(wireErrorOf({ code: 'ENOSPC' }), WireErr.ENOSPC);
    assert.equal(wireErrorOf({ code: 'EDQUOT' }), WireErr.ENOSPC);
    assert.equal(wireErrorOf({ code: 'EFBIG' }), WireErr.ENOSPC);
    assert.equal(wireErrorOf({ code: 'EROFS' }), WireErr.EPERM);
    assert.equal(wireErrorOf({ code: 'ENOMEM' }), WireErr.ENOMEM);
    assert.equal(wireErrorOf(new Error('boom')), WireErr.EIO);
    assert.equal(wireErrorOf(null), WireErr.EIO);
  });
});

describe('structured reply chunks', () => {
  it('OFFSET_DATA header (done)', () => {
    assert.equal(
      encodeOffsetDataHeader(0x0102n, 0x1000n, 512, true).toString('hex'),
      '668e33ef' + '0001' + '0001' + '0000000000000102' + '00000208' + '0000000000001000',
    );
  });
  it('OFFSET_HOLE (not done)', () => {
    assert.equal(
      encodeOffsetHole(5n, 0n, 4096, false).toString('hex'),
      '668e33ef' + '0000' + '0002' + '0000000000000005' + '0000000c' + '0000000000000000' + '00001000',
    );
  });
  it('NONE', () => {
    assert.equal(encodeNone(9n).toString('hex'), '668e33ef' + '0001' + '0000' + '0000000000000009' + '00000000');
  });
  it('ERROR with message', () => {
    assert.equal(
      encodeErrorChunk(1n, WireErr.EPERM, 'ro').toString('hex'),
      '668e33ef' + '0001' + '8001' + '0000000000000001' + '00000008' + '00000001' + '0002' + '726f',
    );
  });
  it('ERROR message capped at 4096 bytes', () => {
    const b = encodeErrorChunk(1n, WireErr.EIO, 'x'.repeat(5000));
    assert.equal(b.readUInt16BE(24), 4096);
    assert.equal(b.length, 20 + 6 + 4096);
  });
});
