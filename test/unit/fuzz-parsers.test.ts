// Property-based tests of the text parsers: addresses and NBD URIs (src/address.ts) and /etc/nbdtab
// (src/nbdtab.ts). Whatever the text, the answer is a target / entries, or an NbdError with a code
// and a one-line message; never another exception. A target it returns is usable: a port in
// 1..65535, a host or a socket path that is not empty.
// Inputs are printable text (the command line and a file's lines: no control characters), random
// or built from the grammar (hosts, [v6], ports, URIs with their parameters and percent-escapes).
// Budget: ~10 s for the file by default. Longer: FUZZ_SECONDS=N (seconds per property) or
// FUZZ_RUNS=N (inputs per property); replay a failure with the FUZZ_SEED=… FUZZ_PATH=… it printed
// (test/lib/fuzz.ts; `FUZZ_SECONDS=300 npm run test:fuzz` runs every fuzz file).

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { parseAddress, type Target } from '../../src/address.ts';
import { NbdError } from '../../src/errors.ts';
import { nbdtabSettings, parseNbdtab } from '../../src/nbdtab.ts';
import { check, typedError } from '../lib/fuzz.ts';

/** Printable text: any code point but controls (and the line separators). */
const printable = (maxLength: number): fc.Arbitrary<string> =>
  fc.string({ unit: 'binary', maxLength }).map((s) => s.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, ''));

const piece = (alphabet: string[]): fc.Arbitrary<string> =>
  fc.array(fc.oneof({ arbitrary: fc.constantFrom(...alphabet), weight: 4 }, printable(3)), { maxLength: 5 }).map((a) => a.join(''));

const host = piece(['example.com', 'h', '127.0.0.1', '::1', '[::1]', '[fe80::1%eth0]', '%', '%ff', '%41', '@', ':', '.', '-', '[', ']']);
const port = fc.oneof(fc.constantFrom('', '0', '1', '10809', '65535', '65536', '99999', '007', '-1', '1e3', ' 1'), printable(4));
const uriPath = piece(['/', 'disk', '%2F', '%ff', '%', '%%', '%e2%82', '?', '#', 'é']);
const param = fc.oneof(
  fc.constantFrom('socket=/run/nbd.sock', 'socket=', 'tls-type=x509', 'tls-type=anon', 'tls-type=psk', 'tls-verify-peer=0', 'tls-verify-peer=yes', 'tls-hostname=h', 'tls-certificates=/d', 'tls-psk-file=/k', 'tls-username=u', 'x=1', 'tls-other=1', '%ff=%ff'),
  fc.tuple(printable(6), printable(6)).map(([k, v]) => `${k}=${v}`),
);
const uri = fc
  .tuple(
    fc.constantFrom('nbd', 'nbds', 'nbd+unix', 'nbds+unix', 'NBD', 'http', 'nbd+tcp'),
    fc.option(piece(['user', '%ff', '%41', ':', 'pw']), { nil: undefined }),
    host,
    fc.option(port, { nil: undefined }),
    uriPath,
    fc.array(param, { maxLength: 3 }),
  )
  .map(([scheme, user, h, p, path, params]) => `${scheme}://${user !== undefined ? `${user}@` : ''}${h}${p !== undefined ? `:${p}` : ''}${path}${params.length ? `?${params.join('&')}` : ''}`);

const address = fc.oneof(uri, fc.tuple(host, fc.option(port, { nil: undefined })).map(([h, p]) => (p === undefined ? h : `${h}:${p}`)), printable(40));

function checkTarget(t: Target): void {
  if (t.endpoint.kind === 'tcp') {
    assert.ok(t.endpoint.host.length > 0, 'a tcp target has a host');
    assert.ok(Number.isInteger(t.endpoint.port) && t.endpoint.port >= 1 && t.endpoint.port <= 65535, `port ${t.endpoint.port}`);
  } else {
    assert.ok(t.endpoint.path.length > 0, 'a unix target has a socket path');
  }
}

describe('text parsers: hostile input', () => {
  it('parseAddress: a usable target or NBD_E_ADDRESS', () => {
    check(3000, [address, fc.option(port, { nil: undefined })], (text, p) => {
      try {
        checkTarget(parseAddress(text, p));
      } catch (err) {
        assert.match(typedError(err, NbdError), /^NBD_E_ADDRESS: /);
      }
    });
  });

  const option = fc.oneof(
    fc.constantFrom('port', 'bs', 'timeout', 'dead-timeout', 'conns', 'certfile', 'tls', 'unix', 'no_optgo', 'swap', 'persist', 'priority', 'preinit', '_local', 'other', '__proto__', 'constructor'),
    printable(8),
  );
  const value = fc.oneof(fc.constantFrom('', '0', '1', '512', '4096', '65536', '99999999999', '1.5', '-1', '0x10'), printable(6));
  const optionList = fc.array(fc.tuple(option, fc.option(value, { nil: undefined })), { maxLength: 4 }).map((os) => os.map(([n, v]) => (v === undefined ? n : `${n}=${v}`)).join(','));
  const line = fc.oneof(
    fc.tuple(fc.constantFrom('nbd0', '/dev/nbd1', 'x'), host, printable(8), optionList, fc.constantFrom(' ', '\t', ' \t ')).map(([d, h, x, o, sep]) => [d, h, x, o].join(sep)),
    fc.constantFrom('', '# comment', '   ', 'nbd0 h', 'a b c d e'),
    printable(40),
  );

  it('parseNbdtab and nbdtabSettings: entries and settings, or NBD_E_USAGE naming the line', () => {
    check(3000, [fc.array(line, { maxLength: 6 })], (lines) => {
      let entries;
      try {
        entries = parseNbdtab(lines.join('\n'), '/etc/nbdtab');
      } catch (err) {
        assert.match(typedError(err, NbdError), /^NBD_E_USAGE: \/etc\/nbdtab line \d+: /);
        return;
      }
      for (const e of entries) {
        const warnings: string[] = [];
        try {
          const s = nbdtabSettings(e, '/etc/nbdtab', (w) => warnings.push(w));
          assert.ok(s.host !== undefined || s.unix !== undefined);
          if (s.port !== undefined) assert.ok(Number(s.port) >= 1 && Number(s.port) <= 65535);
          assert.ok(!Object.prototype.hasOwnProperty.call(s, '__proto__'));
        } catch (err) {
          assert.match(typedError(err, NbdError), /^NBD_E_USAGE: \/etc\/nbdtab line \d+ /);
        }
        for (const w of warnings) assert.doesNotMatch(w, /\n/);
      }
    });
  });
});

describe('text parsers: regressions found by fuzzing', () => {
  it('a URI whose user name is not valid percent-encoding is NBD_E_ADDRESS, not a URIError', () => {
    assert.throws(() => parseAddress('nbds://%ff@example.com/disk'), (err: unknown) => err instanceof NbdError && err.code === 'NBD_E_ADDRESS' && /user name is not valid percent-encoding/.test(err.message));
    assert.equal((parseAddress('nbds://al%69ce@example.com/disk').tls as { username?: string }).username, 'alice');
  });
});
