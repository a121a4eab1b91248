// `status` from a fake sysfs tree and state files (no kernel): attached or not, size, server,
// export, connections live/total, supervisor pid (alive or not), reconnects, last error.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { formatStatus, statusOf } from '../../src/commands/status.ts';
import { type SupervisorState, readState, removeState, stateFile, writeState } from '../../src/supervisor/state.ts';

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
  const e = statusOf(0, '/dev/nbd0', roots, (pid) => pid === 1234);
  assert.deepEqual(e, {
    device: '/dev/nbd0', index: 0, attached: true, sizeBytes: 67108864, kernelPid: 4242, identifier: 'id-0', server: '10.0.0.1:10809',
    export: 'disk', connections: { live: 3, total: 4 }, supervisorPid: 1234, reconnects: 2, lastError: 'connection refused',
  });
  assert.equal(formatStatus(e), "/dev/nbd0: attached, 64 MiB, server 10.0.0.1:10809, export 'disk', connections 3/4, supervisor pid 1234, reconnects 2, last error: connection refused");
});

test('supervisor dead: shown as no supervisor, with the hint to adopt', () => {
  const e = statusOf(0, '/dev/nbd0', roots, () => false);
  assert.equal(e.supervisorPid, null);
  assert.match(formatStatus(e), /no supervisor \(adopt it with nbd-attach --reattach\)/);
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

test('state files: atomic write, read back, removed only by their owner', () => {
  writeState(state({ index: 5, pid: process.pid }));
  assert.equal(readState(5)?.pid, process.pid);
  removeState(5, process.pid + 1);
  assert.ok(fs.existsSync(stateFile(5)), 'another pid does not remove it');
  removeState(5, process.pid);
  assert.equal(readState(5), undefined);
  assert.deepEqual(fs.readdirSync(path.dirname(stateFile(5))).filter((f) => f.endsWith('.tmp')), []);
});

test('a TLS device: shown as such; without its supervisor, says that I/O waits for --reattach; settings read back', () => {
  writeState(state({ tls: { certificatesDir: '/etc/pki/nbd', hostname: 'disk.example' } }));
  assert.deepEqual(readState(0)?.tls, { certificatesDir: '/etc/pki/nbd', hostname: 'disk.example' }, 'the state file keeps the TLS settings for --reattach');
  const live = statusOf(0, '/dev/nbd0', roots, (pid) => pid === 1234);
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
