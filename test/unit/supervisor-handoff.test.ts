// The hand-off from the attach command to the supervisor started beside it: what the environment
// carries is checked before any descriptor is trusted.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseHandoff } from '../../src/supervisor/handoff.ts';

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
