// A connected AF_UNIX stream pair as two net.Sockets: one end for this process, the other to hand to
// the kernel (takeSocketFd). Used by local attach (the in-process server's connections) and by the
// TLS relay (the kernel's plain side of an encrypted connection).

import net from 'node:net';
import * as libc from '../native-bindings/libc.ts';
import { AF_UNIX, SOCK_CLOEXEC, SOCK_STREAM } from './kernel/constants.ts';

/** socketpair(2), both ends wrapped; nothing leaks if wrapping fails. */
export function socketPair(): [net.Socket, net.Socket] {
  const [fdA, fdB] = libc.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC);
  let a: net.Socket;
  try {
    a = new net.Socket({ fd: fdA, readable: true, writable: true });
  } catch (e) {
    libc.close(fdA);
    libc.close(fdB);
    throw e;
  }
  try {
    return [a, new net.Socket({ fd: fdB, readable: true, writable: true })];
  } catch (e) {
    a.destroy();
    libc.close(fdB);
    throw e;
  }
}
