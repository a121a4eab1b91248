import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rootIsInitramfs } from '../../src/supervisor/follow-root.ts';

test('rootIsInitramfs: the top mount on / decides', () => {
  const initramfs = '1 1 0:2 / / rw - rootfs rootfs rw\n20 1 0:5 / /dev rw - devtmpfs udev rw\n';
  assert.equal(rootIsInitramfs(initramfs), true);
  assert.equal(rootIsInitramfs('1 1 0:2 / / rw shared:1 - tmpfs none rw\n'), true);
  // After switch_root the real root is mounted over rootfs: the last entry for / wins.
  assert.equal(rootIsInitramfs(`${initramfs}25 1 43:0 / / rw,relatime shared:1 - ext4 /dev/nbd0 rw\n`), false);
  assert.equal(rootIsInitramfs('22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n'), false);
  assert.equal(rootIsInitramfs(''), false);
});
