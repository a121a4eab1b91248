// Option parsing shared by the commands that talk to a server (attach, list, info, …).

import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { type Target, type TlsSettings, parseAddress } from '../address.ts';
import { NbdError } from '../errors.ts';
import { DEFAULT_CONNECT_TIMEOUT_MS } from '../client/defaults.ts';
import { transmissionFlagNames } from '../protocol/constants.ts';
import type { ExportInfo } from '../protocol/handshake.ts';
import { formatByteCount } from '../server/size.ts';
import { jsonString } from '../text.ts';

export interface ServerOptions {
  name?: string;
  unix?: string;
  connectTimeout: number;
  noOptgo?: boolean;
  /** TLS, with nbd-client's option names (-x, -A, -F, -K, -H) and libnbd's (certificates dir, PSK). */
  tls?: boolean;
  cacertfile?: string;
  certfile?: string;
  keyfile?: string;
  tlshostname?: string;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsUsername?: string;
  /** false with --no-tls-verify. */
  tlsVerify?: boolean;
  tlsRelay?: boolean;
}

/** Commander parser for a duration in seconds (integer or decimal); returns milliseconds. */
export function seconds(text: string): number {
  if (!/^\d+(\.\d+)?$/.test(text)) throw new InvalidArgumentError(`'${text}' is not a number of seconds`);
  return Math.round(Number(text) * 1000);
}

/** -N, -u, --connect-timeout: how to reach the server and which export. */
export function addServerOptions(cmd: Command, { name = true }: { name?: boolean } = {}): Command {
  if (name) cmd.option('-N, --name <export>', "export name (default: the server's default export)");
  return cmd
    .option('-u, --unix <path>', 'connect to a unix-domain socket instead of TCP')
    .option('-x, --tls', 'negotiate TLS (NBD_OPT_STARTTLS) and fail if the server cannot; an nbds:// URI or any TLS option below implies it')
    .option('-A, --cacertfile <file>', "with TLS, trust the CAs in this PEM file for the server's certificate (default: the system's CAs)")
    .option('-F, --certfile <file>', 'with TLS, present this client certificate (PEM; with -K)')
    .option('-K, --keyfile <file>', "with TLS, the client certificate's key (PEM)")
    .option('-H, --tlshostname <name>', "with TLS, the name the server's certificate must carry (default: the host)")
    .option('--tls-certificates <dir>', 'with TLS, a directory with ca-cert.pem and optionally client-cert.pem and client-key.pem (as for libnbd and qemu)')
    .option('--tls-psk <file>', 'with TLS, a pre-shared key instead of certificates: file of IDENTITY:HEXKEY lines (as psktool writes)')
    .option('--tls-username <name>', 'with --tls-psk, the identity to use (default: your login name)')
    .option('--no-tls-verify', "with TLS, do not check the server's certificate (encryption without authentication)")
    .option('--tls-relay', 'with TLS, keep the encryption in the supervisor (a relay on the data path, as nbd-client) instead of kernel TLS')
    .addOption(
      new Option('--connect-timeout <seconds>', 'give up connecting and negotiating after this long')
        .argParser(seconds)
        .default(DEFAULT_CONNECT_TIMEOUT_MS, '10'),
    );
}

/**
 * Where to connect and which export, from positionals and options. `host` may be HOST, HOST:PORT,
 * [V6]:PORT or a URI; `port` is nbd-client's separate port argument; `-u PATH` replaces both.
 */
export function resolveTarget(host: string | undefined, port: string | undefined, opts: ServerOptions): { target: Target; exportName: string } {
  let target: Target;
  if (opts.unix !== undefined) {
    if (host !== undefined) throw new NbdError('NBD_E_USAGE', `-u/--unix gives the server: drop '${host}'`);
    target = { endpoint: { kind: 'unix', path: opts.unix }, tls: false };
  } else {
    if (host === undefined) throw new NbdError('NBD_E_USAGE', 'no server given: nbd-attach HOST[:PORT] …, an nbd:// URI, or -u SOCKET');
    target = parseAddress(host, port);
  }
  target = { ...target, tls: tlsFromOptions(target.tls, opts) };
  if (opts.name !== undefined && target.exportName !== undefined && target.exportName !== opts.name) {
    throw new NbdError('NBD_E_USAGE', `export named twice: '${target.exportName}' in the URI and '${opts.name}' with -N`);
  }
  return { target, exportName: opts.name ?? target.exportName ?? '' };
}

/**
 * TLS settings from the URI's (nbds://…?tls-…) and the options, options winning. Any TLS option turns
 * TLS on, as with nbd-client's -F/-K/-A; without one, a plain nbd:// target stays plain.
 */
export function tlsFromOptions(fromUri: Target['tls'], opts: ServerOptions): Target['tls'] {
  const given: TlsSettings = {};
  if (opts.cacertfile !== undefined) given.caFile = opts.cacertfile;
  if (opts.certfile !== undefined) given.certFile = opts.certfile;
  if (opts.keyfile !== undefined) given.keyFile = opts.keyfile;
  if (opts.tlshostname !== undefined) given.hostname = opts.tlshostname;
  if (opts.tlsCertificates !== undefined) given.certificatesDir = opts.tlsCertificates;
  if (opts.tlsPsk !== undefined) given.pskFile = opts.tlsPsk;
  if (opts.tlsUsername !== undefined) given.username = opts.tlsUsername;
  if (opts.tlsVerify === false) given.verifyPeer = false;
  if (opts.tlsRelay === true) given.relay = true;
  if (fromUri === false && opts.tls !== true && Object.keys(given).length === 0) return false;
  const merged: TlsSettings = { ...(fromUri || {}), ...given };
  // Absolute paths: the supervisor's state file keeps them for reconnects and a later --reattach
  // run from another directory.
  for (const k of ['caFile', 'certFile', 'keyFile', 'certificatesDir', 'pskFile'] as const) {
    const v = merged[k];
    if (v !== undefined) merged[k] = path.resolve(v);
  }
  return merged;
}

/** 1073741824 → "1 GiB" (one formatter: src/server/size.ts); exact bytes are printed alongside where it matters. */
export const formatSize = formatByteCount;

/** Flag names for people: "read-only, flush, fua, trim, multi-conn". */
export function formatFlags(flags: number): string {
  const names = transmissionFlagNames(flags).map((f) => f.toLowerCase().replace(/^send_/, '').replace(/_/g, '-'));
  return names.length ? names.join(', ') : 'none';
}

/**
 * An export as plain JSON (sizes as numbers when exact, strings otherwise). Names and descriptions are
 * the server's exact strings; one that is not valid UTF-8 also comes as `<field>Hex` (src/text.ts).
 */
export function exportJson(info: ExportInfo): Record<string, unknown> {
  const size = info.size <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(info.size) : info.size.toString();
  return {
    ...jsonString('name', info.name),
    ...(info.canonicalName !== undefined ? jsonString('canonicalName', info.canonicalName) : {}),
    ...(info.description !== undefined ? jsonString('description', info.description) : {}),
    size,
    flags: info.flags,
    flagNames: transmissionFlagNames(info.flags).map((f) => f.toLowerCase()),
    ...(info.blockSize ? { blockSize: info.blockSize } : {}),
  };
}
