// `nbd-attach serve FILE|NAME=FILE… [--memory SIZE]… [--name EXPORT]… [--description TEXT]… [--port N | --unix PATH]
//  [--bind ADDR] [--read-only] [--tls on|require (--tls-certificates DIR [--tls-verify-peer] | --tls-psk FILE)]`: the built-in NBD server,
//  usable by any NBD client.

import { existsSync } from 'node:fs';
import { basename } from 'node:path';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { NbdError } from '../errors.ts';
import { DEFAULT_PORT } from '../protocol/constants.ts';
import { DEFAULT_HANDSHAKE_TIMEOUT_MS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS } from '../server/defaults.ts';

export interface ServeOptions {
  memory: string[];
  name: string[];
  description: string[];
  port?: number;
  unix?: string;
  bind: string;
  readOnly?: boolean;
  tls: (typeof TLS_MODES)[number];
  tlsCertificates?: string;
  tlsVerifyPeer?: boolean;
  tlsPsk?: string;
  handshakeTimeout: number;
  maxConnections: number;
  maxConnectionsPerAddress: number;
}

const TLS_MODES = ['off', 'on', 'require'] as const;

const collect = (value: string, previous: string[]): string[] => [...previous, value];

function seconds(text: string): number {
  if (!/^\d+(\.\d+)?$/.test(text)) throw new InvalidArgumentError(`'${text}' is not a number of seconds (0 = no limit)`);
  return Number(text);
}

function count(text: string): number {
  if (!/^\d+$/.test(text) || Number(text) < 1) throw new InvalidArgumentError(`'${text}' is not a positive whole number`);
  return Number(text);
}

function port(text: string): number {
  if (!/^\d+$/.test(text) || Number(text) > 65535) throw new InvalidArgumentError(`'${text}' is not a port number (0-65535)`);
  return Number(text);
}

interface Planned {
  kind: 'file' | 'memory';
  source: string; // path, or size text
  name: string | undefined; // explicit NAME=FILE
}

/** Pure: which exports to create from the arguments, with their names. Exported for tests. */
export function planExports(files: readonly string[], memory: readonly string[], names: readonly string[], fileExists = existsSync): { kind: 'file' | 'memory'; source: string; name: string }[] {
  const planned: Planned[] = [];
  for (const arg of files) {
    const eq = arg.indexOf('=');
    if (eq > 0 && !fileExists(arg)) planned.push({ kind: 'file', source: arg.slice(eq + 1), name: arg.slice(0, eq) });
    else planned.push({ kind: 'file', source: arg, name: undefined });
  }
  for (const size of memory) planned.push({ kind: 'memory', source: size, name: undefined });
  if (planned.length === 0) throw new NbdError('NBD_E_USAGE', 'serve: nothing to serve; give a FILE, NAME=FILE or --memory SIZE');
  const unnamed = planned.filter((p) => p.name === undefined);
  if (names.length > unnamed.length) {
    throw new NbdError('NBD_E_USAGE', `serve: ${names.length} --name given for ${unnamed.length} unnamed export(s); drop the extra --name`);
  }
  names.forEach((n, i) => (unnamed[i]!.name = n));
  const memories = planned.filter((p) => p.kind === 'memory').length;
  let m = 0;
  const out = planned.map((p) => {
    const name = p.name ?? (p.kind === 'file' ? basename(p.source) : memories > 1 ? `memory${m++}` : 'memory');
    return { kind: p.kind, source: p.source, name };
  });
  const seen = new Set<string>();
  for (const p of out) {
    if (seen.has(p.name)) throw new NbdError('NBD_E_USAGE', `serve: export name ${JSON.stringify(p.name)} used twice; name exports with --name or NAME=FILE`);
    seen.add(p.name);
  }
  return out;
}

export function register(program: Command): void {
  program
    .command('serve')
    .description('serve files or memory over NBD to any client (qemu, nbdcopy, nbd-client, nbd-attach)')
    .argument('[files...]', 'FILE or NAME=FILE to export (regular file or block device)')
    .option('-m, --memory <size>', 'also export a sparse in-memory disk of SIZE (e.g. 1G, 512M); repeatable', collect, [])
    .option('-N, --name <export>', 'name for the next unnamed export, in order; repeatable (default: file name)', collect, [])
    .option('-D, --description <text>', 'description for the exports in order (NBD_INFO_DESCRIPTION, NBD_OPT_LIST); repeatable (default: what backs it, e.g. "file /srv/disk.img")', collect, [])
    .option('-p, --port <n>', `TCP port (default ${DEFAULT_PORT}; 0 picks a free one)`, port)
    .option('-u, --unix <path>', 'listen on a unix-domain socket instead of TCP')
    .option('-b, --bind <addr>', 'address to listen on', '127.0.0.1')
    .option('-r, --read-only', 'refuse writes (clients see NBD_FLAG_READ_ONLY)')
    .addOption(new Option('--tls <mode>', 'TLS through NBD_OPT_STARTTLS: on (offered) or require (all options need it first)').choices(TLS_MODES).default('off'))
    .option('--tls-certificates <dir>', 'X.509 directory with server-cert.pem and server-key.pem (as for nbdkit and qemu); needed with --tls on|require')
    .option('--tls-verify-peer', 'with TLS, accept only clients whose certificate is signed by the directory\'s ca-cert.pem')
    .option('--tls-psk <file>', 'with TLS, pre-shared keys instead of certificates: lines IDENTITY:HEXKEY (as nbdkit and psktool)')
    .option('--handshake-timeout <seconds>', 'close a client that has not finished negotiating within this (0: no limit)', seconds, DEFAULT_HANDSHAKE_TIMEOUT_MS / 1000)
    .option('--max-connections <n>', 'connections open at once; more are closed when accepted', count, DEFAULT_MAX_CONNECTIONS)
    .option('--max-connections-per-address <n>', 'connections open at once from one client IP address', count, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)
    .action(async (files: string[], opts: ServeOptions) => {
      const { runServe } = await import('./serve-run.ts');
      await runServe(files, opts);
    });
}
