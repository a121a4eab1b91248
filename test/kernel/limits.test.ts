// The server's constraints on a real kernel (run in the VM: test/kernel/run.sh test/kernel/limits.test.ts):
//  1. nbdkit's blocksize-policy filter enforcing a 64 KiB maximum payload (blocksize-error-policy=error):
//     `dd bs=1M oflag=direct` and mkfs.ext4 succeed because the queue is limited (max_sectors_kb 64,
//     discard_max_bytes 65536); with the limit lifted by hand the same dd fails (the test can fail),
//     and a reconnect puts the limit back;
//  2. the server restarted with a grown image (applied, logged), then with a smaller one (refused,
//     the device keeps its size, the supervisor gives up after the dead timeout);
//  3. a graceful restart of nbdkit (SIGTERM: it answers NBD_ESHUTDOWN and waits for its clients) under
//     fio reads: the supervisor ends its connections at once, the old server leaves, the new one is
//     serving within 2 s, and only the requests already answered with ESHUTDOWN fail.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import { cleanup, detachAllNbd, isListening, loadNbd, nbdSizeBytes, requireGuest, run, type RunResult, sha256, startNbdkit, tmpFile, waitFor } from './lib.ts';
import { CLI_ARGS } from '../lib/servers.ts';
import { type Sup, startSupervised } from './attach-common.ts';

requireGuest();

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const CLI_MS = 300_000;

async function stopSupervisor(sup: Sup): Promise<void> {
  sup.proc.kill('SIGTERM');
  const e = await Promise.race([sup.exit, delay(60_000).then(() => undefined)]);
  assert.ok(e, `supervisor did not exit on SIGTERM:\n${sup.out()}`);
}

function queue(index: number, attr: string): number {
  return Number(readFileSync(`/sys/block/nbd${index}/queue/${attr}`, 'utf8').trim());
}

function dd(args: readonly string[]): Promise<RunResult> {
  return run('dd', [...args, 'status=none'], { timeoutMs: 240_000 });
}

before(async () => {
  await loadNbd({ nbds_max: 8 });
});
after(async () => {
  await detachAllNbd().catch(() => {});
  await cleanup();
});

test('64 KiB maximum payload enforced by nbdkit: dd bs=1M oflag=direct and mkfs succeed; the limit survives a reconnect', { timeout: 900_000 }, async () => {
  const size = 64 << 20;
  const disk = await tmpFile(size);
  const server = await startNbdkit([
    '--filter=blocksize-policy', 'file', disk,
    'blocksize-error-policy=error', 'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=65536',
  ]);
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd0']);
  assert.equal(queue(0, 'max_sectors_kb'), 64);
  assert.equal(queue(0, 'discard_max_bytes'), 65536, 'nbdkit file supports TRIM: discards bounded too');

  const src = await tmpFile(16 << 20, { random: true, name: 'src.bin' });
  const w = await dd([`if=${src}`, 'of=/dev/nbd0', 'bs=1M', 'oflag=direct']);
  assert.equal(w.code, 0, `dd bs=1M oflag=direct: ${w.stderr}`);
  const back = await tmpFile(0, { name: 'back.bin' });
  const r = await dd(['if=/dev/nbd0', `of=${back}`, 'bs=1M', 'count=16', 'iflag=direct']);
  assert.equal(r.code, 0, `dd read bs=1M iflag=direct: ${r.stderr}`);
  assert.equal(await sha256(back), await sha256(src), 'what was written is read back');
  const mkfs = await run('mkfs.ext4', ['-F', '-q', '/dev/nbd0'], { timeoutMs: 600_000 });
  assert.equal(mkfs.code, 0, `mkfs.ext4: ${mkfs.stderr}`);
  const fsck = await run('fsck.ext4', ['-n', '-f', '/dev/nbd0'], { timeoutMs: 300_000 });
  assert.equal(fsck.code, 0, `fsck: ${fsck.stdout}${fsck.stderr}`);
  assert.doesNotMatch(server.log(), /request rejected/, 'nbdkit rejected no request');

  // The test can fail: the kernel's default limit makes the very same dd fail at the server.
  writeFileSync('/sys/block/nbd0/queue/max_sectors_kb', '1280\n');
  const bad = await dd([`if=${src}`, 'of=/dev/nbd0', 'bs=1M', 'count=4', 'oflag=direct']);
  assert.notEqual(bad.code, 0, 'a 1 MiB request reaches the server without the limit');
  assert.match(server.log(), /larger than maximum size 65536/);

  // A reconnect applies the limits again.
  server.kill('SIGKILL');
  await server.exited();
  await server.restart();
  await waitFor(() => /reconnected after/.test(sup.out()), 120_000, { what: 'reconnect' });
  await waitFor(() => queue(0, 'max_sectors_kb') === 64, 10_000, { what: 'max_sectors_kb back to 64 after the reconnect' });
  const again = await dd([`if=${src}`, 'of=/dev/nbd0', 'bs=1M', 'oflag=direct']);
  assert.equal(again.code, 0, `dd after reconnect: ${again.stderr}`);
  assert.match(sup.out(), /request limits: requests of at most 64 KiB/);
  await stopSupervisor(sup);
  await server.stop();
});

test('server restarted with a grown image: applied and logged; with a smaller one: refused until the dead timeout', { timeout: 900_000 }, async () => {
  const disk = await tmpFile(64 << 20);
  const server = await startNbdkit(['file', disk]);
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd1', '--dead-timeout', '8', '-t', '5']);
  assert.equal(nbdSizeBytes(1), 64 << 20);

  server.kill('SIGKILL');
  await server.exited();
  truncateSync(disk, 96 << 20);
  await server.restart();
  await waitFor(() => /reconnected after/.test(sup.out()), 120_000, { what: 'reconnect to the grown export' });
  assert.match(sup.out(), /export grew from 67108864 to 100663296 bytes/);
  await waitFor(() => nbdSizeBytes(1) === 96 << 20, 10_000, { what: 'nbd1 grown to 96 MiB' });

  server.kill('SIGKILL');
  await server.exited();
  truncateSync(disk, 32 << 20);
  await server.restart();
  const e = await Promise.race([sup.exit, delay(180_000).then(() => undefined)]);
  assert.ok(e, `the supervisor kept retrying past the dead timeout:\n${sup.out()}`);
  assert.notEqual(e.code, 0);
  assert.match(sup.out(), /the export shrank from 100663296 to 33554432 bytes.*not handing this connection to the kernel/);
  assert.match(sup.out(), /giving up after \d+ s \(dead timeout 8 s\)/);
  assert.equal(nbdSizeBytes(1), 96 << 20, 'the device never took the smaller size');
  await run(process.execPath, [...CLI_ARGS, '-d', '--force', '/dev/nbd1'], { cwd: REPO, timeoutMs: CLI_MS });
  await server.stop();
});

interface FioRead {
  reads: number;
  errors: number;
}

function fioSummary(r: RunResult): FioRead {
  const i = r.stdout.indexOf('{');
  assert.ok(i >= 0, `fio printed no JSON (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  const j = JSON.parse(r.stdout.slice(i)) as { jobs: { total_err: number; read: { total_ios: number } }[] };
  return { reads: j.jobs[0]!.read.total_ios, errors: j.jobs[0]!.total_err };
}

test('graceful nbdkit restart (SIGTERM → NBD_ESHUTDOWN) under reads: connections dropped at once, new server serving within 2 s plus the request timeout', { timeout: 900_000 }, async () => {
  const disk = await tmpFile(32 << 20, { random: true });
  const server = await startNbdkit(['file', disk]);
  // Requests already in flight on the connection we end are requeued by the kernel only at their
  // request timeout (drivers/block/nbd.c nbd_xmit_timeout): -t 2 bounds that part of the wait.
  const requestTimeoutMs = 2000;
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd2', '-t', String(requestTimeoutMs / 1000)]);
  const fio = run(
    'fio',
    [
      '--name=restart', '--filename=/dev/nbd2', '--ioengine=libaio', '--direct=1', '--iodepth=4', '--bs=4k', '--rw=randread',
      '--size=32M', '--time_based', '--runtime=25', '--continue_on_error=all', '--output-format=json',
    ],
    { timeoutMs: 300_000 },
  );
  const reads = (): number => Number(readFileSync('/sys/block/nbd2/stat', 'utf8').trim().split(/\s+/)[0]);
  const r0 = reads();
  await waitFor(() => reads() > r0 + 200, 120_000, { what: 'fio reading' });

  const shutdownReplies = async (): Promise<number> => ((await run('dmesg')).stdout.match(/nbd2: Other side returned error \(108\)/g) ?? []).length;
  const replies0 = await shutdownReplies();
  const oldPid = server.pid;
  const tTerm = Date.now();
  server.kill('SIGTERM');
  await Promise.race([server.exited(), delay(30_000)]);
  const left = Date.now() - tTerm;
  console.log(`# old server left ${left} ms after SIGTERM`);
  assert.ok(left < 5000, `the old server stayed ${left} ms after SIGTERM (our connections kept it alive)`);
  await server.restart(); // what systemd does once the old one is gone
  assert.notEqual(server.pid, oldPid);
  const tNew = Date.now();
  assert.ok(isListening(server.port));
  const r1 = reads();
  await waitFor(() => reads() > r1 + 20, 30_000, { what: 'reads served by the new server', intervalMs: 20 });
  const serving = Date.now() - tNew;
  console.log(`# new server listening → serving the device: ${serving} ms`);
  // Within 2 s, plus the request timeout when fio's reads were on the ended connection at that moment.
  assert.ok(serving < 2000 + requestTimeoutMs, `new server serving only after ${serving} ms`);

  const f = fioSummary(await fio);
  const replies = (await shutdownReplies()) - replies0;
  console.log(`# fio: ${f.reads} reads, ${f.errors} failed; the server answered ${replies} with ESHUTDOWN before the connection was ended`);
  assert.ok(f.reads > 0);
  assert.ok(f.errors <= replies, `${f.errors} reads failed, more than the ${replies} answered with ESHUTDOWN`);
  // Left alone, nbdkit answers ESHUTDOWN for as long as the client stays (~12 s measured, thousands
  // of reads at this rate); ending the connection at the first reply leaves a handful in flight.
  assert.ok(replies > 0 && replies <= 64, `${replies} ESHUTDOWN replies before the connection was ended`);
  assert.match(sup.out(), /the server is shutting down \(it answered NBD_ESHUTDOWN\): ending 1 connection/);
  assert.match(sup.out(), /reconnected after \d+ ms/);
  await stopSupervisor(sup);
  await server.stop();
});

test('graceful nbdkit restart with an idle device: the idle probe gets the ESHUTDOWN reply, the old server leaves', { timeout: 600_000 }, async () => {
  const disk = await tmpFile(16 << 20, { random: true });
  const server = await startNbdkit(['file', disk]);
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd3']);
  await delay(3000); // idle: nothing but the supervisor's own probes
  const tTerm = Date.now();
  server.kill('SIGTERM');
  await Promise.race([server.exited(), delay(30_000)]);
  const left = Date.now() - tTerm;
  console.log(`# idle device: old server left ${left} ms after SIGTERM`);
  // Without the probe nbdkit 1.32 is still there after 30 s (measured); the probe runs every 2 s.
  assert.ok(left < 10_000, `the old server stayed ${left} ms after SIGTERM`);
  await server.restart();
  const tNew = Date.now();
  await waitFor(() => /reconnected after/.test(sup.out()), 30_000, { what: 'reconnect', intervalMs: 20 });
  console.log(`# idle device: new server listening → reconnected: ${Date.now() - tNew} ms`);
  const r = await dd(['if=/dev/nbd3', 'of=/dev/null', 'bs=4k', 'count=16', 'iflag=direct']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(sup.out(), /the server is shutting down \(it answered NBD_ESHUTDOWN\)/);
  await stopSupervisor(sup);
  await server.stop();
});
