// Swap on NBD under real memory pressure (run in the VM: test/kernel/run.sh test/kernel/swap.test.ts):
// a device attached from /etc/nbdtab's form with `swap` (the supervisor gets oom_score_adj -1000),
// mkswap + swapon, then a job that needs 192 MiB confined by a cgroup to 64 MiB (memory.max) fills
// memory and verifies it while the server is SIGKILLed and restarted. The job's data must come back
// intact (measured at twice the size, 384 MiB in 128 MiB: nbd-client -swap -persist loses the job to
// SIGBUS there; docs/decisions.md), pswpout and the swap's use prove pages went out; then swapoff
// and detach. Swap under software emulation moves about 2 MB/s: 384 MiB with three passes took 13
// minutes, this size about a quarter of that.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustRun, run, startNbdkit, tmpDir, tmpFile } from './lib.ts';
import { cli, kernelSuite, show } from './attach-common.ts';
import { killAndRestart } from '../lib/servers.ts';

kernelSuite(8);
const MiB = 1024 * 1024;
const CG_ROOT = '/sys/fs/cgroup';
const CG = `${CG_ROOT}/nbd-swap-test`;

function vmstat(key: string): number {
  const m = new RegExp(`^${key} (\\d+)$`, 'm').exec(readFileSync('/proc/vmstat', 'utf8'));
  return m ? Number(m[1]) : 0;
}

/** KiB of swap in use on `dev` (/proc/swaps). */
function swapUsedKiB(dev: string): number {
  for (const line of readFileSync('/proc/swaps', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[0] === dev) return Number(f[3]);
  }
  return -1;
}

async function memoryCgroup(maxBytes: number): Promise<void> {
  if (!existsSync(join(CG_ROOT, 'cgroup.controllers'))) await mustRun('mount', ['-t', 'cgroup2', 'none', CG_ROOT]);
  writeFileSync(join(CG_ROOT, 'cgroup.subtree_control'), '+memory');
  if (!existsSync(CG)) mkdirSync(CG);
  writeFileSync(join(CG, 'memory.max'), String(maxBytes));
  writeFileSync(join(CG, 'memory.swap.max'), 'max');
}

test('swap on NBD (nbdtab swap): a 192 MiB job in 64 MiB keeps its data while the server is SIGKILLed and restarted; swapoff and detach', { timeout: 900_000 }, async () => {
  const dev = '/dev/nbd3';
  const img = await tmpFile(512 * MiB);
  const server = await startNbdkit(['file', img]);
  const dir = await tmpDir('swap-');
  const nbdtab = join(dir, 'nbdtab');
  writeFileSync(nbdtab, `nbd3 127.0.0.1 swap port=${server.port},swap\n`);
  const a = await cli(['--nbdtab', nbdtab, 'nbd3']);
  assert.equal(a.code, 0, show(a));
  const pid = Number(/supervisor pid (\d+)/.exec(a.stdout)?.[1]);
  assert.equal(readFileSync(`/proc/${pid}/oom_score_adj`, 'utf8').trim(), '-1000', 'nbdtab swap: the supervisor must be exempt from the OOM killer');
  await mustRun('mkswap', [dev]);
  await mustRun('swapon', [dev]);
  try {
    await memoryCgroup(64 * MiB);
    const outBefore = vmstat('pswpout');
    const job = spawn('sh', ['-c', `echo $$ > ${CG}/cgroup.procs && exec ${process.execPath} ${join(import.meta.dirname, 'swap-job.mjs')} 192 1`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let maxUsed = 0;
    const sampler = setInterval(() => (maxUsed = Math.max(maxUsed, swapUsedKiB(dev))), 250);
    const events: string[] = [];
    job.stderr.on('data', (b: Buffer) => (err += b.toString()));
    job.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      if (b.toString().includes('filled') && events.length === 0) {
        events.push('filled');
        killAndRestart(server, events);
      }
    });
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => job.on('exit', (c, s) => resolve([c, s])));
    clearInterval(sampler);
    const swappedOut = vmstat('pswpout') - outBefore;
    const detail = `job exit ${code} ${signal ?? ''}\nstdout: ${out}\nstderr: ${err}\nevents: ${events.join(', ')}\npswpout +${swappedOut}, max swap used ${maxUsed} KiB`;
    process.stdout.write(`# swap: ${detail.replace(/\n/g, ' | ')}\n`);
    assert.equal(signal, null, `the job was killed: ${detail}`);
    assert.equal(code, 0, detail);
    assert.match(out, /pass 1 bad=0/, detail);
    assert.deepEqual(events, ['filled', 'killed', 'restarted'], detail);
    // 192 MiB in 64 MiB: over 100 MiB must have gone out (pswpout counts 4 KiB pages).
    assert.ok(swappedOut * 4096 > 100 * MiB, detail);
    assert.ok(maxUsed * 1024 > 100 * MiB, detail);
  } finally {
    const off = await run('swapoff', [dev], { timeoutMs: 300_000 });
    assert.equal(off.code, 0, `swapoff: ${off.stderr}`);
    try {
      rmdirSync(CG);
    } catch {
      /* still populated for a moment */
    }
  }
  const d = await cli(['-d', dev]);
  assert.equal(d.code, 0, show(d));
  await server.stop();
});
