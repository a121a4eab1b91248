// sd_notify(3) over real AF_UNIX datagram sockets: the test plays the service manager with a
// listener bound to a path or an abstract name (native-bindings/unix-dgram.ts) and checks what the
// Notifier sends: READY=1 with STATUS=, STATUS= updates, STOPPING=1, periodic WATCHDOG=1, a failed
// send logged once. systemd's own systemd-notify checks the listener, and a full receive queue
// proves that sending never blocks the event loop.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { DatagramListener, sendDatagram } from '../../native-bindings/unix-dgram.ts';
import { SyscallError } from '../../native-bindings/libc.ts';
import { createNotifier } from '../../src/systemd/notify.ts';
import { tmpDir } from '../lib/servers.ts';

const dir = tmpDir('nbd-attach-notify-');
const listeners: DatagramListener[] = [];
after(() => {
  for (const l of listeners) l.close();
  rmSync(dir, { recursive: true, force: true });
});
function listen(address: string): DatagramListener {
  const l = new DatagramListener(address);
  listeners.push(l);
  return l;
}
async function next(l: DatagramListener, ms = 2000): Promise<string | undefined> {
  const d = await l.receive(ms);
  if (d) assert.equal(d.truncated, false);
  return d?.data.toString('utf8');
}

for (const kind of ['path', 'abstract'] as const) {
  test(`notifier to the ${kind} socket: READY=1 + STATUS, STATUS, STOPPING=1, in order`, async () => {
    const address = kind === 'path' ? path.join(dir, 'notify.sock') : `@nbd-attach-test-${process.pid}-notify`;
    const l = listen(address);
    const env: Record<string, string | undefined> = { NOTIFY_SOCKET: address };
    const logs: string[] = [];
    const n = await createNotifier({ env, log: (m) => logs.push(m) });
    assert.equal(n.enabled, true);
    n.ready("/dev/nbd0: export 'disk' on 127.0.0.1:10809, connections 1/1");
    n.status('/dev/nbd0: reconnecting\nsecond line');
    n.stopping('/dev/nbd0: detaching');
    await n.flush();
    assert.equal(await next(l), "READY=1\nSTATUS=/dev/nbd0: export 'disk' on 127.0.0.1:10809, connections 1/1");
    assert.equal(await next(l), 'STATUS=/dev/nbd0: reconnecting second line');
    assert.equal(await next(l), 'STOPPING=1\nSTATUS=/dev/nbd0: detaching');
    assert.equal(await next(l, 200), undefined, 'nothing else (no watchdog without WATCHDOG_USEC)');
    assert.deepEqual(logs, []);
    n.close();
  });
}

test('WATCHDOG=1 arrives about every half WATCHDOG_USEC while the notifier is open, not after close', async () => {
  const address = `@nbd-attach-test-${process.pid}-watchdog`;
  const l = listen(address);
  const n = await createNotifier({ env: { NOTIFY_SOCKET: address, WATCHDOG_USEC: '200000', WATCHDOG_PID: String(process.pid) }, log: () => undefined });
  assert.equal(n.watchdogIntervalMs, 100);
  const t0 = Date.now();
  const times: number[] = [];
  while (times.length < 5) {
    const m = await next(l, 2000);
    assert.equal(m, 'WATCHDOG=1');
    times.push(Date.now() - t0);
  }
  // 5 pings at 100 ms: not before 500 ms, and (on a loaded 2-core host) well within 3 s.
  assert.ok(times[4]! >= 450, `pings too early: ${times.join(',')}`);
  assert.ok(times[4]! < 3000, `pings too late: ${times.join(',')}`);
  n.close();
  while ((await l.receive(0)) !== undefined); // drop one that raced with close
  assert.equal(await next(l, 400), undefined, 'no pings after close');
});

test("WATCHDOG_PID of another process: no pings (that process's watchdog)", async () => {
  const address = `@nbd-attach-test-${process.pid}-otherpid`;
  const l = listen(address);
  const n = await createNotifier({ env: { NOTIFY_SOCKET: address, WATCHDOG_USEC: '100000', WATCHDOG_PID: '1' }, log: () => undefined });
  assert.equal(n.watchdogIntervalMs, undefined);
  assert.equal(await next(l, 400), undefined);
  n.close();
});

test('nobody listening: the send fails, is logged once with the errno, and never throws', async () => {
  for (const address of [path.join(dir, 'absent.sock'), `@nbd-attach-test-${process.pid}-absent`]) {
    const logs: string[] = [];
    const n = await createNotifier({ env: { NOTIFY_SOCKET: address }, log: (m) => logs.push(m) });
    n.ready('x');
    n.status('y');
    n.stopping();
    await n.flush();
    n.close();
    assert.equal(logs.length, 1, logs.join('\n'));
    assert.match(logs[0]!, new RegExp(`^systemd notification \\(READY=1\\) to ${address} failed: sendto\\(${address}\\) failed: (ENOENT|ECONNREFUSED) `));
  }
});

test("systemd's systemd-notify reaches the listener (the listener reads what systemd's tools send)", async (t) => {
  if (!existsSync('/usr/bin/systemd-notify')) {
    t.skip('systemd-notify is not installed');
    return;
  }
  for (const address of [path.join(dir, 'sd.sock'), `@nbd-attach-test-${process.pid}-sd`]) {
    const l = listen(address);
    const r = spawnSync('/usr/bin/systemd-notify', ['--no-block', '--ready', '--status=from systemd'], { env: { NOTIFY_SOCKET: address }, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const m = await next(l);
    assert.ok(m?.includes('READY=1') && m.includes('STATUS=from systemd'), m);
  }
});

test('a full receive queue gives EAGAIN at once (sending never blocks the event loop)', () => {
  const address = `@nbd-attach-test-${process.pid}-full`;
  const l = listen(address);
  let sent = 0;
  let error: unknown;
  try {
    // net.unix.max_dgram_qlen (default 512) datagrams fit; the listener cannot drain while this loop runs.
    for (; sent < 100_000; sent++) sendDatagram(address, Buffer.from('WATCHDOG=1'));
  } catch (e) {
    error = e;
  }
  assert.ok(error instanceof SyscallError, `no EAGAIN after ${sent} datagrams`);
  assert.equal(error.code, 'EAGAIN');
  assert.match(error.message, new RegExp(`^sendto\\(${address}\\) failed: EAGAIN`));
  assert.ok(sent > 0);
  l.close();
});

test('binding an address in use is a clear error naming it', () => {
  const address = `@nbd-attach-test-${process.pid}-twice`;
  listen(address);
  assert.throws(() => new DatagramListener(address), (e: unknown) => e instanceof SyscallError && e.code === 'EADDRINUSE' && e.message.startsWith(`bind(${address}) failed`));
});
