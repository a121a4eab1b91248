// Real NBD servers for tests: nbdkit, nbd-server, qemu-nbd (Debian packages), started on loopback
// with a free port, waited for until they accept, and always stopped by the caller's `stop()`.
// Used by the interop tests on the host and by the kernel tests inside the VM.

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface RunningServer {
  port: number;
  /** For unix-socket servers. */
  socketPath?: string;
  pid: number;
  /** Output so far, for failure messages. */
  log(): string;
  kill(signal?: NodeJS.Signals): void;
  /** SIGTERM, then SIGKILL after 3 s; resolves when the process is gone. */
  stop(): Promise<void>;
}

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
function isListening(port: number, socketPath?: string): boolean {
  if (port === 0 && !socketPath) return false;
  if (socketPath) return existsSync(socketPath);
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try {
      text = readFileSync(file, 'utf8');
    } catch {
      continue;
    }
    // columns: sl local_address rem_address st …; st 0A = LISTEN
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols[1]?.endsWith(`:${hex}`) && cols[3] === '0A') return true;
    }
  }
  return false;
}

/** Spawn a server and wait (bounded) until its port accepts connections. */
export async function startServer(cmd: string, args: string[], opts: { port: number; socketPath?: string; timeoutMs?: number }): Promise<RunningServer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  let exited = false;
  const gone = new Promise<void>((resolve) => child.once('exit', () => { exited = true; resolve(); }));
  child.once('error', (e) => (out += `spawn error: ${e.message}`));
  const server: RunningServer = {
    port: opts.port,
    ...(opts.socketPath ? { socketPath: opts.socketPath } : {}),
    pid: child.pid ?? 0,
    log: () => out,
    kill: (signal = 'SIGKILL') => { if (!exited) child.kill(signal); },
    stop: async () => {
      if (exited) return;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 3000);
      await gone;
      clearTimeout(t);
    },
  };
  const deadline = Date.now() + (opts.timeoutMs ?? 15_000);
  while (Date.now() < deadline) {
    if (exited) throw new Error(`${cmd} exited before listening: ${out.trim()}`);
    if (isListening(opts.port, opts.socketPath)) return server;
    await new Promise((r) => setTimeout(r, 50));
  }
  await server.stop();
  throw new Error(`${cmd} did not listen on ${opts.socketPath ?? opts.port} within the time limit: ${out.trim()}`);
}

/** nbdkit on 127.0.0.1 with a free port; `args` are the plugin and its parameters (and any extra flags). */
export async function startNbdkit(args: string[], flags: string[] = []): Promise<RunningServer> {
  const port = await freePort();
  return startServer('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), ...flags, ...args], { port });
}

export interface NbdServerExport {
  name: string;
  file: string;
  readonly?: boolean;
}

/** nbd-server (the reference server) with a config file of named exports. */
export async function startNbdServer(exports: NbdServerExport[], generic: Record<string, string> = {}): Promise<RunningServer> {
  const port = await freePort();
  const dir = tmpDir('nbd-server-');
  const lines = ['[generic]', `port = ${port}`, 'listenaddr = 127.0.0.1', ...Object.entries(generic).map(([k, v]) => `${k} = ${v}`)];
  for (const e of exports) {
    lines.push(`[${e.name}]`, `exportname = ${e.file}`);
    if (e.readonly) lines.push('readonly = true');
  }
  const config = path.join(dir, 'config');
  writeFileSync(config, `${lines.join('\n')}\n`);
  // Not -d: in the foreground nbd-server serves one transmission session and exits (and exits when a
  // client drops mid-negotiation). As a daemon it forks per client, like in production; we track it by
  // its pid file and kill its whole session (it calls setsid) when done.
  const pidFile = path.join(dir, 'pid');
  const launcher = spawn('nbd-server', ['-C', config, '-p', pidFile], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  launcher.stdout!.on('data', (d) => (out += d));
  launcher.stderr!.on('data', (d) => (out += d));
  await new Promise<void>((resolve) => launcher.once('exit', () => resolve()));
  const deadline = Date.now() + 15_000;
  let pid = 0;
  while (Date.now() < deadline) {
    if (!pid && existsSync(pidFile)) pid = Number(readFileSync(pidFile, 'utf8').trim()) || 0;
    if (pid && isListening(port)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const alive = (): boolean => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  const signal = (sig: NodeJS.Signals) => {
    for (const target of [-pid, pid]) {
      try {
        process.kill(target, sig);
      } catch {
        /* already gone */
      }
    }
  };
  const server: RunningServer = {
    port,
    pid,
    log: () => out,
    kill: (sig = 'SIGKILL') => signal(sig),
    stop: async () => {
      if (!pid) return;
      signal('SIGTERM');
      for (let i = 0; i < 60 && alive(); i++) await new Promise((r) => setTimeout(r, 50));
      if (alive()) signal('SIGKILL');
    },
  };
  if (!pid || !isListening(port)) {
    await server.stop();
    throw new Error(`nbd-server did not listen on ${port} within the time limit: ${out.trim()}`);
  }
  return server;
}

/** qemu-nbd serving one raw file under `name`, persistent (-t), on 127.0.0.1. */
export async function startQemuNbd(file: string, name: string, extra: string[] = []): Promise<RunningServer> {
  const port = await freePort();
  return startServer('qemu-nbd', ['-f', 'raw', '-t', '-b', '127.0.0.1', '-p', String(port), '-x', name, ...extra, file], { port });
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

/** Run the real CLI (`bin/nbd-attach.js`) with a hard time limit. */
export function runCli(args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(REPO, 'bin/nbd-attach.js'), ...args], {
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
export function makePki(where: string): string {
  const pki = path.join(where, 'pki');
  mkdirSync(pki);
  const ssl = (args: string[]): void => {
    const r = spawnSync('openssl', args, { cwd: pki, encoding: 'utf8', timeout: 30_000 });
    if (r.error) throw r.error;
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
  };
  ssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=nbd-attach test CA', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem']);
  ssl(['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', 'server-key.pem', '-out', 'server.csr']);
  writeFileSync(path.join(pki, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  ssl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', '2', '-extfile', 'ext.cnf', '-out', 'server-cert.pem']);
  // A client certificate too (libnbd and qemu present client-cert.pem/client-key.pem when the directory has them).
  ssl(['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=nbd-attach test client', '-keyout', 'client-key.pem', '-out', 'client.csr']);
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
