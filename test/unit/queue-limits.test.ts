// The server's block-size constraints turned into request-queue limits (src/kernel/queue-limits.ts):
// the plan (pure) and its application to a sysfs tree laid out like /sys/block/nbdN/queue.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NbdError } from '../../src/errors.ts';
import { TransmissionFlag } from '../../src/protocol/constants.ts';
import { KERNEL_DEFAULT_MAX_SECTORS_KB, NO_MAXIMUM, applyQueueLimits, planQueueLimits, readQueue, reconnectLimits } from '../../src/kernel/queue-limits.ts';

const F = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
const bs = (min: number, preferred: number, max: number) => ({ min, preferred, max });

test('plan: a 64 KiB maximum payload bounds READ/WRITE and TRIM; WRITE_ZEROES is withheld', () => {
  const p = planQueueLimits({ blockSize: 512, server: bs(512, 4096, 65536), flags: F | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES, pageSize: 4096 });
  assert.deepEqual(p, { maxPayload: 65536, maxSectorsKb: 64, bounded: true, discardMaxBytes: 65536, maskWriteZeroes: true });
  // No TRIM, no WRITE_ZEROES: only max_sectors_kb.
  assert.deepEqual(planQueueLimits({ blockSize: 512, server: bs(1, 4096, 65536), flags: F, pageSize: 4096 }), { maxPayload: 65536, maxSectorsKb: 64, bounded: true, maskWriteZeroes: false });
});

test('plan: a maximum that is not whole KiB/blocks is rounded down; the hardware limit caps it', () => {
  assert.equal(planQueueLimits({ blockSize: 4096, server: bs(4096, 4096, 100_000), flags: F, pageSize: 4096 }).maxSectorsKb, 96);
  assert.equal(planQueueLimits({ blockSize: 512, server: bs(1, 4096, 65536 + 1000), flags: F, pageSize: 4096 }).maxSectorsKb, 64);
  assert.equal(planQueueLimits({ blockSize: 512, server: bs(1, 4096, 64 << 20), flags: F, pageSize: 4096, maxHwSectorsKb: 32768 }).maxSectorsKb, 32768);
});

test('plan: no maximum (absent, or 0xffffffff): the kernel default, nothing withheld', () => {
  for (const server of [undefined, bs(1, 4096, NO_MAXIMUM)]) {
    const p = planQueueLimits({ blockSize: 512, server, flags: F | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_TRIM, pageSize: 4096 });
    assert.deepEqual(p, { maxPayload: undefined, maxSectorsKb: KERNEL_DEFAULT_MAX_SECTORS_KB, bounded: false, maskWriteZeroes: false });
  }
});

test('plan: a maximum below one page cannot be set (max_sectors_kb ≥ PAGE_SIZE/1024): refused with the reason', () => {
  assert.throws(
    () => planQueueLimits({ blockSize: 512, server: bs(512, 512, 2048), flags: F, pageSize: 4096 }),
    (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_KERNEL_LIMITS' && /maximum payload of 2048 bytes.*4096 bytes/.test(e.message),
  );
  assert.doesNotThrow(() => planQueueLimits({ blockSize: 512, server: bs(512, 512, 4096), flags: F, pageSize: 4096 }));
});

test('plan: a minimum above the device block size (a reconnected server) is refused', () => {
  assert.throws(
    () => planQueueLimits({ blockSize: 512, server: bs(4096, 4096, NO_MAXIMUM), flags: F, pageSize: 4096 }),
    (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_KERNEL_LIMITS' && /minimum block size 4096 is above the device's block size 512/.test(e.message),
  );
  assert.doesNotThrow(() => planQueueLimits({ blockSize: 4096, server: bs(4096, 4096, NO_MAXIMUM), flags: F, pageSize: 4096 }));
});

function fakeQueue(v: { maxSectorsKb: number; maxHwSectorsKb?: number; discardMaxBytes?: number; lbs?: number }) {
  const sys = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-queue-'));
  const q = path.join(sys, 'block', 'nbd2', 'queue');
  fs.mkdirSync(q, { recursive: true });
  fs.writeFileSync(path.join(q, 'max_sectors_kb'), `${v.maxSectorsKb}\n`);
  fs.writeFileSync(path.join(q, 'max_hw_sectors_kb'), `${v.maxHwSectorsKb ?? 32768}\n`);
  fs.writeFileSync(path.join(q, 'discard_max_bytes'), `${v.discardMaxBytes ?? 0}\n`);
  fs.writeFileSync(path.join(q, 'logical_block_size'), `${v.lbs ?? 512}\n`);
  return { roots: { sys, dev: path.join(sys, 'dev'), proc: '/proc' }, q };
}

test('apply: writes max_sectors_kb and discard_max_bytes and reads them back', () => {
  const { roots, q } = fakeQueue({ maxSectorsKb: 1280, discardMaxBytes: 2199023255040 });
  const plan = planQueueLimits({ blockSize: 512, server: bs(512, 4096, 65536), flags: F | TransmissionFlag.SEND_TRIM, pageSize: 4096 });
  const before = applyQueueLimits(2, plan, { roots, discard: false });
  assert.equal(before.maxSectorsKb, 64);
  assert.equal(before.discardMaxBytes, 2199023255040, 'discard left for after CONNECT');
  const after = applyQueueLimits(2, plan, { roots });
  assert.deepEqual(readQueue(2, roots), after);
  assert.equal(fs.readFileSync(path.join(q, 'discard_max_bytes'), 'utf8').trim(), '65536');
});

test('apply: an unbounded server raises a limit an earlier attach left low, and never lowers one', () => {
  const low = fakeQueue({ maxSectorsKb: 64 });
  const plan = planQueueLimits({ blockSize: 512, server: undefined, flags: F, pageSize: 4096 });
  assert.equal(applyQueueLimits(2, plan, { roots: low.roots }).maxSectorsKb, KERNEL_DEFAULT_MAX_SECTORS_KB);
  const high = fakeQueue({ maxSectorsKb: 4096 });
  assert.equal(applyQueueLimits(2, plan, { roots: high.roots }).maxSectorsKb, 4096);
});

test('apply: a limit that does not stick (the kernel refused the write) is refused with the reason', () => {
  const { roots, q } = fakeQueue({ maxSectorsKb: 1280 });
  fs.rmSync(path.join(q, 'max_sectors_kb'));
  fs.mkdirSync(path.join(q, 'max_sectors_kb')); // unwritable, unreadable as a number
  const plan = planQueueLimits({ blockSize: 512, server: bs(512, 4096, 65536), flags: F, pageSize: 4096 });
  assert.throws(() => applyQueueLimits(2, plan, { roots }), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_KERNEL_LIMITS' && /cannot limit \/dev\/nbd2's requests/.test(e.message));
});

test('reconnect: the new server planned against the device block size; refusal is an export change', () => {
  const { roots } = fakeQueue({ maxSectorsKb: 1280, lbs: 4096 });
  const apply = reconnectLimits(roots, 4096);
  assert.equal(apply(2, { blockSizes: bs(4096, 4096, 65536), flags: F }, false), undefined);
  assert.equal(readQueue(2, roots).maxSectorsKb, 64);
  assert.match(apply(2, { blockSizes: bs(4096, 4096, 65536), flags: F }, true)!, /at most 64 KiB/);
  assert.throws(() => apply(2, { blockSizes: bs(512, 512, 1024), flags: F }, false), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_EXPORT_CHANGED' && /^reconnect: the server's maximum payload of 1024/.test(e.message));
});
