// `npm run bench` (test/bench.sh boots the test VM and runs this inside, as root).
// Every figure is printed next to the same measurement of the reference in the same run, as a ratio:
// absolute numbers under software emulation mean little (docs/decisions.md, "Benchmarks").
//
//  1. attach/detach latency: nbd-attach vs nbd-client, same nbdkit server.
//  2. throughput through the kernel (fio, O_DIRECT): our client vs nbd-client on the same server.
//  3. our built-in server vs nbd-server and nbdkit file, same image, same client (nbd-client), same fio jobs
//     (issue: ≥ 1.0× nbd-server, ≥ 0.9× nbdkit file).
//  4. reconnect: median time from the server accepting again to fresh I/O completing (target ≤ 1 s at
//     default settings), and the worst stall of I/O across the outage.
//  5. TLS throughput: our client's kernel TLS (and relay) vs nbd-client's TLS proxy (-x), same nbdkit
//     --tls=require, and vs our own plain TCP.
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadNbd, mustRun, run, requireGuest, startNbdkit, startNbdServer, startOurServer, tmpDir, tmpFile, waitFor, cleanup, type ServerHandle } from '../kernel/lib.ts';
import { makePki } from '../lib/servers.ts';
import { writeBenchResults } from './report.ts';

requireGuest();
const CLI = join(process.cwd(), 'dist/nbd-attach.mjs'); // built on the host by test/vm/run.sh
const REPS = Number(process.env.BENCH_REPS ?? 5);
const FIO_SECONDS = Number(process.env.BENCH_FIO_SECONDS ?? 5);
const MiB = 1024 * 1024;
const results: string[] = [];

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? (s[(s.length - 1) >> 1]! + s[s.length >> 1]!) / 2 : NaN;
};
const ratio = (a: number, b: number): string => (b > 0 ? `${(a / b).toFixed(2)}×` : 'n/a');
function report(line: string): void {
  results.push(line);
  process.stdout.write(`bench: ${line}\n`);
}

/** Wall and CPU (user+sys) milliseconds of one command, and its output. */
interface Timed {
  wall: number;
  cpu: number;
  stdout: string;
  stderr: string;
}

/**
 * Run a command under bash and read its CPU time from bash's `times` (user and sys of the waited-for
 * child; a detached supervisor is not counted). CPU time is steadier than wall time when other
 * work shares the machine. The last stderr line is `times`' children line, removed from the output.
 */
async function timedRun(file: string, args: string[], opts: { env?: NodeJS.ProcessEnv; anyExit?: boolean } = {}): Promise<Timed> {
  const script = '"$@"; rc=$?; times >&2; exit $rc';
  const t0 = performance.now();
  const r = await run('bash', ['-c', script, 'bash', file, ...args], { timeoutMs: 120_000, ...(opts.env ? { env: opts.env } : {}) });
  const wall = performance.now() - t0;
  const lines = r.stderr.trimEnd().split('\n');
  const m = /^(\d+)m([\d.]+)s (\d+)m([\d.]+)s$/.exec(lines.at(-1) ?? '');
  if (!m) throw new Error(`bench: no CPU times from ${file} ${args.join(' ')}: ${r.stderr}`);
  const cpu = (Number(m[1]) * 60 + Number(m[2]) + Number(m[3]) * 60 + Number(m[4])) * 1000;
  const stderr = lines.slice(0, -2).join('\n');
  if (!opts.anyExit && r.code !== 0) throw new Error(`bench: ${file} ${args.join(' ')} exited ${r.code}: ${stderr}`);
  return { wall, cpu, stdout: r.stdout, stderr };
}

/** Start-up targets: attach ≤ 3×, detach and check ≤ 2.5× nbd-client; --version ≤ 1.25× `node -e 0`; idle supervisor ≤ 45 MB. */
const TARGETS = { attach: 3, detach: 2.5, check: 2.5, version: 1.25, rssMB: 45 };
const verdict = (r: number, max: number): string => (r <= max ? `target ≤ ${max}×: met` : `target ≤ ${max}×: NOT met`);

async function attachLatency(): Promise<void> {
  const srv = await startNbdkit(['memory', '64M']);
  const m = {
    attach: [] as Timed[], refAttach: [] as Timed[], detach: [] as Timed[], refDetach: [] as Timed[],
    check: [] as Timed[], refCheck: [] as Timed[], node: [] as Timed[], version: [] as Timed[],
  };
  const rss: number[] = [];
  const timings: string[] = [];
  for (let i = 0; i < REPS; i++) {
    // Alternating, same server: nbd-client, then ours.
    m.refAttach.push(await timedRun('nbd-client', ['127.0.0.1', String(srv.port), '/dev/nbd0']));
    m.refCheck.push(await timedRun('nbd-client', ['-c', '/dev/nbd0'], { anyExit: true }));
    m.refDetach.push(await timedRun('nbd-client', ['-d', '/dev/nbd0']));
    const a = await timedRun(process.execPath, [CLI, '127.0.0.1', String(srv.port), '/dev/nbd0'], { env: { ...process.env, NBD_ATTACH_TIMING: '1' } });
    m.attach.push(a);
    const t = /^timing: .*$/m.exec(a.stderr)?.[0];
    if (t) timings.push(t);
    const pid = Number(/supervisor pid (\d+)/.exec(a.stdout)?.[1]);
    m.check.push(await timedRun(process.execPath, [CLI, '-c', '/dev/nbd0'], { anyExit: true }));
    // The supervisor has started when it has loaded koffi (netlink subscription, socket checks);
    // then it settles (idle). Measured earlier, a supervisor still loading looks smaller.
    const t0 = Date.now();
    while (!readFileSync(`/proc/${pid}/maps`, 'utf8').includes('koffi') && Date.now() - t0 < 60_000) await new Promise((r) => setTimeout(r, 200));
    await new Promise((r) => setTimeout(r, 3000));
    const kb = Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
    if (kb > 0) rss.push(kb / 1024);
    m.detach.push(await timedRun(process.execPath, [CLI, '-d', '/dev/nbd0']));
    m.node.push(await timedRun(process.execPath, ['-e', '0']));
    m.version.push(await timedRun(process.execPath, [CLI, '--version']));
  }
  const wall = (xs: Timed[]): number => median(xs.map((x) => x.wall));
  const cpu = (xs: Timed[]): number => median(xs.map((x) => x.cpu));
  const line = (what: string, a: Timed[], b: Timed[], refName: string, max: number): void => {
    const r = wall(a) / wall(b);
    const runs = (xs: Timed[]): string => xs.map((x) => x.wall.toFixed(0)).join(', ');
    report(
      `${what.padEnd(9)} median ${wall(a).toFixed(0)} ms vs ${refName} ${wall(b).toFixed(0)} ms = ${ratio(wall(a), wall(b))} (${verdict(r, max)}); ` +
        `CPU ${cpu(a).toFixed(0)} ms vs ${cpu(b).toFixed(0)} ms = ${ratio(cpu(a), cpu(b))} (runs: ${runs(a)} vs ${runs(b)})`,
    );
  };
  line('attach', m.attach, m.refAttach, 'nbd-client', TARGETS.attach);
  line('detach', m.detach, m.refDetach, 'nbd-client', TARGETS.detach);
  line('check', m.check, m.refCheck, 'nbd-client -c', TARGETS.check);
  line('--version', m.version, m.node, 'node -e 0', TARGETS.version);
  // The floor: starting Node at all, against nbd-client's whole attach, check and detach.
  report(
    `floor: node -e 0 median ${wall(m.node).toFixed(0)} ms (CPU ${cpu(m.node).toFixed(0)} ms) = ` +
      `${ratio(wall(m.node), wall(m.refAttach))} nbd-client's attach, ${ratio(wall(m.node), wall(m.refCheck))} its check, ${ratio(wall(m.node), wall(m.refDetach))} its detach (wall); ` +
      `CPU ${ratio(cpu(m.node), cpu(m.refAttach))}, ${ratio(cpu(m.node), cpu(m.refCheck))}, ${ratio(cpu(m.node), cpu(m.refDetach))}`,
  );
  // The RSS floor: an idle Node that loaded nothing (most of it is the node binary's own pages).
  const idle = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)'], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 3000));
  const idleKb = Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${idle.pid}/status`, 'utf8'))?.[1]);
  idle.kill('SIGKILL');
  report(`supervisor idle RSS median ${median(rss).toFixed(1)} MB (target ≤ ${TARGETS.rssMB} MB: ${median(rss) <= TARGETS.rssMB ? 'met' : 'NOT met'}; runs: ${rss.map((x) => x.toFixed(1)).join(', ')}); an idle \`node -e\` ${(idleKb / 1024).toFixed(1)} MB`);
  // Where an attach's time goes (the last run; NBD_ATTACH_TIMING): Node start is `node -e 0`'s median.
  // Where an attach's time goes (NBD_ATTACH_TIMING): the median of each step over the runs.
  const steps = new Map<string, number[]>();
  for (const t of timings) {
    for (const part of t.replace(/^timing: /, '').replace(/ \(total.*$/, '').split(', ')) {
      const pm = /^(.*?) \+?(\d+) ms$/.exec(part);
      if (pm) steps.set(pm[1]!, [...(steps.get(pm[1]!) ?? []), Number(pm[2])]);
    }
  }
  if (steps.size) {
    const parts = [...steps].map(([name, xs]) => `${name} ${median(xs).toFixed(0)} ms`);
    report(`attach breakdown, medians of ${timings.length} (node -e 0 takes ${wall(m.node).toFixed(0)} ms of "loaded"): ${parts.join(', ')}`);
  }
  await srv.stop();
}

interface FioResult {
  readMBs: number;
  writeMBs: number;
  readIops: number;
  writeIops: number;
}
const JOBS: { name: string; rw: string; bs: string; depth: number }[] = [
  { name: 'seq-read-1M', rw: 'read', bs: '1M', depth: 4 },
  { name: 'seq-write-1M', rw: 'write', bs: '1M', depth: 4 },
  { name: 'rand-read-4k-qd16', rw: 'randread', bs: '4k', depth: 16 },
  { name: 'rand-write-4k-qd16', rw: 'randwrite', bs: '4k', depth: 16 },
];

async function fio(dev: string, job: (typeof JOBS)[number], seconds = FIO_SECONDS): Promise<FioResult> {
  const r = await mustRun('fio', [
    '--name=b', `--filename=${dev}`, `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.depth}`, '--ioengine=libaio', '--direct=1',
    '--size=48M', '--time_based', `--runtime=${seconds}`, '--output-format=json',
  ], { timeoutMs: (seconds + 60) * 1000 });
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  return { readMBs: j.read.bw / 1024, writeMBs: j.write.bw / 1024, readIops: j.read.iops, writeIops: j.write.iops };
}
const figure = (job: (typeof JOBS)[number], r: FioResult): number =>
  job.bs === '4k' ? (job.rw.includes('read') ? r.readIops : r.writeIops) : job.rw.includes('read') ? r.readMBs : r.writeMBs;
const unit = (job: (typeof JOBS)[number]): string => (job.bs === '4k' ? 'IOPS' : 'MB/s');

/** nbd-client 127.0.0.1 PORT DEV [-N NAME] [EXTRA…]: attach a device for fio. */
async function nbdClientAttach(port: number, name: string, dev: string, extra: readonly string[] = []): Promise<void> {
  await mustRun('nbd-client', ['127.0.0.1', String(port), dev, ...(name ? ['-N', name] : []), ...extra], { timeoutMs: 60_000 });
}

async function withNbdClient<T>(port: number, name: string, fn: (dev: string) => Promise<T>, extra: readonly string[] = []): Promise<T> {
  await nbdClientAttach(port, name, '/dev/nbd2', extra);
  try {
    return await fn('/dev/nbd2');
  } finally {
    await run('nbd-client', ['-d', '/dev/nbd2'], { timeoutMs: 60_000 });
  }
}

async function withNbdAttach<T>(port: number, fn: (dev: string) => Promise<T>, extra: readonly string[] = []): Promise<T> {
  await mustRun(process.execPath, [CLI, '127.0.0.1', String(port), '/dev/nbd3', ...extra], { timeoutMs: 60_000 });
  try {
    return await fn('/dev/nbd3');
  } finally {
    await run(process.execPath, [CLI, '-d', '/dev/nbd3'], { timeoutMs: 60_000 });
  }
}

async function clientThroughput(): Promise<void> {
  const srv = await startNbdkit(['memory', '64M']);
  for (const job of JOBS) {
    const ref = figure(job, await withNbdClient(srv.port, '', (d) => fio(d, job)));
    const ours = figure(job, await withNbdAttach(srv.port, (d) => fio(d, job)));
    report(`client ${job.name.padEnd(19)} nbd-attach ${ours.toFixed(0)} vs nbd-client ${ref.toFixed(0)} ${unit(job)} = ${ratio(ours, ref)}`);
  }
  await srv.stop();
}

/**
 * The same fio jobs over TLS, one nbdkit --tls=require: ours with kernel TLS (the default) against
 * nbd-client's TLS proxy (issue: ≥ 3× for 1 MiB sequential, ≥ 2× for 4 KiB QD16) and against our own
 * plain TCP to a plain nbdkit (≥ 0.8× for 1 MiB sequential); ours through the relay (--tls-relay) as well.
 */
/** The kernel's driver for an algorithm: the highest-priority entry of /proc/crypto with that name. */
function cryptoDriver(name: string): string {
  let best = { driver: 'none', priority: -1 };
  for (const block of readFileSync('/proc/crypto', 'utf8').split('\n\n')) {
    const f = Object.fromEntries(block.split('\n').map((l) => l.split(/\s*:\s*/, 2) as [string, string]));
    if (f.name === name && Number(f.priority) > best.priority) best = { driver: f.driver ?? '?', priority: Number(f.priority) };
  }
  return best.driver;
}

async function tlsThroughput(): Promise<void> {
  // On a real machine udev loads the modules matching the CPU's modalias at boot (aesni_intel among
  // them: Debian's kernel builds the generic AES in, so nothing else asks for it); the test VM has no
  // udev, so the bench does what udev would before measuring kernel TLS.
  const cpu = readFileSync('/sys/devices/system/cpu/modalias', 'utf8').trim();
  await run('modprobe', ['-a', '-q', cpu], { timeoutMs: 600_000 });
  report(`tls ciphers: gcm(aes) by ${cryptoDriver('gcm(aes)')}, aes by ${cryptoDriver('aes')}, rfc7539(chacha20,poly1305) by ${cryptoDriver('rfc7539(chacha20,poly1305)')} (CPU modules loaded as udev would)`);
  const pki = makePki(await tmpDir('pki-'), { ec: true });
  const ca = join(pki, 'ca-cert.pem');
  const srv = await startNbdkit(['--tls=require', `--tls-certificates=${pki}`, 'memory', '64M']);
  const plain = await startNbdkit(['memory', '64M']);
  for (const job of JOBS) {
    const ref = figure(job, await withNbdClient(srv.port, '', (d) => fio(d, job), ['-x', '-A', ca]));
    const ours = figure(job, await withNbdAttach(srv.port, (d) => fio(d, job), ['-x', '-A', ca]));
    const relay = figure(job, await withNbdAttach(srv.port, (d) => fio(d, job), ['-x', '-A', ca, '--tls-relay']));
    const tcp = figure(job, await withNbdAttach(plain.port, (d) => fio(d, job)));
    const target = job.bs === '4k' ? '(target ≥ 2×)' : '(target ≥ 3×)';
    report(`tls ${job.name.padEnd(22)} kernel TLS ${ours.toFixed(0)} vs nbd-client -x ${ref.toFixed(0)} ${unit(job)} = ${ratio(ours, ref)} ${target}`);
    report(`tls ${job.name.padEnd(22)} kernel TLS ${ours.toFixed(0)} vs our plain TCP ${tcp.toFixed(0)} ${unit(job)} = ${ratio(ours, tcp)}${job.bs === '1M' ? ' (target ≥ 0.8×)' : ''}`);
    report(`tls ${job.name.padEnd(22)} relay ${relay.toFixed(0)} vs nbd-client -x ${ref.toFixed(0)} ${unit(job)} = ${ratio(relay, ref)}`);
  }
  await srv.stop();
  await plain.stop();
}

/**
 * All three servers run at once on the same image, each attached once through nbd-client (its own
 * /dev/nbdN, one connection held for the whole comparison, as a user's would be). Every server gets
 * the same unmeasured warm-up first: BENCH_SERVER_WARM seconds (default 12) of each fio job. Ours
 * needs that long under emulation: V8 optimizes its hot path over the first ~15 s of traffic
 * (docs/decisions.md, "Benchmarks"); the C servers start optimized. Then each fio job is measured on
 * each server in turn, SERVER_REPS times with the order rotated, and the median is reported: single
 * runs in the emulated VM vary by ±30%, more than the differences being measured.
 */
const SERVER_REPS = Number(process.env.BENCH_SERVER_REPS ?? 5);
const SERVER_WARM = Number(process.env.BENCH_SERVER_WARM ?? 12);

/**
 * The image of the server comparison: a file on the guest's /tmp (tmpfs: the original benchmark, where
 * our server receives large WRITEs straight into the file's pages), or on ext4, as most users' images
 * are (a file system on a loop device over a tmpfs file, so no disk speed enters the figures).
 */
async function serverImage(where: 'tmpfs' | 'ext4'): Promise<{ img: string; release(): Promise<void> }> {
  if (where === 'tmpfs') return { img: await tmpFile(64 * MiB, { name: 'bench.img' }), release: async () => {} };
  await run('modprobe', ['loop'], { timeoutMs: 30_000 });
  const backing = await tmpFile(256 * MiB, { name: 'ext4.raw' });
  const loop = (await mustRun('losetup', ['--find', '--show', backing], { timeoutMs: 30_000 })).stdout.trim();
  const mnt = await tmpDir('ext4-');
  try {
    // The new file reads as zeros: no zeroing by mkfs, and none in the background while measuring
    // (noinit_itable). The loop device refuses the few WRITE_ZEROES mkfs still tries (kernel log lines).
    await mustRun('mkfs.ext4', ['-q', '-E', 'lazy_itable_init=1,lazy_journal_init=1,nodiscard', loop], { timeoutMs: 120_000 });
    await mustRun('mount', ['-o', 'noinit_itable', loop, mnt], { timeoutMs: 30_000 });
  } catch (e) {
    await run('losetup', ['-d', loop], { timeoutMs: 30_000 });
    throw e;
  }
  const img = join(mnt, 'bench.img');
  await mustRun('truncate', ['-s', String(64 * MiB), img], { timeoutMs: 30_000 });
  return {
    img,
    release: async () => {
      await run('umount', [mnt], { timeoutMs: 60_000 });
      await run('losetup', ['-d', loop], { timeoutMs: 30_000 });
    },
  };
}

async function serverThroughput(where: 'tmpfs' | 'ext4'): Promise<void> {
  const { img, release } = await serverImage(where);
  const label = where === 'tmpfs' ? 'server' : 'server-ext4';
  // Targets are printed for the benchmark's image as first measured (tmpfs); the ext4 run gives the same ratios for a disk file system's image.
  const target = (t: string): string => (where === 'tmpfs' ? ` (target ≥ ${t}×)` : '');
  const defs: { name: string; start(): Promise<{ port: number; stop(): Promise<void> }>; export: string; dev: string }[] = [
    { name: 'nbd-attach serve', start: () => startOurServer([`disk=${img}`]), export: 'disk', dev: '/dev/nbd2' },
    { name: 'nbd-server', start: async () => startNbdServer(`[disk]\nexportname = ${img}\n`) as Promise<ServerHandle>, export: 'disk', dev: '/dev/nbd4' },
    { name: 'nbdkit file', start: () => startNbdkit(['file', img]), export: '', dev: '/dev/nbd5' },
  ];
  const servers: { name: string; dev: string; srv: { port: number; stop(): Promise<void> } }[] = [];
  try {
    for (const d of defs) {
      const srv = await d.start();
      servers.push({ name: d.name, dev: d.dev, srv });
      await nbdClientAttach(srv.port, d.export, d.dev);
    }
    for (const s of servers) for (const job of JOBS) await fio(s.dev, job, SERVER_WARM);
    const runs = new Map<string, number[]>(); // "server/job" -> figures
    for (let rep = 0; rep < SERVER_REPS; rep++) {
      for (const job of JOBS) {
        for (let k = 0; k < servers.length; k++) {
          const s = servers[(k + rep) % servers.length]!;
          const key = `${s.name}/${job.name}`;
          if (!runs.has(key)) runs.set(key, []);
          runs.get(key)!.push(figure(job, await fio(s.dev, job)));
        }
      }
    }
    const med = (server: string, job: string): number => median(runs.get(`${server}/${job}`)!);
    for (const job of JOBS) {
      const ours = med('nbd-attach serve', job.name);
      const ns = med('nbd-server', job.name);
      const nk = med('nbdkit file', job.name);
      report(
        `${label} ${job.name.padEnd(19)} ours ${ours.toFixed(0)} ${unit(job)}; nbd-server ${ns.toFixed(0)} = ${ratio(ours, ns)}${target('1.0')}; nbdkit file ${nk.toFixed(0)} = ${ratio(ours, nk)}${target('0.9')}; medians of ${SERVER_REPS} after ${SERVER_WARM} s warm-up (runs: ${servers.map((s) => `${s.name} ${runs.get(`${s.name}/${job.name}`)!.map((x) => x.toFixed(0)).join(', ')}`).join('; ')})`,
      );
    }
  } finally {
    for (const s of servers) await run('nbd-client', ['-d', s.dev], { timeoutMs: 60_000 });
    for (const s of servers) await s.srv.stop();
    await release();
  }
}

/**
 * A prober child writes 4 KiB O_DSYNC at rotating offsets and prints a timestamp per completion.
 * The server is SIGKILLed, restarted on the same port after `downMs`, and we measure from its
 * listening again to the prober's first completion after that.
 */
async function reconnect(): Promise<void> {
  const downMs = 2000;
  const srv = await startNbdkit(['memory', '64M']);
  await mustRun(process.execPath, [CLI, '127.0.0.1', String(srv.port), '/dev/nbd4'], { timeoutMs: 60_000 });
  const prober = spawn(process.execPath, ['-e', `
    const fs = require('fs');
    const fd = fs.openSync('/dev/nbd4', fs.constants.O_WRONLY | fs.constants.O_DSYNC);
    const buf = Buffer.alloc(4096, 7);
    let off = 0;
    for (;;) {
      try { fs.writeSync(fd, buf, 0, 4096, off); process.stdout.write(Date.now() + '\\n'); }
      catch (e) { process.stdout.write('E ' + Date.now() + ' ' + e.code + '\\n'); }
      off = (off + 4096) % (32 * 1024 * 1024);
    }`], { stdio: ['ignore', 'pipe', 'inherit'] });
  const stamps: number[] = [];
  let errors = 0;
  let partial = '';
  prober.stdout!.on('data', (d: Buffer) => {
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop()!;
    for (const l of lines) {
      if (l.startsWith('E')) errors++;
      else if (l) stamps.push(Number(l));
    }
  });
  const recoveries: number[] = [];
  const fresh: number[] = [];
  try {
    await waitFor(() => stamps.length > 10, 60_000, { what: 'prober running' });
    for (let i = 0; i < REPS; i++) {
      srv.kill('SIGKILL');
      await srv.exited();
      await new Promise((r) => setTimeout(r, downMs));
      await srv.restart();
      const back = Date.now();
      // Fresh I/O: a direct read of a block nobody has asked for yet, issued once the server listens.
      const skip = 4096 + i * 17;
      await mustRun('dd', ['if=/dev/nbd4', 'of=/dev/null', 'bs=4096', 'count=1', `skip=${skip}`, 'iflag=direct', 'status=none'], { timeoutMs: 120_000 });
      fresh.push(Date.now() - back);
      const first = await waitFor(() => stamps.find((t) => t >= back), 120_000, { what: 'I/O after reconnect', intervalMs: 5 });
      recoveries.push(first! - back);
      await new Promise((r) => setTimeout(r, 1000));
    }
  } finally {
    prober.kill('SIGKILL');
    await run(process.execPath, [CLI, '-d', '/dev/nbd4'], { timeoutMs: 60_000 });
    await srv.stop();
  }
  let worst = 0;
  for (let i = 1; i < stamps.length; i++) worst = Math.max(worst, stamps[i]! - stamps[i - 1]!);
  report(`reconnect median ${median(fresh).toFixed(0)} ms from server back to a fresh read completing (target ≤ 1000 ms; runs: ${fresh.join(', ')})`);
  report(`reconnect median ${median(recoveries).toFixed(0)} ms from server back to the next completion of a writer whose request was in flight on the dead socket (runs: ${recoveries.join(', ')}); worst I/O stall ${worst} ms with the server down ${downMs} ms; I/O errors ${errors} (nbd-client -persist: never recovers, upstream #93)`);
}

await loadNbd({ nbds_max: 8 });
const allSections: [string, () => Promise<void>][] = [
  ['attach latency', attachLatency],
  ['client throughput', clientThroughput],
  ['server throughput', () => serverThroughput('tmpfs')],
  ['server throughput on ext4', () => serverThroughput('ext4')],
  ['reconnect', reconnect],
  ['tls throughput', tlsThroughput],
];
// BENCH_ONLY=reconnect (or a comma-separated list of section names) runs only those.
const only = (process.env.BENCH_ONLY ?? '').split(',').map((x) => x.trim()).filter(Boolean);
const sections = only.length ? allSections.filter(([n]) => only.some((o) => n.startsWith(o))) : allSections;
let failed = 0;
for (const [name, fn] of sections) {
  try {
    await fn();
  } catch (e) {
    failed++;
    report(`${name}: FAILED: ${(e as Error).message.split('\n')[0]}`);
  }
}
await cleanup();
writeFileSync('/tmp/bench-results.txt', results.join('\n'));
writeBenchResults(results); // docs/benchmarks.md, written on the host by test/bench.sh
process.stdout.write(`\n=== benchmark summary ===\n${results.join('\n')}\n`);
process.exitCode = failed ? 1 : 0;
