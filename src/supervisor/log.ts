// The resident supervisor's log. Three rules, because the process it belongs to may be the only
// thing keeping a root filesystem alive:
//
// 1. It never blocks the event loop. Lines are queued and written by one asynchronous write at a
//    time (a libuv pool thread), so a log file on a stalled disk, or a journal that stops reading,
//    costs at most one pool thread, never the reconnect or the signal handling. The background log
//    is never placed on the device being supervised (that write could wait for the very reconnect
//    it would delay).
// 2. It is bounded. At most MAX_QUEUED_BYTES wait in memory (the rest is counted and reported as
//    dropped); a line repeated verbatim is counted, not repeated; the file is rotated once to
//    `.1` when it passes MAX_FILE_BYTES.
// 3. It is opened without following symlinks, and every line is one line: control characters
//    (from a server's export name, an error text) are shown escaped, never interpreted.

import fs from 'node:fs';
import path from 'node:path';
import { oneLine as escapeLine } from '../text.ts';

export const MAX_QUEUED_BYTES = 256 * 1024;
export const MAX_FILE_BYTES = 4 * 1024 * 1024;
export const MAX_LINE_CHARS = 2000;

/** One line, control characters made visible (src/text.ts, the one helper for that), cut at MAX_LINE_CHARS. */
export function oneLine(text: string): string {
  const s = escapeLine(text);
  return s.length > MAX_LINE_CHARS ? `${s.slice(0, MAX_LINE_CHARS)}… (${s.length} chars)` : s;
}

export interface LogSink {
  /** Queue one message (made one line here). */
  write(message: string): void;
  /** Raw text from elsewhere (debug(), warnings): queued as it is, bounded the same way. */
  raw(text: string): void;
  /** Write what is queued, then stop. */
  close(): Promise<void>;
  readonly dropped: number;
}

export interface LogTarget {
  fd: number;
  /** The file behind fd, for rotation; undefined for stderr. */
  file?: string;
}

/**
 * A bounded, non-blocking writer to `target`. `format` adds the prefix (time, device, pid) to each
 * message; a message equal to the previous one is counted until a different one comes.
 */
export function createLogSink(target: LogTarget, format: (message: string) => string, opts: { maxQueued?: number; maxFile?: number } = {}): LogSink {
  const maxQueued = opts.maxQueued ?? MAX_QUEUED_BYTES;
  const maxFile = opts.maxFile ?? MAX_FILE_BYTES;
  let fd = target.fd;
  let queue: string[] = [];
  let queuedBytes = 0;
  let dropped = 0;
  let writing: Promise<void> | undefined;
  let last: string | undefined;
  let repeats = 0;
  let size = 0;
  if (target.file !== undefined) {
    try {
      size = fs.fstatSync(fd).size;
    } catch {
      size = 0;
    }
  }

  const enqueue = (text: string): void => {
    if (queuedBytes + text.length > maxQueued) {
      dropped++;
      return;
    }
    if (dropped > 0) {
      const note = `${format(`${dropped} log line(s) dropped (the log could not keep up)`)}\n`;
      dropped = 0;
      queue.push(note);
      queuedBytes += note.length;
    }
    queue.push(text);
    queuedBytes += text.length;
    writing ??= drain();
  };

  const rotate = async (): Promise<void> => {
    if (target.file === undefined) return;
    try {
      await fs.promises.rename(target.file, `${target.file}.1`);
      const next = await openNoFollow(target.file);
      const old = fd;
      fd = next;
      size = 0;
      fs.close(old, () => undefined);
    } catch {
      /* keep writing where we were */
    }
  };

  const drain = async (): Promise<void> => {
    while (queue.length > 0) {
      const batch = queue.join('');
      queue = [];
      queuedBytes = 0;
      const buf = Buffer.from(batch, 'utf8');
      await new Promise<void>((resolve) => {
        fs.write(fd, buf, 0, buf.length, null, () => resolve()); // a failed write (disk full) loses the batch, nothing else
      });
      size += buf.length;
      if (target.file !== undefined && size > maxFile) await rotate();
    }
    writing = undefined;
  };

  const flushRepeats = (): void => {
    if (repeats > 0) enqueue(`${format(`(the previous message repeated ${repeats} more time${repeats === 1 ? '' : 's'})`)}\n`);
    repeats = 0;
  };

  return {
    write(message: string) {
      const line = oneLine(message);
      if (line === last) {
        repeats++;
        return;
      }
      flushRepeats();
      last = line;
      enqueue(`${format(line)}\n`);
    },
    raw(text: string) {
      enqueue(text);
    },
    async close() {
      flushRepeats();
      while (writing) await writing;
    },
    get dropped() {
      return dropped;
    },
  };
}

function openNoFollow(file: string): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(file, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o640, (err, fd) => (err ? reject(err) : resolve(fd)));
  });
}

/**
 * Open the background log nbdN.log in the first of `dirs` that is writable, is not on the
 * supervised device itself (`onDevice(dev)` says so from the directory's st_dev) and holds no
 * symlink or non-regular file at that name.
 */
export function openLogFile(index: number, dirs: readonly string[], onDevice: (dev: bigint) => boolean): { fd: number; file: string } {
  for (const dir of dirs) {
    try {
      fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
      if (onDevice(fs.statSync(dir, { bigint: true }).dev)) continue;
      const file = path.join(dir, `nbd${index}.log`);
      const fd = fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o640);
      if (!fs.fstatSync(fd).isFile()) {
        fs.closeSync(fd);
        continue;
      }
      return { fd, file };
    } catch {
      /* read-only, not allowed, or a symlink planted there: try the next place */
    }
  }
  return { fd: fs.openSync('/dev/null', 'a'), file: '/dev/null' };
}
