// Helpers for the real-kernel tests (test/kernel/*.test.ts). These run INSIDE the test VM as
// root (test/kernel/run.sh → test/vm/run.sh); see test/vm/README.md for what the guest provides.
// Every helper that touches the kernel first checks that it really is in the VM, so a kernel
// test started on a host fails loudly instead of loading modules or attaching devices there.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import createDebug from 'debug';
// Servers (nbdkit, nbd-server, qemu-nbd, our serve) and waitFor: one implementation for the host's
// interop tests and the guest's kernel tests.
import { stopAllServers, waitFor } from '../lib/servers.ts';

export { freePort, isListening, startNbdkit, startNbdServer, startOurServer, startQemuNbd, waitFor, type ServerHandle } from '../lib/servers.ts';

const debug = createDebug('nbd:kernel-test');

// ---------------------------------------------------------------------------------------------
// Guest guard

/** True only inside the VM started by test/vm/run.sh (env marker and kernel command line agree). */
export function isInGuest(): boolean {
  if (process.env['NBD_VM_GUEST'] !== '1') return false;
  try {
    return readFileSync('/proc/cmdline', 'utf8').split(/\s+/).includes('nbdvm=1');
  } catch {
    return false;
  }
}

/** Throws unless in the VM. Call at the top of every kernel test file (a thrown error fails the file). */
export function requireGuest(): void {
  if (!isInGuest()) {
    throw new Error(
      'kernel test: not inside the test VM; run it with test/kernel/run.sh (it loads modules and attaches /dev/nbdN as root)',
    );
  }
  if (process.getuid?.() !== 0) {
    throw new Error('kernel test: must run as root inside the test VM; run it with test/kernel/run.sh');
  }
}

// ---------------------------------------------------------------------------------------------
// Running commands

export interface RunOptions {
  /** Hard limit; the whole process group gets SIGKILL when it passes. Default 60 s. */
  timeoutMs?: number;
  /** Written to stdin, which is then closed. Default: empty stdin. */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Called with the child once it is spawned (e.g. to signal it before it ends by itself). */
  onSpawn?: (child: ChildProcess) => void;
}

export interface RunResult {
  /** Exit code, or null when killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  durationMs: number;
}

const OUTPUT_CAP = 8 * 1024 * 1024;

/**
 * Runs `file args` (no shell), collecting output, with a hard timeout (SIGKILL to its process
 * group). Resolves when it exits, whatever the status; rejects only if it cannot be spawned.
 */
export function run(file: string, args: readonly string[] = [], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const started = Date.now();
  debug('run %s %o', file, args);
  return new Promise((resolve, reject) => {
    let child: ChildProcess;
    try {
      child = spawn(file, [...args], {
        cwd: opts.cwd,
        env: opts.env ?? process.env,
        stdio: ['pipe', 'pipe', 'pipe'],
        detached: true, // own process group, so the timeout kills grandchildren too
      });
    } catch (err) {
      reject(err);
      return;
    }
    opts.onSpawn?.(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outLen = 0;
    let errLen = 0;
    child.stdout?.on('data', (b: Buffer) => {
      if (outLen < OUTPUT_CAP) out.push(b);
      outLen += b.length;
    });
    child.stderr?.on('data', (b: Buffer) => {
      if (errLen < OUTPUT_CAP) err.push(b);
      errLen += b.length;
    });
    child.stdin?.on('error', () => {}); // the command may exit without reading its input
    child.stdin?.end(opts.input ?? '');
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(child, 'SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`run ${file}: ${e.message}`));
    });
    // Resolve on exit once the output pipes have drained. A daemon the command left behind may
    // still hold them: then stop waiting after a short grace period, but keep the pipes open and
    // drained (closing them would hand the daemon EPIPE) without keeping this process alive.
    let closed = false;
    const closedPromise = new Promise<void>((res) => child.on('close', () => ((closed = true), res())));
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      void Promise.race([closedPromise, delay(500)]).then(() => {
        if (!closed) {
          for (const stream of [child.stdout, child.stderr]) (stream as Socket | null)?.unref();
        }
        const result: RunResult = {
          code,
          signal,
          stdout: Buffer.concat(out).toString('utf8'),
          stderr: Buffer.concat(err).toString('utf8'),
          timedOut,
          durationMs: Date.now() - started,
        };
        debug('run %s → code %s signal %s in %d ms', file, code, signal, result.durationMs);
        resolve(result);
      });
    });
  });
}

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      /* already gone */
    }
  }
}

/** Runs a bash command line (with `set -o pipefail`). */
export function sh(cmd: string, opts: RunOptions = {}): Promise<RunResult> {
  return run('/bin/bash', ['-o', 'pipefail', '-c', cmd], opts);
}

function describe(what: string, r: RunResult): string {
  const how = r.timedOut ? 'timed out' : r.signal ? `killed by ${r.signal}` : `exited ${r.code}`;
  return `${what} ${how}\n--- stdout ---\n${r.stdout.slice(-4000)}\n--- stderr ---\n${r.stderr.slice(-4000)}`;
}

/** Like run() but throws (with the output) unless the command exits 0. */
export async function mustRun(file: string, args: readonly string[] = [], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(file, args, opts);
  if (r.code !== 0) throw new Error(describe(`${file} ${args.join(' ')}`, r));
  return r;
}

/** Like sh() but throws (with the output) unless the command exits 0. */
export async function mustSh(cmd: string, opts: RunOptions = {}): Promise<RunResult> {
  const r = await sh(cmd, opts);
  if (r.code !== 0) throw new Error(describe(cmd, r));
  return r;
}

/**
 * Runs a command as uid 0 but with every capability gone (effective, permitted, inheritable,
 * ambient and bounding set emptied, no_new_privs), so it lacks CAP_SYS_ADMIN like an ordinary
 * user while still owning root's files. A string runs through bash; an array is an argv.
 */
export function asUnprivileged(cmd: string | readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const argv = typeof cmd === 'string' ? ['/bin/bash', '-c', cmd] : [...cmd];
  return run('setpriv', [...UNPRIVILEGED_PREFIX, ...argv], opts);
}

/** The argv prefix asUnprivileged() uses, for callers that spawn processes themselves. */
export const UNPRIVILEGED_PREFIX: readonly string[] = [
  '--inh-caps=-all',
  '--ambient-caps=-all',
  '--bounding-set=-all',
  '--no-new-privs',
  '--',
];


// ---------------------------------------------------------------------------------------------
// Kernel modules

/** The unpacked kernel package inside the guest (modprobe -d DIR). */
export function kernelRoot(): string {
  return process.env['NBD_VM_KERNEL_ROOT'] ?? '/run/nbd-vm/kroot';
}

/** True when `name` is a loaded module (listed in /proc/modules; built-ins are not). */
export function isModuleLoaded(name: string): boolean {
  const want = name.replace(/-/g, '_');
  return readFileSync('/proc/modules', 'utf8')
    .split('\n')
    .some((line) => line.split(' ', 1)[0] === want);
}

export type ModuleParams = Record<string, string | number | boolean>;

function paramArgs(params: ModuleParams): string[] {
  return Object.entries(params).map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 1 : 0) : v}`);
}

/** modprobe from the unpacked kernel tree (e.g. veth, inet_diag, tcp_diag, loop, sch_netem). */
export async function loadModule(name: string, params: ModuleParams = {}): Promise<void> {
  requireGuest();
  await mustRun('/usr/sbin/modprobe', ['-d', kernelRoot(), name, ...paramArgs(params)], { timeoutMs: 30_000 });
  if (!isModuleLoaded(name) && !existsSync(`/sys/module/${name.replace(/-/g, '_')}`)) {
    throw new Error(`loadModule: modprobe ${name} succeeded but the module is not loaded`);
  }
}

export interface NbdParams {
  nbds_max?: number;
  max_part?: number;
  [param: string]: string | number | boolean | undefined;
}

/**
 * Loads nbd.ko with exactly these parameters (unloading it first if it is loaded), then waits
 * until /sys/block/nbd0 exists (unless nbds_max is 0).
 */
export async function loadNbd(params: NbdParams = {}): Promise<void> {
  requireGuest();
  if (isModuleLoaded('nbd')) await unloadNbd();
  const clean: ModuleParams = {};
  for (const [k, v] of Object.entries(params)) if (v !== undefined) clean[k] = v;
  await mustRun('/usr/sbin/modprobe', ['-d', kernelRoot(), 'nbd', ...paramArgs(clean)], { timeoutMs: 30_000 });
  if (params.nbds_max !== 0) {
    await waitFor(() => existsSync('/sys/block/nbd0'), 10_000, { what: '/sys/block/nbd0 after modprobe nbd' });
  }
}

/** Indexes of nbd devices that have a connection (a `pid` attribute in sysfs). */
export function connectedNbdDevices(): number[] {
  if (!existsSync('/sys/module/nbd')) return [];
  return readdirSync('/sys/block')
    .map((name) => /^nbd(\d+)$/.exec(name)?.[1])
    .filter((n): n is string => n !== undefined && existsSync(`/sys/block/nbd${n}/pid`))
    .map(Number)
    .sort((a, b) => a - b);
}

/** Disconnects every connected /dev/nbdN with the reference client (`nbd-client -d`). */
export async function detachAllNbd(): Promise<void> {
  for (const i of connectedNbdDevices()) {
    await run('nbd-client', ['-d', `/dev/nbd${i}`], { timeoutMs: 15_000 });
  }
}

/**
 * rmmod nbd; while the module is busy, disconnects every device and retries for up to
 * `timeoutMs`. A no-op when nbd is not loaded.
 */
export async function unloadNbd(timeoutMs = 15_000): Promise<void> {
  requireGuest();
  if (!isModuleLoaded('nbd')) return;
  const deadline = Date.now() + timeoutMs;
  let last: RunResult | undefined;
  for (let attempt = 0; ; attempt++) {
    last = await run('rmmod', ['nbd'], { timeoutMs: 15_000 });
    if (last.code === 0 || !isModuleLoaded('nbd')) return;
    if (Date.now() >= deadline) break;
    if (attempt === 0 || attempt % 10 === 0) await detachAllNbd();
    await delay(200);
  }
  throw new Error(`unloadNbd: rmmod nbd still failing after ${timeoutMs} ms: ${last.stderr.trim()}`);
}

/** Size of /dev/nbdN in bytes as the kernel sees it (0 when not connected). */
export function nbdSizeBytes(index: number): number {
  return Number(readFileSync(`/sys/block/nbd${index}/size`, 'utf8').trim()) * 512;
}

// ---------------------------------------------------------------------------------------------
// Temporary files

let tmpRoot: string | undefined;
async function tmpBase(): Promise<string> {
  tmpRoot ??= await mkdtemp(join(tmpdir(), 'nbd-ktest-'));
  return tmpRoot;
}

/** A fresh empty directory under this process's temporary root (removed by cleanup()). */
export async function tmpDir(prefix = 'd-'): Promise<string> {
  return mkdtemp(join(await tmpBase(), prefix));
}

/**
 * A new file of `sizeBytes`: sparse zeros by default, or random bytes with `{ random: true }`.
 * Lives under the guest's /tmp (a RAM-backed tmpfs): keep it small.
 */
export async function tmpFile(sizeBytes: number, opts: { random?: boolean; name?: string } = {}): Promise<string> {
  const path = join(await tmpDir('f-'), opts.name ?? 'disk.img');
  const fh = await open(path, 'wx');
  try {
    if (opts.random) {
      const chunk = 1024 * 1024;
      for (let off = 0; off < sizeBytes; off += chunk) {
        const n = Math.min(chunk, sizeBytes - off);
        await fh.write(randomBytes(n), 0, n, off);
      }
    } else {
      await fh.truncate(sizeBytes);
    }
  } finally {
    await fh.close();
  }
  return path;
}

/** Hex SHA-256 of a file or block device; only the first `length` bytes when given. */
export function sha256(path: string, length?: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    const stream = createReadStream(path, length === undefined ? {} : { start: 0, end: length - 1 });
    stream.on('data', (b) => hash.update(b));
    stream.on('error', reject);
    stream.on('end', () => resolve(hash.digest('hex')));
  });
}

/** Stops every server started here and removes the temporary files. Call it in `after()`. */
export async function cleanup(): Promise<void> {
  await stopAllServers();
  if (tmpRoot) {
    await rm(tmpRoot, { recursive: true, force: true });
    tmpRoot = undefined;
  }
}

/** Whether a process lives (a zombie or a dead task counts as gone: /proc/PID/stat state Z or X). */
export function pidAlive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) [ZX] /s.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
