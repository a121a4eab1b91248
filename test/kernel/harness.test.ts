// Proves the real-kernel test harness itself (test/vm/*, test/kernel/lib.ts) with real parts:
// the guest environment, nbd.ko load/unload, a reference client (Debian's nbd-client) driving
// /dev/nbd0 against nbdkit with an ext4 round trip, the other drivers tests need, network
// namespaces over veth, and that asUnprivileged() really lacks CAP_SYS_ADMIN.
// Runs only inside the VM: test/kernel/run.sh.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import {
  asUnprivileged,
  cleanup,
  connectedNbdDevices,
  isInGuest,
  isListening,
  isModuleLoaded,
  loadModule,
  loadNbd,
  mustRun,
  mustSh,
  nbdSizeBytes,
  requireGuest,
  run,
  sh,
  sha256,
  startNbdkit,
  startNbdServer,
  startQemuNbd,
  tmpDir,
  tmpFile,
  unloadNbd,
  waitFor,
} from './lib.ts';

requireGuest();
after(async () => {
  await run('umount', ['-l', '/tmp/nbd-harness-mnt'], { timeoutMs: 10_000 });
  await run('nbd-client', ['-d', '/dev/nbd0'], { timeoutMs: 10_000 });
  await cleanup();
  await unloadNbd().catch(() => {});
});

const MiB = 1024 * 1024;
// ioctl numbers: _IO(0xab, n) from include/uapi/linux/nbd.h (NBD_CLEAR_QUE = 5, a no-op since 2.6).
const NBD_CLEAR_QUE = 0xab05;
/** perl (Debian-essential) issues one raw ioctl on a device and prints "ok" or the errno text. */
const perlIoctl = (dev: string, req: number): string[] => [
  '-e',
  `open(my $f, "+<", "${dev}") or die "open: $!\\n"; ioctl($f, ${req}, 0) or die "ioctl: $!\\n"; print "ok\\n";`,
];

test('the guest provides what kernel tests rely on', async () => {
  assert.equal(isInGuest(), true);
  assert.equal(process.getuid?.(), 0);
  assert.equal(process.env['HOME'], '/tmp');
  // cwd is the checkout at the host's absolute path, read-only.
  assert.ok(existsSync(join(process.cwd(), 'test/kernel/harness.test.ts')), `cwd ${process.cwd()} is not the checkout`);
  await assert.rejects(writeFile(join(process.cwd(), '.vm-write-probe'), 'x'), { code: 'EROFS' });
  // /tmp is writable.
  const f = await tmpFile(4096);
  assert.equal((await sha256(f)).length, 64);
  // pseudo filesystems
  const mounts = readFileSync('/proc/self/mounts', 'utf8');
  for (const [dir, type] of [
    ['/proc', 'proc'],
    ['/sys', 'sysfs'],
    ['/dev', 'devtmpfs'],
    ['/dev/pts', 'devpts'],
    ['/sys/kernel/debug', 'debugfs'],
    ['/tmp', 'tmpfs'],
    ['/run', 'tmpfs'],
  ] as const) {
    assert.match(mounts, new RegExp(`^\\S+ ${dir.replace(/\//g, '\\/')} ${type} `, 'm'), `${dir} is not a ${type} mount`);
  }
  // loopback is up
  const lo = await mustRun('ip', ['-o', 'link', 'show', 'lo']);
  assert.match(lo.stdout, /[<,]UP[,>]/);
  // run(): a hard timeout really kills, and exit codes come back.
  const slow = await sh('sleep 30', { timeoutMs: 300 });
  assert.equal(slow.timedOut, true);
  assert.equal(slow.signal, 'SIGKILL');
  assert.ok(slow.durationMs < 10_000);
  assert.equal((await sh('exit 3')).code, 3);
  // ...and a background process holding the output pipe does not hold run() up.
  const bg = await sh('sleep 30 & echo $!');
  assert.equal(bg.code, 0);
  assert.ok(bg.durationMs < 5_000, `run() waited ${bg.durationMs} ms for a background process`);
  process.kill(Number(bg.stdout.trim()), 'SIGKILL');
});

test('server helpers: nbd-server, qemu-nbd and nbdkit listen, serve, die and restart', { timeout: 120_000 }, async () => {
  const size = async (uri: string): Promise<number> => {
    const r = await run('nbdinfo', ['--size', uri], { timeoutMs: 30_000 });
    if (r.code !== 0) {
      // Say who listened on the port, for the record of a failure.
      const ss = await run('ss', ['-tlnpe']);
      assert.fail(`nbdinfo --size ${uri}: ${r.timedOut ? 'timed out' : `exit ${r.code}`}: ${r.stderr}\n${ss.stdout}`);
    }
    return Number(r.stdout.trim());
  };

  const img = await tmpFile(8 * MiB);
  const ns = await startNbdServer(`[disk]\nexportname = ${img}\n`);
  assert.equal(await size(`nbd://127.0.0.1:${ns.port}/disk`), 8 * MiB);

  const qimg = await tmpFile(4 * MiB);
  const qn = await startQemuNbd(['-f', 'raw', '-t', '-x', 'q', qimg]);
  assert.equal(await size(`nbd://127.0.0.1:${qn.port}/q`), 4 * MiB);

  const kit = await startNbdkit(['memory', '2M']);
  assert.equal(await size(`nbd://127.0.0.1:${kit.port}`), 2 * MiB);
  const oldPid = kit.pid;
  kit.kill('SIGKILL');
  await kit.exited();
  assert.equal(await isListening(kit.port), false);
  assert.notEqual((await run('nbdinfo', ['--size', `nbd://127.0.0.1:${kit.port}`])).code, 0);
  await kit.restart();
  assert.notEqual(kit.pid, oldPid);
  assert.equal(await size(`nbd://127.0.0.1:${kit.port}`), 2 * MiB);

  await ns.stop();
  assert.equal(await isListening(ns.port), false);
  await qn.stop();
  await kit.stop();
});

test('nbd is not loaded by the guest itself; loadNbd/unloadNbd control it', { timeout: 120_000 }, async () => {
  await unloadNbd();
  assert.equal(isModuleLoaded('nbd'), false);
  assert.equal(existsSync('/sys/block/nbd0'), false);
  // The kernel's request_module helper refuses nbd, so nothing but a test loads it.
  const helper = readFileSync('/proc/sys/kernel/modprobe', 'utf8').trim();
  const refused = await run(helper, ['-q', '--', 'nbd']);
  assert.notEqual(refused.code, 0);
  assert.equal(isModuleLoaded('nbd'), false);

  await loadNbd({ nbds_max: 4, max_part: 15 });
  assert.equal(isModuleLoaded('nbd'), true);
  for (const i of [0, 1, 2, 3]) assert.ok(existsSync(`/sys/block/nbd${i}`), `nbd${i} missing`);
  assert.equal(existsSync('/sys/block/nbd4'), false);
  assert.equal(readFileSync('/sys/module/nbd/parameters/nbds_max', 'utf8').trim(), '4');
  assert.equal(readFileSync('/sys/module/nbd/parameters/max_part', 'utf8').trim(), '15');
  assert.deepEqual(connectedNbdDevices(), []);

  // Reloading with other parameters really changes them.
  await loadNbd({ nbds_max: 2 });
  assert.ok(existsSync('/sys/block/nbd1'));
  assert.equal(existsSync('/sys/block/nbd2'), false);
  await unloadNbd();
  assert.equal(isModuleLoaded('nbd'), false);
});

test('nbd-client attaches nbdkit to /dev/nbd0: mkfs.ext4, mount, write, read back, detach', { timeout: 300_000 }, async () => {
  await loadNbd({ nbds_max: 4, max_part: 15 });
  const server = await startNbdkit(['memory', '64M']);
  assert.ok(server.port > 0);

  await mustRun('nbd-client', ['127.0.0.1', String(server.port), '/dev/nbd0'], { timeoutMs: 30_000 });
  await waitFor(() => nbdSizeBytes(0) === 64 * MiB, 10_000, { what: '/dev/nbd0 size 64 MiB' });
  assert.deepEqual(connectedNbdDevices(), [0]);

  const data = await tmpFile(3 * MiB, { random: true });
  const want = await sha256(data);
  const mnt = '/tmp/nbd-harness-mnt';
  await mustSh(`mkfs.ext4 -q -F /dev/nbd0 && mkdir -p ${mnt} && mount /dev/nbd0 ${mnt}`, { timeoutMs: 120_000 });
  await mustSh(`cp ${data} ${mnt}/data && sync && umount ${mnt}`, { timeoutMs: 60_000 });
  // Drop the page cache so the read-back really goes over NBD to nbdkit.
  await mustSh('echo 3 > /proc/sys/vm/drop_caches && blockdev --flushbufs /dev/nbd0');
  await mustSh(`mount -o ro /dev/nbd0 ${mnt}`, { timeoutMs: 60_000 });
  assert.equal(await sha256(`${mnt}/data`), want);
  await mustRun('umount', [mnt]);

  await mustRun('nbd-client', ['-d', '/dev/nbd0'], { timeoutMs: 30_000 });
  await waitFor(() => connectedNbdDevices().length === 0, 10_000, { what: 'nbd0 disconnected' });
  assert.equal(nbdSizeBytes(0), 0);

  await server.stop();
  assert.equal(await server.exited().then(() => true), true);
  await unloadNbd();
  assert.equal(isModuleLoaded('nbd'), false);
});

test('asUnprivileged runs without CAP_SYS_ADMIN: nbd ioctls get EPERM', { timeout: 120_000 }, async () => {
  const caps = await asUnprivileged('grep -E "^Cap(Eff|Prm|Bnd|Amb):" /proc/self/status');
  assert.equal(caps.code, 0, caps.stderr);
  assert.match(caps.stdout, /^CapEff:\s+0+$/m);
  assert.match(caps.stdout, /^CapBnd:\s+0+$/m);
  const rootCaps = await sh('grep "^CapEff:" /proc/self/status');
  assert.doesNotMatch(rootCaps.stdout, /^CapEff:\s+0+$/m);

  await loadNbd({ nbds_max: 2 });
  // The same harmless ioctl: allowed for root, EPERM without the capability.
  const asRoot = await run('perl', perlIoctl('/dev/nbd1', NBD_CLEAR_QUE));
  assert.equal(asRoot.stdout.trim(), 'ok', asRoot.stderr);
  const denied = await asUnprivileged(['perl', ...perlIoctl('/dev/nbd1', NBD_CLEAR_QUE)]);
  assert.notEqual(denied.code, 0);
  assert.match(denied.stderr, /ioctl: Operation not permitted/);

  // The reference client, unprivileged, cannot attach a device either.
  const server = await startNbdkit(['memory', '16M']);
  const attach = await asUnprivileged(['nbd-client', '127.0.0.1', String(server.port), '/dev/nbd1'], { timeoutMs: 30_000 });
  assert.notEqual(attach.code, 0);
  assert.deepEqual(connectedNbdDevices(), []);
  await server.stop();
  await unloadNbd();
});

test('loadModule loads the drivers kernel tests use; veth + network namespaces carry TCP', { timeout: 120_000 }, async () => {
  for (const m of ['veth', 'inet_diag', 'tcp_diag', 'loop', 'sch_netem']) {
    await loadModule(m);
    assert.ok(isModuleLoaded(m), `${m} not loaded`);
  }
  assert.ok(existsSync('/dev/loop-control'));

  const ns = `nbdh${process.pid}`;
  const host = `vh${process.pid}`;
  const peer = `vp${process.pid}`;
  await mustSh(
    [
      `ip netns add ${ns}`,
      `ip link add ${host} type veth peer name ${peer}`,
      `ip link set ${peer} netns ${ns}`,
      `ip addr add 10.231.0.1/24 dev ${host}`,
      `ip link set ${host} up`,
      `ip -n ${ns} addr add 10.231.0.2/24 dev ${peer}`,
      `ip -n ${ns} link set ${peer} up`,
      `ip -n ${ns} link set lo up`,
    ].join(' && '),
  );
  try {
    // A TCP server in the initial namespace, reached from inside the other one over the veth pair.
    const received = new Promise<string>((resolve) => {
      const srv = createServer((sock) => {
        let text = '';
        sock.on('data', (b: Buffer) => (text += b.toString()));
        sock.on('end', () => {
          srv.close();
          resolve(text);
        });
      });
      srv.listen(0, '10.231.0.1', () => {
        const { port } = srv.address() as AddressInfo;
        void mustRun('ip', ['netns', 'exec', ns, 'bash', '-c', `echo "from ${ns}" > /dev/tcp/10.231.0.1/${port}`]);
      });
    });
    assert.equal((await received).trim(), `from ${ns}`);
    // The namespace really is separate: the peer is not visible here.
    const here = await run('ip', ['link', 'show', peer]);
    assert.notEqual(here.code, 0);
    // netem attaches (tc talks to sch_netem).
    await mustRun('tc', ['qdisc', 'add', 'dev', host, 'root', 'netem', 'delay', '1ms']);
  } finally {
    await run('ip', ['link', 'del', host]);
    await run('ip', ['netns', 'del', ns]);
  }
  const dir = await tmpDir();
  assert.ok(existsSync(dir));
});
