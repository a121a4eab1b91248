// src/output.ts: a command's output written to fds 1 and 2 without process.stdout/process.stderr.
// Run in a child process whose stdout and stderr are pipes: everything arrives, in order, and a
// reader that goes away (EPIPE) ends the output quietly. (test/interop/package.test.ts shows the
// built commands load no node:net or node:tty for it.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const OUTPUT = fileURLToPath(new URL('../../src/output.ts', import.meta.url));
const child = (code: string): string[] => ['--import', 'tsx', '--input-type=module', '-e', `import { writeOut, writeErr } from ${JSON.stringify(OUTPUT)};\n${code}`];

test('writeOut and writeErr write everything, in order, more than a pipe holds (the reader waits)', () => {
  const r = spawnSync(process.execPath, child(`
    writeOut('x'.repeat(1 << 20) + '\\n');
    writeErr('é to stderr\\n');
    writeOut('end\\n');`), { encoding: 'utf8', maxBuffer: 4 << 20 });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, `${'x'.repeat(1 << 20)}\nend\n`);
  assert.equal(r.stderr, 'é to stderr\n');
});

test('a reader that closes the pipe ends the output: exit 0, no EPIPE error', async () => {
  const p = spawn(process.execPath, child(`for (let i = 0; i < 2000; i++) writeOut('line ' + i + ' ' + 'y'.repeat(1000) + '\\n'); writeErr('done\\n');`), { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  p.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
  p.stdout.once('data', () => p.stdout.destroy());
  const code = await new Promise<number | null>((resolve) => p.on('exit', resolve));
  assert.equal(code, 0, err);
  assert.match(err, /done\n$/);
});

test('a non-blocking stdout that fills (EAGAIN) is waited on, not an error: everything arrives', async () => {
  // Touching process.stdout makes a pipe's fd 1 non-blocking (libuv); the child reports the flag so
  // the test knows the EAGAIN path was taken, and the reader starts only after the pipe is full.
  const c = spawn(process.execPath, child(`
    import { readFileSync } from 'node:fs';
    process.stdout;
    const flags = /flags:\\s+(\\d+)/.exec(readFileSync('/proc/self/fdinfo/1', 'utf8'))[1];
    writeErr(flags + '\\n');
    writeOut('y'.repeat(4 << 20));
    writeOut('end');`), { stdio: ['ignore', 'pipe', 'pipe'] });
  c.stdout.pause();
  let err = '';
  c.stderr.on('data', (b: Buffer) => (err += b.toString()));
  await new Promise((r) => setTimeout(r, 1000));
  let out = 0;
  let tail = '';
  c.stdout.on('data', (b: Buffer) => {
    out += b.length;
    tail = (tail + b.toString('latin1')).slice(-3);
  });
  c.stdout.resume();
  const code = await new Promise((r) => c.on('close', r));
  assert.equal(code, 0, err);
  assert.ok((parseInt(err.trim(), 8) & 0o4000) !== 0, `fd 1 was not non-blocking: flags ${err}`);
  assert.equal(out, (4 << 20) + 3);
  assert.equal(tail, 'end');
});
