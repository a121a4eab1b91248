// NBD_OPT_STARTTLS on the server side, once acknowledged (proto.md "TLS support"): the accepted
// socket is wrapped in a tls.TLSSocket as the server end (certificates or pre-shared keys), the TLS
// handshake has a deadline, and a client certificate is verified when required. It owns no
// connection state: the connection moves its listeners to the TLS socket (`wrapped`) and records
// why it failed (`failed`); the option haggling continues when `secured` is called.

import type net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import createDebug from '../debug.ts';
import type { TlsMode } from './handshake.ts';
import { peerVerificationError } from './socket-edge.ts';

const log = createDebug('nbd:server');

export interface ServerTlsOptions {
  mode: Exclude<TlsMode, 'off'>;
  context: tls.SecureContext;
  /** The TLS handshake must finish within this (default 30 s). */
  handshakeTimeoutMs?: number;
  /** Require a client certificate that verifies against the context's CA (nbdkit's --tls-verify-peer). */
  verifyPeer?: boolean;
  /** Pre-shared keys by identity (nbdkit's --tls-psk) instead of certificates; `context` then allows PSK suites. */
  psk?: ReadonlyMap<string, Buffer>;
}

export interface TlsUpgradeEvents {
  /** The TLS socket now carries the connection: its raw socket's listeners move over to it. */
  wrapped(secure: tls.TLSSocket): void;
  /** Why the TLS session is refused or broken (the socket is destroyed, or will close). */
  failed(reason: string): void;
  /** The TLS handshake finished (and the client's certificate verified, when required). */
  secured(): void;
}

/**
 * Run the TLS handshake on `raw` once the STARTTLS ACK queued on it has left in clear. The client
 * sends nothing until it has read the ACK, so no bytes are in flight between the two; `raw` must be
 * paused and no longer read by its owner.
 */
export function upgradeToTls(raw: Duplex, opts: ServerTlsOptions, ev: TlsUpgradeEvents): void {
  const wrap = (): void => {
    const verify = opts.verifyPeer === true;
    const psk = opts.psk;
    const secure = new tls.TLSSocket(raw as net.Socket, {
      isServer: true,
      secureContext: opts.context,
      requestCert: verify,
      rejectUnauthorized: verify,
      ...(psk && {
        pskCallback: (_socket: tls.TLSSocket, identity: string): Buffer | null => {
          const key = psk.get(identity) ?? null;
          if (!key) ev.failed(`TLS: unknown PSK identity ${JSON.stringify(identity)}`);
          return key;
        },
      }),
    } as tls.TLSSocketOptions);
    const timer = setTimeout(() => {
      ev.failed('TLS handshake did not finish in time');
      secure.destroy();
    }, opts.handshakeTimeoutMs ?? 30_000);
    timer.unref();
    secure.once('secure', () => {
      clearTimeout(timer);
      if (verify) {
        const refused = peerVerificationError(secure);
        if (refused) {
          const reason = `TLS client certificate refused: ${refused}`;
          ev.failed(reason);
          log('%s', reason);
          secure.destroy();
          return;
        }
      }
      log('TLS established: %s %s', secure.getProtocol(), secure.getCipher()?.name);
      ev.secured();
    });
    secure.once('close', () => clearTimeout(timer));
    ev.wrapped(secure);
  };
  // The ACK must leave in clear before TLS takes the socket over.
  if (raw.writableLength > 0) raw.once('drain', wrap);
  else wrap();
}
