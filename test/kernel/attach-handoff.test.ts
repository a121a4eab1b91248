// The socket handoff on its own (src/kernel/attach.ts takeSocketFd): dup the fd of a negotiated
// Node socket, destroy the Node socket, and the connection must survive with no FIN sent and no byte
// lost in either direction. Runs in the VM with the other kernel tests (loopback only, no module).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { NbdError } from '../../src/errors.ts';
import { takeSocketFd } from '../../src/kernel/attach.ts';
import * as libc from '../../native-bindings/libc.ts';
import { requireGuest } from './lib.ts';

requireGuest();

async function pair(): Promise<{ server: net.Server; client: net.Socket; peer: net.Socket }> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  const client = net.connect(port, '127.0.0.1');
  const [peer] = (await once(server, 'connection')) as [net.Socket];
  await once(client, 'connect');
  return { server, client, peer };
}

test('takeSocketFd: no FIN, nothing lost, the dup carries the connection on', async () => {
  const { server, client, peer } = await pair();
  let peerEnded = false;
  peer.on('end', () => (peerEnded = true));
  client.pause();
  const fd = takeSocketFd(client);
  assert.ok(client.destroyed, 'Node socket destroyed');
  // The peer sends after the handoff; the dup (wrapped again here, as the kernel would read it) gets every byte.
  const resumed = new net.Socket({ fd, readable: true, writable: true });
  const chunks: Buffer[] = [];
  resumed.on('data', (b: Buffer) => chunks.push(b));
  const payload = Buffer.alloc(256 * 1024, 0x5a);
  peer.write(payload);
  for (let i = 0; i < 200 && Buffer.concat(chunks).length < payload.length; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(Buffer.concat(chunks).length, payload.length);
  // And the other direction still works: the peer never saw a FIN.
  resumed.write('after');
  const [got] = (await once(peer, 'data')) as [Buffer];
  assert.equal(got.toString(), 'after');
  assert.equal(peerEnded, false, 'no FIN reached the server');
  resumed.destroy();
  peer.destroy();
  server.close();
});

test('takeSocketFd refuses a socket with unread bytes or one already closed', async () => {
  const { server, client, peer } = await pair();
  peer.write('unexpected');
  await new Promise<void>((r) => client.once('readable', () => r()));
  assert.ok(client.readableLength > 0);
  assert.throws(() => takeSocketFd(client), (e: unknown) => e instanceof NbdError && /unread/.test(e.message));
  client.destroy();
  assert.throws(() => takeSocketFd(client), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_KERNEL_HANDOFF');
  peer.destroy();
  server.close();
});

test('libc errors name the call and the errno', () => {
  assert.throws(
    () => libc.ioctl(987654, 0xab00, 0, 'NBD_SET_SOCK'),
    (e: unknown) => e instanceof libc.SyscallError && e.message === 'ioctl(NBD_SET_SOCK) failed: EBADF (Bad file descriptor)' && e.errno === 9 && e.syscall === 'ioctl(NBD_SET_SOCK)',
  );
  assert.throws(() => libc.dup(987654), /dup failed: EBADF/);
});
