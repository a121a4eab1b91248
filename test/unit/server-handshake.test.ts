// Server handshake state machine, byte for byte (proto.md "Fixed newstyle negotiation", "Option types").

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Info, Opt, Rep, RepErr, TransmissionFlag } from '../../src/protocol/constants.ts';
import { encodeInfoRequest, encodeOption } from '../../src/protocol/codec.ts';
import { MemoryBackend } from '../../src/server/backends.ts';
import type { ServedExport } from '../../src/server/export.ts';
import { DISCARD_LIMIT, MAX_OPTIONS, MAX_OPTION_DATA, ServerHandshake, type HandshakeStep, type TlsMode } from '../../src/server/handshake.ts';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const cat = (bufs: Buffer[]): string => Buffer.concat(bufs).toString('hex');

function exp(name: string, size: number, opts: { readOnly?: boolean; description?: string } = {}): ServedExport {
  return { name, description: opts.description ?? `d-${name}`, backend: new MemoryBackend(size), readOnly: opts.readOnly ?? false };
}

/** A handshake past the client flags (fixed newstyle + no zeroes unless told). */
function ready(exports: ServedExport[], clientFlags = 3, tls: TlsMode = 'off'): ServerHandshake {
  const hs = new ServerHandshake(exports, { tls });
  const b = Buffer.alloc(4);
  b.writeUInt32BE(clientFlags);
  const step = hs.push(b);
  assert.deepEqual(step.send, []);
  assert.equal(step.close, undefined);
  return hs;
}

/** Expected option reply bytes: magic, option, type, length, data. */
function rep(option: number, type: number, data = ''): string {
  const d = Buffer.from(data, 'hex');
  const h = Buffer.alloc(20);
  h.write('0003e889045565a9', 0, 'hex');
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(d.length, 16);
  return h.toString('hex') + d.toString('hex');
}

/** Expected error reply: header + UTF-8 message. */
function repErr(option: number, type: number, message: string): string {
  return rep(option, type, Buffer.from(message, 'utf8').toString('hex'));
}

const RW_FLAGS =
  TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM |
  TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE;

describe('server handshake: greeting and client flags', () => {
  it('greets with NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', () => {
    assert.equal(new ServerHandshake([]).greeting().toString('hex'), '4e42444d41474943' + '49484156454f5054' + '0003');
  });

  it('closes on unknown client flags (proto.md "Client flags": MUST drop)', () => {
    const hs = new ServerHandshake([exp('a', 1024)]);
    const step = hs.push(hex('00000004'));
    assert.deepEqual(step.send, []);
    assert.equal(step.close?.soft, false);
    assert.match(step.close!.reason, /unknown bits/);
    assert.equal(hs.state.phase, 'closed');
  });

  it('a client without C_FIXED_NEWSTYLE may only send EXPORT_NAME', () => {
    const hs = ready([exp('a', 1024)], 0);
    const step = hs.push(encodeOption(Opt.LIST));
    assert.deepEqual(step.send, []);
    assert.equal(step.close?.soft, false);

    const hs2 = ready([exp('a', 1024)], 0);
    const s2 = hs2.push(encodeOption(Opt.EXPORT_NAME, Buffer.from('a')));
    assert.ok(s2.negotiated);
    assert.equal(cat(s2.send), '0000000000000400' + RW_FLAGS.toString(16).padStart(4, '0') + '00'.repeat(124));
  });
});

describe('server handshake: options', () => {
  it('NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK', () => {
    const hs = ready([exp('a', 512), exp('bb', 512, { description: 'x' })]);
    const step = hs.push(encodeOption(Opt.LIST));
    assert.equal(
      cat(step.send),
      rep(Opt.LIST, Rep.SERVER, '00000001' + '61' + Buffer.from('d-a').toString('hex')) +
        rep(Opt.LIST, Rep.SERVER, '00000002' + '6262' + '78') +
        rep(Opt.LIST, Rep.ACK),
    );
    assert.equal(hs.state.phase, 'option-header');
  });

  it('NBD_OPT_LIST with data: INVALID after reading the data; the next option is in step', () => {
    const hs = ready([exp('a', 512)]);
    const step = hs.push(Buffer.concat([encodeOption(Opt.LIST, hex('deadbeef')), encodeOption(Opt.STRUCTURED_REPLY)]));
    assert.equal(
      cat(step.send),
      repErr(Opt.LIST, RepErr.INVALID, 'NBD_OPT_LIST must not carry data') + rep(Opt.STRUCTURED_REPLY, Rep.ACK),
    );
  });

  it('NBD_OPT_STARTTLS without --tls: NBD_REP_ERR_POLICY (proto.md "NOTLS mode")', () => {
    const hs = ready([exp('a', 512)]);
    const step = hs.push(encodeOption(Opt.STARTTLS));
    assert.equal(cat(step.send), repErr(Opt.STARTTLS, RepErr.POLICY, 'TLS is not enabled on this server (serve --tls)'));
    assert.equal(step.close, undefined);
    assert.equal(step.startTls, undefined);
  });

  it('NBD_OPT_STRUCTURED_REPLY: ACK once, INVALID the second time', () => {
    const hs = ready([exp('a', 512)]);
    assert.equal(cat(hs.push(encodeOption(Opt.STRUCTURED_REPLY)).send), rep(Opt.STRUCTURED_REPLY, Rep.ACK));
    assert.equal(
      cat(hs.push(encodeOption(Opt.STRUCTURED_REPLY)).send),
      repErr(Opt.STRUCTURED_REPLY, RepErr.INVALID, 'structured replies already negotiated'),
    );
  });

  it('NBD_OPT_INFO: INFO_EXPORT, requested NAME and DESCRIPTION, BLOCK_SIZE, ACK; stays in negotiation', () => {
    const hs = ready([exp('disk', 0x100000, { description: 'desc' })]);
    const step = hs.push(encodeOption(Opt.INFO, encodeInfoRequest('disk', [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])));
    assert.equal(
      cat(step.send),
      rep(Opt.INFO, Rep.INFO, '0000' + '0000000000100000' + RW_FLAGS.toString(16).padStart(4, '0')) +
        rep(Opt.INFO, Rep.INFO, '0001' + Buffer.from('disk').toString('hex')) +
        rep(Opt.INFO, Rep.INFO, '0002' + Buffer.from('desc').toString('hex')) +
        rep(Opt.INFO, Rep.INFO, '0003' + '00000001' + '00001000' + '02000000') +
        rep(Opt.INFO, Rep.ACK),
    );
    assert.equal(step.negotiated, undefined);
    assert.equal(hs.state.phase, 'option-header');
  });

  it('NBD_OPT_GO: same replies, then transmission with the bytes that followed', () => {
    const hs = ready([exp('disk', 4096)]);
    const step = hs.push(Buffer.concat([encodeOption(Opt.GO, encodeInfoRequest('disk', [])), hex('25609513')]));
    assert.equal(
      cat(step.send),
      rep(Opt.GO, Rep.INFO, '0000' + '0000000000001000' + RW_FLAGS.toString(16).padStart(4, '0')) +
        rep(Opt.GO, Rep.INFO, '0003' + '00000001' + '00001000' + '02000000') +
        rep(Opt.GO, Rep.ACK),
    );
    assert.equal(step.negotiated?.export.name, 'disk');
    assert.equal(step.negotiated?.structured, false);
    assert.equal(step.negotiated?.leftover.toString('hex'), '25609513');
    assert.equal(hs.state.phase, 'transmission');
    assert.throws(() => hs.push(hex('00')));
  });

  it('read-only export: READ_ONLY, no FUA/TRIM/WRITE_ZEROES; structured adds SEND_DF', () => {
    const hs = ready([exp('ro', 4096, { readOnly: true })]);
    hs.push(encodeOption(Opt.STRUCTURED_REPLY));
    const step = hs.push(encodeOption(Opt.GO, encodeInfoRequest('ro', [])));
    const flags =
      TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE |
      TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_DF;
    assert.equal(step.negotiated?.flags, flags);
    assert.equal(step.negotiated?.structured, true);
    assert.equal(step.send[0]!.subarray(30, 32).readUInt16BE(0), flags);
  });

  it('the empty name reaches the only export, but not one of several', () => {
    const one = ready([exp('only', 512)]);
    const s1 = one.push(encodeOption(Opt.GO, encodeInfoRequest('', [Info.NAME])));
    assert.equal(s1.negotiated?.export.name, 'only');
    // NBD_INFO_NAME tells the client the canonical name.
    assert.equal(s1.send[1]!.subarray(20).toString('hex'), '0001' + Buffer.from('only').toString('hex'));

    const two = ready([exp('a', 512), exp('b', 512)]);
    const s2 = two.push(encodeOption(Opt.GO, encodeInfoRequest('', [])));
    assert.equal(cat(s2.send), repErr(Opt.GO, RepErr.UNKNOWN, 'unknown export ""; exports: "a", "b"'));
    assert.equal(s2.negotiated, undefined);
  });

  it('NBD_OPT_GO for an unknown export: NBD_REP_ERR_UNKNOWN with no NBD_REP_INFO', () => {
    const hs = ready([exp('a', 512)]);
    const step = hs.push(encodeOption(Opt.GO, encodeInfoRequest('nope', [Info.BLOCK_SIZE])));
    assert.equal(cat(step.send), repErr(Opt.GO, RepErr.UNKNOWN, 'unknown export "nope"; exports: "a"'));
    assert.equal(hs.state.phase, 'option-header');
  });

  it('malformed NBD_OPT_GO data: NBD_REP_ERR_INVALID', () => {
    const hs = ready([exp('a', 512)]);
    // name length 9 but only 1 byte of name
    const step = hs.push(encodeOption(Opt.GO, hex('00000009' + '61' + '0000')));
    assert.equal(step.send.length, 1);
    assert.equal(step.send[0]!.readUInt32BE(12), RepErr.INVALID);
    assert.match(step.send[0]!.subarray(20).toString(), /^NBD_OPT_GO: /);
    // info count that does not match the length
    const s2 = hs.push(encodeOption(Opt.INFO, hex('00000001' + '61' + '0002' + '0001')));
    assert.equal(s2.send[0]!.readUInt32BE(12), RepErr.INVALID);
    // too short to hold a name length and a count
    const s3 = hs.push(encodeOption(Opt.INFO, hex('0000')));
    assert.equal(s3.send[0]!.readUInt32BE(12), RepErr.INVALID);
  });

  it('export name over 4096 bytes: NBD_REP_ERR_INVALID for GO', () => {
    const hs = ready([exp('a', 512)]);
    const step = hs.push(encodeOption(Opt.GO, encodeInfoRequest('x'.repeat(4097), [])));
    assert.equal(cat(step.send), repErr(Opt.GO, RepErr.INVALID, 'NBD_OPT_GO: export name longer than 4096 bytes'));
  });

  it('NBD_OPT_GO data over the cap: NBD_REP_ERR_TOO_BIG after discarding it; next option in step', () => {
    const hs = ready([exp('a', 512)]);
    const big = encodeOption(Opt.GO, Buffer.alloc(MAX_OPTION_DATA + 1));
    const step = hs.push(Buffer.concat([big, encodeOption(Opt.STRUCTURED_REPLY)]));
    assert.equal(
      cat(step.send),
      repErr(Opt.GO, RepErr.TOO_BIG, `NBD_OPT_GO data longer than ${MAX_OPTION_DATA} bytes`) + rep(Opt.STRUCTURED_REPLY, Rep.ACK),
    );
  });

  it('unknown and unsupported options: NBD_REP_ERR_UNSUP, data skipped', () => {
    const hs = ready([exp('a', 512)]);
    const step = hs.push(
      Buffer.concat([
        encodeOption(99, Buffer.alloc(100, 1)),
        encodeOption(Opt.SET_META_CONTEXT, Buffer.alloc(30, 2)),
        encodeOption(Opt.EXTENDED_HEADERS),
      ]),
    );
    assert.equal(
      cat(step.send),
      repErr(99, RepErr.UNSUP, 'NBD_OPT_99 is not supported by this server') +
        repErr(Opt.SET_META_CONTEXT, RepErr.UNSUP, 'NBD_OPT_SET_META_CONTEXT is not supported by this server') +
        repErr(Opt.EXTENDED_HEADERS, RepErr.UNSUP, 'NBD_OPT_EXTENDED_HEADERS is not supported by this server'),
    );
  });

  it('NBD_OPT_ABORT: ACK and a soft close, even with (ignored) data', () => {
    for (const data of [Buffer.alloc(0), Buffer.alloc(10)]) {
      const hs = ready([exp('a', 512)]);
      const step = hs.push(encodeOption(Opt.ABORT, data));
      assert.equal(cat(step.send), rep(Opt.ABORT, Rep.ACK));
      assert.deepEqual(step.close, { reason: 'client sent NBD_OPT_ABORT', soft: true });
    }
  });
});

describe('server handshake: NBD_OPT_EXPORT_NAME', () => {
  it('known export: size, flags and 124 zeros', () => {
    const hs = ready([exp('a', 0x200)], 1);
    const step = hs.push(Buffer.concat([encodeOption(Opt.EXPORT_NAME, Buffer.from('a')), hex('aa')]));
    assert.equal(cat(step.send), '0000000000000200' + RW_FLAGS.toString(16).padStart(4, '0') + '00'.repeat(124));
    assert.equal(step.negotiated?.leftover.toString('hex'), 'aa');
  });

  it('known export with NO_ZEROES agreed: size and flags only', () => {
    const hs = ready([exp('a', 0x200)], 3);
    const step = hs.push(encodeOption(Opt.EXPORT_NAME, Buffer.from('a')));
    assert.equal(cat(step.send), '0000000000000200' + RW_FLAGS.toString(16).padStart(4, '0'));
  });

  it('unknown export: hard close without a reply (proto.md: MUST terminate)', () => {
    const hs = ready([exp('a', 0x200)]);
    const step = hs.push(encodeOption(Opt.EXPORT_NAME, Buffer.from('b')));
    assert.deepEqual(step.send, []);
    assert.equal(step.close?.soft, false);
    assert.match(step.close!.reason, /unknown export "b"/);
  });

  it('name over 4096 bytes: closed at the header, before reading it', () => {
    const hs = ready([exp('a', 0x200)]);
    const header = encodeOption(Opt.EXPORT_NAME, Buffer.alloc(4097)).subarray(0, 16);
    const step = hs.push(header);
    assert.equal(step.close?.soft, false);
  });
});

describe('server handshake: bounds and violations', () => {
  it(`more than ${MAX_OPTIONS} options: closed`, () => {
    const hs = ready([exp('a', 512)]);
    let step: HandshakeStep = { send: [] };
    for (let i = 0; i < MAX_OPTIONS; i++) {
      step = hs.push(encodeOption(Opt.STARTTLS));
      assert.equal(step.send.length, 1);
      assert.equal(step.close, undefined);
    }
    step = hs.push(encodeOption(Opt.STARTTLS));
    assert.deepEqual(step.send, []);
    assert.match(step.close!.reason, /more than 32 options/);
  });

  it(`option length over ${DISCARD_LIMIT}: closed at the header`, () => {
    const hs = ready([exp('a', 512)]);
    const h = Buffer.alloc(16);
    h.write('49484156454f5054', 0, 'hex');
    h.writeUInt32BE(99, 8);
    h.writeUInt32BE(DISCARD_LIMIT + 1, 12);
    const step = hs.push(h);
    assert.equal(step.close?.soft, false);
  });

  it('bad option magic: closed', () => {
    const hs = ready([exp('a', 512)]);
    const step = hs.push(hex('0000000000000000' + '00000003' + '00000000'));
    assert.equal(step.close?.soft, false);
    assert.match(step.close!.reason, /IHAVEOPT/);
  });

  it('same output whether fed whole or one byte at a time', () => {
    const input = Buffer.concat([
      hex('00000003'),
      encodeOption(Opt.LIST, hex('0102')),
      encodeOption(77, Buffer.alloc(5)),
      encodeOption(Opt.STRUCTURED_REPLY),
      encodeOption(Opt.INFO, encodeInfoRequest('a', [Info.NAME])),
      encodeOption(Opt.GO, encodeInfoRequest('a', [])),
      hex('2560951300'),
    ]);
    const whole = new ServerHandshake([exp('a', 512)]).push(input);
    const hs = new ServerHandshake([exp('a', 512)]);
    const sent: Buffer[] = [];
    let negotiated;
    for (let i = 0; i < input.length && !negotiated; i++) {
      const s = hs.push(input.subarray(i, i + 1));
      sent.push(...s.send);
      negotiated = s.negotiated;
    }
    assert.equal(cat(sent), cat(whole.send));
    assert.ok(negotiated);
    // Fed byte by byte, GO completes with its last byte: the request bytes arrive later.
    assert.equal(whole.negotiated?.leftover.toString('hex'), '2560951300');
  });

  it('during shutdown: options get NBD_REP_ERR_SHUTDOWN, ABORT still ACK', () => {
    const hs = ready([exp('a', 512)]);
    hs.beginShutdown();
    assert.equal(cat(hs.push(encodeOption(Opt.GO, encodeInfoRequest('a', []))).send), repErr(Opt.GO, RepErr.SHUTDOWN, 'server is shutting down'));
    assert.equal(cat(hs.push(encodeOption(99, hex('00'))).send), repErr(99, RepErr.SHUTDOWN, 'server is shutting down'));
    const s = hs.push(encodeOption(Opt.ABORT));
    assert.equal(cat(s.send), rep(Opt.ABORT, Rep.ACK));
    assert.equal(s.close?.soft, true);
  });
});

describe('server handshake: TLS (proto.md "TLS support")', () => {
  const goA = (): Buffer => encodeOption(Opt.GO, encodeInfoRequest('a', []));

  it('require (FORCEDTLS): options before STARTTLS get TLS_REQD, the connection stays usable', () => {
    const hs = ready([exp('a', 512)], 3, 'require');
    for (const opt of [Opt.LIST, Opt.STRUCTURED_REPLY, 99]) {
      const step = hs.push(encodeOption(opt));
      assert.equal(cat(step.send), repErr(opt, RepErr.TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
      assert.equal(step.close, undefined);
    }
    let step = hs.push(goA());
    assert.equal(cat(step.send), repErr(Opt.GO, RepErr.TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
    assert.equal(step.negotiated, undefined, 'no transmission without TLS');
    step = hs.push(encodeOption(Opt.INFO, encodeInfoRequest('a', [])));
    assert.equal(cat(step.send), repErr(Opt.INFO, RepErr.TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
  });

  it('require: EXPORT_NAME before TLS ends the session (it cannot be answered with an error)', () => {
    const hs = ready([exp('a', 512)], 3, 'require');
    const step = hs.push(encodeOption(Opt.EXPORT_NAME, Buffer.from('a')));
    assert.deepEqual(step.send, []);
    assert.match(step.close!.reason, /requires TLS/);
  });

  it('STARTTLS: ACK, then nothing is parsed until tlsStarted(); then options work and a second STARTTLS is INVALID', () => {
    const hs = ready([exp('a', 512)], 3, 'require');
    let step = hs.push(encodeOption(Opt.STRUCTURED_REPLY));
    assert.equal(cat(step.send), repErr(Opt.STRUCTURED_REPLY, RepErr.TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
    step = hs.push(encodeOption(Opt.STARTTLS));
    assert.equal(cat(step.send), rep(Opt.STARTTLS, Rep.ACK));
    assert.equal(step.startTls, true);
    assert.throws(() => hs.push(goA()), /before tlsStarted/);
    hs.tlsStarted();
    step = hs.push(encodeOption(Opt.STARTTLS));
    assert.equal(cat(step.send), repErr(Opt.STARTTLS, RepErr.INVALID, 'TLS is already running'));
    step = hs.push(goA());
    assert.ok(step.negotiated, 'GO over TLS enters transmission');
    assert.equal(step.negotiated.structured, false);
  });

  it('STARTTLS forgets structured replies negotiated in clear (proto.md "NBD_OPT_STARTTLS")', () => {
    const hs = ready([exp('a', 512)], 3, 'on');
    let step = hs.push(encodeOption(Opt.STRUCTURED_REPLY));
    assert.equal(cat(step.send), rep(Opt.STRUCTURED_REPLY, Rep.ACK));
    step = hs.push(encodeOption(Opt.STARTTLS));
    assert.equal(step.startTls, true);
    hs.tlsStarted();
    step = hs.push(goA());
    assert.equal(step.negotiated?.structured, false);
  });

  it('on (TLS offered, not required): clients without TLS negotiate as before', () => {
    const hs = ready([exp('a', 512)], 3, 'on');
    const step = hs.push(goA());
    assert.ok(step.negotiated);
  });

  it('bytes queued behind STARTTLS (before its ACK could be read): closed', () => {
    const hs = ready([exp('a', 512)], 3, 'on');
    const step = hs.push(Buffer.concat([encodeOption(Opt.STARTTLS), Buffer.from([0x16, 0x03, 0x01])]));
    assert.match(step.close!.reason, /data after NBD_OPT_STARTTLS/);
    assert.equal(step.startTls, undefined);
  });
});

describe('server handshake: names and descriptions are bytes', () => {
  // A name given as a string with U+DC80..U+DCFF stands for raw bytes (src/text.ts): served exactly.
  const raw = 'r\x1b[2J\udcff\n';
  const rawHex = '721b5b324aff0a';

  it('LIST and INFO send control characters and invalid UTF-8 exactly as configured', () => {
    const hs = ready([exp(raw, 0x200, { description: 'line\r\n\udcc0' })]);
    const list = hs.push(encodeOption(Opt.LIST));
    assert.equal(cat(list.send), rep(Opt.LIST, Rep.SERVER, `00000007${rawHex}` + '6c696e650d0ac0') + rep(Opt.LIST, Rep.ACK));
    const info = hs.push(encodeOption(Opt.INFO, Buffer.concat([hex(`00000007${rawHex}`), hex('0002 0001 0002')])));
    assert.equal(
      cat(info.send),
      rep(Opt.INFO, Rep.INFO, '0000' + '0000000000000200' + RW_FLAGS.toString(16).padStart(4, '0')) +
        rep(Opt.INFO, Rep.INFO, `0001${rawHex}`) +
        rep(Opt.INFO, Rep.INFO, '0002' + '6c696e650d0ac0') +
        rep(Opt.INFO, Rep.INFO, '0003' + '00000001' + '00001000' + '02000000') +
        rep(Opt.INFO, Rep.ACK),
    );
  });

  it('a name is found by its exact bytes: U+FFFD does not stand in for an invalid byte', () => {
    const hs = ready([exp(raw, 0x200)], 3);
    const miss = hs.push(encodeOption(Opt.INFO, encodeInfoRequest('r\x1b[2J\ufffd\n', [])));
    assert.match(miss.send[0]!.subarray(20).toString('utf8'), /unknown export/);
    const step = hs.push(encodeOption(Opt.EXPORT_NAME, hex(rawHex)));
    assert.equal(cat(step.send), '0000000000000200' + RW_FLAGS.toString(16).padStart(4, '0'));
    assert.equal(step.negotiated?.export.name, raw);
  });
});
