// fio under the kernel tests: random 4 KiB writes verified by crc32c while a test kills things
// (servers, supervisors, connections), and the check that no I/O failed.
//
// A run is capped by fio's own `--runtime`, but a test ends it as soon as what it provokes is over
// and I/O has flowed again for a while (`stopAfterWrites`): fio stops on SIGINT like at the end of
// its runtime (exit 128 when signalled, its JSON report intact, verified blocks counted), so a test
// does not sit out the rest of a fixed runtime (minutes over the suite under software emulation).
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { run, waitFor, type RunResult } from './lib.ts';

/** Completed writes of /dev/nbdN (field 5 of /sys/block/nbdN/stat: Documentation/block/stat.rst). */
export function writesCompleted(index: number): number {
  return Number(readFileSync(`/sys/block/nbd${index}/stat`, 'utf8').trim().split(/\s+/)[4]);
}

/**
 * fio's own runtime cap for tests that end it with stopAfterWrites: long, so that under a slow
 * (busy, emulated) guest fio is still running when the test checks that I/O flows on.
 */
export const FIO_CAP_S = 240;

/** A running fio: awaiting it waits for its runtime; `stopAfterWrites` ends it earlier. */
export type FioRun = Promise<RunResult> & {
  /** Whether fio has ended (by itself or by stopAfterWrites). */
  readonly finished: boolean;
  /**
   * Once `more` further writes completed on nbdN (fio still running: I/O flows again after whatever
   * the test did), SIGINT fio and return its result. If fio ends first, that result.
   */
  stopAfterWrites(index: number, more?: number): Promise<RunResult>;
};

/** fio writing and verifying `dev` for at most `runtimeS` seconds, checking every `verifyBacklog` writes. */
export function startFio(dev: string, runtimeS: number, name = 'kernel-test', verifyBacklog = 64): FioRun {
  let child: ChildProcess | undefined;
  let finished = false;
  let stoppedByUs = false;
  const done = run(
    'fio',
    [
      `--name=${name}`, `--filename=${dev}`, '--ioengine=libaio', '--direct=1', '--iodepth=4', '--bs=4k', '--rw=randwrite',
      '--size=16M', '--verify=crc32c', `--verify_backlog=${verifyBacklog}`, '--time_based', `--runtime=${runtimeS}`, '--output-format=json',
    ],
    { timeoutMs: (runtimeS + 240) * 1000, onSpawn: (c) => (child = c) },
  ).then((r) => {
    finished = true;
    return stoppedByUs && r.code === SIGINT_EXIT ? { ...r, code: 0 } : r;
  });
  return Object.assign(done, {
    get finished() {
      return finished;
    },
    async stopAfterWrites(index: number, more = 200): Promise<RunResult> {
      const w0 = writesCompleted(index);
      await Promise.race([done, waitFor(() => finished || writesCompleted(index) > w0 + more, (runtimeS + 240) * 1000, { what: `${more} more writes on nbd${index}` })]);
      if (!finished && child?.pid !== undefined) {
        stoppedByUs = true;
        child.kill('SIGINT');
      }
      return done;
    },
  });
}

/** fio's exit status when it ended on SIGINT (it prints "terminating on signal 2", then its report). */
const SIGINT_EXIT = 128;

export function fioSummary(r: RunResult): { error: number; writes: number; reads: number; worstMs: number } {
  const i = r.stdout.indexOf('{');
  assert.ok(i >= 0, `fio printed no JSON (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  type Dir = { total_ios: number; clat_ns?: { max?: number } };
  const j = JSON.parse(r.stdout.slice(i)) as { jobs: { error: number; write: Dir; read: Dir }[] };
  const job = j.jobs[0]!;
  const worstMs = Math.round(Math.max(job.write.clat_ns?.max ?? 0, job.read.clat_ns?.max ?? 0) / 1e6);
  return { error: job.error, writes: job.write.total_ios, reads: job.read.total_ios, worstMs };
}

/** fio ended in time, exit 0 (or stopped by us), no error, and it both wrote and verified blocks. */
export function assertFioClean(r: RunResult, what: string): void {
  assert.equal(r.timedOut, false, `${what}: fio hung`);
  const s = fioSummary(r);
  assert.equal(r.code, 0, `${what}: fio failed (exit ${r.code}): ${r.stderr}`);
  assert.equal(s.error, 0, `${what}: fio reported error ${s.error}`);
  assert.ok(s.writes > 0 && s.reads > 0, `${what}: fio wrote ${s.writes} and verified ${s.reads} blocks`);
  console.log(`# ${what}: fio ${s.writes} writes, ${s.reads} verify reads, 0 errors; worst stall of one request ${s.worstMs} ms`);
}
