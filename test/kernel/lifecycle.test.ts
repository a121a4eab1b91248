// A disk is never dropped or stranded (run in the VM: test/kernel/run.sh test/kernel/lifecycle.test.ts):
//  1. SIGTERM to the supervisor of a mounted device: it exits 0 without disconnecting, the filesystem
//     keeps working (write + fsync), --reattach adopts the device, detach then works after umount;
//  2. supervisor SIGKILLed, then the server killed and restarted while nobody listens, I/O issued:
//     --reattach repairs the dead link at once and the data reads back; `status` says the truth
//     throughout (no supervisor, then the new one);
//  3. -L returns once the device is usable; -d detaches it and the ioctl lifeline exits;
//  4. detach refuses a device under swap, under a device-mapper target, and mounted only in another
//     mount namespace, naming the user, and sends nothing: the device serves direct I/O afterwards;
//     --force works;
//  5. two concurrent --reattach: exactly one supervisor results.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadModule, mustRun, run, sh, sha256, startNbdkit, tmpDir, tmpFile, waitFor } from './lib.ts';
import { cli, kernelSuite, show, sysPid } from './attach-common.ts';
import { claimedExclusively } from '../../src/kernel/users.ts';

const mounts = kernelSuite(8);
const MiB = 1024 * 1024;

function supervisorPid(stdout: string): number {
  const m = /supervisor pid (\d+)/.exec(stdout);
  assert.ok(m, `no supervisor pid in: ${stdout}`);
  return Number(m[1]);
}

function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) [ZX] /s.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

async function directRead(dev: string): Promise<void> {
  const r = await run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4096', 'count=8', 'iflag=direct', 'status=none'], { timeoutMs: 60_000 });
  assert.equal(r.code, 0, `direct read of ${dev} after the refusal: ${r.stderr}`);
}

async function status(dev: string): Promise<{ attached: boolean; supervisorPid?: number | null; connections?: { live: number | null; total: number } }> {
  const r = await cli(['status', dev, '--json']);
  assert.equal(r.code, 0, show(r));
  return (JSON.parse(r.stdout) as { attached: boolean; supervisorPid?: number | null }[])[0]!;
}

test('SIGTERM to the supervisor of a mounted device leaves it attached and working; --reattach adopts; detach after umount', async () => {
  const img = await tmpFile(64 * MiB);
  const server = await startNbdkit(['file', img]);
  const a = await cli([`127.0.0.1:${server.port}`, '/dev/nbd1']);
  assert.equal(a.code, 0, show(a));
  const pid = supervisorPid(a.stdout);
  await mustRun('mkfs.ext4', ['-q', '-F', '/dev/nbd1']);
  const mnt = await tmpDir('mnt-');
  await mustRun('mount', ['/dev/nbd1', mnt]);
  mounts.push(mnt);
  // The supervisor started beside the command: signal it once it runs (its first log line).
  const logFile = /, log (\S+)$/m.exec(a.stdout)?.[1];
  assert.ok(logFile, a.stdout);
  await waitFor(() => readFileSync(logFile, 'utf8').includes(`supervising (pid ${pid},`), 120_000, { what: 'the supervisor running' });
  process.kill(pid, 'SIGTERM');
  await waitFor(() => !alive(pid), 30_000, { what: 'supervisor exit after SIGTERM' });
  assert.ok(sysPid(1) !== undefined, 'the device is still attached');
  const log = readFileSync(logFile, 'utf8');
  assert.match(log, /SIGTERM: \/dev\/nbd1 is in use \(mounted on [^)]*\): leaving it attached/);
  await mustSh(`dd if=/dev/urandom of=${mnt}/after bs=64k count=16 status=none conv=fsync && sync`);
  const st = await status('/dev/nbd1');
  assert.equal(st.attached, true);
  assert.equal(st.supervisorPid, null, 'status: no supervisor');
  const r = await cli(['--reattach', '/dev/nbd1']);
  assert.equal(r.code, 0, show(r));
  const pid2 = supervisorPid(r.stdout);
  assert.equal((await status('/dev/nbd1')).supervisorPid, pid2);
  // detach refuses while mounted, then works.
  const refused = await cli(['-d', '/dev/nbd1']);
  assert.equal(refused.code, 5, show(refused));
  assert.match(refused.stderr, /^nbd-attach: detach: \/dev\/nbd1 is in use \(mounted on .*\): unmount it/);
  assert.ok(alive(pid2), 'a refused detach leaves the supervisor running');
  await mustRun('umount', [mnt]);
  mounts.splice(mounts.indexOf(mnt), 1);
  const d = await cli(['-d', '/dev/nbd1']);
  assert.equal(d.code, 0, show(d));
  await waitFor(() => !alive(pid2), 30_000, { what: 'adopted supervisor exit after -d' });
  await server.stop();
});

function mustSh(cmd: string) {
  return sh(cmd, { timeoutMs: 120_000 }).then((r) => {
    assert.equal(r.code, 0, `${cmd}: ${r.stderr}`);
    return r;
  });
}

test('supervisor SIGKILLed, server restarted while nobody listens, I/O waiting: --reattach repairs at once; status tells the truth', async () => {
  const img = await tmpFile(32 * MiB, { random: true });
  const server = await startNbdkit(['file', img]);
  const a = await cli([`127.0.0.1:${server.port}`, '/dev/nbd2', '-T', '120']);
  assert.equal(a.code, 0, show(a));
  const pid = supervisorPid(a.stdout);
  process.kill(pid, 'SIGKILL');
  await waitFor(() => !alive(pid), 10_000, { what: 'supervisor gone' });
  const s1 = await status('/dev/nbd2');
  assert.equal(s1.attached, true);
  assert.equal(s1.supervisorPid, null, 'status: the killed supervisor is not shown as running');
  server.kill('SIGKILL');
  await server.exited();
  await server.restart();
  // The link died while no supervisor listened: its LINK_DEAD is gone for good. A read now waits.
  const reading = run('dd', ['if=/dev/nbd2', 'of=/dev/null', 'bs=4096', 'count=4', 'skip=77', 'iflag=direct', 'status=none'], { timeoutMs: 180_000 });
  await new Promise((r) => setTimeout(r, 3000));
  const t0 = Date.now();
  const r = await cli(['--reattach', '/dev/nbd2']);
  assert.equal(r.code, 0, show(r));
  const rd = await reading;
  assert.equal(rd.code, 0, `the waiting read completes after --reattach: ${rd.stderr}`);
  const ms = Date.now() - t0;
  console.log(`# read completed ${ms} ms after --reattach started`);
  assert.equal(await sha256('/dev/nbd2'), await sha256(img), 'the data reads back');
  const s2 = await status('/dev/nbd2');
  assert.equal(s2.supervisorPid, supervisorPid(r.stdout));
  assert.deepEqual(s2.connections, { live: 1, total: 1 });
  assert.equal((await cli(['-d', '/dev/nbd2'])).code, 0);
  await server.stop();
});

test('-L returns once the device is usable (ioctl lifeline in the background); -d detaches it and the lifeline exits', async () => {
  const img = await tmpFile(16 * MiB, { random: true });
  const server = await startNbdkit(['file', img]);
  const a = await cli(['-L', '127.0.0.1', String(server.port), '/dev/nbd3']);
  assert.equal(a.code, 0, show(a));
  assert.match(a.stdout, /^\/dev\/nbd3 attached: 16 MiB .*, ioctl, supervisor pid \d+, log /);
  const pid = supervisorPid(a.stdout);
  assert.ok(alive(pid));
  assert.equal(await sha256('/dev/nbd3'), await sha256(img), 'usable as soon as the command returned');
  const d = await cli(['-d', '/dev/nbd3']);
  assert.equal(d.code, 0, show(d));
  await waitFor(() => !alive(pid), 30_000, { what: 'ioctl lifeline exit after -d' });
  assert.equal(sysPid(3), undefined);
  await server.stop();
});

test('detach refuses a device under swap, under device-mapper, mounted only in another namespace; nothing is sent; --force works', async () => {
  const server = await startNbdkit(['memory', '64M']);
  const attachOne = async (dev: string): Promise<void> => {
    const a = await cli([`127.0.0.1:${server.port}`, dev]);
    assert.equal(a.code, 0, show(a));
  };
  // swap
  await attachOne('/dev/nbd4');
  await mustRun('mkswap', ['/dev/nbd4']);
  await mustRun('swapon', ['/dev/nbd4']);
  const s = await cli(['-d', '/dev/nbd4']);
  assert.equal(s.code, 5, show(s));
  assert.match(s.stderr, /^nbd-attach: detach: \/dev\/nbd4 is in use \(an active swap area \(\/dev\/nbd4\)\)/);
  assert.equal(s.stderr.trim().split('\n').length, 1, 'one line');
  await directRead('/dev/nbd4');
  await mustRun('swapoff', ['/dev/nbd4']);

  // device-mapper (a linear target over the whole device)
  await attachOne('/dev/nbd5');
  await loadModule('dm_mod');
  const sectors = readFileSync('/sys/block/nbd5/size', 'utf8').trim();
  await mustRun('dmsetup', ['create', 'nbdtest', '--noudevsync', '--table', `0 ${sectors} linear /dev/nbd5 0`]);
  await mustRun('dmsetup', ['mknodes', 'nbdtest']); // no udev in the VM
  try {
    const dm = await cli(['-d', '/dev/nbd5']);
    assert.equal(dm.code, 5, show(dm));
    assert.match(dm.stderr, /is in use \(used by dm-\d+ \(nbdtest\) \(device-mapper\/md holder\)/);
    await directRead('/dev/nbd5');
    await directRead('/dev/mapper/nbdtest');
  } finally {
    await mustRun('dmsetup', ['remove', '--noudevsync', 'nbdtest']);
  }

  // mounted only in another mount namespace: a process in `unshare -m` holds the mount.
  await attachOne('/dev/nbd6');
  await mustRun('mkfs.ext4', ['-q', '-F', '/dev/nbd6']);
  const mnt = await tmpDir('ns-mnt-');
  const ready = join(await tmpDir('ns-'), 'ready');
  const holder = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `mount /dev/nbd6 ${mnt} && echo ok > ${ready} && exec sleep 600`], { stdio: 'ignore' });
  try {
    await waitFor(() => existsSync(ready), 30_000, { what: 'mount in the other namespace' });
    assert.ok(!readFileSync('/proc/self/mountinfo', 'utf8').includes(mnt), 'not mounted in our namespace');
    const ns = await cli(['-d', '/dev/nbd6']);
    assert.equal(ns.code, 5, show(ns));
    assert.match(ns.stderr, new RegExp(`is in use \\(mounted on ${mnt} in another mount namespace \\(pid \\d+\\)\\)`));
    await directRead('/dev/nbd6');
  } finally {
    holder.kill('SIGKILL');
  }
  // The namespace (and with it the mount) goes with its last process: then nobody claims the device.
  await waitFor(() => claimedExclusively('/dev/nbd6') === false, 30_000, { what: 'the namespace and its mount gone' });
  // The filesystem was unmounted cleanly with its namespace: it checks clean.
  await mustRun('e2fsck', ['-n', '-f', '/dev/nbd6']);

  // A process with the device open is a user too; --force cuts the device off anyway.
  const opener = spawn('sh', ['-c', 'exec sleep 600 < /dev/nbd5'], { stdio: 'ignore' });
  try {
    await waitFor(async () => (await cli(['-d', '/dev/nbd5'])).stderr.includes(`open by pid ${opener.pid} (sleep)`), 60_000, { what: 'detach naming the opener' });
    await directRead('/dev/nbd5');
    const forced = cli(['-d', '--force', '/dev/nbd5']);
    setTimeout(() => opener.kill('SIGKILL'), 1500);
    const f = await forced;
    assert.equal(f.code, 0, show(f));
  } finally {
    opener.kill('SIGKILL');
  }
  assert.equal(sysPid(5), undefined, 'nbd5 disconnected by --force');
  for (const dev of ['/dev/nbd4', '/dev/nbd6']) assert.equal((await cli(['-d', dev])).code, 0);
  await server.stop();
});
test('two concurrent --reattach: exactly one supervisor results, the other refuses', async () => {
  const server = await startNbdkit(['memory', '16M']);
  const a = await cli([`127.0.0.1:${server.port}`, '/dev/nbd7']);
  assert.equal(a.code, 0, show(a));
  const pid = supervisorPid(a.stdout);
  process.kill(pid, 'SIGKILL');
  await waitFor(() => !alive(pid), 10_000, { what: 'supervisor gone' });
  const [r1, r2] = await Promise.all([cli(['--reattach', '/dev/nbd7']), cli(['--reattach', '/dev/nbd7'])]);
  const ok = [r1, r2].filter((r) => r.code === 0);
  const refused = [r1, r2].filter((r) => r.code !== 0);
  assert.equal(ok.length, 1, `${show(r1)}\n${show(r2)}`);
  assert.equal(refused.length, 1);
  assert.match(refused[0]!.stderr, /already supervised by pid \d+/);
  const winner = supervisorPid(ok[0]!.stdout);
  const supervisors = (await sh("ps -eo pid,args | grep -F -- '--reattach /dev/nbd7' | grep -v grep", { timeoutMs: 10_000 })).stdout.trim().split('\n').filter(Boolean);
  assert.equal(supervisors.length, 1, `one supervisor process: ${supervisors.join(' | ')}`);
  assert.ok(alive(winner));
  assert.equal((await cli(['-d', '/dev/nbd7'])).code, 0);
  await server.stop();
});
