// Kernel TLS key material and record accounting (src/client/ktls-keys.ts): RFC 8448's TLS 1.3 trace
// (traffic secrets → keys and IVs, records that open at their sequence numbers), the TLS 1.2 PRF's
// published vector, the kernel's struct layouts (include/uapi/linux/tls.h), the record splitter's bounds.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv } from 'node:crypto';
import {
  RecordSplitter,
  type Suite,
  TLS_1_2_VERSION,
  cryptoInfo,
  hkdfExpandLabel,
  nextSequence,
  openRecord,
  opens,
  parseKeylogLine,
  sealRecord,
  serverHelloRandom,
  suiteFor,
  tls12Keys,
  tls12Prf,
  tls13Keys,
} from '../../src/client/ktls-keys.ts';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const aes128 = suiteFor('TLSv1.3', 'TLS_AES_128_GCM_SHA256') as Suite;

// RFC 8448 section 3 (Simple 1-RTT Handshake), TLS_AES_128_GCM_SHA256.
const serverHsSecret = hex('b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38');
const clientApSecret = hex('9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5');
const serverApSecret = hex('a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643');
// The client's first application data record (record 0 under its application key) and the server's
// (record 1: its NewSessionTicket was record 0), 50 bytes 00..31 each.
const clientRecord0 = hex(`17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa
  66 bc ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4`);
const serverRecord1 = hex(`17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f
  82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d`);

test('TLS 1.3 keys and IVs from traffic secrets: RFC 8448 section 3', () => {
  assert.equal(hkdfExpandLabel('sha256', serverHsSecret, 'key', Buffer.alloc(0), 16).toString('hex'), '3fce516009c21727d0f2e4e86ee403bc');
  assert.equal(hkdfExpandLabel('sha256', serverHsSecret, 'iv', Buffer.alloc(0), 12).toString('hex'), '5d313eb2671276ee13000b30');
  const c = tls13Keys(aes128, clientApSecret);
  assert.equal(c.key.toString('hex'), '17422dda596ed5d9acd890e3c63f5051');
  assert.equal(c.iv.toString('hex'), '5b78923dee08579033e523d9');
  const s = tls13Keys(aes128, serverApSecret);
  assert.equal(s.key.toString('hex'), '9f02283b6c9c07efc26bb9f2ac92e356');
  assert.equal(s.iv.toString('hex'), 'cf782b88dd83549aadf1e984');
});

test('a record opens only under its key at its sequence number (RFC 8448 records)', () => {
  const c = tls13Keys(aes128, clientApSecret);
  const s = tls13Keys(aes128, serverApSecret);
  assert.equal(opens(aes128, c, 0n, clientRecord0), true);
  assert.equal(opens(aes128, c, 1n, clientRecord0), false);
  assert.equal(opens(aes128, s, 0n, clientRecord0), false);
  assert.equal(opens(aes128, s, 1n, serverRecord1), true);
  const tampered = Buffer.from(serverRecord1);
  tampered[20]! ^= 1;
  assert.equal(opens(aes128, s, 1n, tampered), false);
});

test('next sequence number: handshake-key records before the application key are skipped; a count that does not open is refused', () => {
  const c = tls13Keys(aes128, clientApSecret);
  const handshakeRecord = { type: 23, bytes: Buffer.concat([hex('1703030020'), Buffer.alloc(32, 7)]) };
  const app0 = { type: 23, bytes: clientRecord0 };
  assert.equal(nextSequence(aes128, c, [handshakeRecord, app0]), 1n);
  assert.equal(nextSequence(aes128, c, [handshakeRecord]), undefined, 'no record under the application key');
  // The last record does not open at its count (a record was missed, or the keys changed): refused.
  assert.equal(nextSequence(aes128, c, [handshakeRecord, app0, handshakeRecord]), undefined);
  const s = tls13Keys(aes128, serverApSecret);
  // The server's record 1 alone cannot be placed: its record 0 is missing from the list.
  assert.equal(nextSequence(aes128, s, [{ type: 23, bytes: serverRecord1 }]), undefined);
});

test('TLS 1.2 PRF (P_SHA256): the published vector', () => {
  const out = tls12Prf('sha256', hex('9bbe436ba940f017b17652849a71db35'), 'test label', hex('a0ba9f936cda311827a6f796ffd5198c'), 100);
  assert.equal(
    out.toString('hex'),
    'e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff70187347b66',
  );
});

test('TLS 1.2 AES-GCM: key block split, a sealed record opens at its number (explicit nonce, seq in the AAD)', () => {
  const s = suiteFor('TLSv1.2', 'TLS_PSK_WITH_AES_128_GCM_SHA256') as Suite;
  assert.equal(s.version, TLS_1_2_VERSION);
  const master = Buffer.alloc(48, 1);
  const keys = tls12Keys(s, master, Buffer.alloc(32, 2), Buffer.alloc(32, 3));
  const kb = tls12Prf('sha256', master, 'key expansion', Buffer.concat([Buffer.alloc(32, 3), Buffer.alloc(32, 2)]), 40);
  assert.deepEqual(keys.client.key, kb.subarray(0, 16));
  assert.deepEqual(keys.server.key, kb.subarray(16, 32));
  assert.deepEqual(keys.client.iv, kb.subarray(32, 36));
  assert.deepEqual(keys.server.iv, kb.subarray(36, 40));
  // Seal record 5 as a TLS 1.2 peer does (RFC 5288): nonce = salt | explicit (the seq), AAD = seq | type | version | length.
  const plain = Buffer.from('nbd reply');
  const explicit = hex('0000000000000005');
  const aad = Buffer.concat([explicit, hex('170303'), Buffer.from([0, plain.length])]);
  const c = createCipheriv('aes-128-gcm', keys.server.key, Buffer.concat([keys.server.iv, explicit]));
  c.setAAD(aad);
  const body = Buffer.concat([explicit, c.update(plain), c.final(), c.getAuthTag()]);
  const record = Buffer.concat([hex('170303'), Buffer.from([0, body.length]), body]);
  assert.equal(opens(s, keys.server, 5n, record), true);
  assert.equal(opens(s, keys.server, 4n, record), false);
  assert.equal(opens(s, keys.client, 5n, record), false);
  const list = Array.from({ length: 6 }, () => ({ type: 23, bytes: record }));
  assert.equal(nextSequence(s, keys.server, list), 6n);
});

test('suites the kernel can carry, and why not the others', () => {
  assert.equal((suiteFor('TLSv1.3', 'TLS_AES_256_GCM_SHA384') as Suite).hash, 'sha384');
  assert.equal((suiteFor('TLSv1.3', 'TLS_CHACHA20_POLY1305_SHA256') as Suite).kernelCipher, 54);
  assert.equal((suiteFor('TLSv1.2', 'TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384') as Suite).kernelCipher, 52);
  assert.equal((suiteFor('TLSv1.2', 'TLS_DHE_PSK_WITH_AES_128_GCM_SHA256') as Suite).kernelCipher, 51);
  assert.match(suiteFor('TLSv1.2', 'TLS_PSK_WITH_AES_128_CBC_SHA256') as string, /not AES-GCM/);
  assert.match(suiteFor('TLSv1.3', 'TLS_AES_128_CCM_SHA256') as string, /no kernel cipher/);
  assert.match(suiteFor('TLSv1.1', 'x') as string, /not TLS 1\.2 or 1\.3/);
});

test('the kernel structs: tls12_crypto_info_aes_gcm_128/256 and chacha20_poly1305 layouts', () => {
  const keys = tls13Keys(aes128, serverApSecret);
  const b = cryptoInfo(aes128, keys, 0x0102n);
  assert.equal(b.length, 40); // 4 + iv 8 + key 16 + salt 4 + rec_seq 8
  assert.equal(b.readUInt16LE(0), 0x0304);
  assert.equal(b.readUInt16LE(2), 51);
  assert.deepEqual(b.subarray(4, 12), keys.iv.subarray(4));
  assert.deepEqual(b.subarray(12, 28), keys.key);
  assert.deepEqual(b.subarray(28, 32), keys.iv.subarray(0, 4));
  assert.equal(b.subarray(32).toString('hex'), '0000000000000102');
  const cc = suiteFor('TLSv1.3', 'TLS_CHACHA20_POLY1305_SHA256') as Suite;
  const ck = tls13Keys(cc, serverApSecret);
  const cb = cryptoInfo(cc, ck, 3n);
  assert.equal(cb.length, 56); // 4 + iv 12 + key 32 + rec_seq 8
  assert.deepEqual(cb.subarray(4, 16), ck.iv);
  assert.deepEqual(cb.subarray(16, 48), ck.key);
  const g = suiteFor('TLSv1.2', 'TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384') as Suite;
  const gk = tls12Keys(g, Buffer.alloc(48), Buffer.alloc(32), Buffer.alloc(32)).client;
  const gb = cryptoInfo(g, gk, 9n);
  assert.equal(gb.length, 56); // 4 + iv 8 + key 32 + salt 4 + rec_seq 8
  assert.equal(gb.readUInt16LE(0), 0x0303);
  assert.equal(gb.subarray(4, 12).toString('hex'), '0000000000000009', 'TLS 1.2: the next explicit nonce is the sequence number');
  assert.deepEqual(gb.subarray(44, 48), gk.iv);
});

test('record splitter: records across chunks, nothing past one partial record, garbage refused', () => {
  const s = new RecordSplitter();
  assert.deepEqual(s.push(clientRecord0.subarray(0, 3)), []);
  assert.deepEqual(s.push(clientRecord0.subarray(3, 30)), []);
  const both = s.push(Buffer.concat([clientRecord0.subarray(30), serverRecord1.subarray(0, 10)]));
  assert.equal(both.length, 1);
  assert.deepEqual(both[0]!.bytes, clientRecord0);
  assert.equal(s.partial, 10);
  assert.equal(s.push(serverRecord1.subarray(10)).length, 1);
  assert.equal(s.partial, 0);
  assert.throws(() => new RecordSplitter().push(Buffer.from('GET / HTTP/1.1\r\n')), /not a TLS record header/);
  assert.throws(() => new RecordSplitter().push(hex('17030348ff')), /not a TLS record header/, 'a body longer than 2^14 + 2048');
});

test('ServerHello random and key log lines', () => {
  const hello = Buffer.concat([hex('160303004a 02000046 0303'), Buffer.alloc(32, 0xab), Buffer.alloc(38)]);
  assert.deepEqual(serverHelloRandom(hello), Buffer.alloc(32, 0xab));
  assert.equal(serverHelloRandom(clientRecord0), undefined);
  const line = parseKeylogLine(Buffer.from(`CLIENT_RANDOM ${'aa'.repeat(32)} ${'bb'.repeat(48)}\n`));
  assert.equal(line?.label, 'CLIENT_RANDOM');
  assert.equal(line?.secret.length, 48);
  assert.equal(parseKeylogLine(Buffer.from('# comment')), undefined);
});

test('seal and open: RFC 8448 client record 0 sealed byte for byte; TLS 1.2 and ChaCha round trips', () => {
  const c = tls13Keys(aes128, clientApSecret);
  const payload = Buffer.from(Array.from({ length: 50 }, (_, i) => i));
  assert.deepEqual(sealRecord(aes128, c, 0n, 23, payload), clientRecord0);
  assert.deepEqual(openRecord(aes128, tls13Keys(aes128, serverApSecret), 1n, serverRecord1), { type: 23, plaintext: payload });
  for (const [proto, name] of [['TLSv1.2', 'TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384'], ['TLSv1.2', 'TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256'], ['TLSv1.3', 'TLS_CHACHA20_POLY1305_SHA256']] as const) {
    const s = suiteFor(proto, name) as Suite;
    const k = s.version === TLS_1_2_VERSION ? tls12Keys(s, Buffer.alloc(48, 5), Buffer.alloc(32, 6), Buffer.alloc(32, 7)).server : tls13Keys(s, serverApSecret);
    const r = sealRecord(s, k, 77n, 23, Buffer.from('hello'));
    assert.equal(openRecord(s, k, 77n, r)?.plaintext.toString(), 'hello', name);
    assert.equal(openRecord(s, k, 78n, r), undefined, name);
  }
});
