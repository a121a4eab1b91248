// Reusable payload buffers for READ data and assembled WRITE payloads. Allocating a fresh 1 MiB
// ArrayBuffer per request costs an mmap, 256 page faults and an munmap each time; reusing them keeps
// large sequential I/O cheap; for 4 KiB, a pooled buffer costs a quarter of a fresh one under emulation
// (6 vs 26 µs). Bounded: at most `maxBytes` are kept idle; sizes below a page are not pooled (Node's
// own slab allocator serves those). Idle buffers are dropped once nothing was taken for `idleMs`, so
// memory goes back when load ends (a slow-reader flood left 64 MiB idle here for good).

import v8 from 'node:v8';
import vm from 'node:vm';

/** Trims that let go of at least this much also ask for a garbage collection (see collectGarbage). */
const COLLECT_MIN_BYTES = 16 * 1024 * 1024;

let gc: (() => void) | null | undefined;

/**
 * A full garbage collection, so that dropped buffers' memory goes back to the system now. An idle
 * process allocates nothing, so V8 has no reason to collect: in a slow-reader flood test, RSS stayed
 * at 137 MB for 5 to more than 20 s after the pool let go of its buffers, and fell to 55 MB after a
 * collection. `gc` is not exposed without --expose-gc; setting the flag at run time and fetching
 * the function from a new context is the documented way around (v8.setFlagsFromString).
 */
function collectGarbage(): void {
  if (gc === undefined) {
    try {
      v8.setFlagsFromString('--expose-gc');
      gc = vm.runInNewContext('gc') as () => void;
    } catch {
      gc = null;
    }
  }
  gc?.();
}

export class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private readonly ours = new WeakSet<ArrayBuffer>();
  private readonly isIdle = new WeakSet<ArrayBuffer>();
  private idle = 0;
  private takenSinceCheck = false;
  private trimTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly maxBytes = 64 * 1024 * 1024,
    private readonly minPooled = 4096,
    /** Idle buffers are let go after this long without a `take` (0: never). */
    private readonly idleMs = 2000,
  ) {}

  /** Bytes currently kept for reuse. */
  get idleBytes(): number {
    return this.idle;
  }

  /** A buffer of exactly `n` bytes with unspecified contents. */
  take(n: number): Buffer {
    if (n < this.minPooled) return Buffer.allocUnsafe(n);
    const size = sizeClass(n);
    this.takenSinceCheck = true;
    const ab = this.free.get(size)?.pop();
    if (ab) {
      this.isIdle.delete(ab);
      this.idle -= size;
      return Buffer.from(ab, 0, n);
    }
    const fresh = new ArrayBuffer(size);
    this.ours.add(fresh);
    return Buffer.from(fresh, 0, n);
  }

  /** Hand a buffer from `take` back once nothing refers to it any more. Others are ignored. */
  give(buf: Buffer): void {
    const ab = buf.buffer;
    if (!(ab instanceof ArrayBuffer) || !this.ours.has(ab) || this.isIdle.has(ab)) return; // foreign, or given twice
    const size = ab.byteLength;
    if (this.idle + size > this.maxBytes) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(ab);
    this.isIdle.add(ab);
    this.idle += size;
    if (!this.trimTimer && this.idleMs > 0) this.armTrim();
  }

  /** Let go of every idle buffer (the garbage collector frees them once nothing else refers to them). */
  trim(): void {
    const dropped = this.idle;
    this.free.clear();
    this.idle = 0;
    if (dropped >= COLLECT_MIN_BYTES) collectGarbage();
  }

  private armTrim(): void {
    this.takenSinceCheck = false;
    this.trimTimer = setTimeout(() => {
      this.trimTimer = undefined;
      if (this.idle === 0) return;
      if (this.takenSinceCheck) this.armTrim();
      else this.trim();
    }, this.idleMs);
    this.trimTimer.unref();
  }
}

/** Next power of two ≥ n. */
function sizeClass(n: number): number {
  return 2 ** Math.ceil(Math.log2(n));
}
