// Storage operations in progress on one export, across all its connections. Pure bookkeeping.
//
// Why: a client that gives up on a connection (the kernel's request timeout) resends that
// connection's requests on a new one. A WRITE still running on the old connection must not land
// after the resent one, nor after newer writes to the same block. So a new connection starts
// transmission only once every operation started before it, on any connection to the export, has
// finished (`barrier`), and a connection counts as over only once its own operations have.

export class ExportActivity {
  private nextId = 0;
  /** Ids of unfinished operations, in start order (a Set iterates in insertion order). */
  private readonly pending = new Set<number>();
  private waiters: { upTo: number; resolve: () => void }[] = [];

  /** Operations started and not finished. */
  get inProgress(): number {
    return this.pending.size;
  }

  /** An operation starts; pass the id to `end` when it has finished (succeeded or failed). */
  begin(): number {
    const id = this.nextId++;
    this.pending.add(id);
    return id;
  }

  end(id: number): void {
    if (!this.pending.delete(id) || this.waiters.length === 0) return;
    const oldest = this.oldest();
    const ready = this.waiters.filter((w) => oldest === undefined || oldest >= w.upTo);
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve();
  }

  /** Resolves once every operation started before this call has finished (later ones are not waited for). */
  barrier(): Promise<void> {
    const oldest = this.oldest();
    if (oldest === undefined) return Promise.resolve();
    const upTo = this.nextId;
    return new Promise((resolve) => this.waiters.push({ upTo, resolve }));
  }

  private oldest(): number | undefined {
    for (const id of this.pending) return id;
    return undefined;
  }
}

const byBackend = new WeakMap<object, ExportActivity>();

/** The activity record of a backend (one per backend object, shared by every connection serving it). */
export function activityOf(backend: object): ExportActivity {
  let a = byBackend.get(backend);
  if (!a) byBackend.set(backend, (a = new ExportActivity()));
  return a;
}
