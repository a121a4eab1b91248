// The command side of a background attach. Node cannot fork, so the command spawns itself detached
// with the internal flag --supervisor-child; that process negotiates, attaches and stays resident,
// and reports "ready …" or the one-line error over an inherited pipe. The command prints it and
// exits with the right code, so `nbd-attach host /dev/nbd0 && mount …` works.

import { spawn } from 'node:child_process';
import { NbdError } from '../errors.ts';
import { CHILD_FLAG, REPORT_FD, parseReport } from './reporter.ts';

type Outcome = { ok: true; line: string } | { ok: false; error: NbdError };

/**
 * Start the resident process and wait (at most `limitMs`) for its first report. Under systemd's
 * journal ($JOURNAL_STREAM) its stderr is ours, so its log goes to the journal too.
 */
export async function launchBackground(limitMs: number): Promise<void> {
  const entry = process.argv[1];
  if (!entry) throw new NbdError('NBD_E_FAILURE', 'attach: cannot find this program to start the supervisor: use -n/--foreground');
  const args = [...process.execArgv, entry, ...process.argv.slice(2), CHILD_FLAG];
  const stderr = process.env['JOURNAL_STREAM'] !== undefined ? 'inherit' : 'ignore';
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'ignore', stderr, 'pipe'], env: process.env });
  const pipe = child.stdio[REPORT_FD] as NodeJS.ReadableStream | null;
  if (!pipe) throw new NbdError('NBD_E_FAILURE', 'attach: no pipe to the supervisor process');
  const outcome = await new Promise<Outcome>((resolve) => {
    let buf = '';
    let settled = false;
    const done = (v: Outcome): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(v);
    };
    const timer = setTimeout(() => {
      child.kill('SIGTERM');
      done({ ok: false, error: new NbdError('NBD_E_KERNEL_TIMEOUT', `attach: the supervisor did not report within ${Math.round(limitMs / 1000)} s: see its log under /var/log/nbd-attach/`) });
    }, limitMs);
    pipe.setEncoding('utf8');
    pipe.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > 1 << 20) buf = buf.slice(-4096); // a report is one short line: never grow without bound
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const r = parseReport(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (r?.kind === 'note') process.stderr.write(`nbd-attach: note: ${r.text}\n`);
        else if (r?.kind === 'ready') done({ ok: true, line: r.line });
        else if (r?.kind === 'error') done({ ok: false, error: new NbdError(r.code, r.message) });
      }
    });
    child.on('error', (e) => done({ ok: false, error: new NbdError('NBD_E_FAILURE', `attach: cannot start the supervisor: ${e.message}`) }));
    child.on('exit', (code, sig) =>
      done({ ok: false, error: new NbdError('NBD_E_FAILURE', `attach: the supervisor exited (${sig ?? `code ${code}`}) before the device was ready: run with -n/--foreground to see why`) }),
    );
  });
  (pipe as unknown as { destroy(): void }).destroy();
  child.unref();
  if (!outcome.ok) throw outcome.error;
  process.stdout.write(`${outcome.line}\n`);
}
