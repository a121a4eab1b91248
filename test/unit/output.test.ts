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
