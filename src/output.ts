// A command's output on fds 1 and 2, written directly. Touching process.stdout or process.stderr
// creates a stream (node:tty or node:net with the whole stream stack, ~30 built-in modules) that a
// short command such as `check`, `detach` or `--version` otherwise never loads
// (docs/decisions.md "Start-up: output without stdio streams").
// The resident supervisor keeps process.stderr: its log sink replaces process.stderr.write.

import { writeSync } from 'node:fs';

/** Writes all of `text` to stdout. */
export function writeOut(text: string): void {
  writeAll(1, text);
}

/** Writes all of `text` to stderr. */
export function writeErr(text: string): void {
  writeAll(2, text);
}

const pause = new Int32Array(new SharedArrayBuffer(4));

function writeAll(fd: 1 | 2, text: string): void {
  const buf = Buffer.from(text, 'utf8');
  let off = 0;
  while (off < buf.length) {
    try {
      off += writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // A non-blocking descriptor (a pipe or socket some other process set so) that is full: wait
      // for the reader, as a blocking write would.
      if (code === 'EAGAIN') {
        Atomics.wait(pause, 0, 0, 1);
        continue;
      }
      // The reader is gone (`nbd-attach status | head -1`): nothing left to say to it.
      if (code === 'EPIPE') return;
      throw e;
    }
  }
}
