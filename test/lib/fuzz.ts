// Shared pieces of the property-based tests (test/unit/fuzz-*.test.ts): the run budget, byte
// mutations that keep inputs "mostly valid", and splitting a byte string into chunks.
//
// Budget. Each property runs until FUZZ_RUNS inputs or FUZZ_SECONDS seconds, whichever comes
// first; a property interrupted by the time limit passes with the inputs it checked (the budget is
// a bound, not a target). By default a property stops after its own run count (hundreds to a few
// thousand) or 2 s, and the properties of one file share 6 s, so a fuzz file stays near 10 s even on
// a loaded CI machine (it then checks fewer inputs):
//   FUZZ_RUNS     runs per property             (default: each property's own)
//   FUZZ_SECONDS  time limit per property, in s (no file budget then; alone, it lifts the run cap)
//   FUZZ_SEED     replay a seed fast-check printed (with FUZZ_PATH to go straight to the failure;
//                 pick the property with --test-name-pattern, as every property of the file gets it)
// A long local run:  FUZZ_SECONDS=300 npm run test:fuzz
//
// A failure prints its seed, path and the shrunk counterexample; the shrunk bytes then become an
// explicit regression case in the test file (see "regressions" in each file).

import fc from 'fast-check';

const envNumber = (name: string): number | undefined => {
  const v = process.env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${name}=${v}: expected a positive number`);
  return n;
};

/** Default wall-clock budget: per property, and for all the properties of one file together. */
const PROPERTY_MS = 2000;
const FILE_MS = 6000;
/** Each test file runs in its own process: this module is loaded when the file starts. */
const fileStart = Date.now();

/** fast-check parameters for one property whose default run count is `runs`. */
export function budget(runs: number): fc.Parameters<unknown> {
  const seconds = envNumber('FUZZ_SECONDS');
  const envRuns = envNumber('FUZZ_RUNS');
  // Seeds are any 32-bit integer, negative ones included.
  const seedText = process.env.FUZZ_SEED;
  const seed = seedText ? Number(seedText) : undefined;
  if (seed !== undefined && !Number.isInteger(seed)) throw new Error(`FUZZ_SEED=${seedText}: expected an integer`);
  // By default a property gets what is left of the file's budget, at most PROPERTY_MS and at least
  // a quarter of a second: on a loaded machine a file checks fewer inputs but stays short.
  const left = FILE_MS - (Date.now() - fileStart);
  const ms = seconds !== undefined ? seconds * 1000 : Math.max(250, Math.min(PROPERTY_MS, left));
  const params: fc.Parameters<unknown> = {
    // FUZZ_SECONDS alone: run until the time limit.
    numRuns: envRuns ?? (seconds !== undefined ? Number.MAX_SAFE_INTEGER : runs),
    // Interrupted runs pass with what they checked (failOnInterrupt defaults to false).
    plugins: [fc.interruptAfterTimeLimit(ms)],
    // The failing assertion's own message in the report, not only the counterexample.
    includeErrorInReport: true,
  };
  if (seed !== undefined) params.seed = seed;
  if (process.env.FUZZ_PATH) params.path = process.env.FUZZ_PATH;
  return params;
}

/** With a budget from the environment, say how many inputs a property got through (a long run's yield). */
function report(count: number, started: number): void {
  if (process.env.FUZZ_RUNS || process.env.FUZZ_SECONDS) {
    console.log(`fuzz: ${count} inputs in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  }
}

/** Run a synchronous property under the budget. */
export function check<T extends unknown[]>(runs: number, arbs: { [K in keyof T]: fc.Arbitrary<T[K]> }, body: (...args: T) => void): void {
  let count = 0;
  const started = Date.now();
  const counted = (...a: T): void => {
    count++;
    body(...a);
  };
  fc.assert(fc.property(...(arbs as unknown as [fc.Arbitrary<unknown>]), counted as (...a: unknown[]) => void), budget(runs));
  report(count, started);
}

/** Run an asynchronous property under the budget. */
export async function checkAsync<T extends unknown[]>(
  runs: number,
  arbs: { [K in keyof T]: fc.Arbitrary<T[K]> },
  body: (...args: T) => Promise<void>,
): Promise<void> {
  let count = 0;
  const started = Date.now();
  const counted = (...a: T): Promise<void> => {
    count++;
    return body(...a);
  };
  await fc.assert(fc.asyncProperty(...(arbs as unknown as [fc.Arbitrary<unknown>]), counted as (...a: unknown[]) => Promise<void>), budget(runs));
  report(count, started);
}

/** Arbitrary bytes as a Buffer. */
export const bytes = (maxLength = 256): fc.Arbitrary<Buffer> =>
  fc.uint8Array({ maxLength }).map((u) => Buffer.from(u));

/** u32 values that stress length fields: edges of every width, and plain small values. */
export const hostileU32: fc.Arbitrary<number> = fc.oneof(
  fc.constantFrom(0, 1, 3, 4, 15, 16, 27, 28, 255, 256, 4095, 4096, 4097, 8192, 8193, 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 1 << 25, (1 << 25) + 1, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff),
  fc.integer({ min: 0, max: 0xffffffff }),
);

/** u64 values that stress offsets: around 2^53 (Number precision) and 2^63/2^64. */
export const hostileU64: fc.Arbitrary<bigint> = fc.oneof(
  fc.constantFrom(0n, 1n, 511n, 512n, 4096n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 4096n, 2n ** 64n - 1n),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);

/** One edit of a byte string. Positions are fractions so they fit whatever length the input has. */
export type Mutation =
  | { kind: 'flip'; at: number; bit: number }
  | { kind: 'truncate'; at: number }
  | { kind: 'u32'; at: number; value: number }
  | { kind: 'u16'; at: number; value: number }
  | { kind: 'insert'; at: number; data: Uint8Array }
  | { kind: 'delete'; at: number; count: number };

// Unbiased: fast-check's default bias towards 0 would cut and flip mostly the first bytes (the
// greeting or header), and the fuzzer would rarely get past it.
const frac = fc.noBias(fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }));

export const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: frac, bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant('truncate' as const), at: frac }),
  fc.record({ kind: fc.constant('u32' as const), at: frac, value: hostileU32 }),
  fc.record({ kind: fc.constant('u16' as const), at: frac, value: fc.oneof(fc.constantFrom(0, 1, 0x7fff, 0x8000, 0xffff), fc.integer({ min: 0, max: 0xffff })) }),
  fc.record({ kind: fc.constant('insert' as const), at: frac, data: fc.uint8Array({ minLength: 1, maxLength: 16 }) }),
  fc.record({ kind: fc.constant('delete' as const), at: frac, count: fc.integer({ min: 1, max: 16 }) }),
);

/** Apply `edits` to a copy of `input`, leaving its first `keep` bytes alone (e.g. a greeting). */
export function mutate(input: Buffer, edits: readonly Mutation[], keep = 0): Buffer {
  let b = Buffer.from(input);
  for (const m of edits) {
    const lo = Math.min(keep, b.length);
    const at = lo + Math.floor(m.at * (b.length - lo + 1));
    switch (m.kind) {
      case 'flip':
        if (b.length > 0) {
          const i = Math.min(at, b.length - 1);
          b[i] = b[i]! ^ (1 << m.bit);
        }
        break;
      case 'truncate':
        b = b.subarray(0, at);
        break;
      case 'u32':
        // Overwrite in place (big-endian, as NBD's length fields are), when there is room.
        if (b.length >= 4) b.writeUInt32BE(m.value >>> 0, Math.min(at, b.length - 4));
        break;
      case 'u16':
        if (b.length >= 2) b.writeUInt16BE(m.value, Math.min(at, b.length - 2));
        break;
      case 'insert':
        b = Buffer.concat([b.subarray(0, at), m.data, b.subarray(at)]);
        break;
      case 'delete':
        b = Buffer.concat([b.subarray(0, at), b.subarray(at + m.count)]);
        break;
    }
  }
  return b;
}

/** Zero to `max` mutations; zero is common so that valid inputs are checked too. */
export const mutations = (max = 3): fc.Arbitrary<Mutation[]> =>
  fc.oneof({ arbitrary: fc.constant<Mutation[]>([]), weight: 1 }, { arbitrary: fc.array(mutation, { minLength: 1, maxLength: max }), weight: 2 });

/** Cut points for splitting: fractions, turned into offsets by `split`. */
export const cuts: fc.Arbitrary<number[]> = fc.oneof(
  fc.constant<number[]>([]),
  fc.array(frac, { maxLength: 12 }),
  // Byte by byte sometimes: every boundary at once.
  fc.constant<number[]>([-1]),
);

/** Split `b` at the given cut points (fractions of its length); [-1] means one byte per chunk. */
export function split(b: Buffer, at: readonly number[]): Buffer[] {
  if (at.length === 1 && at[0] === -1) return Array.from({ length: b.length }, (_, i) => b.subarray(i, i + 1));
  const points = [...new Set(at.map((f) => Math.floor(f * (b.length + 1))))].sort((x, y) => x - y);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    if (p > prev) out.push(b.subarray(prev, p));
    prev = Math.max(prev, p);
  }
  if (prev < b.length || out.length === 0) out.push(b.subarray(prev));
  return out;
}

/**
 * The outcome text of an error a parser may throw on bad input: one of `allowed` (an NbdError must
 * carry a code) with a one-line printable message. Anything else is rethrown: the test fails.
 */
export function typedError(err: unknown, ...allowed: Array<new (...a: never[]) => Error>): string {
  for (const cls of allowed) {
    if (err instanceof cls) {
      const code = (err as { code?: unknown }).code;
      if (code !== undefined && (typeof code !== 'string' || !/^[A-Z][A-Z0-9_]+$/.test(code))) throw new Error(`bad error code ${String(code)}`);
      // One printable line (house rule): no line breaks, no terminal control characters.
      if (typeof err.message !== 'string' || err.message.length === 0 || /[\u0000-\u001f\u007f-\u009f\u2028\u2029]/.test(err.message)) {
        throw new Error(`error message must be one printable, non-empty line: ${JSON.stringify(err.message)}`);
      }
      return code !== undefined ? `${String(code)}: ${err.message}` : `${err.name}: ${err.message}`;
    }
  }
  throw err;
}
