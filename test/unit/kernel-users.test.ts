// Who uses an nbd device, read from a fake sysfs/proc tree (the real kernel: test/kernel/lifecycle.test.ts).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describeUser, deviceUsers, holdersOf, swapsOf } from '../../src/kernel/users.ts';

function tree(): { sys: string; dev: string; proc: string } {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'users-'));
  const sys = path.join(root, 'sys');
  const proc = path.join(root, 'proc');
  fs.mkdirSync(path.join(sys, 'block/nbd2/holders'), { recursive: true });
  fs.mkdirSync(path.join(sys, 'block/nbd2/nbd2p1/holders'), { recursive: true });
  fs.mkdirSync(path.join(sys, 'module/nbd/parameters'), { recursive: true });
  fs.writeFileSync(path.join(sys, 'module/nbd/parameters/max_part'), '16\n');
  fs.mkdirSync(path.join(proc, 'self'), { recursive: true });
  fs.writeFileSync(path.join(proc, 'self/mountinfo'), '');
  fs.writeFileSync(path.join(proc, 'swaps'), 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n');
  return { sys, dev: path.join(root, 'dev'), proc };
}

test('nothing uses a device with empty holders, no mounts, no swap, no openers', () => {
  const roots = tree();
  assert.deepEqual(deviceUsers(2, '/nonexistent/nbd2', { roots }), []);
});

test('holders of the disk and of a partition, with the device-mapper name', () => {
  const roots = tree();
  fs.writeFileSync(path.join(roots.sys, 'block/nbd2/holders/dm-0'), '');
  fs.writeFileSync(path.join(roots.sys, 'block/nbd2/nbd2p1/holders/md127'), '');
  fs.mkdirSync(path.join(roots.sys, 'block/dm-0/dm'), { recursive: true });
  fs.writeFileSync(path.join(roots.sys, 'block/dm-0/dm/name'), 'crypt-home\n');
  assert.deepEqual(holdersOf(2, roots).map(describeUser), ['used by dm-0 (crypt-home) (device-mapper/md holder)', 'used by md127 (device-mapper/md holder)']);
});

test('swap areas by name (disk and partition); files and other devices are not ours', () => {
  const roots = tree();
  const swaps = [
    'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority',
    '/dev/nbd2                               partition\t1048572\t\t0\t\t-2',
    '/dev/nbd2p1                             partition\t1048572\t\t0\t\t-3',
    '/dev/nbd12                              partition\t1048572\t\t0\t\t-4',
    '/swapfile                               file\t\t1048572\t\t0\t\t-5',
  ].join('\n');
  assert.deepEqual(swapsOf(2, 5, swaps, roots).map(describeUser), ['an active swap area (/dev/nbd2)', 'an active swap area (/dev/nbd2p1)']);
});

test('mounts of this namespace (partition minors with max_part 16 → shift 5) are named', () => {
  const roots = tree();
  // nbd2 with max_part=16: minor 64; nbd2p1: minor 65; nbd1: minor 32.
  fs.writeFileSync(
    path.join(roots.proc, 'self/mountinfo'),
    ['36 25 43:65 / /srv/data rw,relatime shared:1 - ext4 /dev/nbd2p1 rw', '37 25 43:32 / /other rw - ext4 /dev/nbd1 rw', '38 25 8:1 / / rw - ext4 /dev/sda1 rw'].join('\n'),
  );
  assert.deepEqual(deviceUsers(2, '/nonexistent', { roots }).map(describeUser), ['mounted on /srv/data']);
});
