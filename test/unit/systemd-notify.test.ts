// sd_notify(3) for Type=notify units, without sockets: the environment (sd_watchdog_enabled(3)
// semantics), message formatting and escaping, sockaddr_un layout, and the Notifier's behaviour
// with an injected sender (order, EAGAIN retries, failures logged once, watchdog timer, no-op mode).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import {
  createNotifier,
  deviceStatusText,
  formatNotifyMessage,
  oneLine,
  parseNotifyEnvironment,
  SEND_RETRY_LIMIT,
  STATUS_MAX_CHARS,
} from '../../src/systemd/notify.ts';
import { sockaddrUn } from '../../native-bindings/unix-dgram.ts';
import { NbdError } from '../../src/errors.ts';

test('environment: NOTIFY_SOCKET path or @name; anything else is off with a reason', () => {
  assert.deepEqual(parseNotifyEnvironment({}, 1), { socket: undefined, watchdogIntervalMs: undefined, problems: [] });
  assert.equal(parseNotifyEnvironment({ NOTIFY_SOCKET: '' }, 1).socket, undefined);
  assert.equal(parseNotifyEnvironment({ NOTIFY_SOCKET: '/run/systemd/notify' }, 1).socket, '/run/systemd/notify');
  assert.equal(parseNotifyEnvironment({ NOTIFY_SOCKET: '@/org/freedesktop/systemd1/notify/42' }, 1).socket, '@/org/freedesktop/systemd1/notify/42');
  for (const bad of ['relative/sock', 'vsock:2:1234', '@']) {
    const c = parseNotifyEnvironment({ NOTIFY_SOCKET: bad }, 1);
    assert.equal(c.socket, undefined, bad);
    assert.match(c.problems[0]!, /neither an absolute path nor @name: systemd notifications are off/);
  }
});

test('environment: the watchdog is ours when WATCHDOG_PID is unset or our pid; pings at half WATCHDOG_USEC', () => {
  const base = { NOTIFY_SOCKET: '/run/n' };
  assert.equal(parseNotifyEnvironment({ ...base, WATCHDOG_USEC: '30000000' }, 7).watchdogIntervalMs, 15000);
  assert.equal(parseNotifyEnvironment({ ...base, WATCHDOG_USEC: '30000000', WATCHDOG_PID: '7' }, 7).watchdogIntervalMs, 15000);
  assert.equal(parseNotifyEnvironment({ ...base, WATCHDOG_USEC: '30000000', WATCHDOG_PID: '8' }, 7).watchdogIntervalMs, undefined);
  assert.equal(parseNotifyEnvironment({ ...base, WATCHDOG_USEC: '1' }, 7).watchdogIntervalMs, 1, 'never a 0 ms timer');
  // No socket: no watchdog, whatever WATCHDOG_USEC says.
  assert.equal(parseNotifyEnvironment({ WATCHDOG_USEC: '30000000' }, 7).watchdogIntervalMs, undefined);
  for (const [usec, pid, re] of [
    ['0', undefined, /WATCHDOG_USEC='0' is not a positive number/],
    ['10s', undefined, /WATCHDOG_USEC='10s'/],
    ['-5', undefined, /WATCHDOG_USEC='-5'/],
    ['1000', 'me', /WATCHDOG_PID='me' is not a process id/],
  ] as const) {
    const c = parseNotifyEnvironment({ ...base, WATCHDOG_USEC: usec, ...(pid ? { WATCHDOG_PID: pid } : {}) }, 7);
    assert.equal(c.watchdogIntervalMs, undefined);
    assert.match(c.problems.join('\n'), re);
  }
});

test('messages: KEY=VALUE lines; values are one line, control characters folded, long text cut', () => {
  assert.equal(formatNotifyMessage([['READY', '1'], ['STATUS', 'ok']]).toString(), 'READY=1\nSTATUS=ok');
  // A newline in a value must not smuggle in another assignment.
  assert.equal(formatNotifyMessage([['STATUS', 'a\nREADY=1\r\n\tb']]).toString(), 'STATUS=a READY=1 b');
  assert.equal(oneLine('  x\u0000\u001b[31my\u2028z  '), 'x [31my z');
  const long = oneLine('é'.repeat(STATUS_MAX_CHARS + 10));
  assert.equal(Array.from(long).length, STATUS_MAX_CHARS);
  assert.ok(long.endsWith('…'));
  // Never cut inside a surrogate pair.
  const emoji = oneLine('😀'.repeat(10), 4);
  assert.equal(emoji, '😀😀😀…');
  assert.throws(() => formatNotifyMessage([['ready', '1']]), /not an sd_notify name/);
  assert.throws(() => formatNotifyMessage([['A=B', '1']]), /not an sd_notify name/);
});

test('STATUS text names device, export, server and connections; reconnecting shows the error', () => {
  const s = { device: '/dev/nbd0', server: 'srv:10809', export: 'disk', connections: 2, liveConnections: 2 };
  assert.equal(deviceStatusText(s), "/dev/nbd0: export 'disk' on srv:10809, connections 2/2");
  assert.equal(deviceStatusText({ ...s, export: '' }), '/dev/nbd0: default export on srv:10809, connections 2/2');
  assert.equal(
    deviceStatusText({ ...s, liveConnections: 1, reconnects: 3, lastError: 'connect ECONNREFUSED\n127.0.0.1' }),
    "/dev/nbd0: export 'disk' on srv:10809, connections 1/2, reconnecting, reconnects 3, last error: connect ECONNREFUSED 127.0.0.1",
  );
  assert.equal(deviceStatusText({ ...s, reconnects: 3, lastError: 'old' }), "/dev/nbd0: export 'disk' on srv:10809, connections 2/2, reconnects 3");
});

test('sockaddr_un: path NUL-terminated, abstract name after a NUL without terminator, limits', () => {
  const p = sockaddrUn('/run/x');
  assert.equal(p.length, 2 + 6 + 1);
  assert.equal(p.readUInt16LE(0), 1); // AF_UNIX
  assert.equal(p.subarray(2).toString('latin1'), '/run/x\0');
  const a = sockaddrUn('@abc');
  assert.equal(a.length, 2 + 1 + 3, 'offsetof(sun_path) + 1 + name length');
  assert.deepEqual([...a.subarray(2)], [0, 0x61, 0x62, 0x63]);
  assert.equal(sockaddrUn(`/${'a'.repeat(106)}`).length, 110, '107 bytes + NUL fill sun_path');
  assert.throws(() => sockaddrUn(`/${'a'.repeat(107)}`), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_USAGE' && /108 bytes, the limit is 107/.test(e.message));
  assert.equal(sockaddrUn(`@${'b'.repeat(107)}`).length, 110);
  assert.throws(() => sockaddrUn(`@${'b'.repeat(108)}`), /the limit is 107/);
  assert.throws(() => sockaddrUn(''), /empty/);
  assert.throws(() => sockaddrUn('/a\0b'), /NUL/);
});

function recorder(): { sent: string[]; send: (a: string, d: Uint8Array) => void; fail: { code?: string; times: number } } {
  const r = {
    sent: [] as string[],
    fail: { times: 0 } as { code?: string; times: number },
    send(address: string, d: Uint8Array): void {
      if (r.fail.times > 0) {
        r.fail.times--;
        throw Object.assign(new Error(`sendto(${address}) failed: ${r.fail.code}`), { code: r.fail.code });
      }
      r.sent.push(`${address}|${Buffer.from(d).toString()}`);
    },
  };
  return r;
}

test('no NOTIFY_SOCKET: a no-op notifier, the datagram binding (koffi) is not loaded', async () => {
  const logs: string[] = [];
  const n = await createNotifier({ env: {}, log: (m) => logs.push(m) });
  assert.equal(n.enabled, false);
  n.ready('x');
  n.status('y');
  n.stopping();
  await n.flush();
  n.close();
  assert.deepEqual(logs, []);
  const cache = createRequire(import.meta.url).cache;
  assert.equal(Object.keys(cache).filter((k) => k.includes('/koffi/')).length, 0);
});

test('notifier: ready, status, stopping in order; env variables removed once read', async () => {
  const r = recorder();
  const env: Record<string, string | undefined> = { NOTIFY_SOCKET: '@n', WATCHDOG_USEC: '60000000', WATCHDOG_PID: '99', KEEP: '1' };
  const n = await createNotifier({ env, pid: 5, log: () => undefined, send: r.send });
  assert.deepEqual(env, { KEEP: '1' }, 'NOTIFY_SOCKET, WATCHDOG_* unset (children cannot speak for us)');
  assert.equal(n.enabled, true);
  assert.equal(n.watchdogIntervalMs, undefined, 'WATCHDOG_PID is another process');
  n.ready('attached');
  n.status('reconnecting\nnow');
  n.stopping('detaching');
  n.ready('late'); // ignored after stopping
  n.close();
  assert.deepEqual(r.sent, ['@n|READY=1\nSTATUS=attached', '@n|STATUS=reconnecting now', '@n|STOPPING=1\nSTATUS=detaching']);
  const env2: Record<string, string | undefined> = { NOTIFY_SOCKET: '/run/n' };
  const n2 = await createNotifier({ env: env2, pid: 5, log: () => undefined, send: r.send, unsetEnvironment: false });
  n2.ready(undefined, { mainPid: 1234 });
  n2.close();
  assert.equal(env2['NOTIFY_SOCKET'], '/run/n');
  assert.equal(r.sent.at(-1), '/run/n|MAINPID=1234\nREADY=1');
});

test('notifier: a full socket (EAGAIN) is retried in order; other failures are logged once, never thrown', async () => {
  const r = recorder();
  const logs: string[] = [];
  const n = await createNotifier({ env: { NOTIFY_SOCKET: '/run/n' }, log: (m) => logs.push(m), send: r.send });
  r.fail = { code: 'EAGAIN', times: 3 };
  n.ready('a');
  n.status('b'); // queued behind READY
  assert.equal(r.sent.length, 0);
  await n.flush();
  assert.deepEqual(r.sent, ['/run/n|READY=1\nSTATUS=a', '/run/n|STATUS=b']);
  assert.deepEqual(logs, []);
  r.fail = { code: 'ECONNREFUSED', times: 2 };
  n.status('c');
  n.status('d');
  n.status('e');
  assert.equal(logs.length, 1);
  assert.match(logs[0]!, /^systemd notification \(STATUS=c\) to \/run\/n failed: .*ECONNREFUSED; later failures are not logged$/);
  assert.equal(r.sent.at(-1), '/run/n|STATUS=e');
  // EAGAIN for good: dropped after the retry limit, logged (already once: not again), the queue moves on.
  r.fail = { code: 'EAGAIN', times: SEND_RETRY_LIMIT };
  n.status('f');
  n.status('g');
  await n.flush();
  assert.equal(r.sent.at(-1), '/run/n|STATUS=g');
  assert.ok(!r.sent.includes('/run/n|STATUS=f'));
  assert.equal(logs.length, 1);
  n.close();
});

test('notifier: WATCHDOG=1 every half WATCHDOG_USEC, only while open', async (t) => {
  t.mock.timers.enable({ apis: ['setInterval', 'setTimeout'] });
  const r = recorder();
  const n = await createNotifier({ env: { NOTIFY_SOCKET: '/run/n', WATCHDOG_USEC: '2000000', WATCHDOG_PID: '5' }, pid: 5, log: () => undefined, send: r.send });
  assert.equal(n.watchdogIntervalMs, 1000);
  t.mock.timers.tick(999);
  assert.equal(r.sent.length, 0);
  t.mock.timers.tick(1);
  assert.deepEqual(r.sent, ['/run/n|WATCHDOG=1']);
  t.mock.timers.tick(3000);
  assert.equal(r.sent.length, 4);
  n.close();
  t.mock.timers.tick(5000);
  assert.equal(r.sent.length, 4);
});

test('notifier: bad settings are reported through log', async () => {
  const logs: string[] = [];
  const n = await createNotifier({ env: { NOTIFY_SOCKET: 'vsock:2:9', WATCHDOG_USEC: '5' }, log: (m) => logs.push(m) });
  assert.equal(n.enabled, false);
  assert.equal(logs.length, 1);
  assert.match(logs[0]!, /NOTIFY_SOCKET='vsock:2:9'/);
});
