// The body of `nbd-attach serve` (src/commands/serve.ts registers the command): loaded only when
// the command runs, so that other commands never load the server or TLS.

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import tls from 'node:tls';
import { NbdError } from '../errors.ts';
import { DEFAULT_PORT } from '../protocol/constants.ts';
import type { ConnectionOptions } from '../server/connection.ts';
import { fileExport, formatSize, memoryExport, parseSize, startServer, type ServedExport } from '../server/index.ts';
import { display } from '../text.ts';
import { isReadOnly } from '../server/export.ts';
import { loadPskFile } from '../tls-files.ts';
import { type ServeOptions, planExports } from './serve.ts';

/**
 * The server's TLS context from an X.509 directory laid out as for nbdkit and qemu
 * (`--tls-certificates`/`tls-creds-x509`): server-cert.pem and server-key.pem (ca-cert.pem, when
 * present, is sent along as the chain).
 */
export function loadTlsContext(dir: string): tls.SecureContext {
  const read = (name: string): Buffer => {
    try {
      return readFileSync(join(dir, name));
    } catch (err) {
      throw new NbdError('NBD_E_USAGE', `serve --tls-certificates: cannot read ${join(dir, name)}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; the directory needs server-cert.pem and server-key.pem`);
    }
  };
  const ca = existsSync(join(dir, 'ca-cert.pem')) ? read('ca-cert.pem') : undefined;
  try {
    return tls.createSecureContext({ cert: read('server-cert.pem'), key: read('server-key.pem'), ...(ca ? { ca } : {}) });
  } catch (err) {
    if (err instanceof NbdError) throw err;
    throw new NbdError('NBD_E_USAGE', `serve --tls-certificates ${dir}: ${(err as Error).message}`);
  }
}

/**
 * The server's TLS settings from serve's options (a usage error for combinations that make no sense),
 * and how the start-up line describes them; undefined with --tls off.
 */
function tlsSettingsOf(opts: ServeOptions): { config: NonNullable<ConnectionOptions['tls']>; note: string } | undefined {
  const mode = opts.tls;
  if (opts.tlsPsk !== undefined && opts.tlsCertificates !== undefined) {
    throw new NbdError('NBD_E_USAGE', 'serve: give either --tls-certificates or --tls-psk, not both');
  }
  for (const [given, flag] of [[opts.tlsCertificates !== undefined, '--tls-certificates'], [opts.tlsVerifyPeer, '--tls-verify-peer'], [opts.tlsPsk !== undefined, '--tls-psk']] as const) {
    if (mode === 'off' && given) throw new NbdError('NBD_E_USAGE', `serve ${flag}: also give --tls on or --tls require`);
  }
  if (mode === 'off') return undefined;
  const how = `; TLS ${mode === 'require' ? 'required' : 'offered'}`;
  if (opts.tlsPsk !== undefined) {
    if (opts.tlsVerifyPeer) throw new NbdError('NBD_E_USAGE', 'serve --tls-verify-peer checks certificates: with --tls-psk a client proves itself by its key');
    const psk = loadPskFile(opts.tlsPsk, 'serve --tls-psk');
    // 'PSK' names the TLS 1.2 PSK suites; TLS 1.3 suites need no change to take a PSK.
    return { config: { mode, context: tls.createSecureContext({ ciphers: 'PSK' }), psk }, note: `${how}, pre-shared keys (${psk.size})` };
  }
  const dir = opts.tlsCertificates;
  if (dir === undefined) throw new NbdError('NBD_E_USAGE', `serve --tls ${mode}: give --tls-certificates DIR (server-cert.pem, server-key.pem) or --tls-psk FILE`);
  const verifyPeer = opts.tlsVerifyPeer === true;
  if (verifyPeer && !existsSync(join(dir, 'ca-cert.pem'))) {
    throw new NbdError('NBD_E_USAGE', `serve --tls-verify-peer: ${join(dir, 'ca-cert.pem')} is missing: clients are verified against it`);
  }
  return { config: { mode, context: loadTlsContext(dir), verifyPeer }, note: `${how}${verifyPeer ? ', client certificates verified' : ''}` };
}

function describe(e: ServedExport): string {
  const name = e.name === '' ? '(default)' : display(e.name);
  const size = e.backend.description.startsWith('memory') ? '' : `, ${formatSize(e.backend.size)}`;
  return `${name} (${display(e.backend.description)}${size}${isReadOnly(e) ? ', read-only' : ''})`;
}

/** Serve until SIGTERM/SIGINT. */
export async function runServe(files: string[], opts: ServeOptions): Promise<void> {
  const tlsSettings = tlsSettingsOf(opts);
  if (opts.unix !== undefined && opts.port !== undefined) {
    throw new NbdError('NBD_E_USAGE', 'serve: give either --port or --unix, not both');
  }
  const plan = planExports(files, opts.memory, opts.name);
  if (opts.description.length > plan.length) {
    throw new NbdError('NBD_E_USAGE', `serve: ${opts.description.length} --description given for ${plan.length} export(s); drop the extra --description`);
  }
  const exports: ServedExport[] = [];
  try {
    for (const [i, p] of plan.entries()) {
      const description = opts.description[i];
      const how = { name: p.name, readOnly: opts.readOnly ?? false, ...(description !== undefined ? { description } : {}) };
      if (p.kind === 'file') exports.push(await fileExport(p.source, how));
      else exports.push(memoryExport(parseSize(p.source), how));
    }
  } catch (err) {
    await Promise.all(exports.map((e) => e.backend.close().catch(() => undefined)));
    throw err;
  }
  const srv = await startServer({
    exports,
    ...(opts.unix !== undefined ? { unix: opts.unix } : { port: opts.port ?? DEFAULT_PORT, host: opts.bind }),
    connection: { handshakeTimeoutMs: opts.handshakeTimeout * 1000, ...(tlsSettings ? { tls: tlsSettings.config } : {}) },
    maxConnections: opts.maxConnections,
    maxConnectionsPerAddress: opts.maxConnectionsPerAddress,
  });
  process.stdout.write(`nbd-attach serve: listening on ${srv.address}${tlsSettings?.note ?? ''}; exports: ${exports.map(describe).join(', ')}\n`);

  // SIGTERM/SIGINT: finish in-flight requests, flush, close; a second signal exits at once.
  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (signal: NodeJS.Signals): void => {
      if (stopping) process.exit(128 + (signal === 'SIGINT' ? 2 : 15));
      stopping = true;
      srv.close().then(resolve, (err: unknown) => {
        process.stderr.write(`nbd-attach: serve: closing: ${(err as Error).message}\n`);
        resolve();
      });
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });
}
