// Addresses, URIs (doc/uri.md examples) and the nbd-client argv forms.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseAddress, parseUri, describeEndpoint } from '../../src/address.ts';
import { normalizeArgv } from '../../src/cli.ts';
import { NbdError } from '../../src/errors.ts';

test('HOST, HOST:PORT, HOST PORT, [v6]:PORT, bare v6', () => {
  assert.deepEqual(parseAddress('srv'), { endpoint: { kind: 'tcp', host: 'srv', port: 10809 }, tls: false });
  assert.deepEqual(parseAddress('srv:1234').endpoint, { kind: 'tcp', host: 'srv', port: 1234 });
  assert.deepEqual(parseAddress('srv', '1234').endpoint, { kind: 'tcp', host: 'srv', port: 1234 });
  assert.deepEqual(parseAddress('[::1]:10810').endpoint, { kind: 'tcp', host: '::1', port: 10810 });
  assert.deepEqual(parseAddress('[::1]').endpoint, { kind: 'tcp', host: '::1', port: 10809 });
  assert.deepEqual(parseAddress('fe80::1').endpoint, { kind: 'tcp', host: 'fe80::1', port: 10809 });
  assert.equal(describeEndpoint(parseAddress('[::1]:5').endpoint), '[::1]:5');
});

test('bad ports and conflicts are usage errors', () => {
  for (const [a, p] of [['srv:0', undefined], ['srv:70000', undefined], ['srv:abc', undefined], ['srv:1', '2'], [':1', undefined]] as const) {
    assert.throws(() => parseAddress(a, p), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_ADDRESS', `${a} ${p}`);
  }
});

test('uri.md export-name examples', () => {
  const cases: [string, string][] = [
    ['nbd://example.com/disk', 'disk'],
    ['nbd://example.com/', ''],
    ['nbd://example.com', ''],
    ['nbd://example.com//disk', '/disk'],
    ['nbd://example.com/hello%20world', 'hello world'],
  ];
  for (const [uri, name] of cases) assert.equal(parseUri(uri).exportName, name, uri);
  assert.deepEqual(parseUri('nbd://[::1]:10900/x').endpoint, { kind: 'tcp', host: '::1', port: 10900 });
  assert.deepEqual(parseUri('nbd+unix:///disk?socket=/run/nbd.sock'), { endpoint: { kind: 'unix', path: '/run/nbd.sock' }, exportName: 'disk', tls: false });
});

test('nbds is parsed (TLS required); bad URIs are diagnosed', () => {
  assert.equal(parseUri('nbds://h/x').tls, true);
  assert.equal(parseUri('nbds+unix:///x?socket=/s&tls-type=x509').tls, true);
  for (const bad of ['nbd+unix:///x', 'http://h/x', 'nbd://h/x?color=red', 'nbd://h/x?tls-type=anon', 'nbd+unix://host/x?socket=/s', 'nbd://h/%zz']) {
    assert.throws(() => parseUri(bad), NbdError, bad);
  }
});

test('nbd-client argv forms map onto commands', () => {
  const names = ['attach', 'list', 'info', 'detach', 'check', 'mknod'];
  assert.deepEqual(normalizeArgv(['-l', 'srv'], names), ['list', 'srv']);
  assert.deepEqual(normalizeArgv(['-d', '/dev/nbd0'], names), ['detach', '/dev/nbd0']);
  assert.deepEqual(normalizeArgv(['-c', 'nbd1'], names), ['check', 'nbd1']);
  assert.deepEqual(normalizeArgv(['srv', '10809', '/dev/nbd0', '-name', 'x'], names), ['attach', 'srv', '10809', '/dev/nbd0', '--name', 'x']);
  assert.deepEqual(normalizeArgv(['-N', 'x', 'srv:1', '-nonetlink', '-readonly'], names), ['attach', '-N', 'x', 'srv:1', '--ioctl', '--read-only']);
  assert.deepEqual(normalizeArgv(['list', '-l'], names), ['list', '-l']);
  assert.deepEqual(normalizeArgv(['--help'], names), ['--help']);
  assert.deepEqual(normalizeArgv(['-timeout=30', 'h'], names), ['attach', '--timeout=30', 'h']);
});
