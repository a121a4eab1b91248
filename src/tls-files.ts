// Key files both TLS sides read: the pre-shared-key file of nbdkit's --tls-psk, GnuTLS's psktool,
// libnbd's tls-psk-file and qemu's tls-creds-psk (one `identity:hexkey` per line).

import { readFileSync } from 'node:fs';
import { NbdError } from './errors.ts';

/** Identity → key. `what` names the option in messages ("serve --tls-psk"). Usage error when unreadable or malformed. */
export function loadPskFile(file: string, what: string): Map<string, Buffer> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new NbdError('NBD_E_USAGE', `${what}: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '') return;
    const m = /^([^:]+):((?:[0-9a-fA-F]{2})+)$/.exec(line);
    if (!m) throw new NbdError('NBD_E_USAGE', `${what}: ${file} line ${i + 1} is not IDENTITY:HEXKEY (as psktool writes)`);
    keys.set(m[1]!, Buffer.from(m[2]!, 'hex'));
  });
  if (keys.size === 0) throw new NbdError('NBD_E_USAGE', `${what}: ${file} holds no keys (lines IDENTITY:HEXKEY)`);
  return keys;
}
