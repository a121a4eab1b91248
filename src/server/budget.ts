// A process-wide bound on payload bytes held by in-flight requests (READ data waiting to be sent,
// WRITE data waiting to be stored), shared by every connection. Pure bookkeeping.
//
// A per-connection bound alone lets memory grow with the number of connections: 4 clients that
// pipeline 4 MiB READs and never read the replies held 4 × 64 MiB (316 MB RSS at the peak). While
// the process is over its budget, connections stop framing new requests; a connection with nothing
// in flight may still take one request, so a client is never starved by others' unread replies (the
// overshoot is at most one request per connection, and connections are capped).

export class PayloadBudget {
  private used = 0;
  private readonly waiting = new Set<() => void>();

  constructor(readonly limit: number) {}

  /** Bytes held now. */
  get held(): number {
    return this.used;
  }

  /** May a connection that already holds `own` bytes take another request? */
  allows(own: number): boolean {
    return own === 0 || this.used < this.limit;
  }

  take(n: number): void {
    this.used += n;
  }

  give(n: number): void {
    this.used -= n;
    if (this.waiting.size > 0 && this.used < this.limit) {
      const wake = [...this.waiting];
      this.waiting.clear();
      // Not on this stack: the caller is in the middle of releasing one request.
      setImmediate(() => {
        for (const w of wake) w();
      });
    }
  }

  /** Call `wake` once the process is back under its budget (once; register again if still needed). */
  wait(wake: () => void): void {
    this.waiting.add(wake);
  }

  forget(wake: () => void): void {
    this.waiting.delete(wake);
  }
}

/** Default budget of the process: the former per-connection bound, now for all connections together. */
export const DEFAULT_PROCESS_PAYLOAD_BYTES = 64 * 1024 * 1024;

export const processBudget = new PayloadBudget(DEFAULT_PROCESS_PAYLOAD_BYTES);
