// A diskless boot with initramfs-tools: Debian's stock kernel, an initramfs built by Debian's own
// mkinitramfs with packaging/initramfs-tools installed, the root over NBD from a server on the
// host's loopback (qemu user-mode network, restrict=on, guestfwd). Each boot kills and restarts the
// server while the booted system writes and verifies files. Run as root: `sudo node --import tsx
// --test test/boot/initramfs-tools.test.ts` (test/run-all.sh runs it as the "boot" suite).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { type ServerHandle, startNbdkit, startOurServer, stopAllServers, tmpDir } from '../lib/servers.ts';
import { GUEST_IP, GUEST_SERVER, type BootResult, boot, buildInitramfsTools, buildRootImage, fsckClean, readImageFile, setup, stageLib, tail } from './lib.ts';

const work = tmpDir('nbd-boot-itools-');
let initrd = '';

before(() => {
  setup();
  const lib = stageLib(path.join(work, 'lib'));
  initrd = path.join(work, 'initrd.img');
  buildInitramfsTools(initrd, { withNbdAttach: true, lib });
}, { timeout: 900_000 });

after(async () => {
  await stopAllServers();
  rmSync(work, { recursive: true, force: true });
});

/** While the guest's writer runs: SIGKILL the server, wait, start it again on the same port. */
function restartOnWriterStart(server: ServerHandle, events: string[]): (line: string) => void {
  return (line) => {
    if (!line.startsWith('writer-start')) return;
    void (async () => {
      await delay(2_000);
      server.kill('SIGKILL');
      await server.exited();
      events.push('killed');
      await delay(3_000);
      await server.restart();
      events.push('restarted');
    })().catch((e: Error) => events.push(`restart failed: ${e.message}`));
  };
}

function assertBooted(r: BootResult, image: { file: string; dataSha256: string }, marker: string, partition?: boolean): void {
  const why = `\n--- console (tail) ---\n${tail(r.console, 80)}`;
  assert.equal(r.timedOut, false, `the VM did not power off in time${why}`);
  assert.ok(r.lines.includes('done'), `init did not finish${why}`);
  assert.match(r.values.get('dev') ?? '', partition ? /^\/dev\/nbd0p1$/ : /^\/dev\/nbd0$/, `root not on NBD${why}`);
  assert.equal(r.values.get('data-sha256'), image.dataSha256, `data read back differs${why}`);
  assert.equal(r.values.get('marker-written'), marker, why);
  // The supervisor: alive after switch_root, argv[0] marked '@', comm unchanged, followed the root.
  const sup = r.lines.find((l) => l.startsWith('supervisor '));
  assert.ok(sup, `no supervisor with an '@' argv[0] after switch_root${why}`);
  assert.match(sup, /argv0=@nbd-attach_\/dev\/nbd0 /, why);
  assert.match(sup, /comm=node /, `comm changed${why}`);
  assert.match(sup, /oom=-1000/, why);
  assert.equal(r.values.get('state-pid'), r.values.get('pid'), `the state in /run names another pid${why}`);
  assert.equal(r.values.get('followed-root'), '1', why);
  // Its log is in /run (tmpfs), not on the root it supervises.
  assert.ok(r.lines.some((l) => l.startsWith('run-file nbd0.log')), `no log in /run/nbd-attach${why}`);
  // The server restart: every round verified, no write failed, no I/O error, one reconnect or more.
  assert.equal(r.values.get('mismatches'), '0', why);
  assert.equal(r.values.get('failed'), '0', why);
  assert.equal(r.values.get('io-errors'), '0', why);
  assert.ok(Number(r.values.get('rounds')) >= 3, why);
  assert.ok(Number(r.values.get('reconnects')) >= 1, `the supervisor did not reconnect${why}`);
}

test('initramfs-tools: root=nbd:SERVER:PORT from nbd-attach serve; server killed and restarted while the root is written', { timeout: 600_000 }, async () => {
  const dir = tmpDir('nbd-boot-img-');
  try {
    const image = buildRootImage(dir);
    const server = await startOurServer([image.file]);
    const events: string[] = [];
    const r = await boot({
      initrd,
      append: `${GUEST_IP} root=nbd:${GUEST_SERVER}:10809 rw bt.marker=itools-ours bt.writer=25`,
      serverPort: server.port,
      timeoutMs: 420_000,
      onLine: restartOnWriterStart(server, events),
    });
    await server.stop();
    assert.deepEqual(events, ['killed', 'restarted'], `server restart: ${events.join(', ')}`);
    assertBooted(r, image, 'itools-ours');
    assert.equal(readImageFile(image.file, '/marker').trim(), 'itools-ours');
    const fsck = fsckClean(image.file);
    assert.ok(fsck.clean, `e2fsck -fn after poweroff:\n${fsck.output}`);
    process.stdout.write(`# boot: init running ${r.values.get('uptime')} s after the kernel started (emulated)\n`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("initramfs-tools: nbd-client's nbdroot=SERVER,PORT with root=/dev/nbd0p1 (a partition) from nbdkit, restarted mid-write", { timeout: 600_000 }, async () => {
  const dir = tmpDir('nbd-boot-img-');
  try {
    const image = buildRootImage(dir, { partitioned: true });
    const server = await startNbdkit(['file', image.file]);
    const events: string[] = [];
    const r = await boot({
      initrd,
      append: `${GUEST_IP} nbdroot=${GUEST_SERVER},10809 root=/dev/nbd0p1 rw bt.marker=itools-nbdkit bt.writer=25`,
      serverPort: server.port,
      timeoutMs: 420_000,
      onLine: restartOnWriterStart(server, events),
    });
    await server.stop();
    assert.deepEqual(events, ['killed', 'restarted'], `server restart: ${events.join(', ')}`);
    assertBooted(r, image, 'itools-nbdkit', true);
    const fsck = fsckClean(`${image.file}?offset=1048576`);
    assert.ok(fsck.clean, `e2fsck -fn after poweroff:\n${fsck.output}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
