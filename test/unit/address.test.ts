// Addresses, URIs (doc/uri.md examples) and the nbd-client argv forms.

import path from 'node:path';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseAddress, parseUri, describeEndpoint } from '../../src/address.ts';
import { normalizeArgv } from '../../src/cli.ts';
import { NbdError } from '../../src/errors.ts';
import { resolveTarget, tlsFromOptions } from '../../src/commands/common.ts';

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
  assert.deepEqual(parseUri('nbds://h/x').tls, {});
  assert.deepEqual(parseUri('nbds+unix:///x?socket=/s&tls-type=x509').tls, {});
  assert.deepEqual(parseUri('nbds://alice@h/x?tls-hostname=disk.example&tls-verify-peer=0&tls-certificates=/etc/pki/nbd').tls, {
    username: 'alice',
    hostname: 'disk.example',
    verifyPeer: false,
    certificatesDir: '/etc/pki/nbd',
  });
  assert.deepEqual(parseUri('nbds://h/?tls-type=psk&tls-psk-file=/k.psk&tls-username=bob&tls-verify-peer=1').tls, { pskFile: '/k.psk', username: 'bob', verifyPeer: true });
  for (const bad of [
    'nbd+unix:///x', 'http://h/x', 'nbd://h/x?color=red', 'nbd://h/x?tls-type=anon', 'nbd+unix://host/x?socket=/s', 'nbd://h/%zz',
    'nbds://h/x?tls-type=anon', 'nbds://h/x?tls-type=kerberos', 'nbds://h/x?tls-verify-peer=maybe', 'nbds://h/x?tls-colour=red',
  ]) {
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

test('TLS options: any of them turns TLS on; they override the URI; none leaves a plain target plain', () => {
  const base = { connectTimeout: 1000 };
  assert.equal(tlsFromOptions(false, base), false);
  assert.deepEqual(tlsFromOptions(false, { ...base, tls: true }), {});
  assert.deepEqual(tlsFromOptions(false, { ...base, cacertfile: '/ca.pem' }), { caFile: '/ca.pem' });
  assert.deepEqual(tlsFromOptions(false, { ...base, tlsVerify: false }), { verifyPeer: false });
  assert.deepEqual(tlsFromOptions(false, { ...base, tlsVerify: true }), false, '--tls-verify is the default, not a request for TLS');
  assert.deepEqual(tlsFromOptions({ hostname: 'a', certificatesDir: '/d' }, { ...base, tlshostname: 'b', certfile: '/c.pem', keyfile: '/k.pem' }), {
    hostname: 'b',
    certificatesDir: '/d',
    certFile: '/c.pem',
    keyFile: '/k.pem',
  });
  assert.deepEqual(tlsFromOptions(false, { ...base, tlsPsk: '/k.psk', tlsUsername: 'u' }), { pskFile: '/k.psk', username: 'u' });
  const { target } = resolveTarget('nbds://h/x?tls-hostname=a', undefined, { ...base, tlshostname: 'b' });
  assert.deepEqual(target.tls, { hostname: 'b' });
  assert.equal(resolveTarget('h:1', undefined, base).target.tls, false);
  assert.deepEqual(resolveTarget(undefined, undefined, { ...base, unix: '/s', tls: true }).target.tls, {});
  // Relative paths become absolute (the state file keeps them for a --reattach from elsewhere).
  assert.deepEqual(tlsFromOptions({ certificatesDir: 'pki' }, { ...base, cacertfile: 'ca.pem', tlsPsk: './k.psk' }), {
    certificatesDir: path.resolve('pki'),
    caFile: path.resolve('ca.pem'),
    pskFile: path.resolve('k.psk'),
  });
});

test("nbd-client's attach options, short and single-dash long, reach attach with their values", async () => {
  const { buildProgram } = await import('../../src/cli.ts');
  const parse = async (argv: string[]): Promise<Record<string, unknown>> => {
    const program = buildProgram();
    program.exitOverride();
    let seen: Record<string, unknown> = {};
    const attach = program.commands.find((c) => c.name() === 'attach')!;
    attach.exitOverride();
    attach.action((_a, _b, _c, opts: Record<string, unknown>) => void (seen = opts));
    await program.parseAsync(normalizeArgv(argv, program.commands.map((c) => c.name())), { from: 'user' });
    return seen;
  };
  const short = await parse(['srv', 'nbd0', '-T', '30', '-t', '5', '-C', '2', '-p', '-s', '-m', '-x', '-A', '/ca', '-F', '/c', '-K', '/k', '-H', 'name', '-b', '4096', '-N', 'e', '-R', '-g']);
  assert.deepEqual(
    [short.deadTimeout, short.timeout, short.connections, short.persist, short.swap, short.systemdMark, short.tls, short.cacertfile, short.certfile, short.keyfile, short.tlshostname, short.blockSize, short.name, short.readOnly, short.optgo],
    [30, 5, 2, true, true, true, true, '/ca', '/c', '/k', 'name', 4096, 'e', true, false],
  );
  const long = await parse(['srv', 'nbd0', '-dead-timeout', '30', '-persist', '-swap', '-systemd-mark', '-enable-tls', '-cacertfile', '/ca', '-certfile', '/c', '-keyfile', '/k', '-tlshostname', 'name', '-readonly', '-nofork']);
  assert.deepEqual(
    [long.deadTimeout, long.persist, long.swap, long.systemdMark, long.tls, long.cacertfile, long.certfile, long.keyfile, long.tlshostname, long.readOnly, long.foreground],
    [30, true, true, true, true, '/ca', '/c', '/k', 'name', true, true],
  );
});

test('COMMAND_NAMES is what the program registers; a named command is built alone', async () => {
  const { buildProgram, COMMAND_NAMES } = await import('../../src/cli.ts');
  const all = buildProgram().commands.flatMap((c) => [c.name(), ...c.aliases()]);
  assert.deepEqual([...all].sort(), [...COMMAND_NAMES].sort());
  assert.deepEqual(buildProgram('check').commands.map((c) => c.name()), ['check']);
  assert.deepEqual(buildProgram('disconnect').commands.map((c) => c.name()), ['detach']);
  assert.deepEqual(buildProgram('ls').commands.map((c) => c.name()), ['list']);
});
