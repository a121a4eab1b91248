// The hand-off from the attach command to the supervisor started beside it: what the environment
// carries is checked before any descriptor is trusted.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { handoffFailed, parseHandoff } from '../../src/supervisor/handoff.ts';
import { type SupervisorState, readState, writeState } from '../../src/supervisor/state.ts';
import { NbdError } from '../../src/errors.ts';

test('parseHandoff: a well-formed hand-off is read back exactly', () => {
  const h = { device: '/dev/nbd3', lockFd: 3, logFd: 4, logFile: '/run/nbd-attach/nbd3.log', keptFds: [5, 6] };
  assert.deepEqual(parseHandoff(JSON.stringify(h)), h);
});

test('parseHandoff: absent, malformed or out-of-range values are refused (undefined)', () => {
  assert.equal(parseHandoff(undefined), undefined);
  assert.equal(parseHandoff('not json'), undefined);
  const ok = { device: '/dev/nbd3', lockFd: 3, logFd: 4, logFile: '/x', keptFds: [5] };
  for (const bad of [
    { ...ok, lockFd: 0 }, // stdin is never a hand-off
    { ...ok, logFd: 2 },
    { ...ok, lockFd: 3.5 },
    { ...ok, keptFds: [5, -1] },
    { ...ok, keptFds: Array.from({ length: 17 }, (_, i) => 5 + i) },
    { ...ok, device: 7 },
    { ...ok, logFile: undefined },
  ]) {
    assert.equal(parseHandoff(JSON.stringify(bad)), undefined, JSON.stringify(bad));
  }
});

test('handoffFailed: a device detached before its supervisor started leaves no state file; other failures keep it; the log says why', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-handoff-'));
  const saved = process.env['NBD_ATTACH_RUN_DIR'];
  process.env['NBD_ATTACH_RUN_DIR'] = dir;
  t.after(() => {
    if (saved === undefined) delete process.env['NBD_ATTACH_RUN_DIR'];
    else process.env['NBD_ATTACH_RUN_DIR'] = saved;
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const logFile = path.join(dir, 'nbd7.log');
  const logFd = fs.openSync(logFile, 'a');
  t.after(() => fs.closeSync(logFd));
  const handoff = { device: '/dev/nbd7', lockFd: 3, logFd, logFile, keptFds: [] };
  // What the attach command writes for the supervisor it started (its pid: this process here).
  const state = { version: 1, index: 7, device: '/dev/nbd7', pid: process.pid, server: 'h:1', export: '', noOptGo: false, identifier: 'x', interface: 'netlink', connections: 1, liveConnections: 1, sizeBytes: '1', blockSize: 512, flags: 0, readOnly: false, requestTimeoutS: 10, deadTimeoutS: 60, reconnects: 0, startedAt: '', updatedAt: '' } satisfies SupervisorState;

  writeState(state);
  handoffFailed(handoff, new NbdError('NBD_E_FAILURE', 'supervise: something else'));
  assert.equal(readState(7)?.pid, process.pid, 'kept for --reattach');

  handoffFailed(handoff, new NbdError('NBD_E_DEVICE_NOT_ATTACHED', 'supervise: /dev/nbd7 is not attached'));
  assert.equal(readState(7), undefined, 'removed: the device is gone');

  writeState({ ...state, pid: process.pid + 1 });
  handoffFailed(handoff, new NbdError('NBD_E_DEVICE_NOT_ATTACHED', 'supervise: /dev/nbd7 is not attached'));
  assert.equal(readState(7)?.pid, process.pid + 1, "another process's state is left alone");

  const lines = fs.readFileSync(logFile, 'utf8').trim().split('\n');
  assert.equal(lines.length, 3);
  assert.match(lines[1]!, new RegExp(`^\\S+ nbd7\\[${process.pid}\\]: supervisor not started: supervise: /dev/nbd7 is not attached$`));
});
