// TLS for our client: the STARTTLS upgrade of a handshake socket (node:tls over the connected socket,
// driven by src/client/negotiate.ts when the pure handshake asks for it), and the relay that lets the
// kernel use such a connection. The kernel's nbd driver cannot do TLS, so, as nbd-client's TLS proxy
// does, the kernel gets one end of a socketpair and this (resident) process moves bytes between the
// other end and the TLS stream. Either side closing closes the other: a dead server link shows the
// kernel a dead socket (and the supervisor reconnects); the kernel dropping its socket ends TLS.

import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import createDebug from '../debug.ts';
import type { Endpoint, TlsSettings } from '../address.ts';
import { NbdError } from '../errors.ts';
import { loadPskFile } from '../tls-files.ts';
import { socketPair } from '../socket-pair.ts';

const debug = createDebug('nbd:tls');

function usage(message: string): NbdError {
  return new NbdError('NBD_E_USAGE', `TLS: ${message}`);
}

function readPem(file: string, what: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw usage(`cannot read the ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** The name the server's certificate must carry: -H/tls-hostname, else the host (unix sockets: localhost, as libnbd). */
export function tlsHostname(settings: TlsSettings, endpoint: Endpoint): string {
  return settings.hostname ?? (endpoint.kind === 'tcp' ? endpoint.host : 'localhost');
}

/**
 * node:tls options from the settings, reading the files now so a wrong path fails before connecting.
 * Certificates: -A/-F/-K, else the directory's ca-cert.pem / client-cert.pem / client-key.pem (libnbd
 * and qemu), else the system's CAs and no client certificate. PSK: the key of `username` (default
 * the login name) from the file. The server is verified unless verifyPeer is false (uri.md).
 */
export function tlsConnectOptions(settings: TlsSettings, endpoint: Endpoint): tls.ConnectionOptions {
  const host = tlsHostname(settings, endpoint);
  const base: tls.ConnectionOptions = { host, minVersion: 'TLSv1.2', rejectUnauthorized: settings.verifyPeer !== false };
  // SNI takes names only (RFC 6066 section 3): never an IP address.
  if (net.isIP(host) === 0) base.servername = host;
  if (settings.pskFile !== undefined) {
    if (settings.caFile !== undefined || settings.certFile !== undefined || settings.keyFile !== undefined || settings.certificatesDir !== undefined) {
      throw usage('give certificates or a pre-shared key file (--tls-psk), not both');
    }
    const keys = loadPskFile(settings.pskFile, '--tls-psk');
    const identity = settings.username ?? os.userInfo().username;
    const psk = keys.get(identity);
    if (!psk) throw usage(`${settings.pskFile} has no key for identity '${identity}': give the identity with --tls-username or as user@ in an nbds:// URI`);
    // 'PSK' names the TLS 1.2 PSK suites, which every NBD server's GnuTLS or OpenSSL offers; no certificate to check.
    return { ...base, ciphers: 'PSK', maxVersion: 'TLSv1.2', pskCallback: () => ({ psk, identity }), checkServerIdentity: () => undefined };
  }
  const dir = settings.certificatesDir;
  if (dir !== undefined && !existsSync(dir)) throw usage(`certificate directory ${dir} does not exist`);
  const inDir = (name: string): string | undefined => (dir !== undefined && existsSync(path.join(dir, name)) ? path.join(dir, name) : undefined);
  const caFile = settings.caFile ?? inDir('ca-cert.pem');
  const certFile = settings.certFile ?? inDir('client-cert.pem');
  const keyFile = settings.keyFile ?? inDir('client-key.pem');
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw usage(certFile === undefined ? 'a client key (-K/--keyfile) needs its certificate (-F/--certfile)' : 'a client certificate (-F/--certfile) needs its key (-K/--keyfile)');
  }
  const out: tls.ConnectionOptions = { ...base };
  if (caFile !== undefined) out.ca = readPem(caFile, 'CA certificate file');
  if (certFile !== undefined && keyFile !== undefined) {
    out.cert = readPem(certFile, 'client certificate');
    out.key = readPem(keyFile, 'client key');
  }
  return out;
}

/** One line for a failed TLS handshake, saying what to change. */
export function describeTlsFailure(err: NodeJS.ErrnoException, host: string): string {
  switch (err.code) {
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
      return `the server's certificate is not signed by a CA we trust: give its CA with -A/--cacertfile (or tls-certificates=DIR with ca-cert.pem)`;
    case 'ERR_TLS_CERT_ALTNAME_INVALID':
      return `the server's certificate is not for '${host}': give the name it carries with -H/--tlshostname`;
    case 'CERT_HAS_EXPIRED':
      return "the server's certificate has expired";
    case 'CERT_NOT_YET_VALID':
      return "the server's certificate is not valid yet (check the clocks)";
    case 'ECONNRESET':
    case 'EPIPE':
      return 'the server closed the connection during the TLS handshake: it may want a client certificate (-F/--certfile, -K/--keyfile), another pre-shared key, or no TLS';
  }
  return err.message;
}

/** Run the TLS handshake on a connected socket whose NBD_OPT_STARTTLS the server just acknowledged. */
export function startTls(socket: net.Socket, options: tls.ConnectionOptions, where: string, setUp?: (secure: tls.TLSSocket) => void): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const secure = tls.connect({ ...options, socket });
    setUp?.(secure);
    const fail = (err: NodeJS.ErrnoException): void => {
      secure.destroy();
      reject(new NbdError('NBD_E_TLS', `TLS with ${where} failed: ${describeTlsFailure(err, String(options.host))}`, { cause: err }));
    };
    const closed = (): void => fail(Object.assign(new Error('closed'), { code: 'ECONNRESET' }));
    secure.once('error', fail);
    secure.once('close', closed);
    secure.once('secureConnect', () => {
      secure.off('error', fail);
      secure.off('close', closed);
      debug('TLS %s with %s (%s)', secure.getProtocol(), where, secure.getCipher()?.name);
      resolve(secure);
    });
  });
}

/**
 * Give the kernel a plain socket for a TLS connection: a socketpair whose other end this process
 * relays to and from `secure`. Returns the kernel's end (a paused net.Socket to hand over with
 * takeSocketFd). The relay lives as long as both sides do.
 */
export function relayForKernel(secure: tls.TLSSocket, where: string): net.Socket {
  const [near, kernelSide] = socketPair();
  kernelSide.pause();
  let ended = false;
  const end = (why: string) => (err?: Error): void => {
    if (ended) return;
    ended = true;
    debug('relay for %s ends: %s%s', where, why, err ? ` (${err.message})` : '');
    // Let what is in flight drain (a DISC, a last reply), then make sure both sides are gone.
    near.end();
    secure.end();
    setTimeout(() => {
      near.destroy();
      secure.destroy();
    }, 1000).unref();
  };
  secure.on('error', end('TLS connection failed'));
  near.on('error', end('kernel side failed'));
  secure.on('close', end('TLS connection closed'));
  near.on('close', end('kernel side closed'));
  secure.pipe(near);
  near.pipe(secure);
  debug('relaying %s for the kernel (socketpair)', where);
  return kernelSide;
}
