// Which kernel crypto modules kernel TLS asks for (src/kernel/ktls.ts slowPrimitives): from the text
// of /proc/crypto, the primitives of a suite that only the portable C drivers ("*-generic") provide.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { slowPrimitives } from '../../src/kernel/ktls.ts';

/** /proc/crypto entries as crypto/proc.c prints them (name, driver, module, priority, …; blank line between). */
function entry(name: string, driver: string, priority: number): string {
  return `name         : ${name}\ndriver       : ${driver}\nmodule       : kernel\npriority     : ${priority}\nrefcnt       : 1\nselftest     : passed\ninternal     : no\ntype         : cipher\n`;
}

test('Debian 6.1 without udev: built-in aes-generic only, ghash not loaded: both AES-GCM primitives are asked for', () => {
  const text = [entry('aes', 'aes-generic', 100), entry('cbc(aes)', 'cbc(aes-generic)', 100)].join('\n');
  assert.deepEqual(slowPrimitives('aes-128-gcm', text), ['aes', 'ghash']);
  assert.deepEqual(slowPrimitives('aes-256-gcm', text), ['aes', 'ghash']);
  assert.deepEqual(slowPrimitives('chacha20-poly1305', text), ['chacha20', 'poly1305']);
});

test('the kernel loaded ghash on demand but AES stayed generic: only aes is asked for', () => {
  const text = [entry('aes', 'aes-generic', 100), entry('ghash', 'ghash-generic', 100), entry('ghash', 'ghash-clmulni', 400)].join('\n');
  assert.deepEqual(slowPrimitives('aes-128-gcm', text), ['aes']);
});

test('AES-NI and CLMUL registered (aesni_intel, ghash_clmulni_intel): nothing to ask for', () => {
  const text = [entry('aes', 'aes-generic', 100), entry('aes', 'aes-aesni', 300), entry('ghash', 'ghash-clmulni', 400), entry('chacha20', 'chacha20-simd', 300), entry('poly1305', 'poly1305-simd', 300)].join('\n');
  assert.deepEqual(slowPrimitives('aes-256-gcm', text), []);
  assert.deepEqual(slowPrimitives('chacha20-poly1305', text), []);
});

test('an empty or unreadable-looking /proc/crypto asks for everything (modprobe decides)', () => {
  assert.deepEqual(slowPrimitives('chacha20-poly1305', ''), ['chacha20', 'poly1305']);
});
