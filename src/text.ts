// Strings a peer chooses (export names, descriptions, canonical names, error texts), carried exactly
// and shown safely. Pure; the lowest layer: the codec, the handshake, the server and the commands use it.
//
// Carrying: NBD strings are bytes (proto.md says UTF-8, but nothing enforces it). `decodeWire` turns
// them into a JS string without losing any: valid UTF-8 is decoded (a leading BOM kept), and each
// byte of an invalid sequence becomes the lone surrogate U+DC80..U+DCFF (byte 0x80..0xFF; PEP 383's
// "surrogateescape"). Valid UTF-8 never decodes to a surrogate, so the mapping is unambiguous and
// `encodeWire` gives the same bytes back (a listed name is asked for again byte for byte).
//
// Showing, for people (`display`): one line, every character that could drive a terminal or hide in
// it made visible — C0 controls and DEL as `\n` `\r` `\t` or `\xNN`, a raw (invalid UTF-8) byte as
// `\xNN`, C1 controls, format characters (bidi overrides and isolates, zero-width characters, BOM,
// tags), line and paragraph separators, spaces other than U+0020, invisible fillers and unassigned
// code points as `\uXXXX` (`\u{XXXXX}` above the BMP) — and long strings cut with a marker that gives
// the full length in bytes. Backslashes are left as they are, so `oneLine` (display without cutting)
// applied to its own output changes nothing: an error or log line that quotes a name already shown
// can be passed through it again.
//
// For scripts (`jsonText`, `jsonString`): the exact string, JSON-escaped, with the same characters
// escaped as `\uXXXX` (so JSON on a terminal is safe too). JSON cannot carry bytes that are not
// UTF-8: such a string is given as decoded by any UTF-8 decoder (U+FFFD for each bad sequence) and,
// beside it, `<field>Hex` with the exact bytes.

const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const lenientUtf8 = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

/** How many bytes of well-formed UTF-8 start at `i` (Unicode 15, table 3-7), 0 when none. */
function utf8SequenceAt(b: Uint8Array, i: number): number {
  const c = b[i]!;
  if (c < 0x80) return 1;
  const n = b.length;
  const c1 = i + 1 < n ? b[i + 1]! : -1;
  const c2 = i + 2 < n ? b[i + 2]! : -1;
  const c3 = i + 3 < n ? b[i + 3]! : -1;
  const tail = (x: number): boolean => x >= 0x80 && x <= 0xbf;
  if (c >= 0xc2 && c <= 0xdf) return tail(c1) ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    const lo = c === 0xe0 ? 0xa0 : 0x80;
    const hi = c === 0xed ? 0x9f : 0xbf; // ED A0..BF would encode a surrogate
    return c1 >= lo && c1 <= hi && tail(c2) ? 3 : 0;
  }
  if (c >= 0xf0 && c <= 0xf4) {
    const lo = c === 0xf0 ? 0x90 : 0x80;
    const hi = c === 0xf4 ? 0x8f : 0xbf; // F4 90.. would be above U+10FFFF
    return c1 >= lo && c1 <= hi && tail(c2) && tail(c3) ? 4 : 0;
  }
  return 0;
}

/** Bytes a peer sent → string, losslessly (invalid UTF-8 bytes as lone surrogates U+DC80..U+DCFF). */
export function decodeWire(b: Uint8Array): string {
  try {
    return strictUtf8.decode(b);
  } catch {
    /* not valid UTF-8: decode here, escaping the bad bytes */
  }
  const units = new Uint16Array(b.length); // never more UTF-16 units than bytes
  let u = 0;
  for (let i = 0; i < b.length; ) {
    const c = b[i]!;
    const len = utf8SequenceAt(b, i);
    if (len === 0) {
      units[u++] = 0xdc00 + c;
      i++;
      continue;
    }
    if (len === 1) {
      units[u++] = c;
    } else {
      let cp =
        len === 2
          ? ((c & 0x1f) << 6) | (b[i + 1]! & 0x3f)
          : len === 3
            ? ((c & 0x0f) << 12) | ((b[i + 1]! & 0x3f) << 6) | (b[i + 2]! & 0x3f)
            : ((c & 0x07) << 18) | ((b[i + 1]! & 0x3f) << 12) | ((b[i + 2]! & 0x3f) << 6) | (b[i + 3]! & 0x3f);
      if (cp > 0xffff) {
        cp -= 0x10000;
        units[u++] = 0xd800 + (cp >> 10);
        units[u++] = 0xdc00 + (cp & 0x3ff);
      } else {
        units[u++] = cp;
      }
    }
    i += len;
  }
  let out = '';
  for (let k = 0; k < u; k += 8192) out += String.fromCharCode(...units.subarray(k, Math.min(u, k + 8192)));
  return out;
}

/** A surrogate U+DC80..U+DCFF with no high surrogate before it: one raw byte. */
const RAW_BYTE = /(?<![\ud800-\udbff])[\udc80-\udcff]/;
const RAW_BYTES = new RegExp(RAW_BYTE.source, 'g');

/** True when the string carries bytes that are not valid UTF-8 (from `decodeWire`). */
export function hasRawBytes(s: string): boolean {
  return RAW_BYTE.test(s);
}

/** String → the bytes it stands for: UTF-8, raw bytes back as they came (inverse of `decodeWire`). */
export function encodeWire(s: string): Buffer {
  if (!hasRawBytes(s)) return Buffer.from(s, 'utf8');
  const parts: Buffer[] = [];
  let last = 0;
  for (const m of s.matchAll(RAW_BYTES)) {
    parts.push(Buffer.from(s.slice(last, m.index), 'utf8'), Buffer.of(m[0].charCodeAt(0) - 0xdc00));
    last = m.index + 1;
  }
  parts.push(Buffer.from(s.slice(last), 'utf8'));
  return Buffer.concat(parts);
}

/** Length in bytes on the wire. */
export function wireLength(s: string): number {
  return hasRawBytes(s) ? encodeWire(s).length : Buffer.byteLength(s, 'utf8');
}

/**
 * Characters made visible: C0 controls and DEL; lone surrogates (raw bytes, or a broken JS string);
 * other controls (C1); format characters (bidi embeddings/overrides U+202A-202E, isolates
 * U+2066-2069, marks U+200E/200F/061C, zero-width U+200B-200D, word joiner, BOM, tags…); line and
 * paragraph separators; every space but U+0020 (the Zs category, listed: U+00A0, U+1680,
 * U+2000-200A, U+202F, U+205F, U+3000); unassigned code points; and invisible characters of other
 * categories (combining grapheme joiner, Hangul fillers, Braille blank). In `u` mode a surrogate
 * pair is one code point, so `[\ud800-\udfff]` only matches lone surrogates.
 */
const UNSAFE_SOURCE =
  '[\\x00-\\x1f\\x7f]|[\\ud800-\\udfff]|[\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}\\p{Cn}\\u00a0\\u1680\\u2000-\\u200a\\u202f\\u205f\\u3000\\u034f\\u115f\\u1160\\u2800\\u3164\\uffa0]';
const UNSAFE_ONE = new RegExp(`^(?:${UNSAFE_SOURCE})$`, 'u');
const UNSAFE_ALL = new RegExp(UNSAFE_SOURCE, 'gu');

/** How `display` writes one unsafe character (a code point, or a lone surrogate). */
function escapeUnsafe(ch: string): string {
  const c = ch.codePointAt(0)!;
  if (c === 0x0a) return '\\n';
  if (c === 0x0d) return '\\r';
  if (c === 0x09) return '\\t';
  if (c < 0x20 || c === 0x7f) return `\\x${c.toString(16).padStart(2, '0')}`;
  // A lone surrogate U+DC80..U+DCFF is a raw byte (decodeWire): shown as the byte.
  if (ch.length === 1 && c >= 0xdc80 && c <= 0xdcff) return `\\x${(c - 0xdc00).toString(16)}`;
  return c > 0xffff ? `\\u{${c.toString(16)}}` : `\\u${c.toString(16).padStart(4, '0')}`;
}

/** How many characters of a peer's string `display` shows by default before cutting it. */
export const DISPLAY_MAX = 256;

/**
 * A peer's string for people: one line, controls and invisible characters escaped, at most `max`
 * characters of it (escapes count as what they print) followed by `…[N bytes]` when cut, N being its
 * full length on the wire. `max: Infinity` never cuts (whole error and log lines).
 */
export function display(s: string, max: number = DISPLAY_MAX): string {
  const whole = s.replace(UNSAFE_ALL, escapeUnsafe);
  // UTF-16 units ≥ characters: within `max` units, nothing needs cutting.
  if (whole.length <= max) return whole;
  let out = '';
  let shown = 0;
  for (const ch of s) {
    const e = UNSAFE_ONE.test(ch) ? escapeUnsafe(ch) : ch;
    const width = e === ch ? 1 : e.length;
    if (shown + width > max) return `${out}…[${wireLength(s)} bytes]`;
    out += e;
    shown += width;
  }
  return whole;
}

/** A whole line (an error message, a log line): `display` without cutting. */
export function oneLine(s: string): string {
  return s.replace(UNSAFE_ALL, escapeUnsafe);
}

/** The string as a UTF-8 decoder would give its bytes (raw bytes → U+FFFD): what JSON can carry. */
export function wellFormed(s: string): string {
  return hasRawBytes(s) ? lenientUtf8.decode(encodeWire(s)) : s;
}

/** `{ field: s }` for JSON, plus `fieldHex` with the exact bytes when they are not valid UTF-8. */
export function jsonString(field: string, s: string): Record<string, string> {
  if (!hasRawBytes(s)) return { [field]: s };
  return { [field]: wellFormed(s), [`${field}Hex`]: encodeWire(s).toString('hex') };
}

/**
 * JSON text (`JSON.stringify`, indented by 2) safe to print: every character `display` would escape
 * is written as a `\uXXXX` escape (JSON.stringify already escapes C0 controls and lone surrogates),
 * so the value read back is exactly the same.
 */
export function jsonText(value: unknown): string {
  // Raw C0 characters in JSON text are its own line breaks and indentation (strings have them escaped).
  return JSON.stringify(value, null, 2).replace(UNSAFE_ALL, (ch) => {
    if (ch.charCodeAt(0) < 0x20) return ch;
    let r = '';
    for (let i = 0; i < ch.length; i++) r += `\\u${ch.charCodeAt(i).toString(16).padStart(4, '0')}`;
    return r;
  });
}
