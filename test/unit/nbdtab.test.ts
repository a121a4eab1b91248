// /etc/nbdtab (nbd-client's nbdtab(5)): parsing, option mapping, and `nbd-attach nbd0` turning into
// the attach it stands for, command-line options winning. No files: the reader is injected.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { applyNbdtab, type AttachCliOptions } from '../../src/commands/attach.ts';
import { NbdError } from '../../src/errors.ts';
import { findNbdtabEntry, nbdtabSettings, parseNbdtab } from '../../src/nbdtab.ts';

const TAB = `# swap space, called "swapexport" on the server
nbd0 nbdserver.example.com swapexport swap,persist
nbd1\tnbdserver.example.com   data   # no options
/dev/nbd2 /run/nbd.sock local unix,bs=4096,timeout=30,dead-timeout=120,conns=2,no_optgo
nbd3 10.0.0.9 secure port=10900,tls,cacertfile=/etc/nbd/ca.pem,certfile=/etc/nbd/c.pem,keyfile=/etc/nbd/k.pem,tlshostname=disk.example,_site=a,odd
`;

test('parse: fields split on spaces and tabs, comments dropped, /dev/ prefix tolerated, line numbers kept', () => {
  const e = parseNbdtab(TAB, '/etc/nbdtab');
  assert.deepEqual(e.map((x) => [x.device, x.host, x.export, x.line]), [
    ['nbd0', 'nbdserver.example.com', 'swapexport', 2],
    ['nbd1', 'nbdserver.example.com', 'data', 3],
    ['nbd2', '/run/nbd.sock', 'local', 4],
    ['nbd3', '10.0.0.9', 'secure', 5],
  ]);
  assert.deepEqual(e[0]!.options, [{ name: 'swap' }, { name: 'persist' }]);
  assert.equal(findNbdtabEntry(e, '/dev/nbd1')?.export, 'data');
  assert.equal(findNbdtabEntry(e, 'nbd9'), undefined);
  assert.throws(() => parseNbdtab('nbd0 host\n', 'T'), (x: unknown) => x instanceof NbdError && /T line 1: expected DEVICE HOST EXPORT/.test(x.message));
});

test('options map onto attach options; unknown ones warn unless they start with _; preinit and bad numbers are errors', () => {
  const e = parseNbdtab(TAB, 'T');
  const warnings: string[] = [];
  const w = (m: string) => warnings.push(m);
  assert.deepEqual(nbdtabSettings(e[0]!, 'T', w), { name: 'swapexport', host: 'nbdserver.example.com', swap: true });
  assert.deepEqual(nbdtabSettings(e[2]!, 'T', w), { name: 'local', unix: '/run/nbd.sock', blockSize: 4096, timeout: 30, deadTimeout: 120, connections: 2, optgo: false });
  assert.deepEqual(nbdtabSettings(e[3]!, 'T', w), {
    name: 'secure', host: '10.0.0.9', port: '10900', tls: true, cacertfile: '/etc/nbd/ca.pem', certfile: '/etc/nbd/c.pem', keyfile: '/etc/nbd/k.pem', tlshostname: 'disk.example',
  });
  assert.deepEqual(warnings, ["T line 5 (nbd3): unknown option 'odd' ignored"]);
  const bad = (line: string, re: RegExp) => assert.throws(() => nbdtabSettings(parseNbdtab(line, 'T')[0]!, 'T', w), (x: unknown) => x instanceof NbdError && x.code === 'NBD_E_USAGE' && re.test(x.message), line);
  bad('nbd0 h e preinit', /preinit .* not supported/);
  bad('nbd0 h e port=70000', /port= needs a whole number between 1 and 65535/);
  bad('nbd0 h e conns=x', /conns= needs a whole number/);
  bad('nbd0 h e unix,port=1', /unix and port= do not go together/);
  bad('nbd0 h e certfile=', /certfile= needs a value/);
});

test('`nbd-attach nbd0` becomes HOST PORT /dev/nbd0 with the entry\'s options; the command line wins', () => {
  const read = () => TAB;
  const base: AttachCliOptions = { optgo: true, connectTimeout: 10_000 };
  let r = applyNbdtab(['nbd3', undefined, undefined], { ...base }, () => undefined, read);
  assert.deepEqual(r.positionals, ['10.0.0.9', '10900', '/dev/nbd3']);
  assert.equal(r.opts.name, 'secure');
  assert.equal(r.opts.tls, true);
  assert.equal(r.opts.tlshostname, 'disk.example');
  r = applyNbdtab(['/dev/nbd2', undefined, undefined], { ...base, timeout: 5, name: 'other' }, () => undefined, read);
  assert.deepEqual(r.positionals, ['/dev/nbd2']);
  assert.equal(r.opts.unix, '/run/nbd.sock');
  assert.equal(r.opts.timeout, 5, 'the command line wins');
  assert.equal(r.opts.name, 'other');
  assert.equal(r.opts.blockSize, 4096);
  assert.equal(r.opts.optgo, false);
  assert.equal(r.opts.connections, 2);
  // Not a lone device: nothing read, nothing changed.
  let reads = 0;
  const counting = () => (reads++, TAB);
  r = applyNbdtab(['host', 'nbd0', undefined], { ...base }, () => undefined, counting);
  assert.deepEqual(r.positionals, ['host', 'nbd0', undefined]);
  r = applyNbdtab(['nbd0', undefined, undefined], { ...base, file: '/img' }, () => undefined, counting);
  assert.deepEqual(r.positionals, ['nbd0', undefined, undefined]);
  assert.equal(reads, 0);
  // Lone device without an entry, or without a file: a usage error that says what to type.
  assert.throws(() => applyNbdtab(['nbd7', undefined, undefined], { ...base }, () => undefined, read), (x: unknown) => x instanceof NbdError && /no server given for nbd7, and \/etc\/nbdtab has no entry for it: nbd-attach HOST\[:PORT\] nbd7/.test(x.message));
  const enoent = () => {
    throw Object.assign(new Error('no'), { code: 'ENOENT' });
  };
  assert.throws(() => applyNbdtab(['nbd0', undefined, undefined], { ...base, nbdtab: '/x/tab' }, () => undefined, enoent), (x: unknown) => x instanceof NbdError && /\/x\/tab cannot be read \(ENOENT\)/.test(x.message));
  assert.throws(() => applyNbdtab(['h', 'nbd0', undefined], { ...base, nbdtab: '/x/tab' }, () => undefined, read), /--nbdtab is read when the device is the only argument/);
});
