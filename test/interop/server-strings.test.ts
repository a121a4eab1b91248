// What a hostile server says reaches people and scripts safely: the real CLI (`info`, `list`, plain and
// --json) against our own server on loopback, configured with export names and descriptions that
// carry newlines, carriage returns, terminal escapes, a bidi override, invalid UTF-8 and 4 KiB
// lengths. People get one line per item with the escapes visible; scripts get the exact strings.

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { memoryExport, startServer, type RunningServer } from '../../src/server/index.ts';
import { DISPLAY_MAX, decodeWire } from '../../src/text.ts';
import { type ServerHandle, runCli, sparseFile, startOurServer, tmpDir } from '../lib/servers.ts';

/** Anything a terminal could act on, besides the newline that ends each line (and `list`'s own tabs). */
const CONTROL = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

function assertSafe(text: string, what: string, { tabs = false } = {}): void {
  assert.ok(!CONTROL.test(text) && (tabs || !text.includes('\t')), `${what} holds a control character: ${JSON.stringify(text)}`);
}

interface ExportJson {
  name: string;
  nameHex?: string;
  description?: string;
  descriptionHex?: string;
  canonicalName?: string;
  canonicalNameHex?: string;
  size?: number;
  error?: string;
}

describe('names and descriptions from `nbd-attach serve`: controls, escapes, 4 KiB', { timeout: 180_000 }, () => {
  // The report this answers: a description of 45 lines, with fake `size:` lines and a screen clear.
  const spoofName = 'evil\x1b[2J\x1b[H\nsize:        0 bytes\r';
  const spoofDescription = `fine\n${'size:        1 bytes (1 bytes)\n'.repeat(44)}\x1b[2J\x1b]0;pwned\x07\u202eend`;
  const longName = 'n'.repeat(4096);
  const longDescription = 'é'.repeat(2048); // 4096 bytes
  let srv: ServerHandle;
  let server: string;

  before(async () => {
    const dir = tmpDir('nbd-strings-');
    const a = sparseFile(dir, 'a.img', 1 << 20);
    const b = sparseFile(dir, 'b.img', 2 << 20);
    srv = await startOurServer([`${spoofName}=${a}`, `${longName}=${b}`, '--memory', '3M', '--name', 'plain', '-D', spoofDescription, '-D', longDescription]);
    server = `127.0.0.1:${srv.port}`;
  });
  after(async () => {
    await srv?.stop();
  });

  it('info: one line per field, escapes visible, the description cut with its length', async () => {
    const r = await runCli(['info', '-N', spoofName, server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'info');
    const lines = r.stdout.split('\n');
    assert.deepEqual(lines.map((l) => l.split(':')[0]), ['export', 'size', 'flags', 'block size', 'description', 'server', ''], r.stdout);
    assert.equal(lines[0], 'export:      evil\\x1b[2J\\x1b[H\\nsize:        0 bytes\\r');
    assert.equal(lines[1], 'size:        1048576 bytes (1 MiB)');
    assert.match(lines[4]!, /^description: fine\\nsize: {8}1 bytes \(1 bytes\)\\nsize:/);
    assert.ok(lines[4]!.endsWith(`…[${Buffer.byteLength(spoofDescription)} bytes]`), lines[4]);
  });

  it('info --json: the exact strings', async () => {
    const r = await runCli(['info', '--json', '-N', spoofName, server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'info --json');
    const out = JSON.parse(r.stdout) as ExportJson;
    assert.equal(out.name, spoofName);
    assert.equal(out.description, spoofDescription);
    assert.equal(out.nameHex, undefined, 'valid UTF-8: no hex field');
  });

  it('info: a 4 KiB name and description are cut for people and whole in --json', async () => {
    const r = await runCli(['info', '-N', longName, server]);
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.split('\n');
    assert.equal(lines[0], `export:      ${'n'.repeat(DISPLAY_MAX)}…[4096 bytes]`);
    assert.equal(lines[4], `description: ${'é'.repeat(DISPLAY_MAX)}…[4096 bytes]`);
    const j = await runCli(['info', '--json', '-N', longName, server]);
    assert.equal(j.code, 0, j.stderr);
    const out = JSON.parse(j.stdout) as ExportJson;
    assert.equal(out.name, longName);
    assert.equal(out.description, longDescription);
  });

  it('list: one line per export, whatever the names and descriptions hold', async () => {
    const r = await runCli(['list', server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'list', { tabs: true });
    const lines = r.stdout.trimEnd().split('\n');
    assert.equal(lines.length, 3, r.stdout);
    assert.ok(lines[0]!.startsWith('evil\\x1b[2J\\x1b[H\\nsize:        0 bytes\\r\t1 MiB\t'), lines[0]);
    assert.match(lines[0]!, /\t- fine\\nsize: .*…\[\d+ bytes\]$/);
    assert.ok(lines[1]!.startsWith(`${'n'.repeat(DISPLAY_MAX)}…[4096 bytes]\t2 MiB\t`), lines[1]);
    assert.ok(lines[1]!.endsWith(`- ${'é'.repeat(DISPLAY_MAX)}…[4096 bytes]`), lines[1]);
    assert.match(lines[2]!, /^plain\t3 MiB\t/);
  });

  it('list --json: the exact strings, and every export found again by its name', async () => {
    const r = await runCli(['list', '--json', server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'list --json');
    const { exports } = JSON.parse(r.stdout) as { exports: ExportJson[] };
    assert.deepEqual(
      exports.map((e) => [e.name, e.description, e.size, e.error]),
      [
        [spoofName, spoofDescription, 1 << 20, undefined],
        [longName, longDescription, 2 << 20, undefined],
        ['plain', 'memory 3 MiB', 3 << 20, undefined],
      ],
    );
  });

  it('an error quoting a name and the server text: one line on stderr, escapes visible', async () => {
    const r = await runCli(['info', '-N', 'nope\x1b[2J\n\u202e', server]);
    assert.equal(r.code, 4, r.stderr);
    assertSafe(r.stderr, 'stderr');
    assert.equal(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /^nbd-attach: server has no export named 'nope\\x1b\[2J\\n\\u202e' \(server says: unknown export/);
  });
});

describe('names and descriptions that are not UTF-8 (our server, configured in process)', { timeout: 120_000 }, () => {
  // src/text.ts: U+DC80..U+DCFF in a string stand for raw bytes, which the server sends as they are.
  const nameBytes = Buffer.from([0x62, 0x61, 0x64, 0xff, 0xfe, 0x1b, 0x5b, 0x32, 0x4a, 0x0a]); // "bad", ff, fe, ESC [2J, "\n"
  const descriptionBytes = Buffer.concat([Buffer.from('desc '), Buffer.from([0xc0, 0x80, 0xed, 0xa0, 0x80]), Buffer.from('\r\nsize: 9')]);
  let srv: RunningServer;
  let server: string;

  before(async () => {
    srv = await startServer({ port: 0, exports: [memoryExport(1 << 20, { name: decodeWire(nameBytes), description: decodeWire(descriptionBytes) })] });
    server = `127.0.0.1:${srv.port}`;
  });
  after(async () => {
    await srv?.close();
  });

  it('list: raw bytes shown as \\xNN; the export found again by its exact bytes', async () => {
    const r = await runCli(['list', server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'list', { tabs: true });
    assert.equal(r.stdout, 'bad\\xff\\xfe\\x1b[2J\\n\t1 MiB\tflush, fua, trim, write-zeroes, can-multi-conn, cache\tblock 1/4096/33554432\t- desc \\xc0\\x80\\xed\\xa0\\x80\\r\\nsize: 9\n');
  });

  it('list --json: text as a UTF-8 decoder reads it, and the exact bytes in hex beside', async () => {
    const r = await runCli(['list', '--json', server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'list --json');
    const [e] = (JSON.parse(r.stdout) as { exports: ExportJson[] }).exports;
    assert.equal(e!.name, 'bad\ufffd\ufffd\x1b[2J\n');
    assert.equal(e!.nameHex, nameBytes.toString('hex'));
    assert.equal(e!.description, new TextDecoder().decode(descriptionBytes));
    assert.equal(e!.descriptionHex, descriptionBytes.toString('hex'));
    assert.equal(e!.size, 1 << 20, 'NBD_OPT_INFO asked for the exact name');
    assert.equal(e!.error, undefined);
  });

  it('info (default export): the canonical name the server gives, escaped; exact in --json', async () => {
    const r = await runCli(['info', server]);
    assert.equal(r.code, 0, r.stderr);
    assertSafe(r.stdout, 'info');
    assert.match(r.stdout, /^export: {6}\(default\) \(server calls it 'bad\\xff\\xfe\\x1b\[2J\\n'\)\n/);
    assert.match(r.stdout, /\ndescription: desc \\xc0\\x80\\xed\\xa0\\x80\\r\\nsize: 9\n/);
    const j = await runCli(['info', '--json', server]);
    assert.equal(j.code, 0, j.stderr);
    const out = JSON.parse(j.stdout) as ExportJson;
    assert.equal(out.name, '');
    assert.equal(out.canonicalNameHex, nameBytes.toString('hex'));
    assert.equal(out.descriptionHex, descriptionBytes.toString('hex'));
  });
});
