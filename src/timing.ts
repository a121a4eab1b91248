// Where the time of an attach goes, for the benchmark: with NBD_ATTACH_TIMING=1 the command prints
// one line on stderr with the time from process start (performance.now()'s origin) to each mark.
// Off by default: a mark is then a single comparison.

const enabled = process.env['NBD_ATTACH_TIMING'] === '1';
const marks: [string, number][] = [];

export function mark(name: string): void {
  if (enabled) marks.push([name, performance.now()]);
}

/** "timing: loaded 412 ms, handshake +35 ms, …" or undefined when timing is off. */
export function timingLine(): string | undefined {
  if (!enabled || marks.length === 0) return undefined;
  let prev = 0;
  const parts = marks.map(([name, t]) => {
    const part = prev === 0 ? `${name} ${t.toFixed(0)} ms` : `${name} +${(t - prev).toFixed(0)} ms`;
    prev = t;
    return part;
  });
  return `timing: ${parts.join(', ')} (total ${prev.toFixed(0)} ms since the process started)`;
}
