// Pure parts of device handling: names, dev_t encoding, minors and max_part, mountinfo, capabilities,
// mknod planning, block-size choice, the attach command's positional arguments.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import {
  devMajor,
  devMinor,
  hasCapSysAdmin,
  indexFromMinor,
  makedev,
  minorOf,
  mountsOf,
  parseDeviceName,
  parseMountinfo,
  partShift,
} from '../../src/kernel/device.ts';
import { nodeStatus, planNodes } from '../../src/kernel/mknod.ts';
import { chooseBlockSize, kernelBlockSizes } from '../../src/kernel/blocksize.ts';
import { splitPositionals } from '../../src/commands/attach.ts';
import { NbdError } from '../../src/errors.ts';

test('parseDeviceName: /dev/nbdN and nbdN only', () => {
  assert.equal(parseDeviceName('/dev/nbd0'), 0);
  assert.equal(parseDeviceName('nbd15'), 15);
  assert.equal(parseDeviceName('/dev/nbd01'), undefined);
  assert.equal(parseDeviceName('/dev/nbd0p1'), undefined);
  assert.equal(parseDeviceName('/dev/nd0'), undefined);
  assert.equal(parseDeviceName('/dev/sda'), undefined);
  assert.equal(parseDeviceName('nbd'), undefined);
  assert.equal(parseDeviceName('/tmp/nbd0'), undefined);
});

test('dev_t: glibc makedev/major/minor round trip, including minors above 255', () => {
  assert.equal(makedev(43, 0), 0x2b00n);
  assert.equal(makedev(43, 32), 0x2b20n);
  assert.equal(makedev(8, 1), 0x801n);
  assert.equal(makedev(43, 256), 0x102b00n); // minor bits 8..19 go to dev_t bits 20..31
  for (const [ma, mi] of [[43, 0], [43, 31], [43, 4096], [259, 1048575], [4095, 255], [4096, 7]] as const) {
    const d = makedev(ma, mi);
    assert.equal(devMajor(d), ma);
    assert.equal(devMinor(d), mi);
  }
});

test('part_shift = fls(max_part): 0 → 0, 16 → 5 (rounded to 31), 31 → 5, 15 → 4, 1 → 1', () => {
  assert.equal(partShift(0), 0);
  assert.equal(partShift(16), 5);
  assert.equal(partShift(31), 5);
  assert.equal(partShift(15), 4);
  assert.equal(partShift(1), 1);
  assert.equal(minorOf(1, 5), 32);
  assert.equal(minorOf(3, 0), 3);
  assert.deepEqual(indexFromMinor(32, 5), { index: 1, partition: 0 });
  assert.deepEqual(indexFromMinor(33, 5), { index: 1, partition: 1 });
  assert.deepEqual(indexFromMinor(7, 0), { index: 7, partition: 0 });
});

const MOUNTINFO = [
  '22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw',
  '40 22 43:32 / /mnt/with\\040space rw,relatime shared:2 - ext4 /dev/nbd1 rw',
  '41 22 43:65 / /srv rw - xfs /dev/nbd2p1 rw',
  '42 22 43:0 / /data rw - ext4 /dev/nbd0 rw',
].join('\n');

test('mountinfo: unescapes paths; mounts of a device include its partitions', () => {
  const m = parseMountinfo(MOUNTINFO);
  assert.equal(m.length, 4);
  assert.deepEqual(m[1], { majorMinor: '43:32', mountPoint: '/mnt/with space', source: '/dev/nbd1' });
  assert.deepEqual(mountsOf(MOUNTINFO, 1, 5), ['/mnt/with space']);
  assert.deepEqual(mountsOf(MOUNTINFO, 2, 5), ['/srv']);
  assert.deepEqual(mountsOf(MOUNTINFO, 0, 5), ['/data']);
  assert.deepEqual(mountsOf(MOUNTINFO, 3, 5), []);
  // with max_part=0, 43:32 is nbd32
  assert.deepEqual(mountsOf(MOUNTINFO, 32, 0), ['/mnt/with space']);
});

test('CAP_SYS_ADMIN from /proc/self/status', () => {
  assert.equal(hasCapSysAdmin('Name:\tx\nCapEff:\t000001ffffffffff\n'), true);
  assert.equal(hasCapSysAdmin('CapEff:\t0000000000200000\n'), true); // bit 21 only
  assert.equal(hasCapSysAdmin('CapEff:\t00000000001fffff\n'), false);
  assert.equal(hasCapSysAdmin('CapEff:\t0000000000000000\n'), false);
  assert.equal(hasCapSysAdmin('no caps line'), false);
});

test('mknod plan: minors follow max_part', () => {
  assert.deepEqual(
    planNodes({ count: 3, prefix: 'nbd', dir: '/dev', maxPart: 16 }).map((e) => [e.path, e.major, e.minor]),
    [['/dev/nbd0', 43, 0], ['/dev/nbd1', 43, 32], ['/dev/nbd2', 43, 64]],
  );
  assert.deepEqual(
    planNodes({ count: 3, prefix: 'nd', dir: '/x', maxPart: 0 }).map((e) => [e.path, e.minor]),
    [['/x/nd0', 0], ['/x/nd1', 1], ['/x/nd2', 2]],
  );
});

test('mknod: an existing node is kept when right and refused when not', () => {
  const e = planNodes({ count: 2, prefix: 'nbd', dir: '/dev', maxPart: 0 })[1]!;
  const fake = (block: boolean, rdev: bigint) => ({ isBlockDevice: () => block, rdev }) as unknown as import('node:fs').BigIntStats;
  assert.deepEqual(nodeStatus(e, undefined), { status: 'create' });
  assert.deepEqual(nodeStatus(e, fake(true, makedev(43, 1))), { status: 'exists' });
  assert.equal(nodeStatus(e, fake(true, makedev(43, 32))).status, 'conflict');
  assert.equal(nodeStatus(e, fake(true, makedev(8, 1))).status, 'conflict');
  assert.equal(nodeStatus(e, fake(false, 0n)).status, 'conflict');
});

const GiB = 1n << 30n;
const code = (fn: () => unknown): string => {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof NbdError);
    return `${e.code}: ${e.message}`;
  }
  assert.fail('expected an NbdError');
};

test('block size: kernel range is 512..page size', () => {
  assert.deepEqual(kernelBlockSizes(4096), [512, 1024, 2048, 4096]);
  assert.deepEqual(kernelBlockSizes(16384).at(-1), 16384);
});

test('block size: 512 by default (as nbd-client and qemu-nbd --connect), whatever the server prefers', () => {
  assert.deepEqual(chooseBlockSize({ size: GiB, pageSize: 4096 }), { blockSize: 512 });
  assert.deepEqual(chooseBlockSize({ size: GiB, pageSize: 4096, server: { min: 1, preferred: 4096, max: 33554432 } }), { blockSize: 512 });
  assert.deepEqual(chooseBlockSize({ size: GiB, pageSize: 4096, server: { min: 1024, preferred: 4096, max: 33554432 } }), { blockSize: 1024 }, 'raised to the minimum');
  assert.deepEqual(chooseBlockSize({ size: GiB, pageSize: 4096, server: { min: 3000, preferred: 4096, max: 33554432 } }), { blockSize: 4096 }, 'minimum rounded up to a power of two');
});

test('block size: -b preferred takes the server preferred size when the kernel allows it', () => {
  const pref = (server?: { min: number; preferred: number; max: number }) => chooseBlockSize({ size: GiB, pageSize: 4096, requested: 'preferred', server });
  assert.deepEqual(pref({ min: 1, preferred: 4096, max: 33554432 }), { blockSize: 4096 });
  assert.deepEqual(pref({ min: 1, preferred: 2048, max: 33554432 }), { blockSize: 2048 });
  const big = pref({ min: 512, preferred: 65536, max: 33554432 });
  assert.equal(big.blockSize, 4096);
  assert.match(big.note!, /prefers block size 65536/);
  assert.equal(pref({ min: 1, preferred: 1, max: 1 << 20 }).blockSize, 512);
  const none = pref(undefined);
  assert.equal(none.blockSize, 512);
  assert.match(none.note!, /did not state a preferred block size/);
});

test('block size: never below the server minimum', () => {
  assert.equal(chooseBlockSize({ size: GiB, pageSize: 4096, server: { min: 2048, preferred: 512, max: 1 << 20 } }).blockSize, 2048);
  assert.match(code(() => chooseBlockSize({ size: GiB, pageSize: 4096, server: { min: 8192, preferred: 8192, max: 1 << 20 } })), /^NBD_E_KERNEL_BLOCKSIZE: .*minimum block size of 8192, above the kernel's maximum of 4096/);
});

test('block size: -b overrides the preference, not the rules', () => {
  const r = chooseBlockSize({ size: GiB, pageSize: 4096, requested: 2048, server: { min: 1, preferred: 4096, max: 1 << 25 } });
  assert.equal(r.blockSize, 2048);
  assert.match(r.note!, /-b.*prefers 4096/);
  assert.match(code(() => chooseBlockSize({ size: GiB, pageSize: 4096, requested: 1000 })), /block size 1000 is not possible: .*power of two from 512 to 4096/);
  assert.match(code(() => chooseBlockSize({ size: GiB, pageSize: 4096, requested: 8192 })), /not possible/);
  assert.match(code(() => chooseBlockSize({ size: GiB, pageSize: 4096, requested: 512, server: { min: 4096, preferred: 4096, max: 1 << 25 } })), /below the server's minimum of 4096: use -b 4096/);
});

test('block size: the size must be a whole number of blocks', () => {
  // 1 MiB + 512: a 4096 preference steps down to 512 with a note
  const r = chooseBlockSize({ size: (1n << 20n) + 512n, pageSize: 4096, requested: 'preferred', server: { min: 1, preferred: 4096, max: 1 << 25 } });
  assert.equal(r.blockSize, 512);
  assert.match(r.note!, /not a multiple of 4096: using block size 512/);
  assert.match(code(() => chooseBlockSize({ size: (1n << 20n) + 512n, pageSize: 4096, requested: 4096 })), /not a multiple of the block size 4096 \(-b\): use -b 512/);
  assert.match(code(() => chooseBlockSize({ size: 1000n, pageSize: 4096 })), /^NBD_E_KERNEL_BLOCKSIZE: .*1000 bytes is not a multiple of 512 bytes/);
});

test('attach positionals: HOST, HOST DEV, HOST PORT DEV, HOST PORT, -u SOCK DEV', () => {
  assert.deepEqual(splitPositionals(['srv'], false), { host: 'srv' });
  assert.deepEqual(splitPositionals(['srv', '/dev/nbd0'], false), { host: 'srv', device: '/dev/nbd0' });
  assert.deepEqual(splitPositionals(['srv', 'nbd3'], false), { host: 'srv', device: 'nbd3' });
  assert.deepEqual(splitPositionals(['srv', '10809', '/dev/nbd1'], false), { host: 'srv', port: '10809', device: '/dev/nbd1' });
  assert.deepEqual(splitPositionals(['srv', '10809'], false), { host: 'srv', port: '10809' });
  assert.deepEqual(splitPositionals(['/dev/nbd0'], true), { device: '/dev/nbd0' });
  assert.deepEqual(splitPositionals([], true), {});
  assert.throws(() => splitPositionals(['a', 'b'], true), NbdError);
});

test('importing the CLI does not load koffi (list/info stay fast)', async () => {
  const { buildProgram } = await import('../../src/cli.ts');
  buildProgram();
  const cache = createRequire(import.meta.url).cache;
  assert.equal(Object.keys(cache).filter((k) => k.includes('/koffi/')).length, 0);
});
