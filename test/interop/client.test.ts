// The client against real servers on loopback: nbdkit (newstyle, oldstyle, non-fixed newstyle, named
// exports, unix socket), nbd-server (named exports, allowlist), qemu-nbd (-x NAME). Each must list and
// negotiate; after negotiation the socket must be exactly at the start of transmission, which we prove by
// a WRITE and a READ over it.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { writeFileSync } from 'node:fs';
import { negotiate } from '../../src/client/negotiate.ts';
import { parseAddress, type Target } from '../../src/address.ts';
import { encodeRequest, decodeSimpleReply, encodeNewstyleGreeting, decodeOptionHeader, encodeOptionReply, encodeExportNameReply } from '../../src/protocol/codec.ts';
import { Cmd, HandshakeFlag, Opt, RepErr, TransmissionFlag } from '../../src/protocol/constants.ts';
import { NbdError } from '../../src/errors.ts';
import { type ServerHandle, runCli, sparseFile, startNbdServer, startNbdkit, startQemuNbd, startServer, tmpDir, freePort } from '../lib/servers.ts';

const servers: ServerHandle[] = [];
after(async () => {
  await Promise.all(servers.map((s) => s.stop()));
});
async function keep(p: Promise<ServerHandle>): Promise<ServerHandle> {
  const s = await p;
  servers.push(s);
  return s;
}
const tcp = (port: number): Target => parseAddress(`127.0.0.1:${port}`);

/** Read exactly n bytes from a paused socket. */
function readN(sock: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const b = sock.read(n) as Buffer | null;
      if (b) {
        sock.off('readable', attempt);
        sock.off('error', reject);
        resolve(b);
      }
    };
    sock.on('readable', attempt);
    sock.once('error', reject);
    attempt();
  });
}

/** WRITE a pattern, READ it back, DISC: proves the socket is at the start of transmission. */
async function roundTrip(sock: net.Socket, offset = 4096n): Promise<void> {
  const data = Buffer.alloc(4096, 0x5a);
  sock.write(encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 1n, offset, length: data.length }));
  sock.write(data);
  const w = decodeSimpleReply(await readN(sock, 16));
  assert.deepEqual(w, { error: 0, cookie: 1n });
  sock.write(encodeRequest({ flags: 0, type: Cmd.READ, cookie: 2n, offset, length: data.length }));
  const r = decodeSimpleReply(await readN(sock, 16));
  assert.deepEqual(r, { error: 0, cookie: 2n });
  assert.ok((await readN(sock, data.length)).equals(data), 'read back what was written');
  sock.write(encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 3n, offset: 0n, length: 0 }));
  sock.destroy();
}

async function listJson(args: string[]): Promise<{ exports: { name: string; size?: number; flagNames?: string[]; description?: string }[]; handshake: string; note?: string }> {
  const r = await runCli(['list', '--json', ...args]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

test('nbdkit newstyle: list, info, negotiate with GO and with -g', async () => {
  const s = await keep(startNbdkit(['memory', '64M']));
  const l = await listJson([`127.0.0.1:${s.port}`]);
  assert.equal(l.handshake, 'fixed-newstyle');
  assert.equal(l.exports[0]!.size, 64 * 1024 * 1024);
  const i = await runCli(['info', '127.0.0.1', String(s.port)]);
  assert.equal(i.code, 0, i.stderr);
  assert.match(i.stdout, /size: +67108864 bytes \(64 MiB\)/);
  const go = await negotiate(tcp(s.port), { exportName: '' });
  assert.equal(go.via, 'NBD_OPT_GO');
  assert.equal(go.info.size, 64n << 20n);
  await roundTrip(go.socket);
  const old = await negotiate(tcp(s.port), { exportName: '', noOptGo: true });
  assert.equal(old.via, 'NBD_OPT_EXPORT_NAME');
  await roundTrip(old.socket, 8192n);
});

test('nbdkit -o oldstyle: list shows the one export; negotiate works', async () => {
  const s = await keep(startNbdkit(['-o', 'memory', '32M']));
  const l = await listJson([`127.0.0.1:${s.port}`]);
  assert.equal(l.handshake, 'oldstyle');
  assert.equal(l.exports[0]!.size, 32 * 1024 * 1024);
  const c = await negotiate(tcp(s.port), { exportName: '' });
  assert.equal(c.style, 'oldstyle');
  await roundTrip(c.socket);
});

test('nbdkit --mask-handshake=0 (non-fixed newstyle): list shows the default export; negotiate works', async () => {
  const s = await keep(startNbdkit(['--mask-handshake=0', 'memory', '16M']));
  const l = await listJson([`127.0.0.1:${s.port}`]);
  assert.equal(l.handshake, 'newstyle');
  assert.match(l.note ?? '', /non-fixed newstyle/);
  assert.equal(l.exports[0]!.size, 16 * 1024 * 1024);
  const c = await negotiate(tcp(s.port), { exportName: '' });
  assert.equal(c.via, 'NBD_OPT_EXPORT_NAME');
  await roundTrip(c.socket);
});

test('nbdkit named exports (file dir=): list names and sizes; info one; unknown export is a clear error', async () => {
  const dir = tmpDir();
  sparseFile(dir, 'alpha', 1 << 20);
  sparseFile(dir, 'beta', 2 << 20);
  const s = await keep(startNbdkit(['file', `dir=${dir}`]));
  const l = await listJson([`nbd://127.0.0.1:${s.port}`]);
  const byName = Object.fromEntries(l.exports.map((e) => [e.name, e]));
  assert.equal(byName.alpha?.size, 1 << 20);
  assert.equal(byName.beta?.size, 2 << 20);
  const i = await runCli(['info', '--json', `nbd://127.0.0.1:${s.port}/beta`]);
  assert.equal(i.code, 0, i.stderr);
  assert.equal(JSON.parse(i.stdout).size, 2 << 20);
  const bad = await runCli(['info', '-N', 'gamma', `127.0.0.1:${s.port}`]);
  assert.equal(bad.code, 4);
  assert.match(bad.stderr, /^nbd-attach: server has no export named 'gamma'/);
  assert.equal(bad.stderr.trim().split('\n').length, 1, 'one line');
  const c = await negotiate(tcp(s.port), { exportName: 'alpha' });
  assert.equal(c.info.size, 1n << 20n);
  await roundTrip(c.socket);
});

test('nbdkit on a unix socket: -u PATH and nbd+unix:// URIs', async () => {
  const dir = tmpDir();
  const sock = path.join(dir, 'nbd.sock');
  await keep(startServer({ name: 'nbdkit', file: 'nbdkit', args: () => ['-f', '--exit-with-parent', '-U', sock, 'memory', '8M'], socketPath: sock }));
  const a = await listJson(['-u', sock]);
  assert.equal(a.exports[0]!.size, 8 << 20);
  const i = await runCli(['info', '--json', `nbd+unix:///?socket=${sock}`]);
  assert.equal(i.code, 0, i.stderr);
  const c = await negotiate({ endpoint: { kind: 'unix', path: sock }, tls: false }, { exportName: '' });
  await roundTrip(c.socket);
});

test('nbd-server: several named exports with allowlist; read-only flag; negotiate', async () => {
  const dir = tmpDir();
  const s = await keep(
    startNbdServer(
      `[generic]\nallowlist = true\n[disk1]\nexportname = ${sparseFile(dir, 'disk1.img', 4 << 20)}\n[disk2]\nexportname = ${sparseFile(dir, 'disk2.img', 8 << 20)}\nreadonly = true\n`,
    ),
  );
  const l = await listJson([`127.0.0.1:${s.port}`]);
  const byName = Object.fromEntries(l.exports.map((e) => [e.name, e]));
  assert.deepEqual(Object.keys(byName).sort(), ['disk1', 'disk2']);
  assert.equal(byName.disk1!.size, 4 << 20);
  assert.ok(byName.disk2!.flagNames!.includes('read_only'), JSON.stringify(byName.disk2));
  assert.ok(!byName.disk1!.flagNames!.includes('read_only'));
  const c = await negotiate(tcp(s.port), { exportName: 'disk1' });
  assert.equal(c.info.size, 4n << 20n);
  await roundTrip(c.socket);
  await assert.rejects(negotiate(tcp(s.port), { exportName: 'disk9' }), (e: unknown) => e instanceof NbdError && e.code === 'NBD_E_EXPORT_UNKNOWN');
});

test('nbd-server without allowlist: list is refused by policy, clearly', async () => {
  const dir = tmpDir();
  const s = await keep(startNbdServer(`[only]\nexportname = ${sparseFile(dir, 'only.img', 1 << 20)}\n`));
  const r = await runCli(['-l', `127.0.0.1:${s.port}`]);
  assert.equal(r.code, 4);
  assert.match(r.stderr, /refused listing exports by policy/);
});

test('qemu-nbd -x NAME: list, info, negotiate', async () => {
  const dir = tmpDir();
  const s = await keep(startQemuNbd(['-f', 'raw', '-t', '-x', 'qdisk', sparseFile(dir, 'q.img', 3 << 20)]));
  const l = await listJson([`127.0.0.1:${s.port}`]);
  assert.equal(l.exports[0]!.name, 'qdisk');
  assert.equal(l.exports[0]!.size, 3 << 20);
  const i = await runCli(['info', '--json', `nbd://127.0.0.1:${s.port}/qdisk`]);
  assert.equal(i.code, 0, i.stderr);
  const c = await negotiate(tcp(s.port), { exportName: 'qdisk' });
  assert.equal(c.via, 'NBD_OPT_GO');
  await roundTrip(c.socket);
});

/** A scripted server for behaviours real servers do not offer on demand. */
async function scripted(onConnection: (sock: net.Socket, n: number) => void): Promise<{ port: number; close(): void }> {
  let n = 0;
  const srv = net.createServer((sock) => onConnection(sock, n++));
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return { port: (srv.address() as net.AddressInfo).port, close: () => srv.close() };
}

test('a server that closes on NBD_OPT_GO: retried once with NBD_OPT_EXPORT_NAME on a new connection', async () => {
  const flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
  const srv = await scripted((sock, n) => {
    sock.write(encodeNewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
    let buf = Buffer.alloc(0);
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (buf.length < 20) return;
      const h = decodeOptionHeader(buf.subarray(4, 20));
      if (h.option === Opt.GO) sock.destroy();
      else if (h.option === Opt.EXPORT_NAME) {
        // One byte at a time: the client must reassemble.
        const reply = encodeExportNameReply(12345n * 512n, flags, true);
        for (const b of reply) sock.write(Buffer.from([b]));
      }
      void n;
    });
    sock.on('error', () => {});
  });
  try {
    const c = await negotiate(tcp(srv.port), { exportName: 'old' });
    assert.equal(c.via, 'NBD_OPT_EXPORT_NAME');
    assert.equal(c.info.size, 12345n * 512n);
    c.socket.destroy();
  } finally {
    srv.close();
  }
});

test('a server that stalls: the handshake times out on time with a clear error', async () => {
  const srv = await scripted((sock) => {
    sock.write(encodeNewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE));
    sock.on('error', () => {});
  });
  try {
    const t0 = Date.now();
    const r = await runCli(['info', '--connect-timeout', '1', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /handshake with 127\.0\.0\.1:\d+ timed out/);
    assert.ok(Date.now() - t0 < 15_000);
  } finally {
    srv.close();
  }
});

test('an export that requires TLS: says to use TLS', async () => {
  const srv = await scripted((sock) => {
    sock.write(encodeNewstyleGreeting(HandshakeFlag.FIXED_NEWSTYLE));
    sock.once('data', () => sock.end(encodeOptionReply(Opt.INFO, RepErr.TLS_REQD, Buffer.from('use TLS'))));
    sock.on('error', () => {});
  });
  try {
    const r = await runCli(['info', `127.0.0.1:${srv.port}`]);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /requires TLS.*server says: use TLS/);
  } finally {
    srv.close();
  }
});

test('connection refused, nbds://, bad address: one line, right exit code', async () => {
  const port = await freePort();
  let r = await runCli(['list', `127.0.0.1:${port}`]);
  assert.equal(r.code, 3);
  assert.match(r.stderr, /^nbd-attach: cannot connect to 127\.0\.0\.1:\d+: connection refused/);
  r = await runCli(['info', 'nbds://127.0.0.1/x?tls-type=anon']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /tls-type=anon \(no authentication\) is not supported: use x509 or psk/);
  r = await runCli(['info', 'host:99999']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /port '99999'/);
  r = await runCli(['list', '--bogus']);
  assert.equal(r.code, 2);
  for (const x of [r]) assert.equal(x.stderr.trim().split('\n')[0]!.startsWith('nbd-attach: '), true, x.stderr);
});

test('IPv6 loopback [::1]', async (t) => {
  let s: ServerHandle;
  try {
    s = await keep(startServer({ name: 'nbdkit', file: 'nbdkit', args: (port) => ['-f', '--exit-with-parent', '-i', '::1', '-p', String(port), 'memory', '1M'], startTimeoutMs: 5000 }));
  } catch (e) {
    // Only if the machine has no IPv6 loopback at all; then the parser is still covered by unit tests.
    const hasV6 = await new Promise<boolean>((res) => {
      const x = net.createServer().once('error', () => res(false));
      x.listen(0, '::1', () => x.close(() => res(true)));
    });
    assert.equal(hasV6, false, `nbdkit failed on ::1 although IPv6 loopback works: ${(e as Error).message}`);
    // Reported as skipped (run-all.sh counts skips), never as passed.
    t.skip('no IPv6 loopback on this machine');
    return;
  }
  const r = await runCli(['info', '--json', `[::1]:${s.port}`]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).size, 1 << 20);
});
void writeFileSync;

test('attach usage errors come before anything is opened: --swap with local attach; nbdtab misuse', async () => {
  let r = await runCli(['--memory', '16M', '-s', '-n']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^nbd-attach: --memory 16M with -s\/--swap: swapping to a disk served by this same machine can deadlock .*remote server\n$/);
  r = await runCli(['--nbdtab', '/nonexistent/nbdtab', 'nbd3']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^nbd-attach: no server given for nbd3, and \/nonexistent\/nbdtab cannot be read \(ENOENT\): nbd-attach HOST\[:PORT\] nbd3/);
  r = await runCli(['--nbdtab', '/nonexistent/nbdtab', '127.0.0.1:1', 'nbd3']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--nbdtab is read when the device is the only argument/);
});
