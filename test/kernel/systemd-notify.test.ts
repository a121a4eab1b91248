// systemd's readiness protocol on a real kernel (run in the VM: test/kernel/run.sh
// test/kernel/systemd-notify.test.ts). The test plays the service manager: it binds a datagram
// socket (a path or an abstract name), starts the CLI in the foreground as nbd-attach@.service does
// (`nbd-attach -n nbdN` with an nbdtab, or `-n HOST /dev/nbdN`) with $NOTIFY_SOCKET pointing at it,
// and checks what arrives:
//  1. READY=1 only once /sys/block/nbdN/size is non-zero (read the moment READY arrives), with a
//     STATUS= naming the device and the export; WATCHDOG=1 about every half $WATCHDOG_USEC;
//     STOPPING=1 on SIGTERM, then exit 0;
//  2. a connection killed with ss -K: a STATUS= update; `nbd-attach -d` (the unit's ExecStop):
//     STOPPING=1, the supervisor exits 0;
//  3. the supervisor SIGKILLed and started again with the same command (systemd's Restart=):
//     it adopts the attached device and sends READY=1 instead of failing with "already attached".

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DatagramListener } from '../../native-bindings/unix-dgram.ts';
import { kernelSuite } from './attach-common.ts';
import { run, startNbdkit, tmpDir } from './lib.ts';
import { CLI_ARGS } from '../lib/servers.ts';

kernelSuite();

const REPO = fileURLToPath(new URL('../..', import.meta.url));
// Start-up of the CLI in the emulated guest can take tens of seconds when the host is busy.
const CLI_MS = 300_000;

const listeners: DatagramListener[] = [];
const procs = new Set<ChildProcess>();
after(() => {
  for (const l of listeners) l.close();
  for (const p of procs) p.kill('SIGKILL');
});

interface Sup {
  proc: ChildProcess;
  out(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function startSupervisor(args: readonly string[], env: Record<string, string>): Sup {
  const proc = spawn(process.execPath, [...CLI_ARGS, '-n', ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  procs.add(proc);
  let out = '';
  proc.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  proc.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    proc.on('exit', (code, signal) => {
      procs.delete(proc);
      r({ code, signal });
    }),
  );
  return { proc, out: () => out, exit };
}

/** Fields of one notification: "READY=1\nSTATUS=…" → { READY: '1', STATUS: '…' }. */
function fields(message: string): Record<string, string> {
  const f: Record<string, string> = {};
  for (const line of message.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) f[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return f;
}

interface Seen {
  message: string;
  f: Record<string, string>;
  /** /sys/block/nbdN/size (512-byte sectors) read the moment the datagram arrived. */
  sizeAtArrival: number;
  pidFileAtArrival: boolean;
}

function sysSize(index: number): number {
  try {
    return Number(readFileSync(`/sys/block/nbd${index}/size`, 'utf8').trim());
  } catch {
    return 0;
  }
}

/**
 * Receive notifications until one satisfies `want` (returned with all seen before it). Fails when
 * the supervisor exits first or nothing matching arrives within `ms`.
 */
async function until(l: DatagramListener, index: number, sup: Sup, want: (f: Record<string, string>) => boolean, ms: number, what: string): Promise<{ hit: Seen; before: Seen[] }> {
  const before: Seen[] = [];
  let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  void sup.exit.then((e) => (exited = e));
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const d = await l.receive(Math.min(1000, Math.max(1, deadline - Date.now())));
    if (d) {
      const message = d.data.toString('utf8');
      const seen: Seen = { message, f: fields(message), sizeAtArrival: sysSize(index), pidFileAtArrival: existsSync(`/sys/block/nbd${index}/pid`) };
      if (want(seen.f)) return { hit: seen, before };
      before.push(seen);
    } else if (exited) {
      assert.fail(`${what}: the supervisor exited (${exited.code ?? exited.signal}) first; notifications: ${JSON.stringify(before.map((s) => s.message))}\n${sup.out()}`);
    }
  }
  return assert.fail(`${what}: nothing within ${ms} ms; notifications: ${JSON.stringify(before.map((s) => s.message))}\n${sup.out()}`);
}

async function memoryServer(): Promise<{ port: number }> {
  return startNbdkit(['memory', 'size=64M']);
}

const scratch = await tmpDir('notify-');

/** An nbdtab with one entry, as /etc/nbdtab would have it for the unit. */
function nbdtab(device: string, port: number): string {
  const file = join(scratch, `nbdtab-${device}`);
  writeFileSync(file, `# test\n${device} 127.0.0.1 disk port=${port}\n`);
  return file;
}

test('nbdtab form: READY=1 only once the size is set, with STATUS; WATCHDOG=1 pings; STOPPING=1 on SIGTERM', { timeout: 900_000 }, async () => {
  const server = await memoryServer();
  const l = new DatagramListener(join(scratch, 'notify.sock'));
  listeners.push(l);
  const sup = startSupervisor(['--nbdtab', nbdtab('nbd3', server.port), 'nbd3'], { NOTIFY_SOCKET: l.address, WATCHDOG_USEC: '2000000' });
  const { hit: ready, before } = await until(l, 3, sup, (f) => f['READY'] === '1', CLI_MS, 'READY=1');
  assert.ok(ready.sizeAtArrival > 0, `READY=1 arrived while /sys/block/nbd3/size was 0 (notifications before: ${JSON.stringify(before.map((s) => s.message))})`);
  assert.ok(ready.pidFileAtArrival, 'READY=1 arrived before the kernel had a pid for nbd3');
  assert.equal(ready.sizeAtArrival * 512, 64 << 20);
  assert.ok(!before.some((s) => s.f['READY'] !== undefined || s.f['STOPPING'] !== undefined), JSON.stringify(before));
  const status = ready.f['STATUS'] ?? '';
  assert.match(status, /\/dev\/nbd3/, `STATUS names the device: ${status}`);
  assert.match(status, /disk/, `STATUS names the export: ${status}`);
  assert.match(status, /connections? 1/, `STATUS gives the connections: ${status}`);

  // WATCHDOG_USEC = 2 s: a ping about every second (WATCHDOG_PID unset: ours).
  const t0 = Date.now();
  await until(l, 3, sup, (f) => f['WATCHDOG'] === '1', 10_000, 'first WATCHDOG=1');
  await until(l, 3, sup, (f) => f['WATCHDOG'] === '1', 10_000, 'second WATCHDOG=1');
  assert.ok(Date.now() - t0 < 10_000);

  sup.proc.kill('SIGTERM');
  await until(l, 3, sup, (f) => f['STOPPING'] === '1', 60_000, 'STOPPING=1 after SIGTERM');
  const end = await sup.exit;
  assert.equal(end.code, 0, `exit after SIGTERM: ${JSON.stringify(end)}\n${sup.out()}`);
});

test('a killed connection: STATUS= update; nbd-attach -d (ExecStop): STOPPING=1, exit 0', { timeout: 900_000 }, async () => {
  const server = await memoryServer();
  const l = new DatagramListener(`@nbd-attach-kernel-test-${process.pid}`);
  listeners.push(l);
  const sup = startSupervisor(['-N', 'disk', `127.0.0.1:${server.port}`, '/dev/nbd4'], { NOTIFY_SOCKET: l.address });
  const { hit: ready } = await until(l, 4, sup, (f) => f['READY'] === '1', CLI_MS, 'READY=1');
  assert.ok(ready.sizeAtArrival > 0, 'READY=1 before the size was set');

  const k = await run('ss', ['-K', 'state', 'established', 'dst', `127.0.0.1:${server.port}`]);
  assert.equal(k.code, 0, k.stderr);
  await until(l, 4, sup, (f) => f['STATUS'] !== undefined, 120_000, 'STATUS= after the connection was killed');

  const d = await run(process.execPath, [...CLI_ARGS, '-d', '/dev/nbd4'], { cwd: REPO, timeoutMs: CLI_MS });
  assert.equal(d.code, 0, `${d.stdout}\n${d.stderr}`);
  await until(l, 4, sup, (f) => f['STOPPING'] === '1', 60_000, 'STOPPING=1 after nbd-attach -d');
  const end = await sup.exit;
  assert.equal(end.code, 0, `exit after detach: ${JSON.stringify(end)}\n${sup.out()}`);
});

test('restart after the supervisor was killed (Restart=): the same command adopts the device and sends READY=1', { timeout: 900_000 }, async () => {
  const server = await memoryServer();
  const tab = nbdtab('nbd5', server.port);
  const l = new DatagramListener(`@nbd-attach-kernel-test-${process.pid}-restart`);
  listeners.push(l);
  const first = startSupervisor(['--nbdtab', tab, 'nbd5'], { NOTIFY_SOCKET: l.address });
  await until(l, 5, first, (f) => f['READY'] === '1', CLI_MS, 'first READY=1');
  first.proc.kill('SIGKILL');
  await first.exit;
  assert.ok(sysSize(5) > 0, 'the device stays attached when its supervisor is killed');

  const second = startSupervisor(['--nbdtab', tab, 'nbd5'], { NOTIFY_SOCKET: l.address });
  const { hit } = await until(l, 5, second, (f) => f['READY'] === '1', CLI_MS, 'READY=1 from the restarted supervisor');
  assert.ok(hit.sizeAtArrival > 0);
  second.proc.kill('SIGTERM');
  await until(l, 5, second, (f) => f['STOPPING'] === '1', 60_000, 'STOPPING=1');
  assert.equal((await second.exit).code, 0, second.out());
});
