// The client's TLS settings turned into node:tls options (files read, usage errors) and TLS failures
// turned into one line. The TLS handshakes themselves are tested against real servers in
// test/interop/client-tls.test.ts.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describeTlsFailure, tlsConnectOptions } from '../../src/client/tls.ts';
import { NbdError } from '../../src/errors.ts';

const tcp = { kind: 'tcp' as const, host: 'disk.example', port: 10809 };
const dir = mkdtempSync(path.join(os.tmpdir(), 'nbd-attach-tls-'));
for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem', 'other-ca.pem']) writeFileSync(path.join(dir, f), `contents of ${f}`);
writeFileSync(path.join(dir, 'keys.psk'), 'alice:00112233\nbob:aabbccdd\n');

const usageError = (re: RegExp) => (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_USAGE' && re.test(e.message);

test('certificates: the directory layout of libnbd and qemu, -A/-F/-K override it, the server is verified', () => {
  const o = tlsConnectOptions({ certificatesDir: dir }, tcp);
  assert.equal(String(o.ca), 'contents of ca-cert.pem');
  assert.equal(String(o.cert), 'contents of client-cert.pem');
  assert.equal(String(o.key), 'contents of client-key.pem');
  assert.equal(o.rejectUnauthorized, true);
  assert.equal(o.host, 'disk.example');
  assert.equal(o.servername, 'disk.example');
  const a = tlsConnectOptions({ certificatesDir: dir, caFile: path.join(dir, 'other-ca.pem') }, tcp);
  assert.equal(String(a.ca), 'contents of other-ca.pem');
  const none = tlsConnectOptions({}, tcp);
  assert.equal(none.ca, undefined, "no CA given: the system's");
  assert.equal(none.cert, undefined);
});

test('names: -H wins; an IP address is checked but never sent as SNI; a unix socket checks localhost', () => {
  assert.equal(tlsConnectOptions({ hostname: 'real.example' }, tcp).host, 'real.example');
  const ip = tlsConnectOptions({}, { kind: 'tcp', host: '127.0.0.1', port: 1 });
  assert.equal(ip.host, '127.0.0.1');
  assert.equal(ip.servername, undefined);
  assert.equal(tlsConnectOptions({}, { kind: 'unix', path: '/s' }).host, 'localhost');
  assert.equal(tlsConnectOptions({ verifyPeer: false }, tcp).rejectUnauthorized, false);
});

test('wrong files are usage errors naming the file, before any connection', () => {
  assert.throws(() => tlsConnectOptions({ caFile: path.join(dir, 'nope.pem') }, tcp), usageError(/cannot read the CA certificate file .*nope\.pem: ENOENT/));
  assert.throws(() => tlsConnectOptions({ certificatesDir: path.join(dir, 'missing') }, tcp), usageError(/certificate directory .*missing does not exist/));
  assert.throws(() => tlsConnectOptions({ certFile: path.join(dir, 'client-cert.pem') }, tcp), usageError(/needs its key \(-K\/--keyfile\)/));
  assert.throws(() => tlsConnectOptions({ keyFile: path.join(dir, 'client-key.pem') }, tcp), usageError(/needs its certificate \(-F\/--certfile\)/));
});

test('PSK: the identity\'s key from the file; unknown identity or mixing with certificates is a usage error', () => {
  const o = tlsConnectOptions({ pskFile: path.join(dir, 'keys.psk'), username: 'bob' }, tcp);
  assert.match(String(o.ciphers), /PSK/);
  const given = o.pskCallback!('hint');
  assert.deepEqual(given, { psk: Buffer.from('aabbccdd', 'hex'), identity: 'bob' });
  assert.throws(() => tlsConnectOptions({ pskFile: path.join(dir, 'keys.psk'), username: 'carol' }, tcp), usageError(/no key for identity 'carol'/));
  assert.throws(() => tlsConnectOptions({ pskFile: path.join(dir, 'keys.psk'), username: 'bob', caFile: path.join(dir, 'ca-cert.pem') }, tcp), usageError(/not both/));
  assert.throws(() => tlsConnectOptions({ pskFile: path.join(dir, 'ca-cert.pem'), username: 'bob' }, tcp), usageError(/line 1 is not IDENTITY:HEXKEY/));
});

test('TLS failures say what to change', () => {
  const f = (code: string) => describeTlsFailure(Object.assign(new Error('raw'), { code }), 'h.example');
  assert.match(f('UNABLE_TO_VERIFY_LEAF_SIGNATURE'), /not signed by a CA we trust: give its CA with -A/);
  assert.match(f('DEPTH_ZERO_SELF_SIGNED_CERT'), /-A\/--cacertfile/);
  assert.match(f('ERR_TLS_CERT_ALTNAME_INVALID'), /not for 'h\.example'.*-H\/--tlshostname/);
  assert.match(f('CERT_HAS_EXPIRED'), /expired/);
  assert.match(f('ECONNRESET'), /closed the connection during the TLS handshake.*client certificate.*pre-shared key/);
  assert.equal(f('SOMETHING_ELSE'), 'raw');
});
