// Local attach (`--file` / `--memory`: the in-process server on a socketpair) and our own server
// (`nbd-attach serve`) under the real kernel, with nbd-client and with nbd-attach as the client.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { basename } from 'node:path';
import { mustRun, run, sha256, startOurServer, tmpFile, nbdSizeBytes, waitFor } from './lib.ts';
import { assertWritesRefused, kernelSuite, attachedDevice, cli, fillFilesystem, indexOf, show, startForeground, sysPid, verifyFilesystem } from './attach-common.ts';
import { pidAlive } from '../../src/supervisor/state.ts';

const MiB = 1024 * 1024;
const mounts = kernelSuite();

function supervisorPid(stdout: string): number {
  const m = /supervisor pid (\d+)/.exec(stdout);
  assert.ok(m, `supervisor pid in: ${stdout}`);
  return Number(m[1]);
}

test('--file: attach in the background, ext4 round trip, -d flushes and stops the server, the image holds the data', async () => {
  const img = await tmpFile(64 * MiB);
  const a = await cli(['--file', img, '/dev/nbd1']);
  assert.equal(a.code, 0, show(a));
  assert.match(a.stdout, new RegExp(`^/dev/nbd1 attached: 64 MiB \\(67108864 bytes\\), local file ${img}, block size \\d+, netlink, connections 1, supervisor pid \\d+, log \\S+`));
  const pid = supervisorPid(a.stdout);
  assert.ok(pidAlive(pid), 'the supervisor (and server) stays resident');
  assert.equal(nbdSizeBytes(1), 64 * MiB);
  const st = await cli(['status', 'nbd1', '--json']);
  assert.equal(st.code, 0, show(st));
  const [entry] = JSON.parse(st.stdout) as { server: string; local: boolean; supervisorPid: number }[];
  assert.deepEqual([entry?.server, entry?.local, entry?.supervisorPid], [`local file ${img}`, true, pid]);

  const sums = await fillFilesystem(mounts, '/dev/nbd1');
  const devSum = await sha256('/dev/nbd1');
  const d = await cli(['-d', '/dev/nbd1']);
  assert.equal(d.code, 0, show(d));
  assert.equal(sysPid(1), undefined);
  assert.ok(!pidAlive(pid), 'detach returns after the supervisor has exited');
  assert.equal(await sha256(img), devSum, 'the image file has exactly what the device had');

  // The same image again: the filesystem is there.
  const b = await cli(['--file', img, 'nbd1']);
  assert.equal(b.code, 0, show(b));
  await verifyFilesystem(mounts, '/dev/nbd1', sums);
  assert.equal((await cli(['detach', 'nbd1'])).code, 0);
});

test('--memory in the foreground (-n): ext4 round trip, SIGTERM disconnects and exits 0; no device argument picks one', async () => {
  const fg = await startForeground(['--memory', '48M', '-n', '/dev/nbd2']);
  assert.equal(fg.device, '/dev/nbd2');
  assert.match(fg.stdout(), /48 MiB \(50331648 bytes\), local memory 48M, block size \d+, netlink/);
  const sums = await fillFilesystem(mounts, '/dev/nbd2');
  await verifyFilesystem(mounts, '/dev/nbd2', sums);
  fg.child.kill('SIGTERM');
  const end = await fg.exit;
  assert.equal(end.code, 0, `exit after SIGTERM: ${fg.stderr()}`);
  assert.equal(sysPid(2), undefined, 'SIGTERM detached the device');

  const c = await cli(['--memory', '8M']);
  assert.equal(c.code, 0, show(c));
  const dev = attachedDevice(c.stdout);
  assert.equal(nbdSizeBytes(indexOf(dev)), 8 * MiB);
  assert.equal((await cli(['-d', dev])).code, 0);
});

test('--file -R: the device is read-only, writes fail with EPERM, the image is untouched', async () => {
  const img = await tmpFile(16 * MiB, { random: true });
  const sum = await sha256(img);
  const a = await cli(['-R', '--file', img, '/dev/nbd3']);
  assert.equal(a.code, 0, show(a));
  assert.match(a.stdout, /read-only, netlink/);
  assert.equal(await sha256('/dev/nbd3'), sum, 'reads come from the image');
  const w = await run('dd', ['if=/dev/zero', 'of=/dev/nbd3', 'bs=4096', 'count=1', 'oflag=direct', 'conv=notrunc', 'status=none']);
  assert.match(w.stderr, /Operation not permitted/, `EPERM: ${w.stderr}`);
  await assertWritesRefused('/dev/nbd3', sum, () => sha256(img));
  assert.equal((await cli(['-d', '/dev/nbd3'])).code, 0);
});

test('local attach refuses what cannot work: a missing image, a server with --file, a busy device', async () => {
  const missing = await cli(['--file', '/nonexistent.img', '/dev/nbd4']);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /no such file; create it first/);
  assert.equal(missing.stderr.trim().split('\n').length, 1, 'one line');
  const both = await cli(['--memory', '8M', '127.0.0.1', '/dev/nbd4']);
  assert.equal(both.code, 2, show(both));
  assert.match(both.stderr, /give only the device/);
  const a = await cli(['--memory', '8M', '/dev/nbd4']);
  assert.equal(a.code, 0, show(a));
  const again = await cli(['--memory', '8M', '/dev/nbd4']);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /already attached/);
  assert.equal((await cli(['-d', '/dev/nbd4'])).code, 0);
  assert.equal(sysPid(4), undefined);
});

test('our server under the kernel: nbd-client and nbd-attach both attach it; ext4 round trip; SIGTERM flushes', async () => {
  const img = await tmpFile(64 * MiB);
  const srv = await startOurServer([img]);
  // nbd-client (Debian 3.24) with the default export name: our single export answers to it.
  await mustRun('nbd-client', ['127.0.0.1', String(srv.port), '/dev/nbd5'], { timeoutMs: 60_000 });
  const sums = await fillFilesystem(mounts, '/dev/nbd5');
  const devSum = await sha256('/dev/nbd5');
  await mustRun('nbd-client', ['-d', '/dev/nbd5'], { timeoutMs: 30_000 });
  await waitFor(() => sysPid(5) === undefined, 10_000, { what: 'nbd5 detached' });

  const a = await cli(['127.0.0.1', String(srv.port), '/dev/nbd6', '-N', basename(img)]);
  assert.equal(a.code, 0, show(a));
  assert.equal(await sha256('/dev/nbd6'), devSum);
  await verifyFilesystem(mounts, '/dev/nbd6', sums);
  assert.equal((await cli(['-d', '/dev/nbd6'])).code, 0);
  await srv.stop();
  assert.equal(await sha256(img), devSum, 'the image holds what was written through both clients');
});
