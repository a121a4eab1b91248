// A FIFO of received chunks that hands out exact byte counts across chunk boundaries without
// copying when the bytes asked for sit inside one chunk. Pure: no sockets.

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    const b = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.chunks.push(b);
    this.total += b.length;
  }

  /** Remove and return exactly `n` bytes (caller checks `length >= n`). A view when contiguous, else one copy. */
  take(n: number): Buffer {
    if (n > this.total) throw new RangeError(`ByteQueue.take(${n}) with only ${this.total} buffered`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyInto(out, 0, n);
    return out;
  }

  /** Move up to `n` bytes into `dest` at `destOffset`; returns how many were moved. */
  copyInto(dest: Uint8Array, destOffset: number, n: number): number {
    let moved = 0;
    while (moved < n && this.total > 0) {
      const first = this.chunks[0]!;
      const take = Math.min(n - moved, first.length - this.head);
      dest.set(first.subarray(this.head, this.head + take), destOffset + moved);
      this.advance(take);
      moved += take;
    }
    return moved;
  }

  /** Drop up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    let dropped = 0;
    while (dropped < n && this.total > 0) {
      const first = this.chunks[0]!;
      const take = Math.min(n - dropped, first.length - this.head);
      this.advance(take);
      dropped += take;
    }
    return dropped;
  }

  /**
   * Copy any buffered bytes that live in `scratch` (a read buffer about to be reused) into memory of
   * their own. Normally only a partial header (< 28 bytes) is left, so this copies little.
   */
  detach(scratch: ArrayBufferLike): void {
    for (let i = 0; i < this.chunks.length; i++) {
      const c = this.chunks[i]!;
      if (c.buffer === scratch) {
        const start = i === 0 ? this.head : 0;
        this.chunks[i] = Buffer.from(c.subarray(start));
        if (i === 0) this.head = 0;
      }
    }
  }

  /** Everything buffered, removed from the queue. */
  drain(): Buffer {
    return this.take(this.total);
  }

  private advance(n: number): void {
    this.head += n;
    this.total -= n;
    while (this.chunks.length > 0 && this.head >= this.chunks[0]!.length) {
      this.head -= this.chunks[0]!.length;
      this.chunks.shift();
    }
  }
}
