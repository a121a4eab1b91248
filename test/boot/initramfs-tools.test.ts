// A diskless boot with initramfs-tools: Debian's stock kernel, an initramfs built by Debian's own
// mkinitramfs with packaging/initramfs-tools installed, the root over NBD from a server on the
// host's loopback (qemu user-mode network, restrict=on, guestfwd). Each boot kills and restarts the
// server while the booted system writes and verifies files. Run as root: `sudo node --import tsx
// --test test/boot/initramfs-tools.test.ts` (test/run-all.sh runs it as the "boot" suite).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { startNbdkit, startOurServer, stopAllServers, tmpDir } from '../lib/servers.ts';
import { GUEST_IP, GUEST_SERVER, boot, buildInitramfsTools, buildRootImage, fsckClean, readImageFile, setup, stageLib } from './lib.ts';
import { assertBooted, restartOnWriterStart } from './assertions.ts';

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
