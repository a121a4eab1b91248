// The test helpers' check that the port a server listens on is held by the server they started,
// not by another test's process that took the same "free" port first.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { test } from 'node:test';
import { isListening, listenerHeldBy } from '../lib/servers.ts';

test('a listening port is attributed to the process holding it, and to nobody else', async () => {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  const stranger = spawn('sleep', ['30'], { stdio: 'ignore' });
  try {
    assert.equal(isListening(port), true);
    assert.equal(listenerHeldBy(port, [process.pid]), true);
    assert.equal(listenerHeldBy(port, [stranger.pid ?? -1]), false);
    // A parent counts through its children: the daemon forked by a launcher still counts.
    assert.equal(listenerHeldBy(port, [process.ppid]), true);
  } finally {
    stranger.kill('SIGKILL');
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
  assert.equal(isListening(port), false);
  assert.equal(listenerHeldBy(port, [process.pid]), false);
});
