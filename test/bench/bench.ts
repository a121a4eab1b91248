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

async function timed(file: string, args: string[]): Promise<number> {
  const t0 = performance.now();
  await mustRun(file, args, { timeoutMs: 120_000 });
  return performance.now() - t0;
}

/** Start-up targets: attach ≤ 3×, detach and check ≤ 2.5× nbd-client; --version ≤ 1.25× `node -e 0`; idle supervisor ≤ 45 MB. */
const TARGETS = { attach: 3, detach: 2.5, check: 2.5, version: 1.25, rssMB: 45 };
const verdict = (r: number, max: number): string => (r <= max ? `target ≤ ${max}×: met` : `target ≤ ${max}×: NOT met`);

async function attachLatency(): Promise<void> {
  const srv = await startNbdkit(['memory', '64M']);
  const ours: number[] = [];
  const ref: number[] = [];
  const oursDetach: number[] = [];
  const refDetach: number[] = [];
  const oursCheck: number[] = [];
  const refCheck: number[] = [];
  const nodeStart: number[] = [];
  const version: number[] = [];
  const rss: number[] = [];
  const timings: string[] = [];
  for (let i = 0; i < REPS; i++) {
    // Alternating, same server: nbd-client, then ours.
    ref.push(await timed('nbd-client', ['127.0.0.1', String(srv.port), '/dev/nbd0']));
    refCheck.push(await timedAnyExit('nbd-client', ['-c', '/dev/nbd0']));
    refDetach.push(await timed('nbd-client', ['-d', '/dev/nbd0']));
    const t0 = performance.now();
    const a = await mustRun(process.execPath, [CLI, '127.0.0.1', String(srv.port), '/dev/nbd0'], { timeoutMs: 120_000, env: { ...process.env, NBD_ATTACH_TIMING: '1' } });
    ours.push(performance.now() - t0);
    const t = /^timing: .*$/m.exec(a.stderr)?.[0];
    if (t) timings.push(t);
    const pid = Number(/supervisor pid (\d+)/.exec(a.stdout)?.[1]);
    oursCheck.push(await timedAnyExit(process.execPath, [CLI, '-c', '/dev/nbd0']));
    await new Promise((r) => setTimeout(r, 3000)); // the supervisor settles (idle)
    const kb = Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
    if (kb > 0) rss.push(kb / 1024);
    oursDetach.push(await timed(process.execPath, [CLI, '-d', '/dev/nbd0']));
    nodeStart.push(await timed(process.execPath, ['-e', '0']));
    version.push(await timed(process.execPath, [CLI, '--version']));
  }
  const line = (what: string, a: number[], b: number[], refName: string, max: number): void => {
    const r = median(a) / median(b);
    report(`${what.padEnd(9)} median ${median(a).toFixed(0)} ms vs ${refName} ${median(b).toFixed(0)} ms = ${ratio(median(a), median(b))} (${verdict(r, max)})`);
  };
  line('attach', ours, ref, 'nbd-client', TARGETS.attach);
  line('detach', oursDetach, refDetach, 'nbd-client', TARGETS.detach);
  line('check', oursCheck, refCheck, 'nbd-client -c', TARGETS.check);
  line('--version', version, nodeStart, 'node -e 0', TARGETS.version);
  report(`supervisor idle RSS median ${median(rss).toFixed(1)} MB (target ≤ ${TARGETS.rssMB} MB: ${median(rss) <= TARGETS.rssMB ? 'met' : 'NOT met'})`);
  // Where an attach's time goes (the last run; NBD_ATTACH_TIMING): Node start is `node -e 0`'s median.
  if (timings.length) report(`attach breakdown (node -e 0 takes ${median(nodeStart).toFixed(0)} ms of "loaded"): ${timings.at(-1)!.replace(/^timing: /, '')}`);
  await srv.stop();
}

/** Like timed(), for commands whose exit code is an answer (check: 0 attached, 1 not). */
async function timedAnyExit(file: string, args: string[]): Promise<number> {
  const t0 = performance.now();
  await run(file, args, { timeoutMs: 120_000 });
  return performance.now() - t0;
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
async function tlsThroughput(): Promise<void> {
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
