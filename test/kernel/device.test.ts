// Device-side semantics on the real kernel (run in the VM: test/kernel/run.sh): check and detach,
// busy and already-attached devices, mknod minors for max_part=0 and the default, refusal of
// nodes that are not nbd devices, and the errors without the module and without root.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { asUnprivileged, cleanup, loadNbd, mustRun, requireGuest, startNbdkit, tmpDir, unloadNbd, waitFor } from './lib.ts';
import { CLI_ARGS, CLI_TIMEOUT_MS, cli, detachEverything, show, sysPid } from './attach-common.ts';

requireGuest();
const mounts: string[] = [];
after(async () => {
  await detachEverything(mounts);
  await cleanup();
  await unloadNbd().catch(() => {});
});

const major = (rdev: number): number => Math.floor(rdev / 256) & 0xfff;
const minor = (rdev: number): number => (rdev & 0xff) | ((Math.floor(rdev / 4096) & ~0xff) >>> 0);

test('check and detach semantics, already attached, mounted, busy', async () => {
  await loadNbd({ nbds_max: 4 });
  const server = await startNbdkit(['memory', '16M']);
  const notAttached = await cli(['-c', '/dev/nbd0']);
  assert.equal(notAttached.code, 1, show(notAttached));
  assert.equal(notAttached.stdout, '');
  assert.match(notAttached.stderr, /\/dev\/nbd0 is not attached/);
  const detachFree = await cli(['-d', '/dev/nbd0']);
  assert.equal(detachFree.code, 0, show(detachFree));
  assert.match(detachFree.stderr, /was not attached/);

  const a = await cli(['127.0.0.1', String(server.port), '/dev/nbd0']);
  assert.equal(a.code, 0, show(a));
  const c = await cli(['check', 'nbd0']);
  assert.equal(c.code, 0, show(c));
  assert.equal(c.stdout.trim(), sysPid(0));

  const again = await cli(['127.0.0.1', String(server.port), '/dev/nbd0']);
  assert.equal(again.code, 5, show(again));
  assert.match(again.stderr, /\/dev\/nbd0 is already attached/);

  // Mounted: detach refuses unless --force.
  const mnt = await tmpDir('mnt-');
  mounts.push(mnt);
  await mustRun('mkfs.ext4', ['-q', '-F', '/dev/nbd0'], { timeoutMs: 120_000 });
  await mustRun('mount', ['/dev/nbd0', mnt]);
  const refused = await cli(['-d', '/dev/nbd0']);
  assert.equal(refused.code, 5, show(refused));
  assert.match(refused.stderr, new RegExp(`is in use \\(mounted on ${mnt}\\): unmount it`));
  assert.ok(sysPid(0), 'still attached after the refusal');
  await mustRun('umount', [mnt]);
  const d = await cli(['detach', '/dev/nbd0']);
  assert.equal(d.code, 0, show(d));
  assert.match(d.stdout, /^\/dev\/nbd0 detached$/m);
  const c2 = await cli(['-c', '/dev/nbd0']);
  assert.equal(c2.code, 1, show(c2));

  // Busy: another process holds /dev/nbd1 open → the kernel says EBUSY; we say who.
  const holder = spawn('/bin/bash', ['-c', 'exec 3</dev/nbd1; exec sleep 300'], { stdio: 'ignore' });
  try {
    await waitFor(() => existsSync(`/proc/${holder.pid}/fd/3`), 10_000, { what: 'holder has nbd1 open' });
    const busy = await cli(['127.0.0.1', String(server.port), '/dev/nbd1']);
    assert.equal(busy.code, 5, show(busy));
    assert.match(busy.stderr, /\/dev\/nbd1 is busy \(open by pid \d+ \(sleep\)\)/);
  } finally {
    holder.kill('SIGKILL');
  }
  assert.equal(sysPid(1), undefined, 'nothing half-attached after EBUSY');
});

test('refusal of nodes that are not nbd devices, before any ioctl', async () => {
  await loadNbd({ nbds_max: 2 });
  const server = await startNbdkit(['memory', '16M']);
  const dir = await tmpDir('nodes-');
  await mustRun('mknod', [join(dir, 'loop'), 'b', '7', '0']);
  writeFileSync(join(dir, 'file'), 'x');
  const cases: [string, RegExp][] = [
    ['/dev/null', /\/dev\/null is not a block device/],
    [join(dir, 'file'), /is not a block device/],
    [dir, /is not a block device/],
    [join(dir, 'loop'), /is block device 7:0, not an nbd device \(major 43\)/],
  ];
  // Independent CLI runs go in parallel: start-up dominates under software emulation.
  await Promise.all(
    cases.map(async ([dev, msg]) => {
      const [r, c] = await Promise.all([cli(['127.0.0.1', String(server.port), dev]), cli(['-d', dev])]);
      assert.equal(r.code, 5, `${dev}: ${show(r)}`);
      assert.match(r.stderr, msg, dev);
      assert.notEqual(c.code, 0, `detach ${dev} must be refused: ${show(c)}`);
    }),
  );
  // A partition-style minor is refused too (nbd0p1 has major 43).
  await loadNbd({ nbds_max: 2, max_part: 4 });
  await mustRun('mknod', [join(dir, 'part'), 'b', '43', '1']);
  const p = await cli(['127.0.0.1', String(server.port), join(dir, 'part')]);
  assert.equal(p.code, 5, show(p));
  assert.match(p.stderr, /partition 1 of nbd0, not a whole device/);
});

test('mknod: minors right for max_part=0 and the default; idempotent; refuses to overwrite; the nodes work', async () => {
  await loadNbd({ nbds_max: 4, max_part: 0 });
  const dir = await tmpDir('dev-');
  const r = await cli(['mknod', '--dir', dir, '--prefix', 'nd']);
  assert.equal(r.code, 0, show(r));
  assert.match(r.stdout, /created 4 node\(s\), 0 already present \(max_part=0\)/);
  for (let i = 0; i < 4; i++) {
    const st = statSync(join(dir, `nd${i}`));
    assert.ok(st.isBlockDevice());
    assert.equal(major(st.rdev), 43);
    assert.equal(minor(st.rdev), i);
    assert.equal(st.mode & 0o777, 0o660);
  }
  const again = await cli(['mknod', '--dir', dir, '--prefix', 'nd']);
  assert.equal(again.code, 0, show(again));
  assert.match(again.stdout, /created 0 node\(s\), 4 already present/);

  // A node under another name attaches by its minor: nd2 is nbd2.
  const server = await startNbdkit(['memory', '16M']);
  const a = await cli(['127.0.0.1', String(server.port), join(dir, 'nd2')]);
  assert.equal(a.code, 0, show(a));
  assert.ok(sysPid(2), 'nd2 attached nbd2');
  assert.equal((await cli(['-c', join(dir, 'nd2')])).code, 0);
  assert.equal((await cli(['-d', join(dir, 'nd2')])).code, 0);
  assert.equal(sysPid(2), undefined);

  // The module's default max_part: the minors must be the ones the kernel itself gives nbdN
  // (/sys/block/nbdN/dev), whatever part_shift this kernel's default works out to.
  await loadNbd({ nbds_max: 3 });
  const published = readFileSync('/sys/module/nbd/parameters/max_part', 'utf8').trim();
  const kernelMinor = (i: number): number => Number(readFileSync(`/sys/block/nbd${i}/dev`, 'utf8').trim().split(':')[1]);
  assert.ok(kernelMinor(1) > 1, `default max_part ${published} gives partitions (nbd1 is 43:${kernelMinor(1)})`);
  const dir2 = await tmpDir('dev-');
  const r2 = await cli(['mknod', '--dir', dir2]);
  assert.equal(r2.code, 0, show(r2));
  assert.match(r2.stdout, new RegExp(`created 3 node\\(s\\), 0 already present \\(max_part=${published}\\)`));
  for (let i = 0; i < 3; i++) {
    const st = statSync(join(dir2, `nbd${i}`));
    assert.equal(major(st.rdev), 43);
    assert.equal(minor(st.rdev), kernelMinor(i), `nbd${i} minor as the kernel has it`);
  }
  // The max_part=0 nodes are now wrong: mknod refuses to overwrite them, attach refuses nd1 (minor 1 = nbd0p1).
  const conflict = await cli(['mknod', '--dir', dir, '--prefix', 'nd', '--count', '2']);
  assert.equal(conflict.code, 5, show(conflict));
  assert.match(conflict.stderr, new RegExp(`nd1 is block device 43:1, expected 43:${kernelMinor(1)}: refusing to overwrite it`));
  assert.equal(minor(statSync(join(dir, 'nd1')).rdev), 1, 'left untouched');
  writeFileSync(join(dir2, 'nbd3'), 'not a node');
  const conflict2 = await cli(['mknod', '--dir', dir2, '--count', '4']);
  assert.equal(conflict2.code, 5, show(conflict2));
  assert.match(conflict2.stderr, /nbd3 exists and is not a block device: refusing to overwrite it/);
});

test('clear errors without the module and without root', async () => {
  await unloadNbd();
  const server = await startNbdkit(['memory', '16M']);
  const devDir = await tmpDir('dev-');
  const [noMod, noModAuto, noModIoctl, mk, chk] = await Promise.all([
    cli(['127.0.0.1', String(server.port), '/dev/nbd0']),
    cli(['127.0.0.1', String(server.port)]),
    cli(['-L', '127.0.0.1', String(server.port)]),
    cli(['mknod', '--dir', devDir]),
    cli(['-c', '/dev/nbd0']),
  ]);
  assert.equal(noMod.code, 5, show(noMod));
  assert.match(noMod.stderr, /nbd kernel module is not loaded: run: modprobe nbd/);
  assert.equal(noModAuto.code, 5, show(noModAuto));
  assert.match(noModAuto.stderr, /run: modprobe nbd/);
  assert.equal(noModIoctl.code, 5, show(noModIoctl));
  assert.match(noModIoctl.stderr, /run: modprobe nbd/);
  assert.equal(mk.code, 5, show(mk));
  assert.match(mk.stderr, /run: modprobe nbd/);
  assert.equal(chk.code, 1, show(chk));

  await loadNbd({ nbds_max: 2 });
  const unpriv = (args: string[]) => asUnprivileged([process.execPath, ...CLI_ARGS, ...args], { timeoutMs: CLI_TIMEOUT_MS });
  const devDir2 = await tmpDir('dev-');
  const [a, d, m, c] = await Promise.all([
    unpriv(['127.0.0.1', String(server.port), '/dev/nbd0']),
    unpriv(['-d', '/dev/nbd0']),
    unpriv(['mknod', '--dir', devDir2]),
    unpriv(['-c', '/dev/nbd0']),
  ]);
  assert.equal(a.code, 6, show(a));
  assert.match(a.stderr, /needs root or CAP_SYS_ADMIN/);
  assert.equal(d.code, 6, show(d));
  assert.match(d.stderr, /needs root or CAP_SYS_ADMIN/);
  assert.equal(m.code, 6, show(m));
  // check needs no privilege.
  assert.equal(c.code, 1, show(c));
  assert.equal(sysPid(0), undefined);
});

test('connection refused and unknown export: clear errors, nothing attached', async () => {
  await loadNbd({ nbds_max: 2 });
  const refused = await cli(['127.0.0.1', '1', '/dev/nbd0']);
  assert.equal(refused.code, 3, show(refused));
  assert.match(refused.stderr, /connection refused/);
  const server = await startNbdkit(['--filter=exportname', 'memory', '16M', 'exportname=disk', 'exportname-strict=true']);
  const unknown = await cli(['-N', 'nope', '127.0.0.1', String(server.port), '/dev/nbd0']);
  assert.equal(unknown.code, 4, show(unknown));
  assert.match(unknown.stderr, /nope/);
  assert.equal(sysPid(0), undefined);
});
