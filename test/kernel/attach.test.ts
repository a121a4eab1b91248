// nbd-attach against the real kernel nbd driver (run in the VM: test/kernel/run.sh).
// netlink and ioctl attach with an ext4 round trip and checksums, the auto-picked device,
// read-only exports and -R — each against a real server (nbdkit, nbd-server, qemu-nbd).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustRun, run, sha256, startNbdkit, startNbdServer, startQemuNbd, tmpDir, tmpFile, waitFor, nbdSizeBytes } from './lib.ts';
import { makePki } from '../lib/servers.ts';
import { assertWritesRefused, kernelSuite, attachedDevice, cli, fillFilesystem, indexOf, show, startForeground, sysPid, verifyFilesystem } from './attach-common.ts';

const MiB = 1024 * 1024;
const mounts = kernelSuite();

test('netlink (nbdkit): attach, mkfs.ext4, mount, write, unmount, detach, re-attach, checksums match', async () => {
  const server = await startNbdkit(['memory', '64M']);
  const a = await cli(['127.0.0.1', String(server.port), '/dev/nbd1', '-i', 'ktest-netlink']);
  assert.equal(a.code, 0, show(a));
  assert.equal(attachedDevice(a.stdout), '/dev/nbd1');
  assert.match(a.stdout, /^\/dev\/nbd1 attached: 64 MiB \(67108864 bytes\), export \(default\), block size \d+, netlink\b/);
  // Ready on return: size and pid already there (no race with mount).
  assert.equal(nbdSizeBytes(1), 64 * MiB);
  assert.ok(sysPid(1), 'pid present on return');
  assert.equal(readFileSync('/sys/block/nbd1/backend', 'utf8').trim(), 'ktest-netlink');
  const sums = await fillFilesystem(mounts, '/dev/nbd1');
  const devSum = await sha256('/dev/nbd1');
  const d = await cli(['-d', '/dev/nbd1']);
  assert.equal(d.code, 0, show(d));
  assert.equal(sysPid(1), undefined);
  // Re-attach the same export (nbdkit memory keeps its data while it runs) to the same device.
  const b = await cli(['127.0.0.1', String(server.port), 'nbd1']);
  assert.equal(b.code, 0, show(b));
  assert.equal(await sha256('/dev/nbd1'), devSum);
  await verifyFilesystem(mounts, '/dev/nbd1', sums);
  const d2 = await cli(['detach', 'nbd1']);
  assert.equal(d2.code, 0, show(d2));
});

test('ioctl -L (nbd-server): attach in the foreground, ext4 round trip, detach ends it, re-attach, checksums match', async () => {
  const file = await tmpFile(64 * MiB);
  const server = await startNbdServer(`[disk]\nexportname = ${file}\n`);
  // nbd-server in this VM now and then sends its greeting only after 4-13 s (measured: median 6-9 ms
  // over 120 connections, a few outliers, once the very first connection); more than our default
  // 10 s handshake limit, which this test is not about.
  const slow = ['--connect-timeout', '60'];
  const fg = await startForeground([...slow, '-N', 'disk', '-L', '127.0.0.1', String(server.port), '/dev/nbd2']);
  assert.equal(fg.device, '/dev/nbd2');
  assert.match(fg.stdout(), /export 'disk', block size \d+, ioctl, supervisor pid \d+, logging to stderr\n/);
  assert.equal(nbdSizeBytes(2), 64 * MiB);
  const pid = sysPid(2);
  assert.ok(pid, 'pid present on return');
  // The pid in sysfs is the DO_IT thread of the nbd-attach process.
  assert.ok(existsSync(`/proc/${fg.child.pid}/task/${pid}`), `sysfs pid ${pid} is a thread of nbd-attach ${fg.child.pid}`);
  const c = await cli(['-c', '/dev/nbd2']);
  assert.equal(c.code, 0, show(c));
  assert.equal(c.stdout.trim(), pid);
  // A signal aimed at the DO_IT thread itself must not tear the device down: that thread blocks them all.
  // tgkill(tgid, tid, SIGUSR2) (x86_64 syscall 234): unblocked, SIGUSR2 would kill the whole process.
  await mustRun('perl', ['-e', `syscall(234, ${fg.child.pid}, ${pid}, 12) == 0 or die "tgkill: $!"`]);
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(fg.child.exitCode, null, 'nbd-attach still running after SIGUSR2 to the DO_IT thread');
  const status = readFileSync(`/proc/${fg.child.pid}/task/${pid}/status`, 'utf8');
  const mask = (field: string): bigint => BigInt(`0x${new RegExp(`^${field}:\\s*([0-9a-f]+)$`, 'm').exec(status)![1]}`);
  const bit = (sig: number): bigint => 1n << BigInt(sig - 1);
  for (const sig of [1, 2, 12, 15]) assert.equal(mask('SigBlk') & bit(sig), bit(sig), `DO_IT thread blocks signal ${sig}`);
  assert.equal(mask('SigPnd') & bit(12), bit(12), 'SIGUSR2 waits, blocked, on the DO_IT thread');
  assert.equal(sysPid(2), pid, 'still attached after the signal');
  const sums = await fillFilesystem(mounts, '/dev/nbd2');
  assert.equal(sysPid(2), pid, 'still attached after signals and I/O');
  const d = await cli(['-d', '/dev/nbd2']);
  assert.equal(d.code, 0, show(d));
  const ended = await fg.exit;
  assert.equal(ended.code, 0, `foreground attach exit: ${JSON.stringify(ended)}\n${fg.stderr()}`);
  assert.equal(sysPid(2), undefined);
  // Re-attach with --ioctl and check the data came back from the server's file.
  const fg2 = await startForeground([...slow, '--name', 'disk', '--ioctl', '127.0.0.1', String(server.port), '/dev/nbd2']);
  await verifyFilesystem(mounts, '/dev/nbd2', sums);
  assert.equal(await sha256('/dev/nbd2'), await sha256(file));
  // SIGTERM to the foreground process: a clean disconnect, exit 0, device free.
  process.kill(fg2.child.pid!, 'SIGTERM');
  const ended2 = await fg2.exit;
  assert.equal(ended2.code, 0, fg2.stderr());
  assert.match(fg2.stderr(), /disconnected/);
  await waitFor(() => sysPid(2) === undefined, 10_000, { what: 'nbd2 free after SIGTERM' });
});

test('auto-picked device (qemu-nbd): no device argument, the kernel picks one and we print it', async () => {
  const file = await tmpFile(32 * MiB, { random: true });
  const server = await startQemuNbd(['-f', 'raw', '-t', '-e', '4', file]);
  const a = await cli(['127.0.0.1:' + server.port]);
  assert.equal(a.code, 0, show(a));
  const dev = attachedDevice(a.stdout);
  assert.match(dev, /^\/dev\/nbd\d+$/);
  const idx = indexOf(dev);
  assert.ok(sysPid(idx), `${dev} attached`);
  assert.equal(nbdSizeBytes(idx), 32 * MiB);
  assert.equal(await sha256(dev), await sha256(file));
  // A second auto-pick gets a different device.
  const b = await cli(['127.0.0.1:' + server.port]);
  assert.equal(b.code, 0, show(b));
  const dev2 = attachedDevice(b.stdout);
  assert.notEqual(dev2, dev);
  for (const x of [dev, dev2]) {
    const d = await cli(['detach', x]);
    assert.equal(d.code, 0, show(d));
  }
});

/** Writing must fail, the kernel must mark the disk read-only and the server's data must not change. */
test('read-only export (nbdkit -r): the kernel refuses writes', async () => {
  const file = await tmpFile(16 * MiB, { random: true });
  const sum = await sha256(file);
  const server = await startNbdkit(['-r', 'file', file]);
  const a = await cli(['127.0.0.1', String(server.port), '/dev/nbd3']);
  assert.equal(a.code, 0, show(a));
  assert.match(a.stdout, /read-only, netlink/);
  assert.equal(await sha256('/dev/nbd3'), sum);
  await assertWritesRefused('/dev/nbd3', sum, () => sha256(file));
  assert.equal((await cli(['-d', '/dev/nbd3'])).code, 0);
});

test('-R on a writable export (netlink and ioctl): the kernel refuses writes', async () => {
  const file = await tmpFile(16 * MiB, { random: true });
  const sum = await sha256(file);
  const server = await startQemuNbd(['-f', 'raw', '-t', '-e', '4', file]);
  const a = await cli(['-R', '127.0.0.1', String(server.port), '/dev/nbd4']);
  assert.equal(a.code, 0, show(a));
  assert.match(a.stdout, /read-only, netlink/);
  await assertWritesRefused('/dev/nbd4', sum, () => sha256(file));
  assert.equal((await cli(['-d', '/dev/nbd4'])).code, 0);
  const fg = await startForeground(['-R', '-L', '127.0.0.1', String(server.port), '/dev/nbd4']);
  assert.match(fg.stdout(), /read-only, ioctl/);
  await assertWritesRefused('/dev/nbd4', sum, () => sha256(file));
  assert.equal((await cli(['-d', '/dev/nbd4'])).code, 0);
  assert.equal((await fg.exit).code, 0);
  // -R leaves nothing behind: the same device attached again without it is writable (the block
  // device's own read-only flag, set by BLKROSET in ioctl mode, outlives the disconnect).
  const writable = async (how: string): Promise<void> => {
    assert.equal(readFileSync('/sys/block/nbd4/ro', 'utf8').trim(), '0', `${how}: sysfs ro`);
    const w = await run('dd', ['if=/dev/zero', 'of=/dev/nbd4', 'bs=4096', 'count=1', 'oflag=direct', 'conv=notrunc', 'status=none']);
    assert.equal(w.code, 0, `${how}: a write after an earlier -R attach: ${w.stderr}`);
  };
  const again = await cli(['127.0.0.1', String(server.port), '/dev/nbd4']);
  assert.equal(again.code, 0, show(again));
  await writable('netlink after -R -L');
  assert.equal((await cli(['-d', '/dev/nbd4'])).code, 0);
  const fg2 = await startForeground(['-R', '-L', '127.0.0.1', String(server.port), '/dev/nbd4']);
  assert.equal((await cli(['-d', '/dev/nbd4'])).code, 0);
  assert.equal((await fg2.exit).code, 0);
  const fg3 = await startForeground(['-L', '127.0.0.1', String(server.port), '/dev/nbd4']);
  await writable('ioctl after -R -L');
  assert.equal((await cli(['-d', '/dev/nbd4'])).code, 0);
  assert.equal((await fg3.exit).code, 0);
});

test('block size: 512 by default, -b preferred takes the server preference, -b N overrides, a conflict is explained', async () => {
  const server = await startNbdkit(['--filter=blocksize-policy', 'memory', '8M', 'blocksize-preferred=4096', 'blocksize-minimum=512']);
  const lbs = (): string => readFileSync('/sys/block/nbd5/queue/logical_block_size', 'utf8').trim();
  const a = await cli(['127.0.0.1', String(server.port), '/dev/nbd5']);
  assert.equal(a.code, 0, show(a));
  assert.match(a.stdout, /block size 512\b/);
  assert.equal(lbs(), '512');
  assert.equal((await cli(['-d', '/dev/nbd5'])).code, 0);
  const p = await cli(['-b', 'preferred', '127.0.0.1', String(server.port), '/dev/nbd5']);
  assert.equal(p.code, 0, show(p));
  assert.equal(lbs(), '4096');
  assert.equal((await cli(['-d', '/dev/nbd5'])).code, 0);
  const b = await cli(['-b', '1024', '127.0.0.1', String(server.port), '/dev/nbd5']);
  assert.equal(b.code, 0, show(b));
  assert.equal(lbs(), '1024');
  assert.match(b.stderr, /using block size 1024 \(-b\); the server prefers 4096/);
  assert.equal((await cli(['-d', '/dev/nbd5'])).code, 0);
  const strict = await startNbdkit(['--filter=blocksize-policy', 'memory', '8M', 'blocksize-minimum=2048', 'blocksize-preferred=4096']);
  const c = await cli(['-b', '512', '127.0.0.1', String(strict.port), '/dev/nbd5']);
  assert.equal(c.code, 5, show(c));
  assert.match(c.stderr, /below the server's minimum of 2048: use -b 2048/);
  assert.equal(sysPid(5), undefined, 'nothing attached after the refusal');
  const d = await cli(['127.0.0.1', String(strict.port), '/dev/nbd5']);
  assert.equal(d.code, 0, show(d));
  assert.equal(lbs(), '2048', 'the default is raised to the server minimum');
  assert.equal((await cli(['-d', '/dev/nbd5'])).code, 0);
});

test('a disk image from qemu-nbd (which prefers 4096): its 512-byte GPT partitions and a 1 KiB-block ext4 made by nbd-client are seen', async () => {
  const img = await tmpFile(64 * MiB);
  const server = await startQemuNbd(['-f', 'raw', '-t', img]);
  // Partition and format it the classic way: nbd-client (512-byte sectors).
  await mustRun('nbd-client', ['127.0.0.1', String(server.port), '/dev/nbd6'], { timeoutMs: 60_000 });
  await mustRun('sfdisk', ['-q', '/dev/nbd6'], { input: 'label: gpt\n,32M\n,\n', timeoutMs: 60_000 });
  await mustRun('partx', ['-u', '/dev/nbd6']);
  await waitFor(() => existsSync('/sys/block/nbd6/nbd6p2'), 10_000, { what: 'nbd6p2' });
  await mustRun('mkfs.ext4', ['-q', '-F', '-b', '1024', '/dev/nbd6p2'], { timeoutMs: 120_000 });
  await mustRun('nbd-client', ['-d', '/dev/nbd6'], { timeoutMs: 30_000 });
  await waitFor(() => sysPid(6) === undefined, 10_000, { what: 'nbd6 detached' });
  const a = await cli(['127.0.0.1', String(server.port), '/dev/nbd6']);
  assert.equal(a.code, 0, show(a));
  await waitFor(() => existsSync('/sys/block/nbd6/nbd6p2'), 10_000, { what: 'the GPT partitions on our attach' });
  const mnt = await tmpDir('mnt-');
  mounts.push(mnt);
  await mustRun('mount', ['-o', 'ro', '/dev/nbd6p2', mnt]);
  await mustRun('umount', [mnt]);
  assert.equal((await cli(['-d', '/dev/nbd6'])).code, 0);
});

test('-L reconnects after a server restart, like nbd-client -persist (I/O fails meanwhile: ioctl cannot hold it)', async () => {
  const img = await tmpFile(16 * MiB, { random: true });
  const server = await startNbdkit(['file', img]);
  const fg = await startForeground(['-L', '127.0.0.1', String(server.port), '/dev/nbd7']);
  const read = () => run('dd', ['if=/dev/nbd7', 'of=/dev/null', 'bs=4096', 'count=16', 'skip=100', 'iflag=direct', 'status=none'], { timeoutMs: 60_000 });
  assert.equal((await read()).code, 0);
  server.kill('SIGKILL');
  await server.exited();
  await waitFor(() => /the connection died/.test(fg.stderr()), 60_000, { what: 'DO_IT ending on the dead connection' });
  await server.restart();
  await waitFor(() => /reconnected/.test(fg.stderr()), 60_000, { what: `ioctl reconnect; stderr: ${fg.stderr()}` });
  const again = await read();
  assert.equal(again.code, 0, `read after the reconnect: ${again.stderr}`);
  assert.equal(await sha256('/dev/nbd7'), await sha256(img), 'the device shows the image again');
  const d = await cli(['-d', '/dev/nbd7']);
  assert.equal(d.code, 0, show(d));
  assert.equal((await fg.exit).code, 0, fg.stderr());
});

test('nbdtab (the nbd-client `nbdN` form): the entry is attached with its options; -s and -m mark the supervisor', async () => {
  const disk = await tmpFile(64 * MiB);
  const server = await startNbdkit(['file', disk]);
  const tab = join(await tmpDir('tab-'), 'nbdtab');
  writeFileSync(tab, `# as nbdtab(5)\nnbd4\t127.0.0.1  disk  port=${server.port},bs=4096,conns=2,timeout=30,swap,persist,_local\n`);
  const a = await cli(['--nbdtab', tab, 'nbd4', '-m']);
  assert.equal(a.code, 0, show(a));
  assert.equal(a.stderr, '', 'no warnings: _local is for local use, persist is understood');
  assert.match(a.stdout, /^\/dev\/nbd4 attached: 64 MiB .*export 'disk', block size 4096, netlink, connections 2, supervisor pid \d+/);
  const pid = Number(/supervisor pid (\d+)/.exec(a.stdout)![1]);
  assert.equal(readFileSync('/sys/block/nbd4/queue/logical_block_size', 'utf8').trim(), '4096', 'bs=4096');
  assert.equal(readFileSync('/sys/block/nbd4/queue/io_timeout', 'utf8').trim(), '30000', 'timeout=30 (ms in sysfs)');
  assert.equal(readFileSync(`/proc/${pid}/oom_score_adj`, 'utf8').trim(), '-1000', 'swap: the supervisor is kept from the OOM killer');
  assert.equal(readFileSync(`/proc/${pid}/cmdline`, 'utf8')[0], '@', "-m: argv[0] starts with '@' (systemd leaves it at shutdown)");
  const st = await cli(['status', 'nbd4', '--json']);
  assert.equal(st.code, 0, show(st));
  assert.deepEqual((JSON.parse(st.stdout) as { connections: unknown }[])[0]!.connections, { live: 2, total: 2 });
  // swap on the device for real: mkswap, swapon, swapoff.
  await mustRun('mkswap', ['/dev/nbd4']);
  await mustRun('swapon', ['/dev/nbd4']);
  assert.match(readFileSync('/proc/swaps', 'utf8'), /\/dev\/nbd4\s+partition/);
  await mustRun('swapoff', ['/dev/nbd4']);
  const d = await cli(['-d', '/dev/nbd4']);
  assert.equal(d.code, 0, show(d));
  const gone = (): boolean => {
    try {
      return /^\d+ \(.*\) [ZX] /s.test(readFileSync(`/proc/${pid}/stat`, 'utf8')); // a zombie nobody reaps has exited too
    } catch {
      return true;
    }
  };
  await waitFor(gone, 30_000, { what: 'supervisor exit after -d' });
  // A device the file does not list: one line saying what to type.
  const none = await cli(['--nbdtab', tab, 'nbd5']);
  assert.equal(none.code, 2, show(none));
  assert.match(none.stderr, /^nbd-attach: no server given for nbd5, and .*nbdtab has no entry for it: nbd-attach HOST\[:PORT\] nbd5\n$/);
  await server.stop();
});

test('-L (ioctl) over TLS with --tls-relay: the relay runs beside NBD_DO_IT in the same process; ext4 round trip; SIGTERM disconnects', async () => {
  const pki = makePki(await tmpDir('pki-'), { ec: true });
  const file = await tmpFile(64 * MiB);
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, 'file', file]);
  const fg = await startForeground(['-L', '--tls-relay', '--tls-certificates', pki, `127.0.0.1:${server.port}`, '/dev/nbd3']);
  assert.match(fg.stdout(), /^\/dev\/nbd3 attached: 64 MiB .*export \(default\) over TLS \(relay, --tls-relay\), block size \d+, ioctl, supervisor pid \d+, logging to stderr\n/);
  const sums = await fillFilesystem(mounts, '/dev/nbd3');
  await verifyFilesystem(mounts, '/dev/nbd3', sums);
  assert.equal(await sha256('/dev/nbd3'), await sha256(file), "the server's file holds what went through the relay");
  process.kill(fg.child.pid!, 'SIGTERM');
  const ended = await fg.exit;
  assert.equal(ended.code, 0, fg.stderr());
  await waitFor(() => sysPid(3) === undefined, 10_000, { what: 'nbd3 free after SIGTERM' });
  await server.stop();
});
