// The supervisor's log: one line per message with control characters visible, repeats counted,
// a bounded queue, rotation at the size cap, never through a symlink, never on the supervised device.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogSink, oneLine, openLogFile } from '../../src/supervisor/log.ts';

const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'nbdlog-'));

test('oneLine: newlines, escapes, C1 and bidi overrides are made visible; long text is shortened with a marker', () => {
  assert.equal(oneLine('export "a\nsize: 1"\r\x1b[2J\x9b\u202etxt\t'), 'export "a\\nsize: 1"\\r\\x1b[2J\\u009b\\u202etxt\\t');
  assert.equal(oneLine('plain text, ünïcode ok'), 'plain text, ünïcode ok');
  const long = oneLine('x'.repeat(5000));
  assert.ok(long.length < 2100 && long.endsWith('… (5000 chars)'), long.slice(-30));
});

test('sink: repeated messages are counted, not repeated; prefix per line; close flushes', async () => {
  const dir = tmp();
  const file = path.join(dir, 'a.log');
  const fd = fs.openSync(file, 'a');
  const sink = createLogSink({ fd, file }, (m) => `P ${m}`);
  sink.write('reconnect failed: refused');
  for (let i = 0; i < 50; i++) sink.write('reconnect failed: refused');
  sink.write('reconnected\x1b[31m');
  await sink.close();
  assert.equal(fs.readFileSync(file, 'utf8'), 'P reconnect failed: refused\nP (the previous message repeated 50 more times)\nP reconnected\\x1b[31m\n');
});

test('sink: the queue is bounded (dropped lines counted and reported) and the file rotates once at the cap', async () => {
  const dir = tmp();
  const file = path.join(dir, 'b.log');
  const sink = createLogSink({ fd: fs.openSync(file, 'a'), file }, (m) => m, { maxQueued: 1000, maxFile: 3000 });
  for (let i = 0; i < 200; i++) sink.write(`line ${i} ${'y'.repeat(40)}`); // 200 × ~50 bytes in one loop turn
  await sink.close();
  const first = (fs.existsSync(`${file}.1`) ? fs.readFileSync(`${file}.1`, 'utf8') : '') + fs.readFileSync(file, 'utf8');
  assert.ok(first.length < 2000, `queued at most ~1000 bytes: ${first.length}`);
  sink.write('after the burst');
  await sink.close();
  const all = fs.readFileSync(file, 'utf8');
  assert.match(all, /\d+ log line\(s\) dropped \(the log could not keep up\)\nafter the burst\n$/);
  // Rotation: more than maxFile in total → .1 exists and the live file restarted.
  for (let k = 0; k < 10; k++) {
    for (let i = 0; i < 15; i++) sink.write(`more ${k} ${i} ${'z'.repeat(40)}`);
    await sink.close();
  }
  assert.ok(fs.existsSync(`${file}.1`));
  assert.ok(fs.statSync(file).size <= 3000 + 1000, `live file stays near the cap: ${fs.statSync(file).size}`);
});

test('openLogFile: skips a directory on the supervised device, refuses a symlink at the log name, falls back', () => {
  const onDev = tmp();
  const withLink = tmp();
  const good = tmp();
  const target = path.join(tmp(), 'victim');
  fs.writeFileSync(target, 'keep');
  fs.symlinkSync(target, path.join(withLink, 'nbd3.log'));
  const devOf = fs.statSync(onDev, { bigint: true }).dev;
  const r = openLogFile(3, [onDev, withLink, good], (dev) => dev === devOf && false);
  // onDevice says no for everything here except when told: first choice wins.
  assert.equal(r.file, path.join(onDev, 'nbd3.log'));
  fs.closeSync(r.fd);
  const seen: string[] = [];
  const r2 = openLogFile(3, [onDev, withLink, good], (dev) => {
    seen.push(String(dev));
    return seen.length === 1; // the first directory "is" the device
  });
  assert.equal(r2.file, path.join(good, 'nbd3.log'), 'the device dir and the symlink are both passed over');
  fs.closeSync(r2.fd);
  assert.equal(fs.readFileSync(target, 'utf8'), 'keep', 'nothing written through the symlink');
});
