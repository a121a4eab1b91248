// The kernel-TLS handoff (src/client/ktls.ts) against real TLS servers: nbdkit (GnuTLS; X.509 with
// TLS 1.3, PSK with TLS 1.2), nbd-server force_tls (GnuTLS, client certificate) and our own `serve
// --tls` (OpenSSL through node:tls). No root needed: this test does what the kernel does with the
// keys and record numbers it is given (seal each request as the next record, open each reply at the
// next number), on the very TCP socket the kernel would get. A wrong key or number fails the AEAD.

import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import type { Target, TlsSettings } from '../../src/address.ts';
import { type Connection, negotiate } from '../../src/client/negotiate.ts';
import type { KernelTlsParams } from '../../src/client/ktls.ts';
import { ContentType, RecordSplitter, openRecord, sealRecord } from '../../src/client/ktls-keys.ts';
import { Cmd, SIMPLE_REPLY_LENGTH } from '../../src/protocol/constants.ts';
import { decodeSimpleReply, encodeRequest } from '../../src/protocol/codec.ts';
import { type ServerHandle, makePki, sparseFile, startNbdServer, startNbdkit, startOurServer, tmpDir } from '../lib/servers.ts';

const dir = tmpDir('nbd-client-ktls-');
const pki = makePki(dir);
const pskFile = path.join(dir, 'keys.psk');
writeFileSync(pskFile, 'alice:0123456789abcdef0123456789abcdef\n');

const servers: ServerHandle[] = [];
after(async () => {
  for (const s of servers) await s.stop();
});

const tcp = (port: number): Target['endpoint'] => ({ kind: 'tcp', host: '127.0.0.1', port });

/** The kernel's side of a kernel-TLS socket, in user space: plaintext in, plaintext out, counting records. */
class UserKtls {
  private txSeq: bigint;
  private rxSeq: bigint;
  private readonly splitter = new RecordSplitter();
  private plain: Buffer = Buffer.alloc(0);
  private waiting: (() => void) | undefined;
  nonData = 0;
  constructor(
    private readonly socket: net.Socket,
    private readonly p: KernelTlsParams,
  ) {
    this.txSeq = p.tx.seq;
    this.rxSeq = p.rx.seq;
    socket.on('data', (b: Buffer) => {
      for (const r of this.splitter.push(b)) {
        const o = openRecord(p.suite, p.rx.keys, this.rxSeq++, r.bytes);
        assert.ok(o, `received record ${this.rxSeq - 1n} does not open under the handed-off keys`);
        if (o.type !== ContentType.APPLICATION_DATA) this.nonData++;
        else this.plain = Buffer.concat([this.plain, o.plaintext]);
      }
      this.waiting?.();
    });
    socket.resume();
  }
  write(b: Buffer): void {
    for (let i = 0; i < b.length; i += 1 << 14) this.socket.write(sealRecord(this.p.suite, this.p.tx.keys, this.txSeq++, ContentType.APPLICATION_DATA, b.subarray(i, i + (1 << 14))));
  }
  async read(n: number): Promise<Buffer> {
    while (this.plain.length < n) await new Promise<void>((r) => (this.waiting = r));
    const out = this.plain.subarray(0, n);
    this.plain = this.plain.subarray(n);
    return out;
  }
}

/** Attach-equivalent: negotiate for kernel TLS, then write, read back and disconnect through the handed-off keys. */
async function kernelRoundTrip(port: number, tls: TlsSettings, exportName = ''): Promise<Connection> {
  const conn = await negotiate({ endpoint: tcp(port), tls }, { exportName, timeoutMs: 20_000, kernelTls: true });
  assert.equal(conn.relayReason, undefined, `kernel TLS refused: ${conn.relayReason}`);
  assert.ok(conn.ktls, 'kernel TLS parameters');
  assert.equal(conn.transport, undefined, 'no relay: no second socket');
  assert.notEqual(conn.socket.remoteFamily, undefined, 'the kernel gets the TCP socket itself');
  assert.equal(conn.socket.readableLength, 0);
  const k = new UserKtls(conn.socket, conn.ktls);
  const data = Buffer.alloc(96 * 1024);
  for (let i = 0; i < data.length; i++) data[i] = (i * 13) % 251;
  k.write(Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 4096n, length: data.length }), data]));
  assert.deepEqual(decodeSimpleReply(await k.read(SIMPLE_REPLY_LENGTH)), { error: 0, cookie: 1n });
  k.write(encodeRequest({ type: Cmd.READ, flags: 0, cookie: 2n, offset: 4096n, length: data.length }));
  assert.deepEqual(decodeSimpleReply(await k.read(SIMPLE_REPLY_LENGTH)), { error: 0, cookie: 2n });
  assert.ok((await k.read(data.length)).equals(data), 'data read back through the handed-off TLS session equals data written');
  assert.equal(k.nonData, 0, 'nothing but application data after the handoff');
  k.write(encodeRequest({ type: Cmd.DISC, flags: 0, cookie: 3n, offset: 0n, length: 0 }));
  conn.socket.destroy();
  return conn;
}

describe('kernel TLS handoff: keys and record numbers carry on the session', { timeout: 180_000 }, () => {
  it('nbdkit --tls=require, X.509: TLS 1.3', async () => {
    const srv = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, 'memory', '16M']);
    servers.push(srv);
    const c = await kernelRoundTrip(srv.port, { certificatesDir: pki });
    assert.match(c.ktls!.description, /^TLS 1\.3 (AES-(128|256)-GCM|ChaCha20-Poly1305)$/);
    console.log(`# nbdkit X.509: ${c.ktls!.description}, next records at handoff: tx ${c.ktls!.tx.seq}, rx ${c.ktls!.rx.seq}`);
  });

  it('nbdkit --tls=require, PSK: TLS 1.2 (GnuTLS picks ChaCha20-Poly1305 or AES-GCM)', async () => {
    const srv = await startNbdkit(['--tls=require', `--tls-psk=${pskFile}`, 'memory', '16M']);
    servers.push(srv);
    const c = await kernelRoundTrip(srv.port, { pskFile, username: 'alice' });
    assert.match(c.ktls!.description, /^TLS 1\.2 /);
    console.log(`# nbdkit PSK: ${c.ktls!.description}, next records at handoff: tx ${c.ktls!.tx.seq}, rx ${c.ktls!.rx.seq}`);
  });

  it('nbd-server force_tls with a client certificate', async () => {
    const img = sparseFile(dir, 'n.img', 16 << 20);
    const srv = await startNbdServer(
      `[generic]\ncertfile = ${pki}/server-cert.pem\nkeyfile = ${pki}/server-key.pem\ncacertfile = ${pki}/ca-cert.pem\nforce_tls = true\n[ndisk]\nexportname = ${img}\n`,
    );
    servers.push(srv);
    const c = await kernelRoundTrip(srv.port, { certificatesDir: pki }, 'ndisk');
    console.log(`# nbd-server: ${c.ktls!.description}, next records at handoff: tx ${c.ktls!.tx.seq}, rx ${c.ktls!.rx.seq}`);
  });

  it('our serve --tls require (OpenSSL, session tickets before the option replies)', async () => {
    const img = sparseFile(dir, 'o.img', 16 << 20);
    const srv = await startOurServer([`odisk=${img}`, '--tls', 'require', '--tls-certificates', pki]);
    servers.push(srv);
    const c = await kernelRoundTrip(srv.port, { certificatesDir: pki }, 'odisk');
    assert.ok(c.ktls!.rx.seq >= 2n, 'the session tickets and option replies were counted');
    console.log(`# serve --tls: ${c.ktls!.description}, next records at handoff: tx ${c.ktls!.tx.seq}, rx ${c.ktls!.rx.seq}`);
  });

  it('our serve --tls require --tls-psk (OpenSSL): TLS 1.2', async () => {
    const img = sparseFile(dir, 'p.img', 16 << 20);
    const srv = await startOurServer([`pdisk=${img}`, '--tls', 'require', '--tls-psk', pskFile]);
    servers.push(srv);
    const c = await kernelRoundTrip(srv.port, { pskFile, username: 'alice' }, 'pdisk');
    assert.match(c.ktls!.description, /^TLS 1\.2 /);
    console.log(`# serve --tls-psk: ${c.ktls!.description}, next records at handoff: tx ${c.ktls!.tx.seq}, rx ${c.ktls!.rx.seq}`);
  });

  it('a unix socket keeps the relay, and says why', async () => {
    const sock = path.join(dir, 'k.sock');
    const srv = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, '-U', sock, 'memory', '16M']).catch(() => undefined);
    if (!srv) return;
    servers.push(srv);
    const conn = await negotiate({ endpoint: { kind: 'unix', path: sock }, tls: { certificatesDir: pki, hostname: 'localhost' } }, { exportName: '', timeoutMs: 20_000, kernelTls: true });
    assert.equal(conn.ktls, undefined);
    assert.match(conn.relayReason ?? '', /needs a TCP connection/);
    conn.socket.destroy();
    conn.transport?.destroy();
  });
});
