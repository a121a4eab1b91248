// Shared helpers for the attach/device kernel tests: run the real CLI (dist/, CLI_ARGS) in the
// VM, keep a foreground (ioctl) attach running, detach everything in cleanup.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { after, before } from 'node:test';
import { CLI_ARGS } from '../lib/servers.ts';
import { cleanup, loadNbd, mustRun, requireGuest, run, sh, sha256, tmpDir, unloadNbd, waitFor, type RunOptions, type RunResult } from './lib.ts';

export { CLI_ARGS };
/** CLI start-up under software emulation is slow. */
export const CLI_TIMEOUT_MS = 120_000;

export function cli(args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [...CLI_ARGS, ...args], { timeoutMs: CLI_TIMEOUT_MS, ...opts });
}

export function show(r: RunResult): string {
  return `exit ${r.code}${r.signal ? ` (${r.signal})` : ''}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

/** `/dev/nbdN attached: …` → the device path. */
export function attachedDevice(stdout: string): string {
  const m = /^(\S+) attached: /m.exec(stdout);
  if (!m) throw new Error(`no "attached" line in: ${stdout}`);
  return m[1]!;
}

export const indexOf = (dev: string): number => Number(/(\d+)$/.exec(dev)![1]);

export function sysPid(index: number): string | undefined {
  const p = `/sys/block/nbd${index}/pid`;
  return existsSync(p) ? readFileSync(p, 'utf8').trim() : undefined;
}

/** A running `nbd-attach -n -L …` (-n keeps the ioctl lifeline in the foreground, logging to stderr). */
export interface Foreground {
  child: ChildProcess;
  device: string;
  stdout(): string;
  stderr(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const foregrounds = new Set<ChildProcess>();

export async function startForeground(args: readonly string[]): Promise<Foreground> {
  const child = spawn(process.execPath, [...CLI_ARGS, '-n', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  foregrounds.add(child);
  let out = '';
  let err = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('close', (code, signal) => {
      foregrounds.delete(child);
      resolve({ code, signal });
    }),
  );
  let exited = false;
  void exit.then(() => (exited = true));
  // Exiting before attaching fails the test at once (waitFor would keep polling past a thrown error).
  await waitFor(() => / attached: /.test(out) || exited, CLI_TIMEOUT_MS, { what: 'ioctl attach ready', intervalMs: 100 });
  if (!/ attached: /.test(out)) throw new Error(`nbd-attach exited before attaching\nstdout: ${out}\nstderr: ${err}`);
  return { child, device: attachedDevice(out), stdout: () => out, stderr: () => err, exit };
}

/** Unmount our mount points, detach every attached nbd device, stop foreground attaches. */
export async function detachEverything(mounts: readonly string[] = []): Promise<void> {
  for (const m of mounts) await run('umount', ['-l', m], { timeoutMs: 10_000 });
  if (existsSync('/sys/module/nbd')) {
    await sh('for p in /sys/block/nbd*/pid; do [ -e "$p" ] || continue; d=${p%/pid}; d=/dev/${d##*/}; nbd-client -d "$d"; done', { timeoutMs: 60_000 });
  }
  for (const c of foregrounds) c.kill('SIGKILL');
}

const MiB = 1024 * 1024;

/** mkfs, mount, write files, unmount; returns the files' checksums. */
export async function fillFilesystem(mounts: string[], dev: string): Promise<Map<string, string>> {
  const mnt = await tmpDir('mnt-');
  mounts.push(mnt);
  await mustRun('mkfs.ext4', ['-q', '-F', dev], { timeoutMs: 120_000 });
  await mustRun('mount', [dev, mnt]);
  const sums = new Map<string, string>();
  for (const [name, size] of [['a.bin', 3 * MiB], ['b.bin', 123457]] as const) {
    await mustRun('dd', ['if=/dev/urandom', `of=${join(mnt, name)}`, `bs=${size}`, 'count=1', 'status=none']);
    sums.set(name, await sha256(join(mnt, name)));
  }
  await mustRun('umount', [mnt]);
  return sums;
}

export async function verifyFilesystem(mounts: string[], dev: string, sums: Map<string, string>): Promise<void> {
  const mnt = await tmpDir('mnt-');
  mounts.push(mnt);
  await mustRun('mount', ['-o', 'ro', dev, mnt]);
  try {
    for (const [name, sum] of sums) assert.equal(await sha256(join(mnt, name)), sum, `${name} after re-attach`);
  } finally {
    await mustRun('umount', [mnt]);
  }
}

/** The device is read-only in sysfs, dd and mkfs fail, and the server's data is unchanged. */
export async function assertWritesRefused(dev: string, before: string, serverData: () => Promise<string>): Promise<void> {
  const idx = indexOf(dev);
  assert.equal(readFileSync(`/sys/block/nbd${idx}/ro`, 'utf8').trim(), '1', 'sysfs ro');
  const w = await run('dd', ['if=/dev/zero', `of=${dev}`, 'bs=4096', 'count=4', 'oflag=direct', 'conv=notrunc', 'status=none']);
  assert.notEqual(w.code, 0, `dd to a read-only device must fail: ${w.stderr}`);
  const m = await run('mkfs.ext4', ['-q', '-F', dev]);
  assert.notEqual(m.code, 0, 'mkfs on a read-only device must fail');
  assert.equal(await serverData(), before, 'server data unchanged');
}

/**
 * The frame of a kernel test file: guest only; nbd loaded with `nbdsMax` devices before the tests;
 * afterwards mounts undone, devices detached, servers stopped, the module unloaded. Returns the list
 * the tests push their mount points on.
 */
export function kernelSuite(nbdsMax = 8): string[] {
  requireGuest();
  const mounts: string[] = [];
  before(async () => {
    await loadNbd({ nbds_max: nbdsMax });
  });
  after(async () => {
    await detachEverything(mounts);
    await cleanup();
    await unloadNbd().catch(() => {});
  });
  return mounts;
}

/** A supervisor run in the foreground (`-n`), resolved on its ready line. */
export interface Sup {
  proc: ChildProcess;
  readyLine: string;
  out(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** `nbd-attach -n …` in the foreground; resolves on its ready line ("attached" or "adopted"). */
export function startSupervised(args: readonly string[], limitMs = 300_000): Promise<Sup> {
  const proc = spawn(process.execPath, [...CLI_ARGS, '-n', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  proc.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => proc.on('exit', (code, signal) => r({ code, signal })));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`supervisor not ready within ${limitMs} ms:\n${out}`));
    }, limitMs);
    const check = (): void => {
      const m = /^(\/dev\/nbd\d+ (?:attached|adopted):.*)$/m.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, readyLine: m[1]!, out: () => out, exit });
      }
    };
    proc.stdout!.on('data', check);
    void exit.then((e) => {
      clearTimeout(timer);
      reject(new Error(`supervisor exited (${e.code ?? e.signal}) before ready:\n${out}`));
    });
  });
}
