// The benchmark's report in docs/benchmarks.md.
//
// Two halves, because the checkout is read-only inside the test VM:
//  - in the guest, at the end of test/bench/bench.ts, writeBenchResults() puts the printed result
//    lines, the date, the guest kernel and Node's version into the VM's writable control share
//    ($NBD_VM_OUT, which test/vm/run.sh --out copies back to the host when the VM stops);
//  - on the host, test/bench.sh then runs this file (`node --import tsx test/bench/report.ts
//    RESULTS.json docs/benchmarks.md`), which adds the host's CPU and the versions of the tools
//    (the guest runs the host's own binaries, shared read-only) and rewrites the "Latest run" block
//    of docs/benchmarks.md between its markers, leaving the rest of the file (history) alone.
// A partial run (BENCH_ONLY) replaces the rows of the benchmarks it ran; rows of the others stay,
// with the date they were measured.

import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

export const START = '<!-- bench:latest:start (rewritten by npm run bench: test/bench/report.ts) -->';
export const END = '<!-- bench:latest:end -->';
export const RESULTS_FILE = 'bench-results.json';

/** What the guest knows about a run. */
export interface BenchRun {
  date: string; // ISO 8601
  kernel: string; // guest `uname -r`
  node: string;
  guestCpu: string;
  guestCores: number;
  settings: Record<string, string>; // BENCH_* variables of the run
  results: string[]; // the lines the benchmark printed, without the "bench: " prefix
}

/** What the host adds. */
export interface HostInfo {
  cpu: string;
  cores: number;
  versions: Record<string, string>; // tool -> version
}

/** The CPU model and the number of processors listed in a /proc/cpuinfo text. */
export function cpuInfo(text: string): { model: string; cores: number } {
  const models = [...text.matchAll(/^model name\s*:\s*(.*)$/gm)].map((m) => m[1]!.trim());
  const cores = [...text.matchAll(/^processor\s*:/gm)].length;
  return { model: models[0] ?? 'unknown CPU', cores };
}

function readCpuInfo(): { model: string; cores: number } {
  try {
    return cpuInfo(readFileSync('/proc/cpuinfo', 'utf8'));
  } catch {
    return { model: 'unknown CPU', cores: os.cpus().length };
  }
}

/** Guest side: write the run's results into the VM's control share, if there is one. */
export function writeBenchResults(results: readonly string[], dir = process.env.NBD_VM_OUT): void {
  if (!dir) return;
  const cpu = readCpuInfo();
  const run: BenchRun = {
    date: new Date().toISOString(),
    kernel: os.release(),
    node: process.version,
    guestCpu: cpu.model,
    guestCores: cpu.cores,
    settings: Object.fromEntries(Object.entries(process.env).filter(([k, v]) => k.startsWith('BENCH_') && v) as [string, string][]),
    results: [...results],
  };
  try {
    writeFileSync(join(dir, RESULTS_FILE), JSON.stringify(run, null, 2));
  } catch (e) {
    process.stderr.write(`bench: could not write the results for docs/benchmarks.md: ${(e as Error).message}\n`);
  }
}

/** The first line of a command's output that names a version, or "not found". */
function versionOf(cmd: string, args: string[], pattern: RegExp): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10_000 });
  if (r.error) return 'not found';
  const m = `${r.stdout ?? ''}\n${r.stderr ?? ''}`.match(pattern);
  return m ? m[1]! : 'unknown';
}

/** Host side: the CPU and the versions of the tools the benchmark ran. */
export function hostInfo(): HostInfo {
  const cpu = readCpuInfo();
  return {
    cpu: cpu.model,
    cores: cpu.cores,
    versions: {
      'nbd-client': versionOf('nbd-client', ['--version'], /from nbd ([\w.~+-]+)/),
      nbdkit: versionOf('nbdkit', ['--version'], /nbdkit ([\w.~+-]+)/),
      'nbd-server': versionOf('nbd-server', ['-V'], /nbd-server version ([\w.~+-]+)/),
      qemu: versionOf('qemu-system-x86_64', ['--version'], /version ([\w.~+-]+)/),
      fio: versionOf('fio', ['--version'], /fio-([\w.~+-]+)/),
    },
  };
}

interface Row {
  area: string;
  ratios: string;
  result: string;
  date: string;
}

const cell = (s: string): string => s.replace(/\\/g, '\\\\').replace(/\|/g, '\\|').replace(/\s+/g, ' ').trim();
const uncell = (s: string): string => s.trim().replace(/\\([\\|])/g, '$1');

/** One printed result line as a table row: its first word names the benchmark; every "= N×" is a ratio. */
export function rowOf(line: string, date: string): Row {
  const text = line.replace(/^bench:\s*/, '').trim();
  const area = text.split(/[\s:]/, 1)[0]!;
  const ratios = [...text.matchAll(/= ([0-9.]+×|n\/a)/g)].map((m) => m[1]!).join(' ');
  return { area, ratios: /FAILED/.test(text) ? 'FAILED' : ratios || '—', result: text.slice(area.length).replace(/^:?\s*/, ''), date };
}

function rowsIn(block: string): Row[] {
  const rows: Row[] = [];
  for (const line of block.split('\n')) {
    if (!line.startsWith('| ') || line.startsWith('| benchmark ') || line.startsWith('| ---')) continue;
    const cells = line.slice(2, -2).split(' | ');
    if (cells.length !== 4) continue;
    rows.push({ area: uncell(cells[0]!), ratios: uncell(cells[1]!), result: uncell(cells[2]!), date: uncell(cells[3]!) });
  }
  return rows;
}

/** The "Latest run" block: this run's rows first, then rows of benchmarks it did not run. */
export function latestBlock(run: BenchRun, host: HostInfo, previous: readonly Row[] = []): string {
  const day = run.date.slice(0, 10);
  const rows = run.results.map((l) => rowOf(l, day));
  const ran = new Set(rows.map((r) => r.area));
  const kept = previous.filter((r) => !ran.has(r.area));
  const settings = Object.entries(run.settings).map(([k, v]) => `${k}=${v}`).join(' ');
  const versions = Object.entries(host.versions).map(([k, v]) => `${k} ${v}`).join(', ');
  const lines = [
    START,
    '## Latest run',
    '',
    `- Date: ${run.date.replace('T', ' ').replace(/\.\d+Z$/, ' UTC')}`,
    `- Host: ${host.cpu}, ${host.cores} cores; test VM: qemu software emulation, ${run.guestCores} vCPUs (${run.guestCpu})`,
    `- Guest kernel: ${run.kernel}`,
    `- Versions: node ${run.node}, ${versions}`,
    `- Settings: ${settings || '(defaults)'}`,
    ...(kept.length ? [`- Rows dated before ${day} were not measured by this run (BENCH_ONLY); they come from earlier runs (see the history).`] : []),
    '',
    'Ratios: ours ÷ reference (for attach/detach, lower is better; elsewhere higher is better).',
    '',
    '| benchmark | ratios | result | measured |',
    '| --- | --- | --- | --- |',
    ...[...rows, ...kept].map((r) => `| ${cell(r.area)} | ${cell(r.ratios)} | ${cell(r.result)} | ${cell(r.date)} |`),
    END,
  ];
  return lines.join('\n');
}

const HEADER = `# Benchmarks

\`npm run bench\` rewrites the "Latest run" block below at the end of each run (test/bench/report.ts);
the rest of this file is kept. Every figure is a ratio against a reference measured in the same run
in the test VM (software emulation), where absolute figures mean little (docs/decisions.md
"Benchmarks").

`;

/** The new file: the old one with its "Latest run" block replaced, or a new file around the block. */
export function rewriteBenchmarks(previousFile: string | undefined, run: BenchRun, host: HostInfo): string {
  const start = previousFile?.indexOf(START) ?? -1;
  const end = previousFile?.indexOf(END) ?? -1;
  if (previousFile === undefined || start < 0 || end < start) {
    return `${HEADER}${latestBlock(run, host)}\n${previousFile ? `\n${previousFile}` : ''}`;
  }
  const block = latestBlock(run, host, rowsIn(previousFile.slice(start, end)));
  return previousFile.slice(0, start) + block + previousFile.slice(end + END.length);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [resultsPath, target] = process.argv.slice(2);
  if (!resultsPath || !target) {
    process.stderr.write('usage: node --import tsx test/bench/report.ts RESULTS.json docs/benchmarks.md\n');
    process.exit(2);
  }
  const run = JSON.parse(readFileSync(resultsPath, 'utf8')) as BenchRun;
  const previous = existsSync(target) ? readFileSync(target, 'utf8') : undefined;
  writeFileSync(target, rewriteBenchmarks(previous, run, hostInfo()));
  process.stdout.write(`bench: wrote ${target}\n`);
}
