// When file I/O may run on the event loop instead of the libuv thread pool. Pure (clock injected).
//
// A page-cache hit takes a few microseconds as a direct call; the same call sent to the pool costs a
// queue hand-off, a thread wake-up and a callback (measured on the host, 4k random reads at QD16:
// 18k IOPS through the pool, 46k inline; docs/decisions.md "Built-in server: inline file I/O"). But a
// call that waits on the disk (a cold read, writeback throttling) would stall every connection of the
// process. Reads avoid that with preadv2(RWF_NOWAIT) where the file system supports it; everything
// else runs inline under this guard (files on tmpfs/ramfs need none: nothing there waits for a disk): a call that took clearly longer than copying its bytes means
// the file system waited, and I/O then goes to the pool for a while before inline is tried again.

/**
 * Largest WRITE run inline. Bigger ones go to the pool: copying 1 MiB there runs on another CPU
 * while the event loop receives the next payload. READs of any size run inline when they can: there
 * the pool round trip costs the loop more than the copy. Measured in the test VM, 1 MiB QD4, pool
 * vs inline, two runs each: writes 43/36 vs 26/32 IOPS, reads 35/19 vs 55/50 IOPS.
 */
export const INLINE_WRITE_MAX_BYTES = 64 * 1024;

/**
 * Time allowed for any inline call before it counts as having waited. Well above a scheduler time
 * slice (~3-4 ms with two runnable tasks per CPU), so being preempted mid-call does not count.
 */
export const INLINE_SLOW_BASE_MS = 10;
/** Extra time allowed per MiB moved (a slow, emulated CPU copies ~1 GiB/s; this is 5× slack). */
export const INLINE_SLOW_PER_MIB_MS = 5;
/** How long I/O stays on the pool after an inline call waited. */
export const INLINE_BACKOFF_MS = 1000;

export class InlineGuard {
  private poolUntil = 0;
  /** Inline calls that waited (for logs and tests). */
  slowCalls = 0;

  constructor(
    private readonly now: () => number = () => performance.now(),
    private readonly backoffMs = INLINE_BACKOFF_MS,
  ) {}

  /** May the next call run inline? */
  get allowed(): boolean {
    return this.poolUntil === 0 || this.now() >= this.poolUntil;
  }

  /** Run `fn` inline, timing it; a call slower than its budget for `bytes` moves I/O to the pool. */
  run<T>(bytes: number, fn: () => T): T {
    const t0 = this.now();
    try {
      return fn();
    } finally {
      const elapsed = this.now() - t0;
      if (elapsed > INLINE_SLOW_BASE_MS + (bytes / (1024 * 1024)) * INLINE_SLOW_PER_MIB_MS) {
        this.slowCalls++;
        this.poolUntil = this.now() + this.backoffMs;
      } else if (this.poolUntil !== 0 && this.now() >= this.poolUntil) {
        this.poolUntil = 0;
      }
    }
  }
}
