// The resident supervisor on a real kernel (run in the VM: test/kernel/run.sh test/kernel/reconnect.test.ts).
// Each test kills something under `fio --verify=crc32c` and checks that no I/O fails:
//  1. server SIGKILLed and restarted on the same port (prints server-back → first I/O time);
//  2. server gone longer than the dead timeout: I/O fails with EIO (no hang), then recovers;
//  3. supervisor SIGKILLed: I/O continues, `--reattach` adopts the device, a later restart is survived,
//     and `nbd-attach -d` from another shell ends the adopted supervisor;
//  4. -C 4: one of the four TCP connections killed with `ss -K`: the others carry on, it is replaced;
//  5. network partition (netns + veth, link down for seconds) during I/O;
//  6. TLS with --tls-relay (nbds:// to nbdkit --tls=require): data reaches the server through the relay, a killed TCP
//     connection is replaced, a killed supervisor (whose relay dies with it) is adopted with TLS.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import {
  cleanup,
  detachAllNbd,
  freePort,
  loadModule,
  loadNbd,
  requireGuest,
  run,
  type RunResult,
  sha256,
  startNbdkit,
  type ServerHandle,
  tmpDir,
  tmpFile,
  waitFor,
  pidAlive,
} from './lib.ts';
import { CLI_ARGS, makePki } from '../lib/servers.ts';
import { socketTuning, tuneSocket } from '../../src/supervisor/kernel-ops.ts';
import { TCP_TUNING } from '../../src/supervisor/policy.ts';
import { type Sup, startSupervised } from './attach-common.ts';
import { assertFioClean, FIO_CAP_S, type FioRun, startFio, writesCompleted } from './fio.ts';

requireGuest();

const REPO = fileURLToPath(new URL('../..', import.meta.url));
// Start-up of the CLI in the emulated guest can take tens of seconds when the host is busy.
const CLI_MS = 300_000;
const DISK = 64 << 20;

function cli(args: readonly string[], timeoutMs = CLI_MS): Promise<RunResult> {
  return run(process.execPath, [...CLI_ARGS, ...args], { cwd: REPO, timeoutMs });
}



/** One direct 4 KiB read; resolves with its duration in ms (rejects on error). */
async function probeRead(dev: string, timeoutMs = 120_000): Promise<number> {
  const t0 = Date.now();
  const r = await run('dd', [`if=${dev}`, 'of=/dev/null', 'bs=4k', 'count=1', `skip=${Math.floor(Math.random() * 1000)}`, 'iflag=direct', 'status=none'], { timeoutMs });
  if (r.code !== 0) throw new Error(`dd: ${r.stderr.trim() || `exit ${r.code}`}`);
  return Date.now() - t0;
}

async function stopSupervisor(sup: Sup, index: number): Promise<void> {
  sup.proc.kill('SIGTERM');
  const e = await Promise.race([sup.exit, delay(60_000).then(() => undefined)]);
  assert.ok(e, `supervisor did not exit on SIGTERM:\n${sup.out()}`);
  assert.equal(e.code, 0, `SIGTERM exit code:\n${sup.out()}`);
  await waitFor(() => !existsSync(`/sys/block/nbd${index}/pid`), 20_000, { what: `nbd${index} disconnected after SIGTERM` });
}

before(async () => {
  await loadNbd({ nbds_max: 8 });
});
after(async () => {
  await detachAllNbd().catch(() => {});
  await cleanup();
});

test('every socket handed to the kernel gets keepalive and TCP_USER_TIMEOUT', async () => {
  const srv = net.createServer((c) => c.destroy());
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  const c = net.connect(port, '127.0.0.1');
  await new Promise((r) => c.once('connect', r));
  tuneSocket(c);
  const fd = (c as unknown as { _handle: { fd: number } })._handle.fd;
  assert.deepEqual(socketTuning(fd), {
    keepalive: 1,
    idle: TCP_TUNING.keepIdleS,
    interval: TCP_TUNING.keepIntervalS,
    count: TCP_TUNING.keepCount,
    userTimeoutMs: TCP_TUNING.userTimeoutMs,
  });
  c.destroy();
  srv.close();
});

/**
 * Start fio on nbdN; once `writes` more writes completed, SIGKILL the server, keep it down
 * `downMs`, check fio is still running across the outage, restart the server. Returns the running fio.
 */
async function restartUnderFio(server: ServerHandle, index: number, writes: number, downMs: number): Promise<{ fio: FioRun }> {
  const fio = startFio(`/dev/nbd${index}`, FIO_CAP_S, 'reconnect');
  const w0 = writesCompleted(index);
  await waitFor(() => writesCompleted(index) > w0 + writes, 120_000, { what: `fio writing on nbd${index}` });
  server.kill('SIGKILL');
  await server.exited();
  await delay(downMs);
  assert.equal(fio.finished, false, 'fio was still running across the outage');
  await server.restart();
  return { fio }; // (wrapped: an async function would await the returned fio run itself)
}

test('server killed and restarted on the same port under fio --verify: zero I/O errors', { timeout: 900_000 }, async () => {
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['file', disk]);
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd0']);
  assert.match(sup.readyLine, /^\/dev\/nbd0 attached: 64 MiB .*netlink.*supervisor pid \d+, logging to stderr$/);
  const { fio } = await restartUnderFio(server, 0, 200, 3000);
  const back = Date.now();
  const first = await probeRead('/dev/nbd0');
  const firstIo = Date.now() - back;
  console.log(`# server back → first completed I/O: ${firstIo} ms (probe read itself ${first} ms)`);
  assertFioClean(await fio.stopAfterWrites(0), 'server restart');
  assert.match(sup.out(), /reconnected after \d+ ms \(reconnect #1/);
  const st = await cli(['status', '/dev/nbd0', '--json']);
  assert.equal(st.code, 0, st.stderr);
  const [entry] = JSON.parse(st.stdout) as { attached: boolean; reconnects: number; connections: { live: number; total: number }; supervisorPid: number; server: string }[];
  assert.equal(entry!.attached, true);
  assert.ok(entry!.reconnects >= 1, `reconnects ${entry!.reconnects}`);
  assert.deepEqual(entry!.connections, { live: 1, total: 1 });
  assert.equal(entry!.supervisorPid, sup.proc.pid);
  assert.equal(entry!.server, `127.0.0.1:${server.port}`);
  await stopSupervisor(sup, 0);
  await server.stop();
});

test('server gone longer than the dead timeout: I/O fails with EIO (no hang), then the device recovers', { timeout: 900_000 }, async () => {
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['file', disk]);
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd1', '--dead-timeout', '5', '-t', '5']);
  await probeRead('/dev/nbd1');
  server.kill('SIGKILL');
  await server.exited();
  const t0 = Date.now();
  await assert.rejects(probeRead('/dev/nbd1', 90_000), /Input\/output error|exit/);
  const failedAfter = Date.now() - t0;
  console.log(`# I/O failed ${failedAfter} ms after the server died (dead timeout 5 s)`);
  assert.ok(failedAfter < 45_000, `EIO came after ${failedAfter} ms`);
  await server.restart();
  const back = Date.now();
  await waitFor(async () => (await probeRead('/dev/nbd1', 30_000)) >= 0, 60_000, { what: 'nbd1 readable again', intervalMs: 250 });
  console.log(`# device usable again ${Date.now() - back} ms after the server returned`);
  assert.match(sup.out(), /reconnected after/);
  await stopSupervisor(sup, 1);
  await server.stop();
});

test('supervisor SIGKILLed during I/O: I/O continues, --reattach adopts, a restart after that is survived, -d ends it', { timeout: 1_200_000 }, async () => {
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['file', disk]);
  // Default mode: returns once usable, supervisor in the background.
  const a = await cli([`127.0.0.1:${server.port}`, '/dev/nbd2']);
  assert.equal(a.code, 0, a.stderr);
  assert.match(a.stdout, /^\/dev\/nbd2 attached: .*supervisor pid (\d+), log \/(var\/log|run)\/nbd-attach\/nbd2\.log\n$/);
  const pid1 = Number(/supervisor pid (\d+)/.exec(a.stdout)![1]);
  assert.ok(pidAlive(pid1), 'background supervisor runs');
  const fio1 = startFio('/dev/nbd2', FIO_CAP_S, 'reconnect');
  const w0 = writesCompleted(2);
  await waitFor(() => writesCompleted(2) > w0 + 100, 120_000, { what: 'fio writing' });
  process.kill(pid1, 'SIGKILL');
  await waitFor(() => !pidAlive(pid1), 10_000, { what: 'supervisor gone' });
  const w1 = writesCompleted(2);
  await waitFor(() => writesCompleted(2) > w1 + 100, 60_000, { what: 'I/O continuing without a supervisor' });
  assertFioClean(await fio1.stopAfterWrites(2, 50), 'supervisor SIGKILL');
  assert.ok(existsSync('/sys/block/nbd2/pid'), 'device still attached');
  const st0 = await cli(['status', 'nbd2']);
  assert.match(st0.stdout, /no supervisor/);
  const r = await cli(['--reattach', '/dev/nbd2']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^\/dev\/nbd2 adopted: server 127\.0\.0\.1:\d+.*supervisor pid (\d+)/);
  const pid2 = Number(/supervisor pid (\d+)/.exec(r.stdout)![1]);
  assert.ok(pidAlive(pid2));
  // Adopting twice is refused while the new supervisor lives.
  const again = await cli(['--reattach', '/dev/nbd2']);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, new RegExp(`already supervised by pid ${pid2}`));
  const { fio: fio2 } = await restartUnderFio(server, 2, 100, 2000);
  assertFioClean(await fio2.stopAfterWrites(2), 'adopted supervisor + server restart');
  const log = readFileSync(/log (\S+)/.exec(r.stdout)![1]!, 'utf8');
  assert.match(log, /adopted/);
  assert.match(log, /reconnected after/);
  // `-d` from another shell: the device goes and the adopted supervisor exits on its own.
  const d = await cli(['-d', '/dev/nbd2']);
  assert.equal(d.code, 0, d.stderr);
  await waitFor(() => !pidAlive(pid2), 30_000, { what: 'supervisor exit after -d' });
  await server.stop();
});

test('-C 4: one TCP connection killed with ss -K: I/O continues on the others and the dead one is replaced', { timeout: 900_000 }, async () => {
  await loadModule('inet_diag');
  await loadModule('tcp_diag');
  const disk = await tmpFile(DISK);
  const server = await startNbdkit(['file', disk]);
  const established = async (): Promise<string[]> => {
    const r = await run('ss', ['-Htn', 'state', 'established', 'dst', `127.0.0.1:${server.port}`]);
    return r.stdout.split('\n').filter((l) => l.trim() !== '');
  };
  const sup = await startSupervised([`127.0.0.1:${server.port}`, '/dev/nbd3', '-C', '4']);
  assert.match(sup.readyLine, /connections 4/);
  assert.equal((await established()).length, 4);
  const fio = startFio('/dev/nbd3', FIO_CAP_S, 'reconnect');
  const w0 = writesCompleted(3);
  await waitFor(() => writesCompleted(3) > w0 + 100, 120_000, { what: 'fio writing' });
  const victim = (await established())[0]!.trim().split(/\s+/)[2]!; // local address:port
  const lport = victim.slice(victim.lastIndexOf(':') + 1);
  const k = await run('ss', ['-K', 'state', 'established', 'dst', `127.0.0.1:${server.port}`, 'sport', '=', `:${lport}`]);
  assert.equal(k.code, 0, k.stderr);
  console.log(`# killed ${victim}: ss -K printed: ${k.stdout.trim().replace(/\n/g, ' | ')}`);
  await waitFor(() => /reconnected after/.test(sup.out()), 60_000, { what: 'replacement connection' }).catch(async (e: Error) => {
    // (nbdkit's own output too: once, all four connections were dropped and the port refused connections.)
    throw new Error(`${e.message}\nss now: ${(await established()).join(' | ')}\nnbdkit (pid ${server.pid}):\n${server.log()}\nsupervisor:\n${sup.out()}`);
  });
  assertFioClean(await fio.stopAfterWrites(3), 'ss -K one of four');
  const conns = await established();
  assert.equal(conns.length, 4, `connections after replacement:\n${conns.join('\n')}`);
  assert.ok(!conns.some((l) => l.includes(`:${lport} `)), 'the killed connection is gone');
  assert.equal((sup.out().match(/reconnected after/g) ?? []).length, 1, 'exactly one replacement');
  await stopSupervisor(sup, 3);
  await server.stop();
});

test('network partition (veth in a netns, link down 15 s) during I/O: detected, reconnected, zero I/O errors', { timeout: 900_000 }, async () => {
  await loadModule('veth');
  const ns = `nbdpart${process.pid}`;
  const sh = async (cmd: string): Promise<void> => {
    const r = await run('/bin/sh', ['-c', cmd], { timeoutMs: 30_000 });
    assert.equal(r.code, 0, `${cmd}: ${r.stderr}`);
  };
  const disk = await tmpFile(DISK);
  const port = await freePort();
  await sh(`ip netns add ${ns}`);
  let server: ChildProcess | undefined;
  let sup: Sup | undefined;
  try {
    await sh(`ip link add vnbd0 type veth peer name vnbd1 && ip link set vnbd1 netns ${ns}`);
    await sh(`ip addr add 10.231.0.1/24 dev vnbd0 && ip link set vnbd0 up`);
    await sh(`ip -n ${ns} addr add 10.231.0.2/24 dev vnbd1 && ip -n ${ns} link set vnbd1 up && ip -n ${ns} link set lo up`);
    server = spawn('ip', ['netns', 'exec', ns, 'nbdkit', '-f', '-i', '10.231.0.2', '-p', String(port), 'file', disk], { stdio: 'ignore' });
    await delay(1000);
    sup = await startSupervised([`10.231.0.2:${port}`, '/dev/nbd4']);
    const fio = startFio('/dev/nbd4', FIO_CAP_S, 'reconnect');
    const w0 = writesCompleted(4);
    await waitFor(() => writesCompleted(4) > w0 + 100, 120_000, { what: 'fio writing' });
    // Longer than TCP_USER_TIMEOUT and the request timeout (10 s each), shorter than the dead timeout:
    // the dead link must be detected, retried while the network is down, and replaced once it is up.
    await sh('ip link set vnbd0 down');
    await delay(15_000);
    await sh('ip link set vnbd0 up');
    const back = Date.now();
    const first = await probeRead('/dev/nbd4');
    console.log(`# link up → first completed I/O: ${Date.now() - back} ms (probe ${first} ms)`);
    assertFioClean(await fio.stopAfterWrites(4), 'partition');
    assert.match(sup.out(), /reconnected after \d+ ms/, 'the partition was detected and the connection replaced');
    await stopSupervisor(sup, 4);
    sup = undefined;
  } finally {
    sup?.proc.kill('SIGKILL');
    server?.kill('SIGKILL');
    await run('ip', ['link', 'del', 'vnbd0']);
    await run('ip', ['netns', 'del', ns]);
  }
});

test('TLS --tls-relay: nbds:// through the relay: data reaches the server, a killed TCP connection is replaced, a killed supervisor is adopted', { timeout: 1_200_000 }, async () => {
  await loadModule('inet_diag');
  await loadModule('tcp_diag');
  const pki = makePki(await tmpDir('pki-'), { ec: true });
  const disk = await tmpFile(DISK);
  // --tls=require: nbdkit refuses every option before STARTTLS, so a working attach is a TLS one.
  const server = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, 'file', disk]);
  const uri = `nbds://127.0.0.1:${server.port}/?tls-certificates=${pki}`;
  const plain = await cli([`127.0.0.1:${server.port}`, '/dev/nbd6']);
  assert.equal(plain.code, 4, `a plain attach is refused: ${plain.stdout}${plain.stderr}`);
  assert.match(plain.stderr, /requires TLS.*-x\/--tls/);
  assert.ok(!existsSync('/sys/block/nbd6/pid'), 'nothing left attached by the refused attach');

  const a = await cli(['--tls-relay', uri, '/dev/nbd6']);
  assert.equal(a.code, 0, a.stderr);
  assert.match(a.stdout, /^\/dev\/nbd6 attached: 64 MiB .*export \(default\) over TLS.*supervisor pid (\d+), log (\S+)\n$/);
  const pid1 = Number(/supervisor pid (\d+)/.exec(a.stdout)![1]);
  const logFile = /log (\S+)\n$/.exec(a.stdout)![1]!;

  // 1. Bytes written to the device arrive in nbdkit's file (so the relay carries them both ways).
  const pattern = await tmpFile(4 << 20, { random: true, name: 'pattern' });
  const dd = await run('dd', [`if=${pattern}`, 'of=/dev/nbd6', 'bs=1M', 'oflag=direct', 'status=none'], { timeoutMs: 120_000 });
  assert.equal(dd.code, 0, dd.stderr);
  assert.equal(await sha256(disk, 4 << 20), await sha256(pattern), "the server's file holds what was written through TLS");
  const back = await run('sh', ['-c', `dd if=/dev/nbd6 bs=1M count=4 iflag=direct status=none | sha256sum`], { timeoutMs: 120_000 });
  assert.equal(back.stdout.split(' ')[0], await sha256(pattern), 'and reads back the same');

  // 2. The TCP connection under TLS killed during fio: the relay closes the kernel's socket, the kernel
  //    reports the link dead, the supervisor negotiates TLS again; zero I/O errors.
  const established = async (): Promise<string[]> =>
    (await run('ss', ['-Htn', 'state', 'established', 'dst', `127.0.0.1:${server.port}`])).stdout.split('\n').filter((l) => l.trim() !== '');
  assert.equal((await established()).length, 1);
  const fio = startFio('/dev/nbd6', FIO_CAP_S, 'reconnect');
  const w0 = writesCompleted(6);
  await waitFor(() => writesCompleted(6) > w0 + 100, 120_000, { what: 'fio writing' });
  const k = await run('ss', ['-K', 'state', 'established', 'dst', `127.0.0.1:${server.port}`]);
  assert.equal(k.code, 0, k.stderr);
  await waitFor(() => /reconnected after/.test(readFileSync(logFile, 'utf8')), 120_000, { what: 'TLS reconnect' }).catch((e: Error) => {
    throw new Error(`${e.message}\nsupervisor log:\n${readFileSync(logFile, 'utf8')}\nnbdkit:\n${server.log()}`);
  });
  assertFioClean(await fio.stopAfterWrites(6), 'TLS connection killed with ss -K');
  console.log(`# TLS supervisor: ${/reconnected after [^\n]*/.exec(readFileSync(logFile, 'utf8'))![0]}`);
  if (process.env.NBD_TEST_SHOW_LOG) console.log(readFileSync(logFile, 'utf8').replace(/^/gm, '# '));

  // 3. Supervisor SIGKILLed: with TLS it was on the data path, so I/O waits (dead timeout) until
  //    --reattach adopts the device, reads the TLS settings from the state file and replaces the connection.
  process.kill(pid1, 'SIGKILL');
  await waitFor(() => !pidAlive(pid1), 10_000, { what: 'supervisor gone' });
  const r = await cli(['--reattach', '/dev/nbd6']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^\/dev\/nbd6 adopted: server 127\.0\.0\.1:\d+, export \(default\) over TLS/);
  const pid2 = Number(/supervisor pid (\d+)/.exec(r.stdout)![1]);
  const ms = await probeRead('/dev/nbd6');
  console.log(`# TLS device adopted: first read after --reattach took ${ms} ms`);
  const log2 = readFileSync(/log (\S+)/.exec(r.stdout)![1]!, 'utf8');
  assert.match(log2, /TLS: the previous supervisor relayed .*replacing all 1/);
  assert.match(log2, /reconnected after/);
  const check = await run('sh', ['-c', `dd if=/dev/nbd6 bs=1M count=4 iflag=direct status=none | sha256sum`], { timeoutMs: 120_000 });
  assert.equal(check.code, 0, check.stderr);
  const d = await cli(['-d', '/dev/nbd6']);
  assert.equal(d.code, 0, d.stderr);
  await waitFor(() => !pidAlive(pid2), 30_000, { what: 'supervisor exit after -d' });
  await server.stop();
});
