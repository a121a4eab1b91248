// A diskless boot with initramfs-tools: Debian's stock kernel, an initramfs built by Debian's own
// mkinitramfs with packaging/initramfs-tools installed, the root over NBD from a server on the
// host's loopback (qemu user-mode network, restrict=on, guestfwd). Each boot kills and restarts the
// server while the booted system writes and verifies files. In the first, the running system also
// runs nbd-attach (the host's node and the staged /usr/lib/nbd-attach over a read-only 9p share):
// `status`, `--reattach` refused and then, once the supervisor is stopped, adopting the root. Run as root: `sudo node --import tsx
// --test test/boot/initramfs-tools.test.ts` (test/run-all.sh runs it as the "boot" suite).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { realpathSync, rmSync } from 'node:fs';
import path from 'node:path';
import { startNbdkit, startOurServer, stopAllServers, tmpDir } from '../lib/servers.ts';
import { type DhcpNet, GUEST_IP, GUEST_SERVER, boot, buildInitramfsTools, buildRootImage, dhcpNet, fsckClean, readImageFile, setup, stageLib, tail } from './lib.ts';
import { assertBooted, restartOnWriterStart } from './assertions.ts';

const work = tmpDir('nbd-boot-itools-');
let initrd = '';
let lib = '';

before(() => {
  setup();
  lib = stageLib(path.join(work, 'lib'));
  initrd = path.join(work, 'initrd.img');
  // 9p: the running system of the first boot mounts the host's root (BootOptions.hostShare).
  buildInitramfsTools(initrd, { withNbdAttach: true, lib, extraModules: ['9p', '9pnet_virtio'] });
}, { timeout: 900_000 });

after(async () => {
  await stopAllServers();
  rmSync(work, { recursive: true, force: true });
});

test('initramfs-tools: root=nbd:SERVER:PORT from nbd-attach serve; the running system sees it in status and re-attaches it; server killed and restarted while the root is written', { timeout: 600_000 }, async () => {
  const dir = tmpDir('nbd-boot-img-');
  try {
    const image = buildRootImage(dir);
    const server = await startOurServer([image.file]);
    const events: string[] = [];
    const r = await boot({
      initrd,
      append: `${GUEST_IP} root=nbd:${GUEST_SERVER}:10809 rw bt.marker=itools-ours bt.writer=25 bt.lib=${lib} bt.node=${realpathSync(process.execPath)}`,
      serverPort: server.port,
      hostShare: true,
      timeoutMs: 480_000,
      onLine: restartOnWriterStart(server, events),
    });
    await server.stop();
    assert.deepEqual(events, ['killed', 'restarted'], `server restart: ${events.join(', ')}`);
    assertBooted(r, image, 'itools-ours');
    // The running system: status names the initramfs's supervisor; --reattach refuses while it runs;
    // stopped (SIGTERM), it leaves the busy root attached and writable; --reattach adopts the root
    // with a new '@'-marked supervisor, which then carries it through the server restart above.
    const why = `\n${r.lines.join('\n')}`;
    const before = r.values.get('supervisor-before') ?? '';
    const after = r.values.get('supervisor-after') ?? '';
    assert.match(before, /^\d+$/, `no '@' supervisor before the re-attach${why}`);
    assert.ok(r.lines.some((l) => l.startsWith('status-before ') && l.includes(`_attached,`) && l.includes(`supervisor_pid_${before},`)), `status before${why}`);
    assert.notEqual(r.values.get('reattach-supervised-rc'), '0', `--reattach of a supervised device must refuse${why}`);
    assert.ok(r.lines.some((l) => l.startsWith('reattach-supervised-rc=') && l.includes('already_supervised')), why);
    assert.ok(!r.lines.includes('supervisor-did-not-exit'), `SIGTERM did not end the supervisor${why}`);
    assert.ok(r.values.has('root-written-unsupervised'), `the root was not writable without a supervisor${why}`);
    assert.equal(r.values.get('reattach-rc'), '0', `--reattach failed${why}`);
    assert.match(after, /^\d+$/, `no '@' supervisor after the re-attach${why}`);
    assert.notEqual(after, before, why);
    assert.ok(r.lines.some((l) => l.startsWith('status-after ') && l.includes(`supervisor_pid_${after},`)), `status after${why}`);
    assert.equal(r.values.get('pid'), after, `the supervisor at the end is not the adopting one${why}`);
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

test("initramfs-tools: nbdroot=dhcp with ip=dhcp: server and port from DHCP's root-path (udhcpd and nbdkit in a network namespace)", { timeout: 600_000 }, async () => {
  const dir = tmpDir('nbd-boot-img-');
  let net: DhcpNet | undefined;
  try {
    const image = buildRootImage(dir);
    // nbd-client's root-path form SERVER,PORT; the command line names no server at all.
    net = await dhcpNet(dir, '10.77.0.1,10809');
    net.spawnInside('nbdkit', ['-f', '-i', net.address, '-p', '10809', 'file', image.file]);
    const r = await boot({
      initrd,
      append: 'ip=:::::eth0:dhcp net.ifnames=0 nbdroot=dhcp root=/dev/nbd0 rw bt.marker=itools-dhcp',
      serverPort: 0,
      tap: net,
      timeoutMs: 420_000,
    });
    net.close();
    net = undefined;
    const why = `\n--- console (tail) ---\n${tail(r.console, 80)}`;
    assert.equal(r.timedOut, false, `the VM did not power off in time${why}`);
    assert.ok(r.lines.includes('done'), `init did not finish${why}`);
    assert.equal(r.values.get('dev'), '/dev/nbd0', `root not on NBD${why}`);
    assert.equal(r.values.get('data-sha256'), image.dataSha256, `data read back differs${why}`);
    assert.equal(readImageFile(image.file, '/marker').trim(), 'itools-dhcp');
    assert.match(r.lines.find((l) => l.startsWith('supervisor ')) ?? '', /argv0=@nbd-attach_\/dev\/nbd0 /, `no '@' supervisor after switch_root${why}`);
    // What `nbd-attach boot` attached: the server DHCP named.
    assert.equal(r.lines.find((l) => l.startsWith('state-server ')), 'state-server 10.77.0.1:10809', `the attach did not use DHCP's server${why}`);
    assert.equal(r.values.get('io-errors'), '0', why);
    const fsck = fsckClean(image.file);
    assert.ok(fsck.clean, `e2fsck -fn after poweroff:\n${fsck.output}`);
  } finally {
    net?.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
