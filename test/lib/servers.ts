// Real NBD servers for tests: nbdkit, nbd-server, qemu-nbd (Debian packages) and our own `serve`,
// started on loopback with a free port (or a unix socket), waited for until they listen (read from
// /proc: no probe connection), stopped by `stop()` and, whatever happens, killed when the test
// process exits. One implementation for the interop tests on the host and the kernel tests in the
// VM (test/kernel/lib.ts re-exports it); plus the other helpers both kinds of test share.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path, { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import createDebug from 'debug';

const debug = createDebug('nbd:test-servers');

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/**
 * How the tests start the CLI: `spawn(process.execPath, [...CLI_ARGS, 'serve', …])`. On the host
 * the sources run through tsx, so what runs is what src/ says now; in the test VM it is dist/, which
 * test/vm/run.sh builds on the host before the boot (tsx costs seconds per start under emulation,
 * and the guest's checkout is read-only). NBD_TEST_CLI=dist or =src chooses either way.
 * test/interop/package.test.ts tests dist/ itself on the host.
 */
export const CLI_ARGS: readonly string[] =
  (process.env.NBD_TEST_CLI ?? (process.env.NBD_VM_GUEST === '1' ? 'dist' : 'src')) === 'dist'
    ? [path.join(REPO, 'dist/nbd-attach.mjs')]
    : ['--import', import.meta.resolve('tsx'), path.join(REPO, 'src/main.ts')];

export function tmpDir(prefix = 'nbd-attach-test-'): string {
  return mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A port nobody listens on right now (bind to 0, read it, close). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/**
 * Whether something listens on the TCP port (or the unix socket exists), read from /proc so that no
 * probe connection is made: nbd-server -d exits when a client drops during negotiation.
 */
export function isListening(port: number, socketPath?: string): boolean {
  if (port === 0 && !socketPath) return false;
  if (socketPath) return existsSync(socketPath);
  return listenerInodes(port).size > 0;
}

/** The inodes of the sockets listening on the TCP port (from /proc/net/tcp and tcp6). */
function listenerInodes(port: number): Set<string> {
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  const inodes = new Set<string>();
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    // columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols[1]?.endsWith(`:${hex}`) && cols[3] === '0A' && cols[9]) inodes.add(cols[9]);
    }
  }
  return inodes;
}

/**
 * Whether one of `pids` (or a process they started) holds the socket listening on `port`: a port
 * picked free can be taken by another test's server or client before ours binds it, and a test
 * would then talk to a stranger.
 */
export function listenerHeldBy(port: number, pids: readonly number[]): boolean {
  const inodes = listenerInodes(port);
  const seen = new Set<number>();
  const queue = pids.filter((p) => p > 0);
  while (queue.length > 0) {
    const pid = queue.shift() as number;
    if (seen.has(pid)) continue;
    seen.add(pid);
    let fds: string[] = [];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      /* gone, or not ours to read */
    }
    for (const fd of fds) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m && inodes.has(m[1] as string)) return true;
      } catch {
        /* closed meanwhile */
      }
    }
    queue.push(...childrenOf(pid));
  }
  return false;
}

/** Polls `predicate` (sync or async) every `intervalMs` until it returns a truthy value, which it returns. */
export async function waitFor<T>(
  predicate: () => T | Promise<T>,
  timeoutMs: number,
  opts: { intervalMs?: number; what?: string } = {},
): Promise<T> {
  const interval = opts.intervalMs ?? 50;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const v = await predicate();
      if (v) return v;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() >= deadline) {
      const why = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
      throw new Error(`waitFor: ${opts.what ?? 'condition'} not met within ${timeoutMs} ms${why}`);
    }
    await delay(interval);
  }
}

export interface ServerHandle {
  /** 0 for a unix-socket server. */
  port: number;
  /** For unix-socket servers. */
  socketPath?: string;
  /** Pid of the server's main process (for nbd-server: the daemon, read from its pid file). */
  pid: number;
  /** The server's output so far (nbd-server logs nothing here once daemonised). */
  log(): string;
  /** SIGTERM, then SIGKILL after 5 s; resolves when it is gone. Safe to call twice. */
  stop(): Promise<void>;
  /** Sends `signal` (default SIGKILL) to the server and its per-connection children. */
  kill(signal?: NodeJS.Signals): void;
  /** Resolves when the main process has exited. */
  exited(): Promise<void>;
  /** Stops it if running and starts the same command on the same port. */
  restart(): Promise<void>;
}

/**
 * While a test's load runs: SIGKILL the server, wait `pauseMs`, start it again on the same port.
 * Not awaited by the caller; `events` records 'killed', 'restarted' or the failure for its asserts.
 */
export function killAndRestart(server: ServerHandle, events: string[], pauseMs = 3_000): void {
  void (async () => {
    server.kill('SIGKILL');
    await server.exited();
    events.push('killed');
    await delay(pauseMs);
    await server.restart();
    events.push('restarted');
  })().catch((e: Error) => events.push(`restart failed: ${e.message}`));
}

const liveServers = new Set<ServerHandle>();
const livePids = new Set<number>();
process.on('exit', () => {
  for (const pid of livePids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
});

function pidAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z /s.test(stat);
  } catch {
    return false;
  }
}

function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

export interface Launch {
  name: string;
  file: string;
  args: (port: number) => string[] | Promise<string[]>;
  /** A unix-socket server: it is ready when this path exists (no port is picked). */
  socketPath?: string;
  /** For daemons: read the main pid (e.g. from a pid file) once the port listens. */
  mainPid?: () => Promise<number>;
  /** How long to wait for the port to listen (default 15 s). */
  startTimeoutMs?: number;
}

class Server implements ServerHandle {
  pid = -1;
  private output = '';
  private child: ChildProcess | undefined;
  private childExit: Promise<void> = Promise.resolve();
  private childCode: number | null = null;
  private childDone = true;

  readonly socketPath: string | undefined;
  constructor(
    private readonly launch: Launch,
    readonly port: number,
  ) {
    this.socketPath = launch.socketPath;
  }

  /** Spawns the server and waits until the port listens; throws with the server's output. */
  async start(): Promise<void> {
    const { launch, port } = this;
    const args = await launch.args(port);
    debug('start %s %o', launch.file, args);
    this.output = '';
    const child = spawn(launch.file, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    this.childDone = false;
    this.childCode = null;
    const collect = (b: Buffer): void => {
      this.output = (this.output + b.toString('utf8')).slice(-64 * 1024);
    };
    child.stdout?.on('data', collect);
    child.stderr?.on('data', collect);
    let spawnError: Error | undefined;
    child.on('error', (e) => {
      spawnError = e;
    });
    this.childExit = new Promise<void>((resolve) =>
      child.on('exit', (code) => {
        this.childDone = true;
        this.childCode = code;
        resolve();
      }),
    );
    if (child.pid !== undefined) livePids.add(child.pid);
    try {
      await waitFor(
        async () => {
          if (spawnError) throw spawnError;
          if (isListening(port, launch.socketPath)) return true;
          // A daemon's launcher exits 0 once it has forked; anything else before listening is fatal.
          if (this.childDone && (!launch.mainPid || this.childCode !== 0)) {
            throw new Error(`exited (code ${this.childCode}) before listening`);
          }
          return false;
        },
        launch.startTimeoutMs ?? 15_000,
        { what: `${launch.name} listening on ${launch.socketPath ?? `127.0.0.1:${port}`}`, intervalMs: 25 },
      );
      this.pid = launch.mainPid ? await launch.mainPid() : (child.pid ?? -1);
      if (!launch.socketPath && !listenerHeldBy(port, [this.pid, child.pid ?? -1])) {
        throw new Error(`127.0.0.1:${port} is held by another process, not by the server started`);
      }
    } catch (e) {
      child.kill('SIGKILL');
      throw new Error(`${launch.name} ${args.join(' ')}: ${(e as Error).message}\n${this.output}`);
    }
    livePids.add(this.pid);
  }

  log(): string {
    return this.output;
  }

  private running(): boolean {
    return this.launch.mainPid ? this.pid > 0 && pidAlive(this.pid) : !this.childDone;
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): void {
    if (this.pid <= 0) return;
    for (const p of [this.pid, ...childrenOf(this.pid)]) {
      try {
        process.kill(p, signal);
      } catch {
        /* gone */
      }
    }
  }

  async exited(): Promise<void> {
    if (!this.launch.mainPid) return this.childExit;
    const pid = this.pid;
    await waitFor(() => !pidAlive(pid), 3_600_000, { what: `${this.launch.name} pid ${pid} exit`, intervalMs: 25 });
  }

  async stop(): Promise<void> {
    if (this.running()) {
      this.kill('SIGTERM');
      const gone = await Promise.race([this.exited().then(() => true), delay(5_000).then(() => false)]);
      if (!gone) {
        this.kill('SIGKILL');
        await this.exited();
      }
    }
    liveServers.delete(this);
    livePids.delete(this.pid);
    if (this.child?.pid !== undefined) livePids.delete(this.child.pid);
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
    liveServers.add(this);
  }
}

/** Start any server command; the port is picked here (free a moment ago; retried if it was taken). */
export async function startServer(launch: Launch): Promise<ServerHandle> {
  let lastError: Error | undefined;
  for (let attempt = 0; attempt < 3; attempt++) {
    const server = new Server(launch, launch.socketPath ? 0 : await freePort());
    try {
      await server.start();
      liveServers.add(server);
      return server;
    } catch (e) {
      lastError = e as Error; // most likely the port was taken in between: try another
    }
  }
  throw lastError ?? new Error(`${launch.name}: could not start`);
}

/**
 * nbdkit in the foreground on 127.0.0.1 and a free port; `args` are what follows the options,
 * e.g. `['memory', '64M']` or `['--filter=delay', 'memory', '64M', 'delay-read=1']`.
 */
export function startNbdkit(args: readonly string[]): Promise<ServerHandle> {
  return startServer({
    name: 'nbdkit',
    file: 'nbdkit',
    args: (port) => ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), ...args],
  });
}

/**
 * Debian's nbd-server with this configuration: export sections (and optionally a [generic]
 * section, minus port/listenaddr, which are set here). Runs as root, daemonised; `pid` is the
 * daemon's and kill() also reaches the per-connection children.
 */
export async function startNbdServer(configText: string): Promise<ServerHandle> {
  const dir = tmpDir('nbd-server-');
  const pidFile = join(dir, 'nbd-server.pid');
  const confFile = join(dir, 'config');
  return startServer({
    name: 'nbd-server',
    file: 'nbd-server',
    async args(port) {
      const injected = `port = ${port}\nlistenaddr = 127.0.0.1\n`;
      const text = /^\s*\[generic\]\s*$/m.test(configText)
        ? configText.replace(/^\s*\[generic\]\s*$/m, (h) => `${h}\n${injected}`)
        : `[generic]\n${injected}\n${configText}`;
      await rm(pidFile, { force: true });
      await writeFile(confFile, text);
      return ['-C', confFile, '-p', pidFile];
    },
    async mainPid() {
      const text = await waitFor(
        async () => (existsSync(pidFile) ? (await readFile(pidFile, 'utf8')).trim() : ''),
        5_000,
        { what: 'nbd-server pid file' },
      );
      return Number(text);
    },
  });
}

/**
 * qemu-nbd on 127.0.0.1 and a free port; `args` follow `-b/-p`, e.g. `['-f', 'raw', '-t', file]`.
 * Without -t/--persistent it serves one client and exits.
 */
export function startQemuNbd(args: readonly string[]): Promise<ServerHandle> {
  return startServer({
    name: 'qemu-nbd',
    file: 'qemu-nbd',
    args: (port) => ['-b', '127.0.0.1', '-p', String(port), ...args],
  });
}

/**
 * Our own server, `nbd-attach serve`, on 127.0.0.1 and a free port; `args` follow `serve`, e.g.
 * `[file]` or `['--memory', '64M']`.
 */
export function startOurServer(args: readonly string[]): Promise<ServerHandle> {
  return startServer({
    name: 'nbd-attach serve',
    file: process.execPath,
    args: (port) => [...CLI_ARGS, 'serve', '--port', String(port), ...args],
    startTimeoutMs: 120_000, // Node start-up under software emulation
  });
}

/** Stops every server started here (kernel tests' cleanup() and any test's after()). */
export async function stopAllServers(): Promise<void> {
  for (const s of [...liveServers]) await s.stop().catch(() => {});
}

/** A file of `size` bytes (sparse). */
export function sparseFile(dir: string, name: string, size: number): string {
  const p = path.join(dir, name);
  writeFileSync(p, '');
  truncateSync(p, size);
  return p;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run the real CLI (CLI_ARGS) with a hard time limit. */
export function runCli(args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...CLI_ARGS, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...opts.env },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const t = setTimeout(() => {
      stderr += '\n[test: killed after time limit]';
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 30_000);
    child.once('close', (code, signal) => {
      clearTimeout(t);
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr });
    });
  });
}

/**
 * A CA and a server certificate for 127.0.0.1/localhost signed by it, laid out as nbdkit, qemu and
 * libnbd expect an X.509 directory (ca-cert.pem, server-cert.pem, server-key.pem).
 */
export function makePki(where: string, opts: { ec?: boolean } = {}): string {
  const pki = path.join(where, 'pki');
  mkdirSync(pki);
  const ssl = (args: string[]): void => {
    const r = spawnSync('openssl', args, { cwd: pki, encoding: 'utf8', timeout: 30_000 });
    if (r.error) throw r.error;
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
  };
  // EC P-256 keys take milliseconds where RSA 2048 can take tens of seconds under software emulation.
  const key = opts.ec ? ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'] : ['-newkey', 'rsa:2048'];
  ssl(['req', '-x509', ...key, '-nodes', '-days', '2', '-subj', '/CN=nbd-attach test CA', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem']);
  ssl(['req', ...key, '-nodes', '-subj', '/CN=localhost', '-keyout', 'server-key.pem', '-out', 'server.csr']);
  writeFileSync(path.join(pki, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  ssl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', '2', '-extfile', 'ext.cnf', '-out', 'server-cert.pem']);
  // A client certificate too (libnbd and qemu present client-cert.pem/client-key.pem when the directory has them).
  ssl(['req', ...key, '-nodes', '-subj', '/CN=nbd-attach test client', '-keyout', 'client-key.pem', '-out', 'client.csr']);
  writeFileSync(path.join(pki, 'client-ext.cnf'), 'extendedKeyUsage=clientAuth\n');
  ssl(['x509', '-req', '-in', 'client.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', '2', '-extfile', 'client-ext.cnf', '-out', 'client-cert.pem']);
  return pki;
}

/** Read exactly n bytes from a socket (flowing), leaving any surplus unshifted; rejects if it closes first. */
export function readExact(socket: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let have = 0;
    const onData = (d: Buffer): void => {
      parts.push(d);
      have += d.length;
      if (have >= n) {
        socket.off('data', onData);
        socket.off('close', onClose);
        socket.pause();
        const all = Buffer.concat(parts);
        if (all.length > n) socket.unshift(all.subarray(n));
        resolve(all.subarray(0, n));
      }
    };
    const onClose = (): void => reject(new Error(`closed after ${have}/${n} bytes`));
    socket.on('data', onData);
    socket.once('close', onClose);
    socket.resume();
  });
}
