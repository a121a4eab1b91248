// Kernel TLS on a real kernel (run in the VM: test/kernel/run.sh test/kernel/ktls.test.ts): after
// STARTTLS the nbd driver gets the TCP socket itself with the "tls" ULP carrying the session
// (src/client/ktls.ts, src/kernel/ktls.ts); no process of ours is on the data path.
//  1. our `serve --tls require` (OpenSSL): attach, /proc/net/tls_stat counts the socket in both
//     directions, the supervisor holds no socketpair; mkfs + mount + files read back; supervisor
//     SIGKILLed under fio --verify: I/O goes on; --reattach adopts without replacing; server killed
//     and restarted under fio: zero errors;
//  2. nbdkit --tls=require (GnuTLS, X.509) with -C 4: data reaches the server's file; one of the four
//     connections killed under fio is replaced with kernel TLS again;
//  3. nbdkit PSK (TLS 1.2) and nbd-server force_tls (client certificate): a round trip of data;
//  4. --tls-relay: the relay as before (a socketpair in the supervisor, status says so);
//  5. -L (ioctl): NBD_DO_IT with a kernel-TLS socket;
//  6. a record the kernel cannot authenticate (injected by a proxy) kills the link, which is reconnected.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync, readlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  cleanup,
  loadModule,
  loadNbd,
  requireGuest,
  run,
  type RunResult,
  sha256,
  startNbdServer,
  startNbdkit,
  startOurServer,
  tmpDir,
  tmpFile,
  waitFor,
  pidAlive,
} from './lib.ts';
import net from 'node:net';
import { makePki } from '../lib/servers.ts';
import { ContentType, RecordSplitter } from '../../src/client/ktls-keys.ts';
import { startForeground } from './attach-common.ts';
import { assertFioClean, FIO_CAP_S, startFio, writesCompleted } from './fio.ts';
import { attach, cli, detach, listenLoopback, roundTrip, tieEnds, unixSockets } from './ktls-common.ts';
import { CLI_ARGS } from '../lib/servers.ts';

requireGuest();

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const CLI_MS = 300_000;
const DISK = 64 << 20;

after(cleanup);

let pkiDir: string | undefined;
/** One CA and certificates for every test here (EC keys: quick to make in the emulated guest). */
async function pki(): Promise<string> {
  return (pkiDir ??= makePki(await tmpDir('pki-'), { ec: true }));
}

/** /proc/net/tls_stat as numbers (the file appears with tls.ko). */
function tlsStat(): Record<string, number> {
  if (!existsSync('/proc/net/tls_stat')) return {};
  const out: Record<string, number> = {};
  for (const line of readFileSync('/proc/net/tls_stat', 'utf8').split('\n')) {
    const [k, v] = line.trim().split(/\s+/);
    if (k && v) out[k] = Number(v);
  }
  return out;
}

test('our serve --tls: kernel TLS both ways, no relay; mkfs/mount; supervisor SIGKILL and server restart under fio', { timeout: 1_500_000 }, async () => {
  await loadNbd();
  const pkiDir = await pki();
  const disk = await tmpFile(DISK);
  const server = await startOurServer([`odisk=${disk}`, '--tls', 'require', '--tls-certificates', pkiDir]);
  const before = tlsStat();
  const a = await attach([`nbds://127.0.0.1:${server.port}/odisk?tls-certificates=${pkiDir}`], '/dev/nbd1');
  assert.match(a.line, /^\/dev\/nbd1 attached: 64 MiB .*export 'odisk' over TLS \(kernel TLS\)/);
  const st = tlsStat();
  assert.ok((st.TlsCurrTxSw ?? 0) >= (before.TlsCurrTxSw ?? 0) + 1 && (st.TlsCurrRxSw ?? 0) >= (before.TlsCurrRxSw ?? 0) + 1, `tls_stat counts the socket both ways: ${JSON.stringify(st)}`);
  assert.equal(unixSockets(a.pid), 0, 'the supervisor holds no socketpair: it is not on the data path');
  const status = await cli(['status', '/dev/nbd1']);
  assert.match(status.stdout, /over TLS \(kernel TLS\)/);

  // A file system on it, written, unmounted, read back.
  const mnt = await tmpDir('mnt-');
  assert.equal((await run('mkfs.ext4', ['-q', '-F', '/dev/nbd1'], { timeoutMs: 300_000 })).code, 0);
  assert.equal((await run('mount', ['/dev/nbd1', mnt])).code, 0);
  const data = Buffer.alloc(1 << 20);
  for (let i = 0; i < data.length; i++) data[i] = (i * 31) % 255;
  writeFileSync(path.join(mnt, 'f'), data);
  assert.equal((await run('umount', [mnt], { timeoutMs: 120_000 })).code, 0);
  assert.equal((await run('mount', ['/dev/nbd1', mnt])).code, 0);
  assert.ok(readFileSync(path.join(mnt, 'f')).equals(data), 'the file reads back after a remount');
  assert.equal((await run('umount', [mnt], { timeoutMs: 120_000 })).code, 0);

  // Supervisor SIGKILLed under fio: the kernel carries TLS on by itself, writes keep completing.
  let fio = startFio('/dev/nbd1', FIO_CAP_S, 'ktls');
  let w0 = writesCompleted(1);
  await waitFor(() => writesCompleted(1) > w0 + 100, 120_000, { what: 'fio writing' });
  process.kill(a.pid, 'SIGKILL');
  await waitFor(() => !pidAlive(a.pid), 10_000, { what: 'supervisor gone' });
  const w1 = writesCompleted(1);
  await waitFor(() => writesCompleted(1) > w1 + 200, 60_000, { what: 'writes completing with the supervisor dead' });
  assertFioClean(await fio.stopAfterWrites(1, 50), 'supervisor SIGKILLed (kernel TLS)');

  // --reattach adopts it and leaves the kernel's connection alone.
  const r = await cli(['--reattach', '/dev/nbd1']);
  assert.equal(r.code, 0, r.stderr);
  const pid2 = Number(/supervisor pid (\d+)/.exec(r.stdout)![1]);
  const log2 = /log (\S+)/.exec(r.stdout)![1]!;
  assert.doesNotMatch(readFileSync(log2, 'utf8'), /replacing all/);

  // Server killed and restarted on the same port under fio: the adopted supervisor reconnects with kernel TLS.
  fio = startFio('/dev/nbd1', FIO_CAP_S, 'ktls');
  w0 = writesCompleted(1);
  await waitFor(() => writesCompleted(1) > w0 + 100, 120_000, { what: 'fio writing' });
  server.kill('SIGKILL');
  await server.exited();
  await new Promise((res) => setTimeout(res, 2000));
  await server.restart();
  await waitFor(() => /reconnected after/.test(readFileSync(log2, 'utf8')), 180_000, { what: 'reconnect' }).catch((e: Error) => {
    throw new Error(`${e.message}\n${readFileSync(log2, 'utf8')}`);
  });
  assertFioClean(await fio.stopAfterWrites(1), 'server restarted (kernel TLS)');
  assert.equal(unixSockets(pid2), 0, 'still no relay after the reconnect');
  await detach('/dev/nbd1', pid2);
  await server.stop();
});

test('nbdkit --tls=require (X.509) with -C 4: four kernel-TLS connections; one killed under fio is replaced', { timeout: 900_000 }, async () => {
  await loadNbd();
  await loadModule('inet_diag');
  await loadModule('tcp_diag');
  const pkiDir = await pki();
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pkiDir}`, 'file', disk]);
  const before = tlsStat();
  const a = await attach(['-C', '4', '--connect-timeout', '60', `nbds://127.0.0.1:${server.port}/?tls-certificates=${pkiDir}`], '/dev/nbd2');
  assert.match(a.line, /over TLS \(kernel TLS\)/);
  const st = tlsStat();
  assert.ok((st.TlsCurrRxSw ?? 0) >= (before.TlsCurrRxSw ?? 0) + 4, `four sockets in kernel TLS: ${JSON.stringify(st)}`);
  assert.equal(unixSockets(a.pid), 0);
  await roundTrip('/dev/nbd2', disk);
  const fio = startFio('/dev/nbd2', FIO_CAP_S, 'ktls');
  const w0 = writesCompleted(2);
  await waitFor(() => writesCompleted(2) > w0 + 100, 120_000, { what: 'fio writing' });
  const ss = await run('ss', ['-Htn', 'state', 'established', 'dst', `127.0.0.1:${server.port}`]);
  const victim = ss.stdout.split('\n').find((l) => l.trim() !== '')!;
  const sport = /127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:\d+\s*$/.exec(victim.trim())![1];
  assert.equal((await run('ss', ['-K', 'state', 'established', 'dst', `127.0.0.1:${server.port}`, 'sport', `= :${sport}`])).code, 0);
  await waitFor(() => /reconnected after/.test(readFileSync(a.log, 'utf8')), 120_000, { what: 'reconnect' }).catch((e: Error) => {
    throw new Error(`${e.message}\n${readFileSync(a.log, 'utf8')}`);
  });
  assertFioClean(await fio.stopAfterWrites(2), '-C 4, one kernel-TLS connection killed');
  assert.equal(unixSockets(a.pid), 0, 'the replacement is kernel TLS too');
  await detach('/dev/nbd2', a.pid);
  await server.stop();
});

test('nbdkit PSK (TLS 1.2) and nbd-server force_tls (client certificate): data through kernel TLS', { timeout: 900_000 }, async () => {
  await loadNbd();
  const dir = await tmpDir('psk-');
  const pkiDir = await pki();
  const psk = path.join(dir, 'keys.psk');
  writeFileSync(psk, 'alice:0123456789abcdef0123456789abcdef\n');
  const disk = await tmpFile(DISK);
  const kit = await startNbdkit(['--tls=require', `--tls-psk=${psk}`, 'file', disk]);
  const a = await attach(['--tls-psk', psk, '--tls-username', 'alice', `127.0.0.1:${kit.port}`], '/dev/nbd3');
  assert.match(a.line, /over TLS \(kernel TLS\)/);
  await roundTrip('/dev/nbd3', disk);
  await detach('/dev/nbd3', a.pid);
  await kit.stop();

  const img = await tmpFile(DISK, { name: 'nbd-server.img' });
  const ns = await startNbdServer(
    `[generic]\ncertfile = ${pkiDir}/server-cert.pem\nkeyfile = ${pkiDir}/server-key.pem\ncacertfile = ${pkiDir}/ca-cert.pem\nforce_tls = true\n[ndisk]\nexportname = ${img}\n`,
  );
  const b = await attach(['--connect-timeout', '60', '-N', 'ndisk', '--tls-certificates', pkiDir, `127.0.0.1:${ns.port}`], '/dev/nbd4');
  assert.match(b.line, /over TLS \(kernel TLS\)/);
  await roundTrip('/dev/nbd4', img);
  await detach('/dev/nbd4', b.pid);
  await ns.stop();
});

test('--tls-relay: the relay as before (a socketpair in the supervisor), and status says so', { timeout: 600_000 }, async () => {
  await loadNbd();
  const pkiDir = await pki();
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pkiDir}`, 'file', disk]);
  const a = await attach(['--tls-relay', `nbds://127.0.0.1:${server.port}/?tls-certificates=${pkiDir}`], '/dev/nbd5');
  assert.match(a.line, /over TLS \(relay, --tls-relay\)/);
  assert.ok(unixSockets(a.pid) >= 1, 'the relay holds its end of the socketpair');
  await roundTrip('/dev/nbd5', disk);
  const status = await cli(['status', '/dev/nbd5']);
  assert.match(status.stdout, /over TLS \(relay\)/);
  await detach('/dev/nbd5', a.pid);
  await server.stop();
});

test('-L (ioctl) with kernel TLS: the device works with NBD_DO_IT holding the TLS socket; SIGTERM disconnects', { timeout: 600_000 }, async () => {
  await loadNbd();
  const pkiDir = await pki();
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pkiDir}`, 'file', disk]);
  const fg = await startForeground(['-L', '--tls-certificates', pkiDir, `127.0.0.1:${server.port}`, '/dev/nbd6']);
  try {
    assert.match(fg.stdout(), /^\/dev\/nbd6 attached: 64 MiB .*export \(default\) over TLS \(kernel TLS\), block size \d+, ioctl, supervisor pid \d+, logging to stderr\n/);
    assert.equal(unixSockets(fg.child.pid!), 0, 'no relay beside NBD_DO_IT');
    await roundTrip('/dev/nbd6', disk);
    process.kill(fg.child.pid!, 'SIGTERM');
    const ended = await fg.exit;
    assert.equal(ended.code, 0, fg.stderr());
    await waitFor(() => !existsSync('/sys/block/nbd6/pid'), 10_000, { what: 'nbd6 free after SIGTERM' });
  } finally {
    fg.child.kill('SIGKILL'); // a failed assertion must not leave it holding the test process open
  }
  await server.stop();
});

/**
 * A TCP proxy between the client and a server that passes both directions through, server→client
 * record by record, and on inject() puts one TLS alert record (clear text, as a peer that lost its
 * keys would) between two records: the kernel's TLS cannot authenticate it.
 */
async function recordProxy(to: number): Promise<{ port: number; inject(): void; injected(): number; close(): void }> {
  let pending = false;
  let count = 0;
  const socks = new Set<net.Socket>();
  const srv = net.createServer((c) => {
    const s = net.connect(to, '127.0.0.1');
    socks.add(c).add(s);
    const split = new RecordSplitter();
    // The NBD greeting and STARTTLS reply are plain; TLS starts with the ServerHello, which comes
    // alone after the client's ClientHello (a record header: handshake, version 3.x).
    let tls = false;
    c.pipe(s);
    s.on('data', (b: Buffer) => {
      if (!tls && b[0] === ContentType.HANDSHAKE && b[1] === 3) tls = true;
      if (!tls) {
        c.write(b);
        return;
      }
      let recs;
      try {
        recs = split.push(b);
      } catch {
        c.destroy();
        return;
      }
      for (const r of recs) {
        if (pending && r.type === ContentType.APPLICATION_DATA) {
          pending = false;
          count++;
          c.write(Buffer.from([ContentType.ALERT, 3, 3, 0, 2, 2, 40])); // fatal handshake_failure
        }
        c.write(r.bytes);
      }
    });
    tieEnds(c, s);
  });
  return {
    port: await listenLoopback(srv),
    inject: () => (pending = true),
    injected: () => count,
    close: () => {
      srv.close();
      for (const s of socks) s.destroy();
    },
  };
}

test('a record the kernel cannot authenticate after the handoff is a dead link, reconnected; never data', { timeout: 600_000 }, async () => {
  await loadNbd();
  const pkiDir = await pki();
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pkiDir}`, 'file', disk]);
  const proxy = await recordProxy(server.port);
  try {
    const a = await attach([`nbds://127.0.0.1:${proxy.port}/?tls-certificates=${pkiDir}`], '/dev/nbd7');
    assert.match(a.line, /over TLS \(kernel TLS\)/);
    const fio = startFio('/dev/nbd7', FIO_CAP_S, 'ktls');
    const w0 = writesCompleted(7);
    await waitFor(() => writesCompleted(7) > w0 + 100, 120_000, { what: 'fio writing' });
    proxy.inject();
    await waitFor(() => proxy.injected() === 1 && /reconnected after/.test(readFileSync(a.log, 'utf8')), 120_000, { what: 'reconnect after the forged record' }).catch((e: Error) => {
      throw new Error(`${e.message}\n${readFileSync(a.log, 'utf8')}`);
    });
    assertFioClean(await fio.stopAfterWrites(7), 'forged TLS record after the handoff');
    await detach('/dev/nbd7', a.pid);
  } finally {
    proxy.close();
    await server.stop();
  }
});
