// A server-chosen export name through attach, `status` and the supervisor's log under the real kernel:
// one line each with the escapes visible for people, the exact string in `status --json`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { startOurServer, tmpFile } from './lib.ts';
import { cli, kernelSuite, show } from './attach-common.ts';

kernelSuite();

/** Anything a terminal could act on, besides the newline that ends each line. */
const CONTROL = /[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

test('an export name with a screen clear, a newline, CR and a bidi override: attach line, status and log stay one line each', async () => {
  const name = 'evil\x1b[2J\x1b[H\nsize: 0 bytes\r\u202ekcab';
  const shown = 'evil\\x1b[2J\\x1b[H\\nsize: 0 bytes\\r\\u202ekcab';
  const img = await tmpFile(16 * 1024 * 1024);
  const srv = await startOurServer([`${name}=${img}`, '-D', 'line 1\nline 2\x1b[31m']);

  const a = await cli(['127.0.0.1', String(srv.port), '/dev/nbd1', '-N', name]);
  assert.equal(a.code, 0, show(a));
  assert.ok(!CONTROL.test(a.stdout), `attach line: ${JSON.stringify(a.stdout)}`);
  assert.equal(a.stdout.trimEnd().split('\n').length, 1, a.stdout);
  assert.match(a.stdout, new RegExp(`^/dev/nbd1 attached: 16 MiB \\(16777216 bytes\\), export '${escapeRe(shown)}', block size`));

  const st = await cli(['status', 'nbd1']);
  assert.equal(st.code, 0, show(st));
  assert.ok(!CONTROL.test(st.stdout), `status: ${JSON.stringify(st.stdout)}`);
  assert.equal(st.stdout.trimEnd().split('\n').length, 1, st.stdout);
  assert.ok(st.stdout.includes(`export '${shown}'`), st.stdout);

  const sj = await cli(['status', 'nbd1', '--json']);
  assert.equal(sj.code, 0, show(sj));
  assert.ok(!CONTROL.test(sj.stdout), `status --json: ${JSON.stringify(sj.stdout)}`);
  const [entry] = JSON.parse(sj.stdout) as { export: string; logFile?: string }[];
  assert.equal(entry?.export, name, 'scripts get the exact name');

  const log = readFileSync(entry!.logFile!, 'utf8');
  assert.ok(!CONTROL.test(log), `log: ${JSON.stringify(log)}`);
  const lines = log.trimEnd().split('\n');
  for (const l of lines) assert.match(l, /^\d{4}-\d\d-\d\dT[\d:.]+Z nbd1\[\d+\]: /, `every log line is a log record: ${l}`);
  assert.ok(lines.some((l) => l.includes(`export '${shown}'`)), log);

  assert.equal((await cli(['-d', '/dev/nbd1'])).code, 0);
  await srv.stop();
});

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
