// `status` from a fake sysfs tree and state files (no kernel): attached or not, size, server,
// export, connections live/total, supervisor pid (alive or not), reconnects, last error.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { formatStatus, statusJson, statusOf } from '../../src/commands/status.ts';
import { type SupervisorState, clearDetachRequested, markDetachRequested, parseProcStat, takeDetachRequested, pidAlive, processIdentity, readState, removeState, stateFile, supervisorAlive, writeState } from '../../src/supervisor/state.ts';

let dir: string;
let roots: { sys: string; dev: string; proc: string };

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sup-status-'));
  process.env['NBD_ATTACH_RUN_DIR'] = path.join(dir, 'run');
  roots = { sys: path.join(dir, 'sys'), dev: path.join(dir, 'dev'), proc: '/proc' };
  const dev = (i: number, files: Record<string, string>): void => {
    const d = path.join(roots.sys, 'block', `nbd${i}`);
    fs.mkdirSync(d, { recursive: true });
    for (const [k, v] of Object.entries(files)) fs.writeFileSync(path.join(d, k), v);
  };
  dev(0, { size: '131072\n', pid: '4242\n', backend: 'id-0\n' });
  dev(1, { size: '0\n' });
  dev(2, { size: '2048\n', pid: '77\n', backend: 'other\n' });
});
after(() => {
  delete process.env['NBD_ATTACH_RUN_DIR'];
  fs.rmSync(dir, { recursive: true, force: true });
});

function state(over: Partial<SupervisorState>): SupervisorState {
  return {
    version: 1, index: 0, device: '/dev/nbd0', pid: 1234, server: '10.0.0.1:10809', endpoint: { kind: 'tcp', host: '10.0.0.1', port: 10809 },
    export: 'disk', noOptGo: false, identifier: 'id-0', interface: 'netlink', connections: 4, liveConnections: 3, sizeBytes: '67108864',
    blockSize: 512, flags: 0, readOnly: false, requestTimeoutS: 10, deadTimeoutS: 60, reconnects: 2, lastError: 'connection refused',
    startedAt: 'x', updatedAt: 'x', ...over,
  };
}

test('attached device with a live supervisor: everything from sysfs and the state file', () => {
  writeState(state({}));
  const e = statusOf(0, '/dev/nbd0', roots, (s) => s.pid === 1234);
  assert.deepEqual(e, {
    device: '/dev/nbd0', index: 0, attached: true, sizeBytes: 67108864, kernelPid: 4242, identifier: 'id-0', server: '10.0.0.1:10809',
    export: 'disk', connections: { live: 3, total: 4 }, supervisorPid: 1234, reconnects: 2, lastError: 'connection refused',
  });
  assert.equal(formatStatus(e), "/dev/nbd0: attached, 64 MiB, server 10.0.0.1:10809, export 'disk', connections 3/4, supervisor pid 1234, reconnects 2, last error: connection refused");
});

test('supervisor dead: shown as no supervisor, with the hint to adopt', () => {
  const e = statusOf(0, '/dev/nbd0', roots, () => false);
  assert.equal(e.supervisorPid, null);
  assert.deepEqual(e.connections, { live: null, total: 4 }, 'nobody watches the links: live is unknown, not the last count');
  assert.match(formatStatus(e), /connections \?\/4, no supervisor \(adopt it with nbd-attach --reattach\)/);
});

test('not attached, and a state file that belongs to another attachment is not shown', () => {
  const e1 = statusOf(1, '/dev/nbd1', roots, () => true);
  assert.deepEqual(e1, { device: '/dev/nbd1', index: 1, attached: false, sizeBytes: 0 });
  assert.equal(formatStatus(e1), '/dev/nbd1: not attached');
  writeState(state({ index: 2, device: '/dev/nbd2', identifier: 'stale' }));
  const e2 = statusOf(2, '/dev/nbd2', roots, () => true);
  assert.equal(e2.server, undefined);
  assert.equal(e2.supervisorPid, null);
});

test('process identity: a reused pid with another start time is not the supervisor', () => {
  const me = processIdentity(process.pid);
  assert.ok(me && /^\d+$/.test(me.start) && !me.gone);
  assert.equal(pidAlive(process.pid, me.start), true);
  assert.equal(pidAlive(process.pid, String(Number(me.start) + 1)), false);
  assert.equal(supervisorAlive({ pid: process.pid, pidStart: me.start }), true);
  assert.equal(supervisorAlive({ pid: 0 }), false);
  assert.deepEqual(parseProcStat(7, '7 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 99887 20'), { pid: 7, start: '99887', gone: false });
  assert.equal(parseProcStat(7, '7 (z) Z 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 5 20')?.gone, true);
  assert.equal(parseProcStat(7, 'garbage'), undefined);
});

test('state files: atomic write, read back, removed only by their owner', () => {
  writeState(state({ index: 5, pid: process.pid }));
  assert.equal(readState(5)?.pid, process.pid);
  removeState(5, process.pid + 1);
  assert.ok(fs.existsSync(stateFile(5)), 'another pid does not remove it');
  removeState(5, process.pid);
  assert.equal(readState(5), undefined);
  assert.deepEqual(fs.readdirSync(path.dirname(stateFile(5))).filter((f) => f.endsWith('.tmp')), []);
});

test('detach marker: taken once by its reader; cleared by detach when no supervisor is left to read it', () => {
  const marker = path.join(process.env['NBD_ATTACH_RUN_DIR']!, 'nbd9.detach');
  markDetachRequested(9);
  assert.ok(fs.existsSync(marker));
  assert.equal(takeDetachRequested(9), true);
  assert.equal(fs.existsSync(marker), false, 'taken');
  assert.equal(takeDetachRequested(9), false, 'only once');
  markDetachRequested(9);
  clearDetachRequested(9);
  assert.equal(fs.existsSync(marker), false, 'a netlink supervisor never reads it: detach removes it');
  clearDetachRequested(9); // none left: no error
});

test('a TLS device: shown as such; without its supervisor, says that I/O waits for --reattach; settings read back', () => {
  writeState(state({ tls: { certificatesDir: '/etc/pki/nbd', hostname: 'disk.example' } }));
  assert.deepEqual(readState(0)?.tls, { certificatesDir: '/etc/pki/nbd', hostname: 'disk.example' }, 'the state file keeps the TLS settings for --reattach');
  const live = statusOf(0, '/dev/nbd0', roots, (s) => s.pid === 1234);
  assert.equal(live.tls, true);
  assert.equal(live.tlsPath, 'relay', 'a state file without tlsPath is from the relay');
  assert.match(formatStatus(live), /export 'disk' over TLS \(relay\), connections 3\/4, supervisor pid 1234/);
  const dead = statusOf(0, '/dev/nbd0', roots, () => false);
  assert.match(formatStatus(dead), /no supervisor \(it relayed the TLS connections: I\/O waits until nbd-attach --reattach\)/);
  writeState(state({ tls: { certificatesDir: '/etc/pki/nbd' }, tlsPath: 'kernel' }));
  const kernel = statusOf(0, '/dev/nbd0', roots, () => false);
  assert.equal(kernel.tlsPath, 'kernel');
  assert.match(formatStatus(kernel), /over TLS \(kernel TLS\), .*no supervisor \(adopt it with nbd-attach --reattach\)/, 'kernel TLS: I/O does not wait for a supervisor');
  writeState(state({}));
  assert.equal(statusOf(0, '/dev/nbd0', roots, () => true).tls, undefined);
});

test('strings from the state file: one line each in the human form, exact in --json', () => {
  const hostileExport = `d\x1b[2J\n${'size: 1 bytes\n'.repeat(44)}\u202e`;
  const hostileError = 'server has no export (server says: \x1b]0;pwned\x07\r\nok)';
  writeState(state({ export: hostileExport, server: 'evil\x1b[31m:10809', lastError: hostileError }));
  const e = statusOf(0, '/dev/nbd0', roots, (s) => s.pid === 1234);
  assert.equal(e.export, hostileExport, 'the entry keeps the exact string');
  const line = formatStatus(e);
  assert.ok(!/[\x00-\x1f\x7f\u202e]/.test(line), line);
  assert.match(line, /server evil\\x1b\[31m:10809, export 'd\\x1b\[2J\\nsize: 1 bytes\\nsize/);
  assert.match(line, /…\[\d+ bytes\]', connections 3\/4/, 'the long export name is cut, with its length');
  assert.match(line, /last error: server has no export \(server says: \\x1b\]0;pwned\\x07\\r\\nok\)$/);
  const json = statusJson([e]);
  assert.ok(!/[\x00-\x09\x0b-\x1f\x7f\u202e]/.test(json), 'no raw control characters in the JSON text either');
  const back = JSON.parse(json) as { export: string; server: string; lastError: string }[];
  assert.equal(back[0]!.export, hostileExport);
  assert.equal(back[0]!.server, 'evil\x1b[31m:10809');
  assert.equal(back[0]!.lastError, hostileError);
  // Not attached: the last error still shows on one line.
  writeState(state({ index: 1, device: '/dev/nbd1', identifier: 'x', lastError: 'gave up\nretry: \x1b[2J' }));
  assert.equal(formatStatus(statusOf(1, '/dev/nbd1', roots, () => false)), '/dev/nbd1: not attached (last error: gave up\\nretry: \\x1b[2J)');
  removeState(1, 1234);
  writeState(state({}));
});
