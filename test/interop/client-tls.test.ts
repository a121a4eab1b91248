// Our client's TLS (NBD_OPT_STARTTLS, nbds://, nbd-client's -x/-A/-F/-K/-H, libnbd's certificate
// directory and PSK file) against real TLS servers: nbdkit, nbd-server and qemu-nbd (GnuTLS) and our own
// `serve --tls` (OpenSSL through node:tls). The data path goes through the relay the kernel would
// use (src/client/tls.ts): requests are written to the kernel's end of the socketpair.

import assert from 'node:assert/strict';
import { cpSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import type { Target } from '../../src/address.ts';
import { type Connection, negotiate } from '../../src/client/negotiate.ts';
import { Cmd, SIMPLE_REPLY_LENGTH } from '../../src/protocol/constants.ts';
import { decodeSimpleReply, encodeRequest } from '../../src/protocol/codec.ts';
import { socketTuning } from '../../src/supervisor/kernel-ops.ts';
import { TCP_TUNING } from '../../src/supervisor/policy.ts';
import { remoteSource } from '../../src/supervisor/source.ts';
import { type ServerHandle, CLI_ARGS, makePki, readExact, runCli, sparseFile, startNbdServer, startNbdkit, startOurServer, startQemuNbd, startServer, tmpDir } from '../lib/servers.ts';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const dir = tmpDir('nbd-client-tls-');
const pki = makePki(dir);
mkdirSync(path.join(dir, 'other'));
const otherPki = makePki(path.join(dir, 'other'));
const pskFile = path.join(dir, 'keys.psk');
writeFileSync(pskFile, 'alice:0123456789abcdef0123456789abcdef\n');
const wrongPsk = path.join(dir, 'wrong.psk');
writeFileSync(wrongPsk, 'alice:ffffffffffffffffffffffffffffffff\n');

const servers: ServerHandle[] = [];
after(async () => {
  for (const s of servers) await s.stop();
});

/** Write a pattern, read it back, then DISC: through the kernel's end of the relay. Returns when the relay closed it. */
async function roundTrip(conn: Connection): Promise<void> {
  const s: net.Socket = conn.socket;
  const data = Buffer.alloc(128 * 1024);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) % 253;
  s.write(Buffer.concat([encodeRequest({ type: Cmd.WRITE, flags: 0, cookie: 1n, offset: 8192n, length: data.length }), data]));
  assert.deepEqual(decodeSimpleReply(await readExact(s, SIMPLE_REPLY_LENGTH)), { error: 0, cookie: 1n });
  s.write(encodeRequest({ type: Cmd.READ, flags: 0, cookie: 2n, offset: 8192n, length: data.length }));
  assert.deepEqual(decodeSimpleReply(await readExact(s, SIMPLE_REPLY_LENGTH)), { error: 0, cookie: 2n });
  assert.ok((await readExact(s, data.length)).equals(data), 'data read back through TLS equals data written');
  s.write(encodeRequest({ type: Cmd.DISC, flags: 0, cookie: 3n, offset: 0n, length: 0 }));
  await new Promise<void>((resolve) => {
    s.once('close', () => resolve());
    s.resume();
  });
}

const tcp = (port: number): Target['endpoint'] => ({ kind: 'tcp', host: '127.0.0.1', port });

describe('client TLS against nbdkit (X.509, --tls=require)', { timeout: 120_000 }, () => {
  let srv: ServerHandle;
  before(async () => {
    srv = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, 'memory', '64M']);
    servers.push(srv);
  });

  it('nbds:// with tls-certificates=DIR lists and describes the export; -x -A does the same', async () => {
    let r = await runCli(['list', `nbds://127.0.0.1:${srv.port}/?tls-certificates=${pki}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /\(default\)\s+64 MiB/);
    r = await runCli(['info', '-x', '-A', path.join(pki, 'ca-cert.pem'), `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /size:\s+67108864 bytes/);
    assert.match(r.stdout, /server:.*TLS\)/);
    // nbd-client's single-dash spellings
    r = await runCli(['info', '-enable-tls', '-cacertfile', path.join(pki, 'ca-cert.pem'), '-tlshostname', 'localhost', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 0, r.stderr);
  });

  it('data goes through the relay for the kernel: write, read back, disconnect', async () => {
    const conn = await negotiate({ endpoint: tcp(srv.port), tls: { certificatesDir: pki } }, { exportName: '', timeoutMs: 10_000 });
    assert.ok(conn.transport, 'the TCP socket is kept apart from the kernel end');
    assert.equal(conn.socket.remoteFamily, undefined, 'the kernel gets a socketpair end, not the TCP socket');
    assert.equal(conn.info.size, 64n << 20n);
    await roundTrip(conn);
  });

  it('the supervisor\'s source tunes the TCP socket under TLS (keepalive, TCP_USER_TIMEOUT), not the socketpair', async () => {
    const conn = await remoteSource({ endpoint: tcp(srv.port), tls: { certificatesDir: pki } }, '', false).connect(10_000);
    try {
      const fd = (conn.transport as unknown as { _handle: { fd: number } })._handle.fd;
      const t = socketTuning(fd);
      assert.equal(t.keepalive, 1);
      assert.equal(t.idle, TCP_TUNING.keepIdleS);
      assert.equal(t.userTimeoutMs, TCP_TUNING.userTimeoutMs);
    } finally {
      conn.socket.destroy();
      conn.transport!.destroy();
    }
  });

  it("the supervisor's source reads the TLS files once: a reconnect after they are gone still verifies the server", async () => {
    // A root on NBD: the files were in the initramfs (emptied at switch_root), or are on the very
    // device being reconnected (reading them would block until the dead timeout).
    const copy = path.join(dir, 'pki-copy');
    cpSync(pki, copy, { recursive: true });
    const source = remoteSource({ endpoint: tcp(srv.port), tls: { certificatesDir: copy } }, '', false);
    const first = await source.connect(10_000);
    first.socket.destroy();
    first.transport?.destroy();
    rmSync(copy, { recursive: true, force: true });
    const again = await source.connect(10_000);
    try {
      assert.equal(again.info.size, 64n << 20n);
    } finally {
      again.socket.destroy();
      again.transport?.destroy();
    }
    // A new source (a new supervisor) reads them again, and says they are gone.
    await assert.rejects(remoteSource({ endpoint: tcp(srv.port), tls: { certificatesDir: copy } }, '', false).connect(10_000), /certificate directory .* does not exist/);
  });

  it('the TCP connection dying closes the kernel end (so the kernel sees a dead link)', async () => {
    const conn = await negotiate({ endpoint: tcp(srv.port), tls: { certificatesDir: pki } }, { exportName: '', timeoutMs: 10_000 });
    const closed = new Promise<void>((resolve) => conn.socket.once('close', () => resolve()));
    conn.socket.resume();
    conn.transport!.destroy();
    const t0 = Date.now();
    await closed;
    assert.ok(Date.now() - t0 < 5000, 'closed within 5 s');
  });

  it('refusals: untrusted CA, wrong name, plain client, missing file: one line each, right exit code', async () => {
    let r = await runCli(['info', '-x', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /^nbd-attach: TLS with 127\.0\.0\.1:\d+ failed: the server's certificate is not signed by a CA we trust: give its CA with -A/);
    r = await runCli(['info', '-A', path.join(otherPki, 'ca-cert.pem'), `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /not signed by a CA we trust/);
    r = await runCli(['info', '-A', path.join(pki, 'ca-cert.pem'), '-H', 'elsewhere.example', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /certificate is not for 'elsewhere\.example': give the name it carries with -H/);
    r = await runCli(['info', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /server requires TLS.*connect with TLS \(-x\/--tls/);
    r = await runCli(['info', '-A', path.join(dir, 'nope.pem'), `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^nbd-attach: TLS: cannot read the CA certificate file .*nope\.pem: ENOENT\n$/);
    r = await runCli(['info', '--no-tls-verify', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 0, `--no-tls-verify: encrypted, server not authenticated: ${r.stderr}`);
  });
});

describe('client TLS: client certificates and pre-shared keys (nbdkit)', { timeout: 120_000 }, () => {
  it('--tls-verify-peer: the directory\'s client certificate gets in; -F/-K from another CA do not', async () => {
    const srv = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, '--tls-verify-peer', 'memory', '16M']);
    servers.push(srv);
    let r = await runCli(['info', `nbds://127.0.0.1:${srv.port}/?tls-certificates=${pki}`]);
    assert.equal(r.code, 0, r.stderr);
    r = await runCli(['info', '-A', path.join(pki, 'ca-cert.pem'), '-F', path.join(otherPki, 'client-cert.pem'), '-K', path.join(otherPki, 'client-key.pem'), `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    // TLS 1.3: the server refuses the certificate after the handshake, by closing.
    assert.match(r.stderr, /^nbd-attach: server closed the connection right after TLS .*: it may not accept our client certificate/);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  });

  it('--tls-psk: the right key gets in and carries data; a wrong key or unknown identity does not', async () => {
    const srv = await startNbdkit(['--tls=require', `--tls-psk=${pskFile}`, 'memory', '16M']);
    servers.push(srv);
    let r = await runCli(['info', '--tls-psk', pskFile, '--tls-username', 'alice', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 0, r.stderr);
    r = await runCli(['info', `nbds://alice@127.0.0.1:${srv.port}/?tls-psk-file=${pskFile}`]);
    assert.equal(r.code, 0, r.stderr);
    const conn = await negotiate({ endpoint: tcp(srv.port), tls: { pskFile, username: 'alice' } }, { exportName: '', timeoutMs: 10_000 });
    await roundTrip(conn);
    r = await runCli(['info', '--tls-psk', wrongPsk, '--tls-username', 'alice', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /^nbd-attach: TLS with 127\.0\.0\.1:\d+ failed: the server closed the connection during the TLS handshake: .*another pre-shared key/);
    r = await runCli(['info', '--tls-psk', pskFile, '--tls-username', 'mallory', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /no key for identity 'mallory'/);
  });
});

describe('client TLS against nbd-server, qemu-nbd and our own server', { timeout: 120_000 }, () => {
  it('nbd-server with force_tls and a CA (it then requires client certificates): the directory\'s certificate gets in', async () => {
    const img = sparseFile(dir, 'n.img', 16 << 20);
    const srv = await startNbdServer(
      `[generic]\ncertfile = ${pki}/server-cert.pem\nkeyfile = ${pki}/server-key.pem\ncacertfile = ${pki}/ca-cert.pem\nforce_tls = true\n[ndisk]\nexportname = ${img}\n`,
    );
    servers.push(srv);
    let r = await runCli(['info', '-N', 'ndisk', '-A', path.join(pki, 'ca-cert.pem'), '-F', path.join(pki, 'client-cert.pem'), '-K', path.join(pki, 'client-key.pem'), `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /size:\s+16777216 bytes[\s\S]*NBD_OPT_GO, TLS\)/);
    const conn = await negotiate({ endpoint: tcp(srv.port), tls: { certificatesDir: pki } }, { exportName: 'ndisk', timeoutMs: 10_000 });
    await roundTrip(conn);
    r = await runCli(['info', '-N', 'ndisk', '-A', path.join(pki, 'ca-cert.pem'), `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /^nbd-attach: server closed the connection right after TLS .*client certificate/);
    r = await runCli(['info', '-N', 'ndisk', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /server requires TLS for export 'ndisk' \(server says: TLS is required on this server\): connect with TLS/);
  });

  it('qemu-nbd --tls-creds (x509): list, info and data through the relay', async () => {
    const img = sparseFile(dir, 'q.img', 16 << 20);
    const srv = await startQemuNbd(['-f', 'raw', '-t', '-x', 'qdisk', '--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${pki}`, '--tls-creds', 'tls0', img]);
    servers.push(srv);
    const r = await runCli(['list', `nbds://127.0.0.1:${srv.port}?tls-certificates=${pki}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /qdisk/);
    const conn = await negotiate({ endpoint: tcp(srv.port), tls: { certificatesDir: pki } }, { exportName: 'qdisk', timeoutMs: 10_000 });
    await roundTrip(conn);
  });

  it('nbd-attach serve --tls require: our client and server agree, over TCP and a unix socket', async () => {
    const img = sparseFile(dir, 'o.img', 16 << 20);
    const srv = await startOurServer([`odisk=${img}`, '--tls', 'require', '--tls-certificates', pki]);
    servers.push(srv);
    const conn = await negotiate({ endpoint: tcp(srv.port), tls: { caFile: path.join(pki, 'ca-cert.pem') } }, { exportName: 'odisk', timeoutMs: 10_000 });
    await roundTrip(conn);
    const sock = path.join(dir, 'o.sock');
    const usrv = await startServer({
      name: 'nbd-attach serve',
      file: process.execPath,
      args: () => [...CLI_ARGS, 'serve', `odisk=${img}`, '--unix', sock, '--tls', 'require', '--tls-certificates', pki],
      socketPath: sock,
      startTimeoutMs: 30_000,
    });
    servers.push(usrv);
    // Over a unix socket the certificate is checked against "localhost" (as libnbd does).
    const r = await runCli(['info', `nbds+unix:///odisk?socket=${sock}&tls-certificates=${pki}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /size:\s+16777216 bytes/);
  });
});
