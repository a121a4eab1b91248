// A diskless boot with dracut: Debian's stock kernel, an initramfs built by dracut 059 (unpacked,
// not installed: see test/boot/lib.ts buildDracut) with packaging/dracut/95nbd-attach, the root over
// NBD from nbdkit on the host's loopback, killed and restarted while the booted system writes.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { startNbdkit, stopAllServers, tmpDir } from '../lib/servers.ts';
import { GUEST_IP, GUEST_SERVER, boot, buildDracut, buildRootImage, fsckClean, readImageFile, setup, stageLib } from './lib.ts';
import { assertBooted, restartOnWriterStart } from './assertions.ts';

const work = tmpDir('nbd-boot-dracut-');
let initrd = '';

before(() => {
  setup();
  const lib = stageLib(path.join(work, 'lib'));
  initrd = path.join(work, 'initrd.img');
  buildDracut(initrd, { lib });
}, { timeout: 900_000 });

after(async () => {
  await stopAllServers();
  rmSync(work, { recursive: true, force: true });
});

test('dracut: root=nbd://SERVER:PORT from nbdkit; server killed and restarted while the root is written', { timeout: 600_000 }, async () => {
  const dir = tmpDir('nbd-boot-img-');
  try {
    const image = buildRootImage(dir);
    const server = await startNbdkit(['file', image.file]);
    const events: string[] = [];
    const r = await boot({
      initrd,
      append: `${GUEST_IP} root=nbd://${GUEST_SERVER}:10809 rw bt.marker=dracut-nbdkit bt.writer=25`,
      serverPort: server.port,
      timeoutMs: 420_000,
      onLine: restartOnWriterStart(server, events),
    });
    await server.stop();
    assert.deepEqual(events, ['killed', 'restarted'], `server restart: ${events.join(', ')}`);
    assertBooted(r, image, 'dracut-nbdkit');
    assert.equal(readImageFile(image.file, '/marker').trim(), 'dracut-nbdkit');
    const fsck = fsckClean(image.file);
    assert.ok(fsck.clean, `e2fsck -fn after poweroff:\n${fsck.output}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
