// RECONFIGURE encoding and LINK_DEAD parsing (src/kernel/netlink-codec.ts, supervisor additions).
// Netlink headers are host byte order: these vectors are little-endian.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { attrU32, encodeGenl, encodeReconfigure, findAttr, parseAttrs, parseGenl, parseLinkDead, parseMessages, readU64 } from '../../src/kernel/netlink-codec.ts';
import { NbdAttr, NbdGenlCmd } from '../../src/kernel/constants.ts';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

test('RECONFIGURE: exact bytes for index 2, backend "ab", one socket fd 7', () => {
  const b = encodeReconfigure({ family: 0x20, seq: 5, index: 2, backend: 'ab', fds: [7] });
  assert.deepEqual(
    b,
    hex(`
      34000000 2000 0500 05000000 00000000
      03 01 0000
      0800 0100 02000000
      0700 0a00 616200 00
      1000 0780 0c00 0180 0800 0100 07000000
    `),
  );
});

test('RECONFIGURE with a new size: SIZE_BYTES u64 present; without: absent', () => {
  const withSize = parseGenl(parseMessages(encodeReconfigure({ family: 0x20, seq: 1, index: 0, fds: [3], sizeBytes: 1n << 33n }))[0]!);
  assert.equal(withSize.cmd, NbdGenlCmd.RECONFIGURE);
  assert.equal(readU64(findAttr(withSize.attrs, NbdAttr.SIZE_BYTES)!), 1n << 33n);
  const without = parseGenl(parseMessages(encodeReconfigure({ family: 0x20, seq: 1, index: 0, fds: [3] }))[0]!);
  assert.equal(findAttr(without.attrs, NbdAttr.SIZE_BYTES), undefined);
  assert.equal(findAttr(without.attrs, NbdAttr.BACKEND_IDENTIFIER), undefined);
  // Several sockets: one SOCK_ITEM each.
  const many = parseGenl(parseMessages(encodeReconfigure({ family: 0x20, seq: 1, index: 0, fds: [3, 4, 5] }))[0]!);
  assert.equal(parseAttrs(findAttr(many.attrs, NbdAttr.SOCKETS)!.payload).length, 3);
});

test('LINK_DEAD multicast (as the kernel builds it: cmd 4, INDEX u32) → index; other commands → undefined', () => {
  const dead = encodeGenl({ family: 0x20, cmd: NbdGenlCmd.LINK_DEAD, version: 1, seq: 0, flags: 0, attrs: [attrU32(NbdAttr.INDEX, 9)] });
  assert.equal(parseLinkDead(parseGenl(parseMessages(dead)[0]!)), 9);
  const other = encodeGenl({ family: 0x20, cmd: NbdGenlCmd.STATUS, version: 1, seq: 0, flags: 0, attrs: [attrU32(NbdAttr.INDEX, 9)] });
  assert.equal(parseLinkDead(parseGenl(parseMessages(other)[0]!)), undefined);
  const noIndex = encodeGenl({ family: 0x20, cmd: NbdGenlCmd.LINK_DEAD, version: 1, seq: 0, flags: 0, attrs: [] });
  assert.equal(parseLinkDead(parseGenl(parseMessages(noIndex)[0]!)), undefined);
});
