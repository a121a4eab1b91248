// native-bindings socketEnded: whether a socket has ended, asked without reading from it (used on
// the duplicates of sockets handed to the kernel, and by the built-in server on paused connections).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import * as libc from '../../native-bindings/libc.ts';

function fdOf(s: net.Socket): number {
  return (s as unknown as { _handle: { fd: number } })._handle.fd;
}

test('socketEnded: false while live (also with unread data), true once the peer ended or the socket is gone', async () => {
  let peer: net.Socket | undefined;
  const srv = net.createServer((s) => (peer = s));
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const c = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise<void>((r) => c.once('connect', r));
  c.pause();
  const dup = libc.dup(fdOf(c));
  try {
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(libc.socketEnded(dup), false, 'live');
    peer!.write('unread bytes');
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(libc.socketEnded(dup), false, 'live with data waiting');
    peer!.end();
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(libc.socketEnded(dup), true, 'the peer shut its side down');
  } finally {
    libc.close(dup);
    c.destroy();
    srv.close();
  }
  assert.equal(libc.socketEnded(dup), true, 'a closed descriptor counts as ended (POLLNVAL)');
});
