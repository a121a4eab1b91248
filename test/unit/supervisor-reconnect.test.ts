// The reconnect engine and the supervisor, driven with a fake clock, fake handshakes and a fake
// kernel: backoff caps and jitter bounds, size change → RECONFIGURE with SIZE, vanished export →
// give up only after the dead timeout, multi-conn: one replacement per LINK_DEAD, SIGTERM → DISCONNECT.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NbdError } from '../../src/errors.ts';
import { TransmissionFlag } from '../../src/protocol/constants.ts';
import { DEFAULT_BACKOFF, RESTART_BACKOFF, backoffDelay, flagsProblem } from '../../src/supervisor/policy.ts';
import { type Candidate, Reconnector, sizeProblem } from '../../src/supervisor/reconnector.ts';
import { KeptSockets, activityKey, isShutdownReply, parseServerError, startIdleProbe } from '../../src/supervisor/shutdown-watch.ts';
import { Supervisor } from '../../src/supervisor/supervisor.ts';
import type { KernelOps } from '../../src/supervisor/kernel-ops.ts';

const FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_TRIM | TransmissionFlag.CAN_MULTI_CONN;

// ---- backoff ----

test('backoff: doubles from the initial delay and never exceeds the cap', () => {
  const b = { initialMs: 50, maxMs: 1000, factor: 2 };
  assert.equal(backoffDelay(0, 0.999999, b), 50);
  assert.equal(backoffDelay(1, 0.999999, b), 100);
  assert.equal(backoffDelay(4, 0.999999, b), 800);
  for (let n = 5; n < 200; n++) assert.ok(backoffDelay(n, 0.999999, b) <= 1000, `attempt ${n}`);
  assert.equal(backoffDelay(100, 0.999999, b), 1000);
});

test('backoff: jitter stays within [d/2, d] and actually varies', () => {
  const seen = new Set<number>();
  for (let i = 0; i < 1000; i++) {
    const r = (i * 7919) % 1000 / 1000;
    const d = backoffDelay(10, r, DEFAULT_BACKOFF);
    assert.ok(d >= DEFAULT_BACKOFF.maxMs / 2 && d <= DEFAULT_BACKOFF.maxMs, `delay ${d}`);
    seen.add(d);
  }
  assert.ok(seen.size > 100, 'jitter spreads the delays');
  assert.equal(backoffDelay(3, 0, { initialMs: 100, maxMs: 10_000, factor: 2 }), 400);
});

test('flags: losing a command the kernel uses, or gaining read-only, is refused; gaining flags is fine', () => {
  assert.equal(flagsProblem(FLAGS, FLAGS, 1), undefined);
  assert.equal(flagsProblem(FLAGS, FLAGS | TransmissionFlag.SEND_FUA, 1), undefined);
  assert.match(flagsProblem(FLAGS, FLAGS | TransmissionFlag.READ_ONLY, 1)!, /read-only/);
  assert.match(flagsProblem(FLAGS, FLAGS & ~TransmissionFlag.SEND_TRIM, 1)!, /no longer supports/);
  assert.equal(flagsProblem(FLAGS, FLAGS & ~TransmissionFlag.CAN_MULTI_CONN, 1), undefined);
  assert.match(flagsProblem(FLAGS, FLAGS & ~TransmissionFlag.CAN_MULTI_CONN, 4)!, /CAN_MULTI_CONN/);
});

// ---- a fake world ----

interface FakeCand extends Candidate {
  id: number;
  discarded: boolean;
}

class World {
  t = 1_000_000;
  sleeps: number[] = [];
  logs: string[] = [];
  reconfigured: { id: number; sizeBytes?: bigint }[] = [];
  /** Script of handshake outcomes; when empty: success with the default size/flags. */
  script: (Error | { size?: bigint; flags?: number })[] = [];
  made: FakeCand[] = [];
  rand = 0.5;
  size = 64n << 20n;
  flags = FLAGS;
  reconfigureError: Error | undefined;
  negotiateMs = 5;

  deps() {
    return {
      now: () => this.t,
      sleep: async (ms: number) => {
        this.sleeps.push(ms);
        this.t += ms;
      },
      random: () => this.rand,
      negotiate: async (): Promise<FakeCand> => {
        this.t += this.negotiateMs;
        const step = this.script.shift();
        if (step instanceof Error) throw step;
        const c: FakeCand = {
          id: this.made.length,
          size: step?.size ?? this.size,
          flags: step?.flags ?? this.flags,
          discarded: false,
          discard() {
            this.discarded = true;
          },
        };
        this.made.push(c);
        return c;
      },
      reconfigure: async (c: FakeCand, change: { sizeBytes?: bigint }) => {
        if (this.reconfigureError) throw this.reconfigureError;
        this.reconfigured.push({ id: c.id, ...change });
      },
      log: (m: string) => void this.logs.push(m),
    };
  }
}

const refused = (): NbdError => new NbdError('NBD_E_CONNECT', 'cannot connect to 127.0.0.1:1: connection refused');
const unknown = (): NbdError => new NbdError('NBD_E_EXPORT_UNKNOWN', "the server has no export named 'disk'");

test('one LINK_DEAD: retries with capped, growing backoff until the server is back, then one RECONFIGURE', async () => {
  const w = new World();
  w.script = Array.from({ length: 12 }, refused);
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(r.reconnects, 1);
  assert.equal(r.pending, 0);
  assert.equal(r.attempts, 13);
  assert.deepEqual(w.reconfigured, [{ id: 0 }]);
  assert.equal(w.sleeps.length, 12);
  // rand 0.5 → 3/4 of the uncapped delay: 38, 75, 150, 300, 600, then 750 (cap 1000) for ever.
  assert.deepEqual(w.sleeps.slice(0, 6), [38, 75, 150, 300, 600, 750]);
  assert.ok(w.sleeps.every((s) => s <= DEFAULT_BACKOFF.maxMs));
  assert.equal(r.outageSince, undefined);
  assert.match(r.lastError ?? '', /connection refused/);
  assert.ok(w.logs.some((l) => /reconnected after \d+ ms/.test(l)));
});

test('connection refusals keep being retried long past the dead timeout (the device recovers later)', async () => {
  const w = new World();
  w.script = Array.from({ length: 200 }, refused); // ~150 s of refusals
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 10_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(r.isStopped, false);
  assert.equal(r.reconnects, 1);
  assert.ok(w.t - 1_000_000 > 100_000, 'simulated outage was longer than the dead timeout');
});

test('vanished export: retried until the dead timeout has passed since the outage, then gives up', async () => {
  const w = new World();
  w.script = Array.from({ length: 1000 }, unknown);
  let gaveUp: NbdError | undefined;
  const start = w.t;
  const r = new Reconnector({ ...w.deps(), gaveUp: (e) => void (gaveUp = e) }, { deadTimeoutMs: 30_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(r.isStopped, true);
  assert.ok(gaveUp instanceof NbdError);
  assert.equal(gaveUp.code, 'NBD_E_EXPORT_UNKNOWN');
  assert.match(gaveUp.message, /giving up after 3\d s \(dead timeout 30 s\)/);
  const elapsed = w.t - start;
  assert.ok(elapsed >= 30_000 && elapsed < 32_000, `gave up at ${elapsed} ms`);
  assert.equal(w.reconfigured.length, 0);
  assert.equal(r.failure, gaveUp);
  // Stopped for good: a later LINK_DEAD does nothing.
  r.linkDead();
  await r.idle();
  assert.equal(r.pending, 1);
});

test('vanished export that comes back before the dead timeout: reconnects', async () => {
  const w = new World();
  w.script = [unknown(), unknown(), unknown(), refused()];
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 30_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(r.isStopped, false);
  assert.equal(r.reconnects, 1);
});

test('size changed: RECONFIGURE carries the new SIZE and it is logged', async () => {
  const w = new World();
  w.script = [{ size: 128n << 20n }];
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 60_000, size: 64n << 20n, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.deepEqual(w.reconfigured, [{ id: 0, sizeBytes: 128n << 20n }]);
  assert.equal(r.size, 128n << 20n);
  assert.ok(w.logs.some((l) => /grew from 67108864 to 134217728/.test(l)));
  // Same size the next time: no SIZE attribute.
  w.script = [{ size: 128n << 20n }];
  r.linkDead();
  await r.idle();
  assert.deepEqual(w.reconfigured[1], { id: 1 });
});

test('flags changed incompatibly: the connection is discarded, never given to the kernel', async () => {
  const w = new World();
  w.script = [{ flags: FLAGS | TransmissionFlag.READ_ONLY }, {}];
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(w.made[0]!.discarded, true);
  assert.deepEqual(w.reconfigured, [{ id: 1 }]);
  assert.match(w.logs.join('\n'), /read-only/);
});

test('RECONFIGURE refused: the candidate is discarded and the attempt retried', async () => {
  const w = new World();
  w.reconfigureError = new Error('netlink NBD_CMD_RECONFIGURE failed: EINVAL');
  const r = new Reconnector({ ...w.deps(), sleep: async (ms) => {
    w.t += ms;
    w.reconfigureError = undefined;
  } }, { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(w.made[0]!.discarded, true);
  assert.deepEqual(w.reconfigured, [{ id: 1 }]);
  assert.match(r.lastError ?? '', /EINVAL/);
});

test('multi-conn: each LINK_DEAD replaces exactly one connection; extra LINK_DEADs are capped', async () => {
  const w = new World();
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 4 });
  r.linkDead();
  await r.idle();
  assert.equal(w.reconfigured.length, 1);
  r.linkDead();
  r.linkDead();
  await r.idle();
  assert.equal(w.reconfigured.length, 3);
  assert.equal(r.reconnects, 3);
  for (let i = 0; i < 6; i++) r.linkDead();
  assert.equal(r.pending, 4);
  await r.idle();
  assert.equal(w.reconfigured.length, 7);
  assert.equal(new Set(w.reconfigured.map((x) => x.id)).size, 7, 'one fresh connection per replacement');
});

test('stop() during an outage ends the loop without handing anything to the kernel', async () => {
  const w = new World();
  w.script = Array.from({ length: 5 }, refused);
  let r!: Reconnector<FakeCand>;
  let sleeps = 0;
  r = new Reconnector({ ...w.deps(), sleep: async (ms) => {
    w.t += ms;
    if (++sleeps === 2) void r.stop();
  } }, { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 1 });
  r.linkDead();
  await r.idle();
  assert.equal(r.isStopped, true);
  assert.equal(w.reconfigured.length, 0);
  assert.equal(r.attempts, 2);
});

// ---- the supervisor with a fake kernel ----

class FakeKernel implements KernelOps {
  handler: ((i: number) => void) | undefined;
  reconfigures: { index: number; fds: readonly number[]; change: { sizeBytes?: bigint; backend?: string } }[] = [];
  disconnects: number[] = [];
  attached = true;
  closed = false;
  async subscribe(h: (i: number) => void): Promise<void> {
    this.handler = h;
  }
  async reconfigure(index: number, fds: readonly number[], change: { sizeBytes?: bigint; backend?: string }): Promise<void> {
    this.reconfigures.push({ index, fds, change });
  }
  async disconnect(index: number): Promise<void> {
    this.disconnects.push(index);
    this.attached = false;
  }
  stillOurs(): boolean {
    return this.attached;
  }
  close(): void {
    this.closed = true;
  }
}

function makeSupervisor(w: World, k: FakeKernel, connections = 1, opts: { users?: string[]; whenBusy?: 'leave' | 'stay' } = {}) {
  const closed: number[] = [];
  const stops: string[] = [];
  const states: { reconnects: number; liveConnections: number }[] = [];
  let tick: (() => void) | undefined;
  const d = w.deps();
  const sup = new Supervisor<FakeCand>(
    { index: 3, device: '/dev/nbd3', identifier: 'id-1', connections, size: w.size, flags: FLAGS, deadTimeoutS: 60, ...(opts.whenBusy ? { whenBusy: opts.whenBusy } : {}) },
    {
      kernel: k,
      now: d.now,
      sleep: d.sleep,
      random: d.random,
      negotiate: d.negotiate,
      takeFd: (c) => 100 + c.id,
      closeFd: (fd) => void closed.push(fd),
      log: d.log,
      users: () => opts.users ?? [],
      stopping: () => void stops.push('STOPPING'),
      saveState: (s) => void states.push({ reconnects: s.reconnects, liveConnections: s.liveConnections }),
      every: (_ms, fn) => {
        tick = fn;
        return () => (tick = undefined);
      },
    },
  );
  return { sup, closed, states, stops, tick: () => tick?.() };
}

test('supervisor: LINK_DEAD for another device is ignored; ours → RECONFIGURE with our index and identifier', async () => {
  const w = new World();
  const k = new FakeKernel();
  const { sup, closed, states } = makeSupervisor(w, k);
  await sup.start();
  k.handler!(7);
  await sup.reconnector.idle();
  assert.equal(k.reconfigures.length, 0);
  k.handler!(3);
  await sup.reconnector.idle();
  assert.deepEqual(k.reconfigures, [{ index: 3, fds: [100], change: { backend: 'id-1' } }]);
  assert.deepEqual(closed, [100], 'our copy of the fd is closed after RECONFIGURE');
  assert.deepEqual(states.at(-1), { reconnects: 1, liveConnections: 1 });
  assert.ok(states.some((s) => s.liveConnections === 0), 'the outage was recorded');
});

test('supervisor: SIGTERM stops reconnecting, sends DISCONNECT for our device and ends with code 0', async () => {
  const w = new World();
  const k = new FakeKernel();
  const { sup } = makeSupervisor(w, k);
  await sup.start();
  await sup.terminate('SIGTERM');
  const end = await sup.ended;
  assert.equal(end.reason, 'signal');
  assert.equal(end.code, 0);
  assert.deepEqual(k.disconnects, [3]);
  assert.equal(k.closed, true);
  k.handler!(3); // late LINK_DEAD after shutdown
  await sup.reconnector.idle();
  assert.equal(k.reconfigures.length, 0);
});

test('supervisor: SIGTERM while the device is in use leaves it attached (no DISCONNECT), ends with code 0 and says why', async () => {
  const w = new World();
  const k = new FakeKernel();
  const { sup, stops } = makeSupervisor(w, k, 1, { users: ['mounted on /mnt'] });
  await sup.start();
  await sup.terminate('SIGTERM');
  const end = await sup.ended;
  assert.equal(end.reason, 'left');
  assert.equal(end.code, 0);
  assert.deepEqual(k.disconnects, [], 'a disk in use is never disconnected by a signal');
  assert.equal(k.attached, true);
  assert.deepEqual(stops, ['STOPPING']);
  assert.ok(w.logs.some((l) => /SIGTERM: \/dev\/nbd3 is in use \(mounted on \/mnt\): leaving it attached/.test(l)), w.logs.join('\n'));
});

test("supervisor: SIGTERM while in use with whenBusy 'stay' (local attach) keeps running; a later SIGTERM when unused disconnects", async () => {
  const w = new World();
  const k = new FakeKernel();
  const users = ['open by pid 42 (dd)'];
  const { sup, stops } = makeSupervisor(w, k, 1, { users, whenBusy: 'stay' });
  await sup.start();
  await sup.terminate('SIGTERM');
  const first = await Promise.race([sup.ended, new Promise((r) => setTimeout(() => r('running'), 20))]);
  assert.equal(first, 'running');
  assert.deepEqual(k.disconnects, []);
  assert.deepEqual(stops, []);
  users.length = 0;
  await sup.terminate('SIGHUP');
  const end = await sup.ended;
  assert.equal(end.reason, 'signal');
  assert.deepEqual(k.disconnects, [3]);
  assert.deepEqual(stops, ['STOPPING']);
});

test('supervisor: a device detached by someone else ends it cleanly, without DISCONNECT', async () => {
  const w = new World();
  const k = new FakeKernel();
  const { sup, tick } = makeSupervisor(w, k);
  await sup.start();
  tick();
  k.attached = false;
  tick();
  const end = await sup.ended;
  assert.equal(end.reason, 'detached');
  assert.equal(end.code, 0);
  assert.deepEqual(k.disconnects, []);
});

test('supervisor: giving up (export gone past the dead timeout) ends with the error exit code', async () => {
  const w = new World();
  w.script = Array.from({ length: 1000 }, unknown);
  const k = new FakeKernel();
  const { sup } = makeSupervisor(w, k);
  await sup.start();
  k.handler!(3);
  const end = await sup.ended;
  assert.equal(end.reason, 'gave-up');
  assert.equal(end.code, 4);
  assert.deepEqual(k.disconnects, [], 'the device is left for the admin to inspect or detach');
});

// ---- changed export size, the server's limits, a server shutting down ----

test('size: a shrink or a size off the block size is refused until the dead timeout; growth is applied', async () => {
  assert.equal(sizeProblem(64n << 20n, 64n << 20n, 4096), undefined);
  assert.equal(sizeProblem(64n << 20n, 128n << 20n, 4096), undefined);
  assert.match(sizeProblem(64n << 20n, 32n << 20n, 512)!, /shrank from 67108864 to 33554432/);
  assert.match(sizeProblem(64n << 20n, (64n << 20n) + 512n, 4096)!, /not a multiple of the device's block size 4096/);

  const w = new World();
  w.script = Array.from({ length: 1000 }, () => ({ size: 32n << 20n }));
  let gaveUp: NbdError | undefined;
  const start = w.t;
  const r = new Reconnector({ ...w.deps(), gaveUp: (e) => void (gaveUp = e) }, { deadTimeoutMs: 20_000, size: 64n << 20n, flags: FLAGS, connections: 1, blockSize: 4096 });
  r.linkDead();
  await r.idle();
  assert.equal(w.reconfigured.length, 0, 'never handed to the kernel');
  assert.ok(w.made.every((c) => c.discarded));
  assert.equal(gaveUp?.code, 'NBD_E_EXPORT_CHANGED');
  assert.match(gaveUp!.message, /shrank.*giving up after/);
  assert.ok(w.t - start >= 20_000, 'kept trying for the dead timeout');
  assert.equal(r.size, 64n << 20n);

  const w2 = new World();
  w2.script = [{ size: (64n << 20n) + 512n }, { size: 96n << 20n }];
  const r2 = new Reconnector(w2.deps(), { deadTimeoutMs: 60_000, size: 64n << 20n, flags: FLAGS, connections: 1, blockSize: 4096 });
  r2.linkDead();
  await r2.idle();
  assert.equal(w2.made[0]!.discarded, true);
  assert.deepEqual(w2.reconfigured, [{ id: 1, sizeBytes: 96n << 20n }]);
  assert.match(w2.logs.join('\n'), /grew from 67108864 to 100663296/);
});

test('prepare refusing a connection (limits the kernel cannot honour): discarded and retried', async () => {
  const w = new World();
  let calls = 0;
  const r = new Reconnector(
    {
      ...w.deps(),
      prepare: () => {
        if (calls++ === 0) throw new NbdError('NBD_E_EXPORT_CHANGED', 'reconnect: maximum payload too small');
      },
    },
    { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 1 },
  );
  r.linkDead();
  await r.idle();
  assert.equal(w.made[0]!.discarded, true);
  assert.deepEqual(w.reconfigured, [{ id: 1 }]);
  assert.match(r.lastError ?? '', /maximum payload too small/);
});

class FakeSockets {
  shut: number[] = [];
  closedFds: number[] = [];
  finished = new Set<number>();
  ops = {
    shutdown: (fd: number) => void this.shut.push(fd),
    close: (fd: number) => void this.closedFds.push(fd),
    isFinished: (fd: number) => this.finished.has(fd),
  };
}

test('supervisor: NBD_ESHUTDOWN for our device in the kernel log ends every kept connection once; limits applied around RECONFIGURE', async () => {
  const w = new World();
  const k = new FakeKernel();
  const fake = new FakeSockets();
  const sockets = new KeptSockets(fake.ops);
  let onRecord: ((r: string) => void) | undefined;
  let kmsgClosed = false;
  const limitCalls: { index: number; discard: boolean }[] = [];
  const d = w.deps();
  const sup = new Supervisor<FakeCand>(
    { index: 3, device: '/dev/nbd3', identifier: 'id-1', connections: 2, size: w.size, flags: FLAGS, deadTimeoutS: 60, blockSize: 512, keptFds: [50, 51] },
    {
      kernel: k,
      users: () => [],
      now: d.now,
      sleep: d.sleep,
      random: d.random,
      negotiate: d.negotiate,
      takeFd: (c) => 100 + c.id,
      closeFd: () => assert.fail('a kept socket is not closed after RECONFIGURE'),
      log: d.log,
      saveState: () => {},
      every: () => () => {},
      applyLimits: (index, _c, discard) => {
        limitCalls.push({ index, discard });
        return discard ? 'request limits: test' : undefined;
      },
      sockets,
      watchKernelLog: (cb) => {
        onRecord = cb;
        return { close: () => void (kmsgClosed = true) };
      },
    },
  );
  await sup.start();
  assert.equal(sockets.size, 2);
  // Other devices, other errors: nothing happens.
  onRecord!('3,1000,5000,-;block nbd4: Other side returned error (108)\n SUBSYSTEM=block');
  onRecord!('3,1001,5001,-;block nbd3: Other side returned error (5)');
  assert.deepEqual(fake.shut, []);
  onRecord!('3,1002,5002,-;block nbd3: Other side returned error (108)\n SUBSYSTEM=block\n DEVICE=b43:96');
  assert.deepEqual(fake.shut, [50, 51]);
  assert.deepEqual(fake.closedFds, [50, 51]);
  onRecord!('3,1003,5003,-;block nbd3: Other side returned error (108)');
  assert.equal(fake.shut.length, 2, 'the burst of replies ends the connections once');
  assert.equal(w.logs.filter((l) => /shutting down.*NBD_ESHUTDOWN.*ending 2 connection/.test(l)).length, 1);
  // The kernel reports both links dead; each is replaced and its new socket kept.
  k.handler!(3);
  k.handler!(3);
  await sup.reconnector.idle();
  assert.equal(k.reconfigures.length, 2);
  assert.deepEqual(limitCalls, [
    { index: 3, discard: false },
    { index: 3, discard: true },
    { index: 3, discard: false },
    { index: 3, discard: true },
  ]);
  assert.equal(sockets.size, 2);
  // A link that dies by itself: the kernel shut its socket down; prune lets go of our copy.
  fake.finished.add(100);
  k.handler!(3);
  await sup.reconnector.idle();
  assert.ok(fake.closedFds.includes(100));
  assert.equal(sockets.size, 2);
  await sup.terminate('SIGTERM');
  assert.equal(kmsgClosed, true);
  assert.equal(sockets.size, 0);
});

test('kernel log records: only "Other side returned error" lines of nbd devices parse', () => {
  assert.deepEqual(parseServerError('3,1002,5002,-;block nbd12: Other side returned error (108)\n SUBSYSTEM=block'), { index: 12, error: 108 });
  assert.deepEqual(parseServerError('[  12.3] block nbd0: Other side returned error (22)'), { index: 0, error: 22 });
  assert.equal(parseServerError('3,1,2,-;block nbd0: Receive control failed (result -32)'), undefined);
  assert.equal(parseServerError('3,1,2,-;block xnbd0: Other side returned error (108)'), undefined);
  assert.equal(isShutdownReply(parseServerError('3,1,2,-;block nbd0: Other side returned error (108)'), 0), true);
  assert.equal(isShutdownReply(parseServerError('3,1,2,-;block nbd0: Other side returned error (108)'), 1), false);
});

test('hurry (a restarted server is expected): retries at most every 200 ms within the window, then the normal cap', async () => {
  const w = new World();
  w.rand = 0.999999;
  w.script = Array.from({ length: 60 }, refused);
  const r = new Reconnector(w.deps(), { deadTimeoutMs: 60_000, size: w.size, flags: FLAGS, connections: 1 });
  r.hurry(5_000);
  r.linkDead();
  await r.idle();
  const start = 1_000_000;
  let t = start;
  for (const s of w.sleeps) {
    if (t + 5 < start + 5_000) assert.ok(s <= RESTART_BACKOFF.maxMs, `sleep ${s} inside the window`);
    t += s + 5;
  }
  assert.ok(w.sleeps.some((s) => s > RESTART_BACKOFF.maxMs), 'after the window the normal backoff applies');
});

test('idle probe: only after an interval without any request, never while a link is being replaced, one at a time', async () => {
  let stat = '10 0 80 5 20 0 160 7 0 12 12 0 0 0 0 0 0';
  let tick: (() => void) | undefined;
  let up = true;
  let probes = 0;
  let release: (() => void) | undefined;
  const p = startIdleProbe(2000, {
    readStat: () => stat,
    probe: () => {
      probes++;
      return new Promise<void>((r) => (release = r));
    },
    linksUp: () => up,
    every: (_ms, fn) => {
      tick = fn;
      return () => (tick = undefined);
    },
  });
  tick!(); // first look: nothing to compare with
  assert.equal(probes, 0);
  stat = '11 0 88 5 20 0 160 7 0 12 12 0 0 0 0 0 0'; // a read completed: busy
  tick!();
  assert.equal(probes, 0);
  up = false;
  tick!(); // idle, but a connection is being replaced
  assert.equal(probes, 0);
  up = true;
  tick!();
  assert.equal(probes, 1);
  tick!(); // the probe is still waiting
  assert.equal(probes, 1);
  stat = '12 0 96 5 20 0 160 7 0 12 12 0 0 0 0 0 0'; // the probe's own read
  release!();
  await new Promise((r) => setImmediate(r));
  tick!(); // idle since the probe: probed again
  assert.equal(probes, 2);
  release!();
  await new Promise((r) => setImmediate(r));
  stat = '12 0 96 5 20 0 160 7 1 12 12 0 0 0 0 0 0'; // one request in flight
  tick!();
  assert.equal(probes, 2);
  p.close();
  assert.equal(tick, undefined);
  assert.deepEqual(activityKey('1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17'), { key: '1 5 9 12 16', inFlight: 9 });
});
