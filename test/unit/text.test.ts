// src/text.ts: a peer's strings carried byte for byte (invalid UTF-8 included), shown on one line
// with every control and invisible character made visible and long ones cut, and written as JSON
// that parses back to the same string.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DISPLAY_MAX, decodeWire, display, encodeWire, hasRawBytes, jsonString, jsonText, oneLine, wellFormed, wireLength } from '../../src/text.ts';

const bytes = (...b: number[]): Buffer => Buffer.from(b);

/** A deterministic byte generator (xorshift32), so a failing case can be replayed. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Random bytes biased towards UTF-8 lead and continuation bytes, so both valid and broken sequences occur. */
function randomBytes(next: () => number, n: number): Buffer {
  const pool = [0x00, 0x0a, 0x1b, 0x41, 0x5c, 0x7f, 0x80, 0x9b, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xe2, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff];
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) {
    const r = next();
    b[i] = r % 3 === 0 ? pool[(r >>> 8) % pool.length]! : (r >>> 8) & 0xff;
  }
  return b;
}

test('decodeWire: valid UTF-8 decoded as is, a leading BOM kept', () => {
  assert.equal(decodeWire(Buffer.from('disk-é-日本-😀', 'utf8')), 'disk-é-日本-😀');
  assert.equal(decodeWire(bytes(0xef, 0xbb, 0xbf, 0x61)), '\ufeffa', 'the BOM is part of the name');
  assert.equal(decodeWire(bytes()), '');
  assert.equal(hasRawBytes('disk-é-😀'), false);
});

test('decodeWire: each byte of an invalid sequence becomes U+DC80..U+DCFF; valid neighbours decode', () => {
  const cases: [Buffer, string][] = [
    [bytes(0x61, 0xff, 0x62), 'a\udcffb'], // never valid
    [bytes(0x80), '\udc80'], // lone continuation byte
    [bytes(0xc0, 0x80), '\udcc0\udc80'], // overlong NUL
    [bytes(0xe0, 0x80, 0x80), '\udce0\udc80\udc80'], // overlong
    [bytes(0xed, 0xa0, 0x80), '\udced\udca0\udc80'], // an encoded surrogate (U+D800)
    [bytes(0xf4, 0x90, 0x80, 0x80), '\udcf4\udc90\udc80\udc80'], // above U+10FFFF
    [bytes(0x61, 0xe2, 0x82), 'a\udce2\udc82'], // cut short at the end
    [bytes(0xe2, 0x82, 0x61, 0xe2, 0x82, 0xac), '\udce2\udc82a€'], // cut short, then a valid €
    [bytes(0xf0, 0x9f, 0x98, 0x80, 0xff), '😀\udcff'], // a raw byte right after a surrogate pair
  ];
  for (const [b, want] of cases) {
    const s = decodeWire(b);
    assert.equal(s, want, b.toString('hex'));
    assert.equal(hasRawBytes(s), true, b.toString('hex'));
    assert.ok(encodeWire(s).equals(b), `round trip ${b.toString('hex')}`);
    assert.equal(wireLength(s), b.length);
  }
});

test('decodeWire/encodeWire: every byte string survives the round trip; wellFormed is what a UTF-8 decoder gives', () => {
  const next = rng(19);
  const lenient = new TextDecoder('utf-8', { ignoreBOM: true });
  for (let i = 0; i < 3000; i++) {
    const b = randomBytes(next, next() % 24);
    const s = decodeWire(b);
    assert.ok(encodeWire(s).equals(b), `round trip ${b.toString('hex')}`);
    assert.equal(wireLength(s), b.length, b.toString('hex'));
    assert.equal(wellFormed(s), lenient.decode(b), `wellFormed ${b.toString('hex')}`);
    let valid = true;
    try {
      new TextDecoder('utf-8', { fatal: true }).decode(b);
    } catch {
      valid = false;
    }
    assert.equal(hasRawBytes(s), !valid, `hasRawBytes ${b.toString('hex')}`);
  }
});

test('display: C0 controls, DEL and escape sequences made visible, one line', () => {
  assert.equal(display('a\nb\rc\td'), 'a\\nb\\rc\\td');
  assert.equal(display('\x1b[2J\x1b[Hsize: 0'), '\\x1b[2J\\x1b[Hsize: 0');
  assert.equal(display('\x00\x07\x08\x0b\x0c\x1f\x7f'), '\\x00\\x07\\x08\\x0b\\x0c\\x1f\\x7f');
  assert.equal(display('\x1b]0;title\x07'), '\\x1b]0;title\\x07', 'OSC: set the window title');
  for (let c = 0; c < 0x20; c++) {
    const shown = display(String.fromCharCode(c));
    assert.match(shown, /^\\(x[0-9a-f]{2}|n|r|t)$/, `U+${c.toString(16)}`);
  }
  const spoof = `x\n${'size:        1 bytes\n'.repeat(44)}`;
  assert.ok(!/[\n\r]/.test(display(spoof, Infinity)), 'no line breaks survive');
});

test('display: C1 controls, bidi overrides and isolates, invisible format characters, odd spaces, unassigned', () => {
  assert.equal(display('\u0085\u009b31m'), '\\u0085\\u009b31m', 'NEL, 8-bit CSI');
  assert.equal(display('abc\u202edcba'), 'abc\\u202edcba', 'RIGHT-TO-LEFT OVERRIDE');
  for (const c of [0x202a, 0x202b, 0x202c, 0x202d, 0x202e, 0x2066, 0x2067, 0x2068, 0x2069, 0x200e, 0x200f, 0x061c]) {
    assert.equal(display(String.fromCodePoint(c)), `\\u${c.toString(16).padStart(4, '0')}`, `bidi U+${c.toString(16)}`);
  }
  for (const c of [0x200b, 0x200c, 0x200d, 0x2060, 0xfeff, 0x00ad, 0x034f, 0x115f, 0x3164, 0x2800, 0x180e]) {
    assert.equal(display(`a${String.fromCodePoint(c)}b`), `a\\u${c.toString(16).padStart(4, '0')}b`, `invisible U+${c.toString(16)}`);
  }
  assert.equal(display('a\u2028b\u2029c'), 'a\\u2028b\\u2029c', 'line and paragraph separators');
  assert.equal(display('a\u00a0b\u3000c'), 'a\\u00a0b\\u3000c', 'spaces that look like U+0020');
  assert.equal(display('a b'), 'a b', 'a plain space stays');
  assert.equal(display('\u{e0041}\u{e007f}'), '\\u{e0041}\\u{e007f}', 'tag characters');
  assert.equal(display('\u0378\uffff'), '\\u0378\\uffff', 'unassigned, noncharacter');
});

test('display: raw bytes as \\xNN, lone surrogates as \\uXXXX; printable text, backslashes and quotes untouched', () => {
  assert.equal(display(decodeWire(bytes(0x64, 0xff, 0xfe, 0x80))), 'd\\xff\\xfe\\x80');
  assert.equal(display('\ud800x'), '\\ud800x');
  const plain = "disk-é 日本 😀 ‘quoted’ \"q\" 'q' C:\\images\\a.img <b> $(rm) `x`";
  assert.equal(display(plain), plain);
});

test('display: idempotent, and its output holds nothing a terminal acts on', () => {
  const next = rng(7);
  const nasty = ['\x1b', '\n', '\r', '\x7f', '\u009b', '\u202e', '\u2066', '\u200b', '\ufeff', '\u2028', '\u{e0001}', 'a', 'é', '😀', '\\', 'x1b', ' '];
  const bad = /[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\u{e0000}-\u{e007f}\ud800-\udfff]/u;
  for (let i = 0; i < 2000; i++) {
    let s = '';
    const n = next() % 12;
    for (let k = 0; k < n; k++) s += nasty[next() % nasty.length];
    if (next() % 4 === 0) s += decodeWire(randomBytes(next, 4));
    const once = oneLine(s);
    assert.equal(oneLine(once), once, JSON.stringify(s));
    assert.ok(!bad.test(once), `${JSON.stringify(s)} → ${JSON.stringify(once)}`);
    // Lone surrogates are checked char by char (the u-flag class above cannot see them).
    for (let k = 0; k < once.length; k++) {
      const c = once.charCodeAt(k);
      if (c >= 0xd800 && c <= 0xdbff) assert.ok(once.charCodeAt(k + 1) >= 0xdc00 && once.charCodeAt(k + 1) <= 0xdfff);
      if (c >= 0xdc00 && c <= 0xdfff) assert.ok(once.charCodeAt(k - 1) >= 0xd800 && once.charCodeAt(k - 1) <= 0xdbff);
    }
  }
});

test('display: long strings cut at DISPLAY_MAX with a marker giving the full length in bytes', () => {
  const long = 'a'.repeat(4096);
  const shown = display(long);
  assert.equal(shown, `${'a'.repeat(DISPLAY_MAX)}…[4096 bytes]`);
  assert.equal(display('a'.repeat(DISPLAY_MAX)), 'a'.repeat(DISPLAY_MAX), 'exactly DISPLAY_MAX: not cut');
  assert.equal(display('é'.repeat(300), 10), `${'é'.repeat(10)}…[600 bytes]`, 'the length is in bytes');
  // An escape is never split: 8 characters of room, each ESC takes 4.
  assert.equal(display('\x1b\x1b\x1b', 9), '\\x1b\\x1b…[3 bytes]');
  assert.equal(display('😀😀😀', 2), '😀😀…[12 bytes]', 'a surrogate pair is one character');
  assert.equal(display(decodeWire(Buffer.alloc(4096, 0xff)), 8), '\\xff\\xff…[4096 bytes]');
  assert.equal(oneLine(long), long, 'oneLine never cuts');
});

test('jsonString: the exact string, and the bytes in hex when they are not UTF-8', () => {
  assert.deepEqual(jsonString('name', 'a\x1bb'), { name: 'a\x1bb' });
  assert.deepEqual(jsonString('name', decodeWire(bytes(0x61, 0xff, 0x0a))), { name: 'a\ufffd\n', nameHex: '61ff0a' });
});

test('jsonText: parses back to the same value; controls and invisible characters only as \\u escapes', () => {
  const value = {
    name: 'a\x1b[2J\n\r\t\x00\x7f\u0085\u009b\u202e\u2066\u200b\ufeff\u2028\u2029\u00a0\u{e0041}é😀\\"',
    list: ['ok', 'C:\\x'],
    n: 1,
  };
  const text = jsonText(value);
  assert.deepEqual(JSON.parse(text), value);
  assert.ok(!/[\x00-\x09\x0b-\x1f\x7f-\x9f\u00a0\u2028\u2029\u200b\u202e\u2066\ufeff\u{e0041}]/u.test(text), text);
  assert.match(text, /\\u001b\[2J/);
  assert.match(text, /\\u202e/);
  assert.match(text, /\\udb40\\udc41/, 'an astral format character as a surrogate pair escape');
  assert.match(text, /é😀/, 'printable text stays readable');
  assert.equal(jsonText({ a: 1, b: ['x', 'é'] }), JSON.stringify({ a: 1, b: ['x', 'é'] }, null, 2), 'the layout of JSON.stringify(…, null, 2)');
});
