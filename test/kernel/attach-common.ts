// Shared helpers for the attach/device kernel tests: run the real CLI (node bin/nbd-attach.js) in the
// VM, keep a foreground (ioctl) attach running, detach everything in cleanup.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { run, sh, waitFor, type RunOptions, type RunResult } from './lib.ts';

export const CLI = join(process.cwd(), 'bin/nbd-attach.js');
/** CLI start-up under software emulation is slow (tsx compiles on the first run of each boot). */
export const CLI_TIMEOUT_MS = 120_000;

export function cli(args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args], { timeoutMs: CLI_TIMEOUT_MS, ...opts });
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

/** A running `nbd-attach -L …` (ioctl mode stays in the foreground). */
export interface Foreground {
  child: ChildProcess;
  device: string;
  stdout(): string;
  stderr(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const foregrounds = new Set<ChildProcess>();

export async function startForeground(args: readonly string[]): Promise<Foreground> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
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
  await waitFor(
    () => {
      if (/ attached: /.test(out)) return true;
      if (exited) throw new Error(`nbd-attach exited before attaching\nstdout: ${out}\nstderr: ${err}`);
      return false;
    },
    CLI_TIMEOUT_MS,
    { what: 'ioctl attach ready', intervalMs: 100 },
  );
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
