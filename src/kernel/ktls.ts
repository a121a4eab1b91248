// Kernel TLS on a TCP socket about to be handed to the nbd driver: attach the "tls" upper-layer
// protocol (tls.ko, loaded on demand by the kernel as "tcp-ulp-tls") and install both directions'
// keys and record numbers (Documentation/networking/tls.rst). From then on the driver's plain
// sendmsg/recvmsg produce and consume TLS records in the kernel: no process on the data path.
// A record that is not application data (a KeyUpdate, an alert) makes the driver's recvmsg fail,
// which the kernel reports as a dead link, like any other broken connection.

import type net from 'node:net';
import createDebug from '../debug.ts';
import { NbdError } from '../errors.ts';
import type { KernelTlsParams } from '../client/ktls.ts';
import { cryptoInfo } from '../client/ktls-keys.ts';
import * as libc from '../../native-bindings/libc.ts';
import { SOL_TLS, TCP_ULP, TLS_RX, TLS_TX } from './constants.ts';
import { IPPROTO_TCP } from './constants.ts';

const debug = createDebug('nbd:ktls');

/** Why the kernel refused, in words that say what to do. */
function refusal(step: string, params: KernelTlsParams, e: unknown): NbdError {
  const code = (e as { code?: string }).code ?? '';
  let why: string;
  if (step === 'TCP_ULP' && code === 'ENOENT') why = 'this kernel has no TLS module (tls.ko; CONFIG_TLS): load it with modprobe tls';
  else if (step === 'TCP_ULP') why = `cannot attach the tls protocol to the socket: ${(e as Error).message}`;
  // crypto/api.c: an algorithm that failed its self-test is looked up as ELIBBAD.
  else if (code === 'ELIBBAD') why = `the kernel's ${params.description} cipher failed its self-test (see dmesg)`;
  else if (code === 'EINVAL' || code === 'ENOPROTOOPT' || code === 'EOPNOTSUPP' || code === 'ENOENT') why = `this kernel's TLS cannot carry ${params.description} (${code})`;
  else why = `${step}: ${(e as Error).message}`;
  return new NbdError('NBD_E_KERNEL_TLS', `kernel TLS: ${why}`, { cause: e });
}

/**
 * Install kernel TLS on the TCP socket of `params` (src/client/ktls.ts kernelTlsHandoff). Throws
 * NbdError NBD_E_KERNEL_TLS when the kernel cannot: the socket is then unusable (the caller
 * closes it and connects again through the relay).
 */
export function installKernelTls(socket: net.Socket, params: KernelTlsParams): void {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new NbdError('NBD_E_KERNEL_HANDOFF', 'attach: the server connection closed before kernel TLS was set up: try again');
  const steps: [string, () => void][] = [
    ['TCP_ULP', () => libc.setsockopt(fd, IPPROTO_TCP, TCP_ULP, Buffer.from('tls', 'latin1'), 'TCP_ULP "tls"')],
    ['TLS_TX', () => libc.setsockopt(fd, SOL_TLS, TLS_TX, cryptoInfo(params.suite, params.tx.keys, params.tx.seq), 'SOL_TLS TLS_TX')],
    ['TLS_RX', () => libc.setsockopt(fd, SOL_TLS, TLS_RX, cryptoInfo(params.suite, params.rx.keys, params.rx.seq), 'SOL_TLS TLS_RX')],
  ];
  for (const [step, run] of steps) {
    try {
      run();
    } catch (e) {
      throw refusal(step, params, e);
    }
  }
  debug('kernel TLS on fd %d: %s, next records: tx %d, rx %d', fd, params.description, params.tx.seq, params.rx.seq);
}
