// How the process that does the attach tells its outcome: on the console (foreground, -n), or over
// an inherited pipe (fd 3) to the command that launched it in the background, which prints it and
// exits with the right code. One line per report: `note TEXT`, `ready LINE`, `error CODE TEXT`.

import fs from 'node:fs';
import { NbdError } from '../errors.ts';

/** The internal flag of the background process (hidden from --help). */
export const CHILD_FLAG = '--supervisor-child';
/** The inherited pipe the background process reports on. */
export const REPORT_FD = 3;

export interface Reporter {
  note(message: string): void;
  /** The device is usable: the line the user sees. */
  ready(line: string): void;
}

export function consoleReporter(): Reporter {
  return {
    note: (m) => process.stderr.write(`nbd-attach: note: ${m}\n`),
    ready: (line) => process.stdout.write(`${line}\n`),
  };
}

export function pipeReporter(): Reporter & { error(e: unknown): void } {
  const send = (s: string): void => {
    try {
      fs.writeSync(REPORT_FD, `${s.replace(/\n/g, ' ')}\n`);
    } catch {
      /* parent gone */
    }
  };
  return {
    note: (m) => send(`note ${m}`),
    ready: (line) => {
      send(`ready ${line}`);
      try {
        fs.closeSync(REPORT_FD);
      } catch {
        /* already closed */
      }
    },
    error: (e) => {
      const code = e instanceof NbdError ? e.code : 'NBD_E_FAILURE';
      send(`error ${code} ${e instanceof Error ? e.message : String(e)}`);
    },
  };
}

export type Report = { kind: 'note'; text: string } | { kind: 'ready'; line: string } | { kind: 'error'; code: string; message: string };

/** Pure: one report line → what it says (unknown kinds are ignored). */
export function parseReport(line: string): Report | undefined {
  const sp = line.indexOf(' ');
  const kind = sp < 0 ? line : line.slice(0, sp);
  const rest = sp < 0 ? '' : line.slice(sp + 1);
  if (kind === 'note') return { kind, text: rest };
  if (kind === 'ready') return { kind, line: rest };
  if (kind === 'error') {
    const sp2 = rest.indexOf(' ');
    return { kind, code: sp2 < 0 ? rest : rest.slice(0, sp2), message: sp2 < 0 ? 'attach failed' : rest.slice(sp2 + 1) };
  }
  return undefined;
}
