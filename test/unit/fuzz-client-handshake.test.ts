// Property-based tests of the client handshake (src/protocol/handshake.ts) and its socket driver
// (runHandshake in src/client/negotiate.ts) against a hostile server.
//
// Inputs are server byte streams: random bytes, and "mostly valid" transcripts recorded from a
// reactive fake server (it answers each option the client sends, right or wrong as a fuzzed plan
// says) and then mutated (bit flips, truncation, u16/u32 fields set to edge values, insertions,
// deletions), so that the fuzzer reaches every state, not only the greeting.
// Properties:
//   1. the machine ends in a result or an NbdError with a code; never another exception, never a
//      step that asks for nothing while not done (a hang), never more steps than input bytes;
//   2. it never asks for more than its limits allow (want ≤ maxReplyLength, or 136 for the oldstyle
//      greeting), never lists more than maxRepliesPerOption exports nor sends more than
//      maxInfoQueries NBD_OPT_INFO, and everything it sends is a well-formed option;
//   3. the real driver over a stream, with the bytes split into arbitrary chunks, gives the same
//      outcome and sends the same bytes as the machine fed exactly what it asks for.
// Budget: ~10 s for the file by default. Longer: FUZZ_SECONDS=N (seconds per property) or
// FUZZ_RUNS=N (inputs per property); replay a failure with the FUZZ_SEED=… FUZZ_PATH=… it printed
// (test/lib/fuzz.ts; `FUZZ_SECONDS=300 npm run test:fuzz` runs every fuzz file).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Duplex } from 'node:stream';
import type net from 'node:net';
import fc from 'fast-check';
import { NbdError } from '../../src/errors.ts';
import { runHandshake } from '../../src/client/negotiate.ts';
import {
  decodeOptionHeader,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNewstyleGreeting,
  encodeOldstyleGreeting,
  encodeOptionReply,
  encodeRepServer,
} from '../../src/protocol/codec.ts';
import { ClientFlag, HandshakeFlag, IHAVEOPT, OLDSTYLE_GREETING_LENGTH, Opt, Rep, RepErr } from '../../src/protocol/constants.ts';
import { ClientHandshake, DEFAULT_LIMITS, type HandshakeGoal, type HandshakeLimits } from '../../src/protocol/handshake.ts';
import { bytes, check, checkAsync, cuts, mutate, mutations, split, typedError } from '../lib/fuzz.ts';

// ---------------------------------------------------------------------------------------------
// Driving the machine

type Outcome = { result: string } | { error: string };

/** Results as comparable text (bigints as decimal). */
const show = (v: unknown): string => JSON.stringify(v, (_, x) => (typeof x === 'bigint' ? `${x}n` : x));

function errorOutcome(err: unknown): Outcome {
  const e = typedError(err, NbdError);
  const retry = (err as { goRejectedByClose?: boolean }).goRejectedByClose ? ' [retry without GO]' : '';
  return { error: e + retry };
}

interface Trace {
  outcome: Outcome;
  /** What the client wrote (TLS not modelled: the same stream goes on after tlsDone()). */
  sent: Buffer;
}

/** The largest `want` the machine may ask for under `limits`. */
const wantLimit = (limits: HandshakeLimits): number => Math.max(limits.maxReplyLength, OLDSTYLE_GREETING_LENGTH - 16);

/**
 * Feed the machine exactly what it asks for from `server`, and eof() when the bytes run out.
 * Asserts the per-step invariants; `more` sees each step's send (the reactive server's hook: it
 * may append to the bytes `server()` returns).
 */
function driveSync(goal: HandshakeGoal, server: () => Buffer, limits: HandshakeLimits, more: (sent: Buffer[]) => void = () => {}): Trace {
  const m = new ClientHandshake(goal, limits);
  const sent: Buffer[] = [];
  let pos = 0;
  let steps = 0;
  try {
    let step = m.start();
    for (;;) {
      assert.ok(++steps <= server().length + 8, `no progress: ${steps} steps for ${server().length} bytes`);
      sent.push(...step.send);
      more(step.send);
      if (step.done) return { outcome: { result: show(step.done) }, sent: Buffer.concat(sent) };
      if (step.startTls) {
        assert.equal(step.want, 0);
        step = m.tlsDone();
        continue;
      }
      assert.ok(Number.isInteger(step.want) && step.want > 0, `step asks for ${step.want} bytes while not done (${m.stateName})`);
      assert.ok(step.want <= wantLimit(limits), `step asks for ${step.want} bytes, above the limit ${wantLimit(limits)}`);
      const all = server();
      if (pos + step.want > all.length) {
        step = m.eof();
        continue;
      }
      const chunk = all.subarray(pos, pos + step.want);
      pos += chunk.length;
      step = m.receive(chunk);
    }
  } catch (err) {
    return { outcome: errorOutcome(err), sent: Buffer.concat(sent) };
  }
}

/** The options the client sent after its 4-byte flags: each must be a well-formed IHAVEOPT option. */
function sentOptions(sent: Buffer, greeting: 'oldstyle' | 'newstyle'): number[] {
  if (greeting === 'oldstyle' || sent.length === 0) {
    assert.equal(sent.length, 0, 'nothing is sent to an oldstyle server');
    return [];
  }
  const flags = sent.readUInt32BE(0);
  assert.equal(flags & ~(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES), 0, 'client flags: only known bits');
  const opts: number[] = [];
  let off = 4;
  while (off < sent.length) {
    const { option, length } = decodeOptionHeader(sent.subarray(off, off + 16));
    assert.ok(off + 16 + length <= sent.length, 'option data fits what was sent');
    assert.ok(length <= 4 + 4096 + 2 + 2 * 3, 'option data within the string limit');
    opts.push(option);
    off += 16 + length;
  }
  return opts;
}

// ---------------------------------------------------------------------------------------------
// The reactive server: answers each option per a fuzzed plan, recording what it sends

interface FakeExport {
  name: string;
  description: string;
  size: bigint;
  flags: number;
  block: { min: number; preferred: number; max: number };
}

interface Decision {
  kind: 'ok' | 'err' | 'wrong' | 'close';
  errType: number;
  text: string;
  /** For GO/INFO answers: which NBD_REP_INFO items, in order (0 EXPORT, 1 NAME, 2 DESCRIPTION, 3 BLOCK_SIZE, 4 unknown). */
  items: number[];
  exportIndex: number;
  unknownInfo: Buffer;
  /** ABORT: answer ACK (true) or just close. */
  ackAbort: boolean;
}

interface Plan {
  greeting: { style: 'oldstyle'; size: bigint; flags: number } | { style: 'newstyle'; hflags: number };
  exports: FakeExport[];
  decisions: Decision[];
}

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const name = fc.oneof(fc.constantFrom('', 'disk', 'a'), fc.string({ unit: 'binary', maxLength: 12 }));

const blockSizes = fc.oneof(
  fc.constantFrom({ min: 1, preferred: 4096, max: 1 << 25 }, { min: 512, preferred: 4096, max: 0xffffffff }, { min: 4096, preferred: 4096, max: 4096 }),
  fc.record({ min: u32, preferred: u32, max: u32 }),
);

const fakeExport: fc.Arbitrary<FakeExport> = fc.record({
  name,
  description: fc.string({ maxLength: 20 }),
  size: fc.oneof(fc.constantFrom(0n, 512n, 1n << 30n, 2n ** 63n, 2n ** 64n - 1n), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })),
  flags: u16,
  block: blockSizes,
});

const decision: fc.Arbitrary<Decision> = fc.record({
  kind: fc.oneof({ arbitrary: fc.constant('ok' as const), weight: 6 }, { arbitrary: fc.constant('err' as const), weight: 2 }, fc.constantFrom('wrong' as const, 'close' as const)),
  errType: fc.oneof(fc.constantFrom(...Object.values(RepErr)), u32.map((t) => (t | 0x80000000) >>> 0)),
  text: fc.string({ maxLength: 30 }),
  items: fc.oneof({ arbitrary: fc.constant<number[]>([3, 0]), weight: 2 }, fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 6 })),
  exportIndex: fc.nat(),
  unknownInfo: fc.tuple(fc.integer({ min: 4, max: 0xffff }), bytes(8)).map(([t, d]) => Buffer.concat([Buffer.from([t >> 8, t & 0xff]), d])),
  ackAbort: fc.boolean(),
});

const plan: fc.Arbitrary<Plan> = fc.record({
  greeting: fc.oneof(
    { arbitrary: fc.record({ style: fc.constant('newstyle' as const), hflags: fc.oneof(fc.constantFrom(3, 1, 0, 2), u16) }), weight: 6 },
    fc.record({ style: fc.constant('oldstyle' as const), size: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), flags: u32 }),
  ),
  exports: fc.array(fakeExport, { minLength: 1, maxLength: 4 }),
  decisions: fc.array(decision, { maxLength: 12 }),
});

const tls = fc.oneof({ arbitrary: fc.constant(false), weight: 3 }, fc.constant(true));
const goal: fc.Arbitrary<HandshakeGoal> = fc.oneof(
  fc.record({ kind: fc.constant('go' as const), name, noOptGo: fc.boolean(), tls }),
  fc.record({ kind: fc.constant('info' as const), name, tls }),
  fc.record({ kind: fc.constant('list' as const), details: fc.boolean(), tls }),
);

/** Play `plan` against the machine; returns the bytes the server sent (the transcript). */
function record(g: HandshakeGoal, p: Plan, limits: HandshakeLimits): Buffer {
  const out: Buffer[] = [];
  const gr = p.greeting;
  out.push(gr.style === 'oldstyle' ? encodeOldstyleGreeting(gr.size, gr.flags) : encodeNewstyleGreeting(gr.hflags));
  let next = 0;
  let noZeroes = false;
  let closed = false;
  let cached = Buffer.concat(out);
  const answer = (sent: Buffer[]): void => {
    for (const b of sent) {
      if (closed) return;
      if (b.length === 4) {
        // Client flags: zeroes after the EXPORT_NAME reply only if both sides agreed to drop them.
        noZeroes = gr.style === 'newstyle' && (gr.hflags & HandshakeFlag.NO_ZEROES) !== 0 && (b.readUInt32BE(0) & ClientFlag.C_NO_ZEROES) !== 0;
        continue;
      }
      const { option, length } = decodeOptionHeader(b);
      const data = b.subarray(16, 16 + length);
      const d = p.decisions[next++];
      if (!d || d.kind === 'close') {
        closed = true;
        return;
      }
      const exp = p.exports[d.exportIndex % p.exports.length]!;
      if (d.kind === 'wrong') {
        out.push(encodeOptionReply(d.exportIndex & 0xff, d.errType & 0x7fffffff, Buffer.from(d.text)));
        continue;
      }
      if (option === Opt.EXPORT_NAME) {
        if (d.kind === 'err') closed = true;
        else out.push(encodeExportNameReply(exp.size, exp.flags, noZeroes));
        continue;
      }
      if (d.kind === 'err') {
        out.push(encodeOptionReply(option, d.errType, Buffer.from(d.text)));
        continue;
      }
      switch (option) {
        case Opt.GO:
        case Opt.INFO: {
          const asked = data.length >= 4 ? data.subarray(4, 4 + data.readUInt32BE(0)).toString('utf8') : '';
          for (const item of d.items) {
            const payload = [
              () => encodeInfoExport(exp.size, exp.flags),
              () => encodeInfoString(1, d.exportIndex % 2 ? asked : exp.name),
              () => encodeInfoString(2, exp.description),
              () => encodeInfoBlockSize(exp.block),
              () => d.unknownInfo,
            ][item]!();
            out.push(encodeOptionReply(option, Rep.INFO, payload));
          }
          out.push(encodeOptionReply(option, Rep.ACK));
          break;
        }
        case Opt.LIST:
          for (const e of p.exports) out.push(encodeOptionReply(option, Rep.SERVER, encodeRepServer(e.name, e.description)));
          out.push(encodeOptionReply(option, Rep.ACK));
          break;
        case Opt.ABORT:
          if (d.ackAbort) out.push(encodeOptionReply(option, Rep.ACK));
          else closed = true;
          break;
        default:
          out.push(encodeOptionReply(option, Rep.ACK));
      }
    }
    cached = Buffer.concat(out);
  };
  driveSync(g, () => cached, limits, answer);
  return cached;
}

// ---------------------------------------------------------------------------------------------
// The real driver over a stream that delivers the bytes in the given chunks

class FakeSocket extends Duplex {
  readonly written: Buffer[] = [];
  override _read(): void {}
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.written.push(chunk);
    cb();
  }
}

/**
 * runHandshake over a stream that delivers `chunks` one per event-loop turn, then EOF. Its deadline
 * is generous (a loaded machine must not turn into a timeout); a driver that hangs fails the
 * comparison with NBD_E_HANDSHAKE_TIMEOUT.
 */
async function driveStream(g: HandshakeGoal, chunks: Buffer[], limits: HandshakeLimits): Promise<Trace> {
  const socket = new FakeSocket();
  let finished = false;
  const feed = (async () => {
    for (const c of chunks) {
      await new Promise((r) => setImmediate(r));
      if (finished) return;
      socket.push(c);
    }
    await new Promise((r) => setImmediate(r));
    if (!finished) socket.push(null);
  })();
  let outcome: Outcome;
  try {
    const { result } = await runHandshake(socket as unknown as net.Socket, new ClientHandshake(g, limits), Date.now() + 30_000, 'fuzz', async (s) => s);
    outcome = { result: show(result) };
  } catch (err) {
    outcome = errorOutcome(err);
  }
  finished = true;
  await feed;
  socket.destroy();
  return { outcome, sent: Buffer.concat(socket.written) };
}

// ---------------------------------------------------------------------------------------------
// Properties

/** Mutations anywhere, or only past the greeting's magics (so that more runs get past it). */
const keep = fc.constantFrom(0, 16);

const SMALL_LIMITS: HandshakeLimits = { maxReplyLength: 100, maxRepliesPerOption: 3, maxInfoQueries: 2, maxKeptBytes: 250 };
const limitsArb = fc.constantFrom(DEFAULT_LIMITS, SMALL_LIMITS);

/** Everything a finished run must satisfy, whatever the input. */
function checkTrace(g: HandshakeGoal, server: Buffer, limits: HandshakeLimits, t: Trace): void {
  const style = server.length >= 16 && server.readBigUInt64BE(8) !== IHAVEOPT ? 'oldstyle' : 'newstyle';
  const opts = sentOptions(t.sent, style);
  assert.ok(opts.filter((o) => o === Opt.INFO).length <= limits.maxInfoQueries + 1, 'NBD_OPT_INFO queries within maxInfoQueries');
  assert.ok(opts.length <= limits.maxInfoQueries + 6, `${opts.length} options sent`);
  if ('result' in t.outcome) {
    const r = JSON.parse(t.outcome.result) as { exports?: unknown[] };
    assert.ok((r.exports?.length ?? 0) <= limits.maxRepliesPerOption, 'listed exports within maxRepliesPerOption');
  }
}

describe('client handshake: hostile server', () => {
  it('random bytes (after a valid greeting or not): a result or an NbdError, within the limits', () => {
    const prefix = fc.constantFrom(Buffer.alloc(0), encodeNewstyleGreeting(3), encodeNewstyleGreeting(0), encodeNewstyleGreeting(1));
    check(3000, [goal, prefix, bytes(300), limitsArb], (g, pre, rest, limits) => {
      const server = Buffer.concat([pre, rest]);
      checkTrace(g, server, limits, driveSync(g, () => server, limits));
    });
  });

  it('mutated transcripts of a plausible server: a result or an NbdError, within the limits', () => {
    check(3000, [goal, plan, mutations(), keep, limitsArb], (g, p, muts, k, limits) => {
      const server = mutate(record(g, p, limits), muts, k);
      checkTrace(g, server, limits, driveSync(g, () => server, limits));
    });
  });

  it('the socket driver, bytes split anywhere, matches the machine fed exact reads', async () => {
    await checkAsync(800, [goal, plan, mutations(), keep, cuts, limitsArb], async (g, p, muts, k, at, limits) => {
      const server = mutate(record(g, p, limits), muts, k);
      const exact = driveSync(g, () => server, limits);
      const streamed = await driveStream(g, split(server, at), limits);
      assert.deepEqual(streamed.outcome, exact.outcome);
      assert.equal(streamed.sent.toString('hex'), exact.sent.toString('hex'));
    });
  });
});

// ---------------------------------------------------------------------------------------------
// Regressions: inputs the properties above found, kept as explicit cases.

describe('client handshake: regressions found by fuzzing', () => {
  const go: HandshakeGoal = { kind: 'go', name: 'disk' };

  it('a server that closes inside a read is a close, not a short message (1 byte of greeting)', async () => {
    // Found: the driver handed the machine the 1 byte left at EOF: "greeting: need 16 bytes, got 1".
    const t = await driveStream({ kind: 'list', details: false }, [Buffer.from([0])], DEFAULT_LIMITS);
    assert.match((t.outcome as { error: string }).error, /^NBD_E_SERVER_CLOSED: server closed the connection before its greeting/);
  });

  it('a close after 1 of the 2 handshake-flag bytes is a close, not a RangeError', async () => {
    const t = await driveStream(go, [encodeNewstyleGreeting(3).subarray(0, 17)], DEFAULT_LIMITS);
    assert.match((t.outcome as { error: string }).error, /^NBD_E_SERVER_CLOSED: .*\(HS_FLAGS\)/);
  });

  it('a close inside the 124 zero bytes after the EXPORT_NAME reply does not finish the handshake', async () => {
    const full = Buffer.concat([encodeNewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE), encodeExportNameReply(4096n, 1, false)]);
    const t = await driveStream({ kind: 'go', name: '', noOptGo: true }, [full.subarray(0, full.length - 60)], DEFAULT_LIMITS);
    assert.match((t.outcome as { error: string }).error, /^NBD_E_SERVER_CLOSED: .*\(EXPORT_NAME_ZEROES\)/);
  });

  it('export names in messages are escaped: a name with a line break stays on one line', () => {
    // Found: "server acknowledged export '\n' without sending NBD_INFO_EXPORT" spanned two lines.
    const server = Buffer.concat([encodeNewstyleGreeting(3), encodeOptionReply(Opt.INFO, Rep.ACK)]);
    const t = driveSync({ kind: 'info', name: '\n' }, () => server, DEFAULT_LIMITS);
    assert.equal((t.outcome as { error: string }).error, "NBD_E_PROTOCOL: protocol error: server acknowledged export '\\n' without sending NBD_INFO_EXPORT (size and flags)");
  });

  it("a listed name with control characters, and the server's error text, cannot break the line or drive the terminal", () => {
    const server = Buffer.concat([
      encodeNewstyleGreeting(3),
      encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer('a\u001b[2Jb\u2028c')),
      encodeOptionReply(Opt.LIST, Rep.ACK),
      encodeOptionReply(Opt.INFO, RepErr.POLICY, Buffer.from('no\r\n\u001b[31mway')),
      encodeOptionReply(Opt.ABORT, Rep.ACK),
    ]);
    const t = driveSync({ kind: 'list' }, () => server, DEFAULT_LIMITS);
    const r = JSON.parse((t.outcome as { result: string }).result) as { exports: Array<{ infoError: string }> };
    assert.equal(r.exports[0]!.infoError, "server refused export 'a\\x1b[2Jb\\u2028c' by policy (server says: no \\x1b[31mway); check the server's access rules for this client");
  });
});

// Sanity of the generator: transcripts reach every way of finishing and the states deep inside
// (else the properties above prove little).
it('client fuzz transcripts reach results by every route and errors in every state', () => {
  const seen = new Set<string>();
  for (const [g, p, muts, kept, limits] of fc.sample(fc.tuple(goal, plan, mutations(), keep, limitsArb), { numRuns: 800, seed: 42 })) {
    const t = driveSync(g, () => mutate(record(g, p, limits), muts, kept), limits);
    if ('result' in t.outcome) seen.add(`${g.kind} via ${(JSON.parse(t.outcome.result) as { via: string }).via}`);
    else seen.add(t.outcome.error.split(':')[0]!);
  }
  for (const want of [
    'go via NBD_OPT_GO',
    'go via NBD_OPT_EXPORT_NAME',
    'go via oldstyle',
    'info via NBD_OPT_INFO',
    'info via NBD_OPT_EXPORT_NAME',
    'list via NBD_OPT_INFO',
    'list via oldstyle',
    'NBD_E_PROTOCOL',
    'NBD_E_SERVER_CLOSED',
    'NBD_E_EXPORT_UNKNOWN',
    'NBD_E_OPTION',
    'NBD_E_TLS',
    'NBD_E_UNSUPPORTED',
  ]) {
    assert.ok(seen.has(want), `no run reached ${want}: ${[...seen].join(', ')}`);
  }
});
