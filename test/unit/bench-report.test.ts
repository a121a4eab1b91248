// The benchmark's report writer (test/bench/report.ts): docs/benchmarks.md's "Latest run" block.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cpuInfo, END, rewriteBenchmarks, rowOf, START, writeBenchResults, RESULTS_FILE, type BenchRun, type HostInfo } from '../bench/report.ts';

const host: HostInfo = {
  cpu: 'Intel(R) Xeon(R) Processor',
  cores: 2,
  versions: { 'nbd-client': '3.24', nbdkit: '1.32.5', 'nbd-server': '3.24', qemu: '7.2.22', fio: '3.33' },
};

function run(date: string, results: string[], settings: Record<string, string> = { BENCH_REPS: '5' }): BenchRun {
  return { date, kernel: '6.1.0-57-amd64', node: 'v20.20.2', guestCpu: 'QEMU TCG CPU', guestCores: 2, settings, results };
}

const full = [
  'attach  median 3600 ms vs nbd-client 170 ms = 21.18× (lower is better)',
  'client seq-read-1M          nbd-attach 98 vs nbd-client 100 MB/s = 0.98×',
  'server seq-write-1M         ours 120 MB/s; nbd-server 81 = 1.48× (target ≥ 1.0×); nbdkit file 88 = 1.36× (target ≥ 0.9×); medians of 5 after 12 s warm-up (runs: nbd-attach serve 102, 127)',
  'reconnect median 688 ms from server back to a fresh read completing (target ≤ 1000 ms; runs: 596, 180)',
  'tls seq-read-1M | odd          nbd-attach 7 vs nbd-client -x 10 MB/s = 0.65×',
];

test('cpuInfo: model name and processor count from /proc/cpuinfo', () => {
  const text = 'processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t: fpu\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n';
  assert.deepEqual(cpuInfo(text), { model: 'Intel(R) Xeon(R) Processor', cores: 2 });
  assert.deepEqual(cpuInfo(''), { model: 'unknown CPU', cores: 0 });
});

test('rowOf: the first word names the benchmark, every "= N×" is a ratio, failures are marked', () => {
  assert.deepEqual(rowOf(full[2]!, '2026-12-01'), {
    area: 'server',
    ratios: '1.48× 1.36×',
    result: full[2]!.slice('server'.length).trimStart(),
    date: '2026-12-01',
  });
  assert.equal(rowOf('bench: reconnect median 688 ms …', 'd').area, 'reconnect');
  assert.equal(rowOf('reconnect median 688 ms …', 'd').ratios, '—');
  const failed = rowOf('attach latency: FAILED: nbd-client exited 1 = 2×', 'd');
  assert.equal(failed.area, 'attach');
  assert.equal(failed.ratios, 'FAILED');
});

test('a new file: header, run description with machine, kernel and versions, one row per result line', () => {
  const out = rewriteBenchmarks(undefined, run('2026-12-01T02:30:00.123Z', full), host);
  assert.match(out, /^# Benchmarks\n/);
  assert.match(out, /`npm run bench` rewrites/);
  assert.ok(out.includes(START) && out.includes(END));
  assert.match(out, /- Date: 2026-12-01 02:30:00 UTC\n/);
  assert.match(out, /- Host: Intel\(R\) Xeon\(R\) Processor, 2 cores; test VM: qemu software emulation, 2 vCPUs \(QEMU TCG CPU\)\n/);
  assert.match(out, /- Guest kernel: 6\.1\.0-57-amd64\n/);
  assert.match(out, /- Versions: node v20\.20\.2, nbd-client 3\.24, nbdkit 1\.32\.5, nbd-server 3\.24, qemu 7\.2\.22, fio 3\.33\n/);
  assert.match(out, /- Settings: BENCH_REPS=5\n/);
  const rows = out.split('\n').filter((l) => l.startsWith('| ') && !l.startsWith('| benchmark') && !l.startsWith('| ---'));
  assert.equal(rows.length, full.length);
  assert.equal(rows[0], '| attach | 21.18× | median 3600 ms vs nbd-client 170 ms = 21.18× (lower is better) | 2026-12-01 |');
  assert.ok(rows[4]!.includes('seq-read-1M \\| odd'), 'a "|" in a result is escaped');
  assert.doesNotMatch(out, /not measured by this run/);
});

test('a rewrite replaces only the block, keeps the history, and keeps rows of benchmarks a partial run skipped', () => {
  const first = rewriteBenchmarks(undefined, run('2026-11-25T10:00:00Z', full), host);
  const withHistory = `${first}\n\n## History\n\n| date | figure |\n| --- | --- |\n| 2026-11-24 | 0.57× |\n`;
  const partial = run('2026-12-01T02:30:00Z', ['server seq-write-1M         ours 150 MB/s; nbd-server 100 = 1.50× (target ≥ 1.0×); nbdkit file 125 = 1.20× (target ≥ 0.9×)'], {
    BENCH_ONLY: 'server',
  });
  const second = rewriteBenchmarks(withHistory, partial, host);
  assert.ok(second.endsWith('## History\n\n| date | figure |\n| --- | --- |\n| 2026-11-24 | 0.57× |\n'), 'history kept verbatim');
  assert.equal(second.split(START).length, 2, 'one block');
  const rows = second.split('\n').filter((l) => l.startsWith('| ') && l.endsWith(' |') && /\| 2026-1[12]-\d\d \|$/.test(l));
  assert.deepEqual(rows.map((r) => r.split(' | ')[0]!.slice(2)), ['server', 'attach', 'client', 'reconnect', 'tls']);
  assert.match(rows[0]!, /1\.50× 1\.20× .* \| 2026-12-01 \|$/);
  assert.ok(rows.slice(1).every((r) => r.endsWith('| 2026-11-25 |')), 'kept rows keep their date');
  assert.ok(rows[4]!.includes('seq-read-1M \\| odd'), 'an escaped "|" survives the round trip');
  assert.doesNotMatch(second, /ours 120 MB\/s/, "the server row of the earlier run is replaced");
  assert.match(second, /Rows dated before 2026-12-01 were not measured by this run/);
  assert.match(second, /- Settings: BENCH_ONLY=server\n/);
  // A full run after that drops the note and the kept rows.
  const third = rewriteBenchmarks(second, run('2026-12-02T00:00:00Z', full), host);
  assert.doesNotMatch(third, /not measured by this run/);
  assert.equal(third.split('\n').filter((l) => l.endsWith('| 2026-12-02 |')).length, full.length);
});

test('a file without the markers keeps its text after a new block', () => {
  const out = rewriteBenchmarks('old notes\n', run('2026-12-01T00:00:00Z', full.slice(0, 1)), host);
  assert.ok(out.startsWith('# Benchmarks\n'));
  assert.ok(out.endsWith(`${END}\n\nold notes\n`));
});

test('writeBenchResults: writes the run into the given directory, and nothing without one', () => {
  const dir = mkdtempSync(join(tmpdir(), 'bench-report-'));
  try {
    writeBenchResults(['attach median 1 ms vs nbd-client 1 ms = 1.00×'], dir);
    const r = JSON.parse(readFileSync(join(dir, RESULTS_FILE), 'utf8')) as BenchRun;
    assert.deepEqual(r.results, ['attach median 1 ms vs nbd-client 1 ms = 1.00×']);
    assert.equal(r.node, process.version);
    assert.ok(!Number.isNaN(Date.parse(r.date)));
    assert.ok(r.kernel.length > 0 && r.guestCores > 0);
    writeBenchResults(['x'], '');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('docs/benchmarks.md as committed: every row of its block survives a partial run', () => {
  const committed = readFileSync(new URL('../../docs/benchmarks.md', import.meta.url), 'utf8');
  const block = committed.slice(committed.indexOf(START), committed.indexOf(END));
  const before = block.split('\n').filter((l) => /^\| [a-z]/.test(l) && !l.startsWith('| benchmark'));
  assert.ok(before.length > 10);
  const out = rewriteBenchmarks(committed, run('2026-12-01T00:00:00Z', ['attach  median 3600 ms vs nbd-client 170 ms = 21.18× (lower is better)'], { BENCH_ONLY: 'attach' }), host);
  const after = out.slice(out.indexOf(START), out.indexOf(END)).split('\n').filter((l) => /^\| [a-z]/.test(l) && !l.startsWith('| benchmark'));
  assert.deepEqual(after.slice(1), before.filter((l) => !l.startsWith('| attach ')));
  assert.ok(out.endsWith(committed.slice(committed.indexOf(END) + END.length)), 'history kept');
});
