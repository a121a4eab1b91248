// Local attach of an image whose file system is frozen (fsfreeze: every writer waits until it is
// thawed). The image's writes must wait on the libuv pool, never on the event loop: the supervisor
// that serves them keeps handling the kernel's dead-link events, signals and reconnects, and the
// write the kernel resends after its request timeout lands once the file system is thawed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustRun, run, tmpDir, tmpFile, waitFor } from './lib.ts';
import { kernelSuite, startForeground, sysPid } from './attach-common.ts';

const MiB = 1024 * 1024;
kernelSuite();

test('--file on a frozen file system: the supervisor still logs the dead link, answers signals and retries; after thawing the write lands and SIGTERM detaches', { timeout: 240_000 }, async (t) => {
  // ext4 on a loop device over a file in the guest's tmpfs, holding the image (as the benchmark's).
  await run('modprobe', ['loop'], { timeoutMs: 30_000 });
  const backing = await tmpFile(64 * MiB, { name: 'ext4.raw' });
  const loop = (await mustRun('losetup', ['--find', '--show', backing], { timeoutMs: 30_000 })).stdout.trim();
  t.after(async () => {
    await run('umount', ['-l', mnt], { timeoutMs: 30_000 });
    await run('losetup', ['-d', loop], { timeoutMs: 30_000 });
  });
  await mustRun('mkfs.ext4', ['-q', '-E', 'lazy_itable_init=1,lazy_journal_init=1,nodiscard', loop], { timeoutMs: 120_000 });
  const mnt = await tmpDir('mnt-');
  await mustRun('mount', ['-o', 'noinit_itable', loop, mnt], { timeoutMs: 30_000 });
  const img = join(mnt, 'image');
  writeFileSync(img, '');
  truncateSync(img, 16 * MiB);
  const pattern = join(await tmpDir('p-'), 'pattern');
  writeFileSync(pattern, Buffer.alloc(4096, 0x5a));

  const fg = await startForeground(['--file', img, '-n', '-t', '2', '/dev/nbd3']);
  const said = (re: RegExp): boolean => re.test(fg.stderr());
  await mustRun('dd', ['if=/dev/zero', 'of=/dev/nbd3', 'bs=4096', 'count=1', 'oflag=direct'], { timeoutMs: 30_000 });

  await mustRun('fsfreeze', ['-f', mnt]);
  let thawed = false;
  const thaw = async (): Promise<void> => {
    if (!thawed) await mustRun('fsfreeze', ['-u', mnt]);
    thawed = true;
  };
  try {
    // A 4 KiB write (formerly written inline on the event loop) now waits in the frozen file system.
    const writer = run('dd', [`if=${pattern}`, 'of=/dev/nbd3', 'bs=4096', 'count=1', 'oflag=direct'], { timeoutMs: 180_000 });
    // The kernel's request timeout (2 s) drops the connection: the supervisor hears of it...
    await waitFor(() => said(/connection lost: reconnecting/), 30_000, { what: 'the dead link logged while frozen', intervalMs: 200 });
    // ...answers a signal (SIGHUP while dd still has the device open: a local attach keeps serving)...
    fg.child.kill('SIGHUP');
    await waitFor(() => said(/SIGHUP: \/dev\/nbd3 is in use \(.*open by pid \d+ \(dd\).*\) and served by this process: not stopping/), 10_000, {
      what: 'SIGHUP handled while frozen',
      intervalMs: 100,
    });
    // ...and keeps trying: no new connection is handed out while the old write is stuck.
    await waitFor(() => said(/reconnect attempt \d+ failed/), 30_000, { what: 'a reconnect attempt while frozen', intervalMs: 200 });
    assert.doesNotMatch(fg.stderr(), /reconnected after/, 'no connection handed out while the old write is stuck');
    await thaw();
    const w = await writer;
    assert.equal(w.code, 0, `dd after thawing: ${w.stderr}`);
    await waitFor(() => said(/reconnected after/), 30_000, { what: 'reconnected after thawing', intervalMs: 200 });
    assert.deepEqual(readFileSync(img).subarray(0, 4096), Buffer.alloc(4096, 0x5a), 'the write is in the image');
  } finally {
    await thaw();
  }
  fg.child.kill('SIGTERM');
  const end = await fg.exit;
  assert.equal(end.code, 0, `exit after SIGTERM: ${fg.stderr()}`);
  assert.equal(sysPid(3), undefined, 'SIGTERM detached the device');
});
