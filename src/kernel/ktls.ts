// Kernel TLS on a TCP socket about to be handed to the nbd driver: attach the "tls" upper-layer
// protocol (tls.ko, loaded on demand by the kernel as "tcp-ulp-tls") and install both directions'
// keys and record numbers (Documentation/networking/tls.rst). From then on the driver's plain
// sendmsg/recvmsg produce and consume TLS records in the kernel: no process on the data path.
// A record that is not application data (a KeyUpdate, an alert) makes the driver's recvmsg fail,
// which the kernel reports as a dead link, like any other broken connection.

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type net from 'node:net';
import createDebug from 'debug';
import { NbdError } from '../errors.ts';
import type { KernelTlsParams } from '../client/ktls.ts';
import { type AeadName, cryptoInfo } from '../client/ktls-keys.ts';
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
 * The crypto API primitives under each AEAD as the kernel builds it for TLS (net/tls/tls_sw.c
 * allocates "gcm(aes)" or "rfc7539(chacha20,poly1305)"; crypto/gcm.c instantiates gcm(aes) from
 * ctr(aes) and ghash, crypto/chacha20poly1305.c from chacha20 and poly1305).
 */
const PRIMITIVES: Record<AeadName, readonly string[]> = {
  'aes-128-gcm': ['aes', 'ghash'],
  'aes-256-gcm': ['aes', 'ghash'],
  'chacha20-poly1305': ['chacha20', 'poly1305'],
};
const asked = new Set<string>();

/**
 * The primitives of `aead` that /proc/crypto (its text) offers only as the portable C driver
 * ("aes-generic", "ghash-generic", …) or not at all: the module aliases worth asking for.
 */
export function slowPrimitives(aead: AeadName, procCrypto: string): string[] {
  const fast = new Set<string>();
  for (const block of procCrypto.split(/\n\s*\n/)) {
    const name = /^name\s*:\s*(\S+)/m.exec(block)?.[1];
    const driver = /^driver\s*:\s*(\S+)/m.exec(block)?.[1];
    if (name && driver && !driver.endsWith('-generic')) fast.add(name);
  }
  return PRIMITIVES[aead].filter((n) => !fast.has(n));
}

/** How long an attach waits for modprobe (it is never killed: see requestFastCiphers). */
const MODPROBE_WAIT_MS = 60_000;

/**
 * Ask modprobe, once per process, for the CPU's implementations of the suite's primitives when only
 * the generic C ones are registered. The kernel's own request_module ("crypto-NAME") happens only
 * for a name nothing provides yet, and Debian's kernel has the generic AES built in: without udev's
 * CPU-feature coldplug (an initramfs without it, a VM, a container's host), TLS would run on
 * table-driven AES although the CPU has AES-NI (measured in docs/decisions.md, "Kernel TLS: the
 * CPU's ciphers"). modprobe of the alias loads every module that provides it (aesni_intel,
 * ghash_clmulni_intel on x86; aes_ce_cipher, ghash_ce on arm64); the crypto API then prefers the
 * higher-priority driver. modprobe is waited for (at most MODPROBE_WAIT_MS) but never killed: the
 * kernel self-tests each algorithm a module registers while modprobe waits (killably), and a
 * modprobe killed there leaves those algorithms failing with ELIBBAD (seen under emulation). Failure
 * changes nothing but speed; it resolves, never rejects.
 */
export async function requestFastCiphers(aead: AeadName, procCrypto = '/proc/crypto'): Promise<void> {
  const names = PRIMITIVES[aead];
  if (names.every((n) => asked.has(n))) return;
  let missing: string[];
  try {
    missing = slowPrimitives(aead, readFileSync(procCrypto, 'latin1')).filter((n) => !asked.has(n));
  } catch {
    return;
  }
  for (const n of names) asked.add(n);
  if (missing.length === 0) return;
  const args = ['-q', '-a', ...missing.map((n) => `crypto-${n}`)];
  const t0 = Date.now();
  await new Promise<void>((resolve) => {
    let timer: NodeJS.Timeout | undefined;
    const done = (what: string): void => {
      if (timer) clearTimeout(timer);
      debug('modprobe %s: %s after %d ms', args.join(' '), what, Date.now() - t0);
      resolve();
    };
    let child;
    try {
      child = spawn('modprobe', args, { stdio: 'ignore' });
    } catch (e) {
      return done((e as Error).message);
    }
    child.once('error', (e) => done(e.message));
    child.once('exit', (code) => done(`exit ${code}`));
    timer = setTimeout(() => {
      child.unref();
      done('still running, not waited for');
    }, MODPROBE_WAIT_MS);
  });
}

/**
 * Install kernel TLS on the TCP socket of `params` (src/client/ktls.ts kernelTlsHandoff). Throws
 * NbdError NBD_E_KERNEL_TLS when the kernel cannot: the socket is then unusable (the caller
 * closes it and connects again through the relay).
 */
export async function installKernelTls(socket: net.Socket, params: KernelTlsParams): Promise<void> {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new NbdError('NBD_E_KERNEL_HANDOFF', 'attach: the server connection closed before kernel TLS was set up: try again');
  const steps: [string, () => void | Promise<void>][] = [
    ['TCP_ULP', () => libc.setsockopt(fd, IPPROTO_TCP, TCP_ULP, Buffer.from('tls', 'latin1'), 'TCP_ULP "tls"')],
    // With tls.ko present: the fast ciphers before the keys make the kernel instantiate the AEAD.
    ['ciphers', () => requestFastCiphers(params.suite.aead)],
    ['TLS_TX', () => libc.setsockopt(fd, SOL_TLS, TLS_TX, cryptoInfo(params.suite, params.tx.keys, params.tx.seq), 'SOL_TLS TLS_TX')],
    ['TLS_RX', () => libc.setsockopt(fd, SOL_TLS, TLS_RX, cryptoInfo(params.suite, params.rx.keys, params.rx.seq), 'SOL_TLS TLS_RX')],
  ];
  for (const [step, run] of steps) {
    try {
      await run();
    } catch (e) {
      throw refusal(step, params, e);
    }
  }
  debug('kernel TLS on fd %d: %s, next records: tx %d, rx %d', fd, params.description, params.tx.seq, params.rx.seq);
}
