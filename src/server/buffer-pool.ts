// Reusable payload buffers for READ data and assembled WRITE payloads. Allocating a fresh 1 MiB
// ArrayBuffer per request costs an mmap, 256 page faults and an munmap each time; reusing them keeps
// large sequential I/O cheap; for 4 KiB, a pooled buffer costs a quarter of a fresh one under emulation
// (6 vs 26 µs). Bounded: at most `maxBytes` are kept idle; sizes below a page are not pooled (Node's
// own slab allocator serves those).

export class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private readonly ours = new WeakSet<ArrayBuffer>();
  private readonly isIdle = new WeakSet<ArrayBuffer>();
  private idle = 0;

  constructor(
    private readonly maxBytes = 64 * 1024 * 1024,
    private readonly minPooled = 4096,
  ) {}

  /** Bytes currently kept for reuse. */
  get idleBytes(): number {
    return this.idle;
  }

  /** A buffer of exactly `n` bytes with unspecified contents. */
  take(n: number): Buffer {
    if (n < this.minPooled) return Buffer.allocUnsafe(n);
    const size = sizeClass(n);
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
  }
}

/** Next power of two ≥ n. */
function sizeClass(n: number): number {
  return 2 ** Math.ceil(Math.log2(n));
}
