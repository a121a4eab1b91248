// The client handshake machine, byte for byte: a scripted server plays each reply path.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClientHandshake, type HandshakeGoal, type HandshakeResult } from '../../src/protocol/handshake.ts';
import {
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNewstyleGreeting,
  encodeOldstyleGreeting,
  encodeOptionReply,
  encodeRepServer,
  encodeOption,
  encodeInfoRequest,
  encodeClientFlags,
} from '../../src/protocol/codec.ts';
import { HandshakeFlag, Info, Opt, Rep, RepErr, TransmissionFlag } from '../../src/protocol/constants.ts';
import { NbdError } from '../../src/errors.ts';

const FIXED = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES;
const TLS_MARK = '<TLS>';
const F = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;

/** Feed `server` bytes to the machine exactly as the driver does; returns result and what the client sent. */
function play(goal: HandshakeGoal, server: Buffer, { eofAtEnd = true } = {}): { result?: HandshakeResult; sent: Buffer; error?: unknown } {
  const m = new ClientHandshake(goal);
  const sent: Buffer[] = [];
  let pos = 0;
  try {
    let step = m.start();
    for (;;) {
      sent.push(...step.send);
      if (step.done) return { result: step.done, sent: Buffer.concat(sent) };
      if (step.startTls) {
        // The driver runs the TLS handshake here; the marker shows where in the byte stream it happened.
        assert.equal(step.want, 0);
        sent.push(Buffer.from(TLS_MARK));
        step = m.tlsDone();
        continue;
      }
      if (pos + step.want > server.length) {
        if (!eofAtEnd) throw new Error(`machine wants ${step.want} more bytes at ${pos}`);
        step = m.eof();
        continue;
      }
      const chunk = server.subarray(pos, pos + step.want);
      pos += step.want;
      step = m.receive(chunk);
    }
  } catch (error) {
    return { error, sent: Buffer.concat(sent) };
  }
}

const infoReply = (opt: number, data: Buffer) => encodeOptionReply(opt, Rep.INFO, data);
const ack = (opt: number) => encodeOptionReply(opt, Rep.ACK);
const err = (opt: number, type: number, text = '') => encodeOptionReply(opt, type, Buffer.from(text));

test('GO: fixed newstyle with NO_ZEROES, block sizes honoured, exact bytes sent', () => {
  const server = Buffer.concat([
    encodeNewstyleGreeting(FIXED),
    infoReply(Opt.GO, encodeInfoBlockSize({ min: 512, preferred: 4096, max: 1 << 25 })),
    infoReply(Opt.GO, encodeInfoExport(1n << 30n, F)),
    ack(Opt.GO),
  ]);
  const { result, sent, error } = play({ kind: 'go', name: 'disk' }, server);
  assert.equal(error, undefined);
  assert.deepEqual(result!.info, { name: 'disk', size: 1n << 30n, flags: F, blockSize: { min: 512, preferred: 4096, max: 1 << 25 } });
  assert.equal(result!.via, 'NBD_OPT_GO');
  assert.equal(result!.style, 'fixed-newstyle');
  assert.equal(result!.transmission, true);
  // client flags C_FIXED_NEWSTYLE|C_NO_ZEROES, then IHAVEOPT GO {u32 4 "disk" u16 1 u16 BLOCK_SIZE}
  const expected = Buffer.concat([encodeClientFlags(3), encodeOption(Opt.GO, encodeInfoRequest('disk', [Info.BLOCK_SIZE]))]);
  assert.equal(sent.toString('hex'), expected.toString('hex'));
  assert.equal(
    expected.subarray(4).toString('hex'),
    '49484156454f5054' + '00000007' + '0000000c' + '00000004' + '6469736b' + '0001' + '0003',
  );
});

test('GO: no C_NO_ZEROES unless the server offered NO_ZEROES', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE), infoReply(Opt.GO, encodeInfoExport(4096n, F)), ack(Opt.GO)]);
  const { sent } = play({ kind: 'go', name: '' }, server);
  assert.equal(sent.readUInt32BE(0), 1);
});

test('GO: unknown info types are ignored; NAME and DESCRIPTION recorded', () => {
  const unknown = Buffer.from([0x00, 0x63, 1, 2, 3]);
  const server = Buffer.concat([
    encodeNewstyleGreeting(FIXED),
    infoReply(Opt.GO, unknown),
    infoReply(Opt.GO, encodeInfoString(Info.NAME, 'canonical')),
    infoReply(Opt.GO, encodeInfoString(Info.DESCRIPTION, 'a disk')),
    infoReply(Opt.GO, encodeInfoExport(512n, F)),
    ack(Opt.GO),
  ]);
  const { result } = play({ kind: 'go', name: 'x' }, server);
  assert.equal(result!.info!.canonicalName, 'canonical');
  assert.equal(result!.info!.description, 'a disk');
});

test('GO: ACK without NBD_INFO_EXPORT is a protocol error', () => {
  const { error } = play({ kind: 'go', name: 'x' }, Buffer.concat([encodeNewstyleGreeting(FIXED), ack(Opt.GO)]));
  assert.ok(error instanceof NbdError);
  assert.equal(error.code, 'NBD_E_PROTOCOL');
  assert.match(error.message, /NBD_INFO_EXPORT/);
});

test('GO: ERR_UNSUP falls back to EXPORT_NAME on the same connection', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.GO, RepErr.UNSUP), encodeExportNameReply(8192n, F, true)]);
  const { result, sent } = play({ kind: 'go', name: 'old' }, server);
  assert.equal(result!.via, 'NBD_OPT_EXPORT_NAME');
  assert.equal(result!.info!.size, 8192n);
  assert.ok(sent.includes(encodeOption(Opt.EXPORT_NAME, Buffer.from('old'))));
});

test('GO: server closing the connection asks for a retry without GO', () => {
  const { error } = play({ kind: 'go', name: 'x' }, encodeNewstyleGreeting(FIXED));
  assert.ok(error instanceof NbdError);
  assert.equal(error.code, 'NBD_E_SERVER_CLOSED');
  assert.equal((error as { goRejectedByClose?: boolean }).goRejectedByClose, true);
});

test('--no-optgo: EXPORT_NAME with the 124 zero bytes when NO_ZEROES was not agreed', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE), encodeExportNameReply(1024n, F, false)]);
  assert.equal(encodeExportNameReply(1024n, F, false).length, 134);
  const { result, sent } = play({ kind: 'go', name: 'n', noOptGo: true }, server, { eofAtEnd: false });
  assert.equal(result!.info!.size, 1024n);
  assert.equal(sent.subarray(4).toString('hex'), encodeOption(Opt.EXPORT_NAME, Buffer.from('n')).toString('hex'));
});

test('non-fixed newstyle: only EXPORT_NAME, client flags 0', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(0), encodeExportNameReply(2048n, F, false)]);
  const { result, sent } = play({ kind: 'go', name: 'a' }, server);
  assert.equal(sent.readUInt32BE(0), 0);
  assert.equal(result!.style, 'newstyle');
  assert.equal(result!.info!.size, 2048n);
});

test('EXPORT_NAME refused by closing: export unknown', () => {
  const { error } = play({ kind: 'go', name: 'nope' }, encodeNewstyleGreeting(0));
  assert.ok(error instanceof NbdError);
  assert.equal(error.code, 'NBD_E_EXPORT_UNKNOWN');
  assert.match(error.message, /'nope'/);
});

test('oldstyle: size and flags from the 152-byte greeting; a name is refused', () => {
  const g = encodeOldstyleGreeting(1n << 20n, F | (0xabcd << 16));
  assert.equal(g.length, 152);
  const { result } = play({ kind: 'go', name: '' }, g);
  assert.deepEqual(result!.info, { name: '', size: 1n << 20n, flags: F });
  assert.equal(result!.via, 'oldstyle');
  const named = play({ kind: 'go', name: 'x' }, g);
  assert.ok(named.error instanceof NbdError);
  assert.equal(named.error.code, 'NBD_E_UNSUPPORTED');
});

test('every error reply becomes a one-line message with the server text', () => {
  const cases: [number, string, RegExp][] = [
    [RepErr.UNKNOWN, 'NBD_E_EXPORT_UNKNOWN', /no export named 'x'.*server says: nope/],
    [RepErr.TLS_REQD, 'NBD_E_TLS_REQUIRED', /requires TLS/],
    [RepErr.POLICY, 'NBD_E_OPTION', /by policy/],
    [RepErr.INVALID, 'NBD_E_OPTION', /invalid/],
    [RepErr.PLATFORM, 'NBD_E_OPTION', /platform/],
    [RepErr.SHUTDOWN, 'NBD_E_OPTION', /shutting down/],
    [RepErr.BLOCK_SIZE_REQD, 'NBD_E_OPTION', /block-size negotiation/],
    [RepErr.TOO_BIG, 'NBD_E_OPTION', /too big/],
    [0x80000063, 'NBD_E_OPTION', /NBD_REP_ERR_99|2147483747/],
  ];
  for (const [type, code, re] of cases) {
    const { error } = play({ kind: 'go', name: 'x' }, Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.GO, type, 'nope\nmore')]));
    assert.ok(error instanceof NbdError, `type ${type}`);
    assert.equal(error.code, code);
    assert.match(error.message, re);
    assert.ok(!error.message.includes('\n'), 'one line');
  }
});

test('LIST then INFO for each export, then ABORT', () => {
  const server = Buffer.concat([
    encodeNewstyleGreeting(FIXED),
    encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer('a', 'first')),
    encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer('b')),
    ack(Opt.LIST),
    infoReply(Opt.INFO, encodeInfoExport(100n, F)),
    ack(Opt.INFO),
    err(Opt.INFO, RepErr.TLS_REQD, 'tls please'),
    ack(Opt.ABORT),
  ]);
  const { result, sent } = play({ kind: 'list' }, server);
  assert.equal(result!.exports!.length, 2);
  assert.deepEqual(result!.exports![0], { name: 'a', description: 'first', info: { name: 'a', size: 100n, flags: F } });
  assert.match(result!.exports![1]!.infoError!, /requires TLS/);
  assert.equal(result!.transmission, false);
  assert.ok(sent.subarray(sent.length - 16).equals(encodeOption(Opt.ABORT)));
});

test('LIST: server may close instead of answering ABORT', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(FIXED), ack(Opt.LIST)]);
  const { result, error } = play({ kind: 'list' }, server);
  assert.equal(error, undefined);
  assert.deepEqual(result!.exports, []);
});

test('LIST refused by policy is an error that says so', () => {
  const { error } = play({ kind: 'list' }, Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.LIST, RepErr.POLICY, 'no listing')]));
  assert.ok(error instanceof NbdError);
  assert.match(error.message, /listing exports by policy.*no listing/);
});

test('INFO unsupported: list falls back to names only; info falls back to EXPORT_NAME', () => {
  const listSrv = Buffer.concat([
    encodeNewstyleGreeting(FIXED),
    encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer('a')),
    ack(Opt.LIST),
    err(Opt.INFO, RepErr.UNSUP),
    ack(Opt.ABORT),
  ]);
  const l = play({ kind: 'list' }, listSrv);
  assert.equal(l.result!.exports![0]!.info, undefined);
  assert.match(l.result!.note!, /NBD_OPT_INFO/);
  const infoSrv = Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.INFO, RepErr.UNSUP), encodeExportNameReply(77n, F, true)]);
  const i = play({ kind: 'info', name: 'a' }, infoSrv);
  assert.equal(i.result!.info!.size, 77n);
  assert.equal(i.result!.transmission, true, 'driver must send NBD_CMD_DISC');
});

test('hostile server: bounded lengths, counts, magics, wrong option', () => {
  const huge = Buffer.concat([encodeNewstyleGreeting(FIXED), encodeOptionReply(Opt.GO, Rep.INFO).subarray(0, 16), Buffer.from([0xff, 0xff, 0xff, 0xff])]);
  let r = play({ kind: 'go', name: 'x' }, huge);
  assert.ok(r.error instanceof NbdError && /limit/.test(r.error.message));

  const many: Buffer[] = [encodeNewstyleGreeting(FIXED)];
  for (let i = 0; i < 10_001; i++) many.push(encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer('x')));
  r = play({ kind: 'list', details: false }, Buffer.concat(many));
  assert.ok(r.error instanceof NbdError && /more than 10000 replies/.test(r.error.message));

  // Within the count and per-reply limits, the total is bounded too: 600 names of 60 000 bytes (36 MB).
  const big: Buffer[] = [encodeNewstyleGreeting(FIXED)];
  for (let i = 0; i < 600; i++) big.push(encodeOptionReply(Opt.LIST, Rep.SERVER, encodeRepServer('y'.repeat(60_000))));
  r = play({ kind: 'list', details: false }, Buffer.concat(big));
  assert.ok(r.error instanceof NbdError && /more than 33554432 bytes of option replies/.test(r.error.message), String(r.error));

  r = play({ kind: 'go', name: 'x' }, Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
  assert.ok(r.error instanceof NbdError && /not an NBD server/.test(r.error.message));

  const wrongOpt = Buffer.concat([encodeNewstyleGreeting(FIXED), ack(Opt.LIST)]);
  r = play({ kind: 'go', name: 'x' }, wrongOpt);
  assert.ok(r.error instanceof NbdError && /NBD_OPT_LIST while we asked NBD_OPT_GO/.test(r.error.message));

  const badMagic = Buffer.concat([encodeNewstyleGreeting(FIXED), Buffer.alloc(20, 0x41)]);
  r = play({ kind: 'go', name: 'x' }, badMagic);
  assert.ok(r.error instanceof NbdError && /bad magic/.test(r.error.message));

  const badInfoLen = Buffer.concat([encodeNewstyleGreeting(FIXED), infoReply(Opt.GO, Buffer.from([0, 0, 1]))]);
  r = play({ kind: 'go', name: 'x' }, badInfoLen);
  assert.ok(r.error instanceof NbdError && /length must be 12/.test(r.error.message));

  const badBlock = Buffer.concat([encodeNewstyleGreeting(FIXED), infoReply(Opt.GO, encodeInfoBlockSize({ min: 3, preferred: 4096, max: 4096 }))]);
  r = play({ kind: 'go', name: 'x' }, badBlock);
  assert.ok(r.error instanceof NbdError && /minimum block size 3/.test(r.error.message));

  const replyToGoWithServer = Buffer.concat([encodeNewstyleGreeting(FIXED), encodeOptionReply(Opt.GO, Rep.SERVER, encodeRepServer('x'))]);
  r = play({ kind: 'go', name: 'x' }, replyToGoWithServer);
  assert.ok(r.error instanceof NbdError && /unexpected NBD_REP_SERVER/.test(r.error.message));
});

test('closed before greeting and mid-handshake: clear errors', () => {
  let r = play({ kind: 'go', name: '' }, Buffer.alloc(0));
  assert.ok(r.error instanceof NbdError && /before its greeting/.test(r.error.message));
  r = play({ kind: 'go', name: '' }, encodeNewstyleGreeting(FIXED).subarray(0, 16));
  assert.ok(r.error instanceof NbdError && r.error.code === 'NBD_E_SERVER_CLOSED');
});

test('a name longer than 4096 bytes is refused before connecting', () => {
  assert.throws(() => new ClientHandshake({ kind: 'go', name: 'x'.repeat(4097) }), /longer than 4096/);
});

test('TLS: STARTTLS is the first option; after its ACK the driver starts TLS and GO follows inside', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(FIXED), ack(Opt.STARTTLS), infoReply(Opt.GO, encodeInfoExport(4096n, F)), ack(Opt.GO)]);
  const { result, sent, error } = play({ kind: 'go', name: 'disk', tls: true }, server);
  assert.equal(error, undefined);
  assert.equal(result!.info!.size, 4096n);
  const expected = Buffer.concat([
    encodeClientFlags(3),
    encodeOption(Opt.STARTTLS), // proto.md: no data with NBD_OPT_STARTTLS
    Buffer.from(TLS_MARK),
    encodeOption(Opt.GO, encodeInfoRequest('disk', [Info.BLOCK_SIZE])),
  ]);
  assert.equal(sent.toString('hex'), expected.toString('hex'));
  assert.equal(encodeOption(Opt.STARTTLS).toString('hex'), '49484156454f5054' + '00000005' + '00000000');
});

test('TLS: list and info negotiate inside TLS too; without tls no STARTTLS is sent', () => {
  const server = Buffer.concat([encodeNewstyleGreeting(FIXED), ack(Opt.STARTTLS), ack(Opt.LIST), ack(Opt.ABORT)]);
  const { result, sent } = play({ kind: 'list', tls: true }, server);
  assert.deepEqual(result!.exports, []);
  assert.ok(sent.indexOf(encodeOption(Opt.STARTTLS)) < sent.indexOf(TLS_MARK));
  assert.ok(sent.indexOf(TLS_MARK) < sent.indexOf(encodeOption(Opt.LIST)));
  const plain = play({ kind: 'go', name: 'd' }, Buffer.concat([encodeNewstyleGreeting(FIXED), infoReply(Opt.GO, encodeInfoExport(1n, F)), ack(Opt.GO)]));
  assert.equal(plain.sent.indexOf(encodeOption(Opt.STARTTLS)), -1);
  assert.equal(plain.sent.indexOf(TLS_MARK), -1);
});

test('TLS: a server that cannot or will not do it fails the handshake (no fallback to plain text)', () => {
  const cases: [Buffer, RegExp][] = [
    [Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.STARTTLS, RepErr.UNSUP)]), /server does not offer TLS/],
    [Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.STARTTLS, RepErr.POLICY, 'not you')]), /refused TLS by policy \(server says: not you\)/],
    [Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.STARTTLS, RepErr.INVALID)]), /refused NBD_OPT_STARTTLS with NBD_REP_ERR_INVALID/],
    [encodeNewstyleGreeting(FIXED), /closed the connection on NBD_OPT_STARTTLS/],
    [encodeNewstyleGreeting(HandshakeFlag.NO_ZEROES), /non-fixed newstyle, which cannot do TLS/],
    [encodeOldstyleGreeting(1n << 20n, F), /oldstyle handshake, which cannot do TLS/],
  ];
  for (const [server, message] of cases) {
    const { error, sent } = play({ kind: 'go', name: '', tls: true }, server);
    assert.ok(error instanceof NbdError, String(message));
    assert.equal(error.code, 'NBD_E_TLS');
    assert.match(error.message, message);
    assert.equal(sent.indexOf(TLS_MARK), -1);
    assert.equal(sent.indexOf(encodeOption(Opt.GO, encodeInfoRequest('', [Info.BLOCK_SIZE]))), -1, 'nothing else is asked in plain text');
  }
});

test('TLS: a TLS_REQD answer to a plain client says how to connect with TLS', () => {
  const { error } = play({ kind: 'go', name: 'd' }, Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.GO, RepErr.TLS_REQD)]));
  assert.ok(error instanceof NbdError);
  assert.equal(error.code, 'NBD_E_TLS_REQUIRED');
  assert.match(error.message, /-x\/--tls.*nbds:\/\//);
});

test('TLS: a server closing right after TLS is not taken for an old server refusing GO', () => {
  const { error } = play({ kind: 'go', name: 'd', tls: true }, Buffer.concat([encodeNewstyleGreeting(FIXED), ack(Opt.STARTTLS)]));
  assert.ok(error instanceof NbdError);
  assert.equal(error.code, 'NBD_E_SERVER_CLOSED');
  assert.match(error.message, /right after TLS.*client certificate.*-F\/--certfile/);
  assert.equal((error as { goRejectedByClose?: boolean }).goRejectedByClose, undefined, 'no retry with NBD_OPT_EXPORT_NAME');
});

test('names and descriptions are kept byte for byte: a listed name that is not UTF-8 is asked for again exactly', () => {
  const rawName = Buffer.from([0x64, 0x1b, 0x5b, 0x32, 0x4a, 0xff, 0x0a]); // "d", ESC [2J, a raw 0xff, "\n"
  const rawDescription = Buffer.concat([Buffer.from('\ufeffline 1\nsize: 1 bytes\r', 'utf8'), Buffer.from([0xc0, 0x80])]);
  const listing = Buffer.alloc(4 + rawName.length + rawDescription.length);
  listing.writeUInt32BE(rawName.length, 0);
  rawName.copy(listing, 4);
  rawDescription.copy(listing, 4 + rawName.length);
  const server = Buffer.concat([
    encodeNewstyleGreeting(FIXED),
    encodeOptionReply(Opt.LIST, Rep.SERVER, listing),
    ack(Opt.LIST),
    infoReply(Opt.INFO, encodeInfoExport(4096n, F)),
    infoReply(Opt.INFO, Buffer.concat([Buffer.from([0, Info.DESCRIPTION]), rawDescription])),
    ack(Opt.INFO),
    ack(Opt.ABORT),
  ]);
  const { result, sent, error } = play({ kind: 'list' }, server);
  assert.equal(error, undefined);
  const e = result!.exports![0]!;
  assert.equal(e.name, 'd\x1b[2J\udcff\n');
  assert.equal(e.description, '\ufeffline 1\nsize: 1 bytes\r\udcc0\udc80');
  assert.equal(e.info!.description, e.description);
  // The client's INFO request carries the listed name's own bytes, not U+FFFD.
  const infoRequest = encodeOption(Opt.INFO, Buffer.concat([Buffer.from([0, 0, 0, rawName.length]), rawName, Buffer.from([0, 3, 0, Info.NAME, 0, Info.DESCRIPTION, 0, Info.BLOCK_SIZE])]));
  assert.ok(sent.includes(infoRequest), 'INFO asks for the exact bytes');
});

test('errors that quote a name or the server text: one line, controls visible, long text cut', () => {
  const hostile = `x\x1b[2J\n\u202e${'y'.repeat(5000)}`;
  const { error } = play({ kind: 'go', name: 'disk\x1b]0;pwned\x07' }, Buffer.concat([encodeNewstyleGreeting(FIXED), err(Opt.GO, RepErr.UNKNOWN, hostile)]));
  assert.ok(error instanceof NbdError);
  assert.match(error.message, /^server has no export named 'disk\\x1b\]0;pwned\\x07' \(server says: x\\x1b\[2J \\u202ey+…\[\d+ bytes\]\)/);
  assert.ok(!/[\x00-\x1f\x7f\u202e]/.test(error.message), error.message);
  assert.ok(error.message.length < 700, 'the server text is cut');
  // A name from a listing that the server then refuses in EXPORT_NAME (it closes): the message shows it escaped too.
  const closed = play({ kind: 'go', name: 'a\nb', noOptGo: true }, encodeNewstyleGreeting(FIXED));
  assert.match((closed.error as Error).message, /refused export 'a\\nb'/);
});
