// Helpers shared by the kernel TLS tests (ktls.test.ts, ktls-fallback.test.ts): the CLI with a long
// start-up allowance, background attach/detach, a 4 MiB round trip, and the count of a process's
// AF_UNIX sockets (the relay's socketpair; none with kernel TLS).
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLI_ARGS } from '../lib/servers.ts';
import { pidAlive, run, type RunResult, sha256, tmpFile, waitFor } from './lib.ts';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
/** CLI start-up (and a TLS handshake with Node on both ends) is slow under emulation on a busy host. */
const CLI_MS = 300_000;

export function cli(args: readonly string[], timeoutMs = CLI_MS): Promise<RunResult> {
  return run(process.execPath, [...CLI_ARGS, ...args], { cwd: REPO, timeoutMs });
}

/** How many AF_UNIX sockets a process holds besides its stdio (the relay's socketpair is two of them). */
export function unixSockets(pid: number): number {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    if (Number(fd) <= 2) continue; // stdio: a test's spawn() gives pipes as socketpairs
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      /* closed meanwhile */
    }
  }
  const unix = readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/)[6]);
  return unix.filter((i) => i !== undefined && inodes.has(i)).length;
}

/** Attach in the background; the supervisor's pid and log file, and what the command printed. */
export async function attach(args: readonly string[], dev: string): Promise<{ pid: number; log: string; line: string }> {
  const a = await cli([...args, dev]);
  assert.equal(a.code, 0, `${a.stdout}${a.stderr}`);
  const m = /supervisor pid (\d+), log (\S+)\n$/.exec(a.stdout);
  assert.ok(m, a.stdout);
  return { pid: Number(m[1]), log: m[2]!, line: a.stdout + a.stderr };
}

export async function detach(dev: string, pid: number): Promise<void> {
  const d = await cli(['-d', dev]);
  assert.equal(d.code, 0, d.stderr);
  await waitFor(() => !pidAlive(pid), 30_000, { what: `supervisor exit after -d ${dev}` });
}

/** Write 4 MiB of random data through the device, read it back; the server's file holds it (when given). */
export async function roundTrip(dev: string, serverFile?: string): Promise<void> {
  const pattern = await tmpFile(4 << 20, { random: true, name: `pattern-${path.basename(dev)}` });
  const dd = await run('dd', [`if=${pattern}`, `of=${dev}`, 'bs=1M', 'oflag=direct', 'status=none'], { timeoutMs: 120_000 });
  assert.equal(dd.code, 0, dd.stderr);
  const back = await run('sh', ['-c', `dd if=${dev} bs=1M count=4 iflag=direct status=none | sha256sum`], { timeoutMs: 120_000 });
  assert.equal(back.stdout.split(' ')[0], await sha256(pattern), `${dev} reads back what was written`);
  if (serverFile) assert.equal(await sha256(serverFile, 4 << 20), await sha256(pattern), "the server's file holds what was written through kernel TLS");
}

/** A test relay's two sockets end together: either one closing or failing destroys both. */
export function tieEnds(a: net.Socket, b: net.Socket): void {
  const end = (): void => {
    a.destroy();
    b.destroy();
  };
  a.on('close', end).on('error', end);
  b.on('close', end).on('error', end);
}

/** Listen on an ephemeral loopback port; resolves with the port. */
export async function listenLoopback(srv: net.Server): Promise<number> {
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  return (srv.address() as net.AddressInfo).port;
}
