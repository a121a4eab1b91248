// A diskless boot with dracut: Debian's stock kernel, an initramfs built by dracut 059 (unpacked,
// not installed: see test/boot/lib.ts buildDracut) with packaging/dracut/95nbd-attach, the root over
// NBD from nbdkit on the host's loopback, killed and restarted while the booted system writes. The root
// is an nbds:// one (nbdkit --tls=require, certificates made here, the CA carried in the initramfs
// as /etc/nbd-attach/initramfs-tls): TLS from the initramfs on, kernel TLS after switch_root and
// after the reconnect.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { makePki, startNbdkit, stopAllServers, tmpDir } from '../lib/servers.ts';
import { GUEST_IP, GUEST_SERVER, boot, buildDracut, buildRootImage, fsckClean, readImageFile, setup, stageLib, tail } from './lib.ts';
import { assertBooted, restartOnWriterStart } from './assertions.ts';

const work = tmpDir('nbd-boot-dracut-');
let initrd = '';
let pki = '';

before(() => {
  setup();
  const lib = stageLib(path.join(work, 'lib'));
  // The server's certificate names localhost (test/lib/servers.ts makePki): the URI says so
  // (tls-hostname), as the guest reaches the server as 10.0.2.100. The initramfs carries the CA only.
  pki = makePki(work, { ec: true });
  const tlsFrom = path.join(work, 'initramfs-tls');
  mkdirSync(tlsFrom);
  copyFileSync(path.join(pki, 'ca-cert.pem'), path.join(tlsFrom, 'ca-cert.pem'));
  initrd = path.join(work, 'initrd.img');
  buildDracut(initrd, { lib, tlsFrom });
}, { timeout: 900_000 });

after(async () => {
  await stopAllServers();
  rmSync(work, { recursive: true, force: true });
});

test('dracut: root=nbds://SERVER:PORT (TLS material from the initramfs) from nbdkit --tls=require; kernel TLS after switch_root; server killed and restarted while the root is written', { timeout: 720_000 }, async () => {
  const dir = tmpDir('nbd-boot-img-');
  try {
    const image = buildRootImage(dir);
    const server = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, 'file', image.file]);
    const events: string[] = [];
    const r = await boot({
      initrd,
      append: `${GUEST_IP} root=nbds://${GUEST_SERVER}:10809/?tls-hostname=localhost rw bt.marker=dracut-nbdkit bt.writer=25`,
      serverPort: server.port,
      timeoutMs: 540_000,
      onLine: restartOnWriterStart(server, events),
    });
    await server.stop();
    assert.deepEqual(events, ['killed', 'restarted'], `server restart: ${events.join(', ')}`);
    assertBooted(r, image, 'dracut-nbdkit');
    // TLS all the way: the state says kernel TLS, and the kernel holds a TLS socket each way now
    // (after switch_root and the reconnect), having set up two or more (the attach, the reconnect).
    const why = `\n--- console (tail) ---\n${tail(r.console, 80)}`;
    assert.equal(r.values.get('state-tls-path'), 'kernel', `the root's connection is not on kernel TLS${why}`);
    assert.ok(Number(r.values.get('TlsCurrTxSw')) >= 1 && Number(r.values.get('TlsCurrRxSw')) >= 1, `no kernel TLS socket after switch_root${why}`);
    assert.ok(Number(r.values.get('TlsTxSw')) >= 2, `the reconnect did not set up kernel TLS again (TlsTxSw ${r.values.get('TlsTxSw')})${why}`);
    assert.equal(readImageFile(image.file, '/marker').trim(), 'dracut-nbdkit');
    const fsck = fsckClean(image.file);
    assert.ok(fsck.clean, `e2fsck -fn after poweroff:\n${fsck.output}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
