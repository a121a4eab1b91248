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
// the full length in bytes. Backslashes are left as they are, so `display` applied to its own output
// changes nothing: an error line that quotes a name already shown can be passed through it again.
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
  const cont = (k: number, lo = 0x80, hi = 0xbf): boolean => i + k < b.length && b[i + k]! >= lo && b[i + k]! <= hi;
  if (c >= 0xc2 && c <= 0xdf) return cont(1) ? 2 : 0;
  if (c === 0xe0) return cont(1, 0xa0) && cont(2) ? 3 : 0;
  if ((c >= 0xe1 && c <= 0xec) || c === 0xee || c === 0xef) return cont(1) && cont(2) ? 3 : 0;
  if (c === 0xed) return cont(1, 0x80, 0x9f) && cont(2) ? 3 : 0;
  if (c === 0xf0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xf1 && c <= 0xf3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c === 0xf4) return cont(1, 0x80, 0x8f) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

/** Bytes a peer sent → string, losslessly (invalid UTF-8 bytes as lone surrogates U+DC80..U+DCFF). */
export function decodeWire(b: Uint8Array): string {
  try {
    return strictUtf8.decode(b);
  } catch {
    /* not valid UTF-8: escape the bad bytes */
  }
  let out = '';
  let start = 0;
  let i = 0;
  while (i < b.length) {
    const n = utf8SequenceAt(b, i);
    if (n > 0) {
      i += n;
      continue;
    }
    out += strictUtf8.decode(b.subarray(start, i)) + String.fromCharCode(0xdc00 + b[i]!);
    start = ++i;
  }
  return out + strictUtf8.decode(b.subarray(start));
}

/** A surrogate U+DC80..U+DCFF with no high surrogate before it: one raw byte. */
const RAW_BYTE = /(?<![\ud800-\udbff])[\udc80-\udcff]/;

/** True when the string carries bytes that are not valid UTF-8 (from `decodeWire`). */
export function hasRawBytes(s: string): boolean {
  return RAW_BYTE.test(s);
}

/** String → the bytes it stands for: UTF-8, raw bytes back as they came (inverse of `decodeWire`). */
export function encodeWire(s: string): Buffer {
  if (!hasRawBytes(s)) return Buffer.from(s, 'utf8');
  const parts: Buffer[] = [];
  let run = '';
  for (const ch of s) {
    const c = ch.charCodeAt(0);
    if (ch.length === 1 && c >= 0xdc80 && c <= 0xdcff) {
      if (run) parts.push(Buffer.from(run, 'utf8'));
      run = '';
      parts.push(Buffer.of(c - 0xdc00));
    } else {
      run += ch;
    }
  }
  if (run) parts.push(Buffer.from(run, 'utf8'));
  return Buffer.concat(parts);
}

/** Length in bytes on the wire. */
export function wireLength(s: string): number {
  return hasRawBytes(s) ? encodeWire(s).length : Buffer.byteLength(s, 'utf8');
}

/**
 * Characters made visible (besides C0, DEL and lone surrogates, handled first): controls (C1), format
 * characters (bidi embeddings/overrides U+202A-202E, isolates U+2066-2069, marks U+200E/200F/061C,
 * zero-width U+200B-200D, word joiner, BOM, tags…), line/paragraph separators, every space but U+0020,
 * unassigned code points, and invisible characters of other categories (combining grapheme joiner,
 * Hangul fillers, Braille blank).
 */
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Zs}\p{Cn}\u034f\u115f\u1160\u2800\u3164\uffa0]/u;

function escapeOf(ch: string): string | undefined {
  const c = ch.codePointAt(0)!;
  if (c < 0x20 || c === 0x7f) {
    if (c === 0x0a) return '\\n';
    if (c === 0x0d) return '\\r';
    if (c === 0x09) return '\\t';
    return `\\x${c.toString(16).padStart(2, '0')}`;
  }
  if (c === 0x20) return undefined;
  if (c < 0x7f) return undefined;
  if (ch.length === 1 && c >= 0xd800 && c <= 0xdfff) {
    // A lone surrogate: a raw byte from decodeWire, or a broken JS string.
    return c >= 0xdc80 && c <= 0xdcff ? `\\x${(c - 0xdc00).toString(16)}` : `\\u${c.toString(16)}`;
  }
  if (!INVISIBLE.test(ch)) return undefined;
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
  let out = '';
  let shown = 0;
  for (const ch of s) {
    const e = escapeOf(ch) ?? ch;
    const width = e === ch ? 1 : e.length;
    if (shown + width > max) return `${out}…[${wireLength(s)} bytes]`;
    out += e;
    shown += width;
  }
  return out;
}

/** A whole line (an error message, a log line): `display` without cutting. */
export function oneLine(s: string): string {
  return display(s, Infinity);
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
  return JSON.stringify(value, null, 2).replace(/[^\x00-\x7e]/gu, (ch) => {
    if (escapeOf(ch) === undefined) return ch;
    let r = '';
    for (let i = 0; i < ch.length; i++) r += `\\u${ch.charCodeAt(i).toString(16).padStart(4, '0')}`;
    return r;
  });
}
