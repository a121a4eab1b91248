// `nbd-attach boot [--cmdline TEXT] [--root-path TEXT] [--root-server HOST] [--report FILE]`: the
// initramfs's one Node.js process for a root on NBD. It reads the kernel command line
// (src/boot/cmdline.ts), attaches the root the way it asks, and stays as the device's supervisor
// (src/supervisor/run.ts runResident): no second process for the command line, none for the
// supervisor. The boot script (packaging/initramfs-tools, packaging/dracut) starts it in the
// background and waits for the report FILE to say `NBDROOT_STATE=ready` (or failed/none), then
// mounts NBDROOT_ROOT. What the root needs: argv[0] marked '@' (-m), the OOM killer kept off (-s),
// log and state under /run/nbd-attach (moved into the real root with /run; never on the root itself).

import fs from 'node:fs';
import path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { ExitCode, NbdError, exitCodeOf } from '../errors.ts';
import { INITRAMFS_TLS_DIR, type BootPlan, type BootState, bootReportAsShell, planBoot } from '../boot/cmdline.ts';
import { type AttachCliOptions, applyNbdtab, attachSpec, defineAttach } from './attach.ts';
import type { AttachSpec, SupervisedAttachOptions } from '../supervisor/run.ts';

/** Where the root's supervisor keeps its state and log in the initramfs: /run moves with switch_root. */
export const BOOT_RUN_DIR = '/run/nbd-attach';
/** Seconds between attempts while the network or the server comes up (as the scripts did before). */
const RETRY_DELAY_MS = 3_000;

interface BootOptions {
  cmdline?: string;
  rootPath?: string;
  rootServer?: string;
  report: string;
  attempts: number;
}

/** Replace the report in one step (rename), so the script never reads half of it. */
function writeReport(file: string, plan: BootPlan | undefined, state: BootState, message?: string): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, `${bootReportAsShell(plan, state, message)}NBDROOT_PID=${process.pid}\n`);
  fs.renameSync(tmp, file);
}

/** The plan's attach arguments, parsed by the attach command's own definition (same options, same checks). */
async function parseAttachArgs(args: readonly string[]): Promise<{ spec: AttachSpec; opts: AttachCliOptions & SupervisedAttachOptions }> {
  let out: { spec: AttachSpec; opts: AttachCliOptions & SupervisedAttachOptions } | undefined;
  const cmd = defineAttach(new Command('nbd-attach'))
    .exitOverride()
    .configureOutput({ writeErr: () => undefined, writeOut: () => undefined })
    .action((a1: string | undefined, a2: string | undefined, a3: string | undefined, given: AttachCliOptions) => {
      const { positionals, opts } = applyNbdtab([a1, a2, a3], given, () => undefined);
      out = { spec: attachSpec(positionals, opts), opts: opts as AttachCliOptions & SupervisedAttachOptions };
    });
  try {
    await cmd.parseAsync([...args], { from: 'user' });
  } catch (e) {
    if (e instanceof NbdError) throw e;
    throw new NbdError('NBD_E_USAGE', `boot: the command line gives attach options it cannot take (${(e as Error).message.replace(/^error: /, '')})`);
  }
  if (!out) throw new NbdError('NBD_E_USAGE', 'boot: nothing to attach');
  return out;
}

export function register(program: Command): void {
  program
    .command('boot')
    .description('initramfs: attach the NBD root the kernel command line asks for and stay as its supervisor, reporting to FILE')
    .option('--cmdline <text>', 'the kernel command line (default: /proc/cmdline)')
    .option('--root-path <text>', "DHCP's root-path (option 17), for nbdroot=dhcp / root=dhcp / netroot=dhcp")
    .option('--root-server <host>', "DHCP's server, for an nbdroot= without a host")
    .option('--report <file>', 'the shell assignments the boot script waits for (NBDROOT_STATE=attaching|ready|failed|none)', `${BOOT_RUN_DIR}/boot.env`)
    .option(
      '--attempts <n>',
      'attach attempts while the server is unreachable (3 s apart)',
      (t: string) => {
        if (!/^\d+$/.test(t) || Number(t) < 1 || Number(t) > 1000) throw new InvalidArgumentError(`'${t}' is not a number of attempts (1..1000)`);
        return Number(t);
      },
      10,
    )
    .action(async (o: BootOptions) => {
      // The log and state of the root's supervisor: /run, never /var/log of the initramfs (emptied
      // at switch_root) nor anything on the root it carries.
      process.env['NBD_ATTACH_RUN_DIR'] ??= BOOT_RUN_DIR;
      process.env['NBD_ATTACH_LOG_DIR'] ??= process.env['NBD_ATTACH_RUN_DIR'];
      let plan: BootPlan | undefined;
      try {
        const cmdline = o.cmdline ?? fs.readFileSync('/proc/cmdline', 'utf8');
        plan = planBoot(cmdline, {
          dhcp: { rootPath: o.rootPath || undefined, rootServer: o.rootServer || undefined },
          tlsDirPresent: fs.existsSync(INITRAMFS_TLS_DIR),
        });
      } catch (e) {
        writeReport(o.report, undefined, 'failed', (e as Error).message);
        throw e;
      }
      if (!plan) {
        writeReport(o.report, undefined, 'none');
        return;
      }
      writeReport(o.report, plan, 'attaching');
      let parsed;
      try {
        parsed = await parseAttachArgs(plan.attachArgs);
      } catch (e) {
        writeReport(o.report, plan, 'failed', (e as Error).message);
        throw e;
      }
      const { runResident } = await import('../supervisor/run.ts');
      const rep = {
        note: (m: string) => void process.stderr.write(`nbd-attach: note: ${m}\n`),
        ready: (line: string) => {
          writeReport(o.report, plan, 'ready', line);
          process.stdout.write(`${line}\n`);
        },
      };
      for (let attempt = 1; ; attempt++) {
        try {
          const code = await runResident(parsed.spec, parsed.opts, rep);
          // Supervising ended (detached, stopped): as the background supervisor does.
          process.exit(code);
        } catch (e) {
          const code = exitCodeOf(e);
          // A wrong command line or no privileges: waiting will not help. Otherwise (server
          // unreachable, negotiation, kernel) the network or the server may still be coming up.
          const final = code === ExitCode.USAGE || code === ExitCode.PERMISSION || attempt >= o.attempts;
          const message = (e as Error).message;
          if (final) {
            writeReport(o.report, plan, 'failed', `${message} (attempt ${attempt} of ${o.attempts})`);
            throw e;
          }
          process.stderr.write(`nbd-attach: boot: attempt ${attempt} of ${o.attempts} failed: ${message}; trying again in ${RETRY_DELAY_MS / 1000} s\n`);
          await new Promise((r) => setTimeout(r, RETRY_DELAY_MS));
        }
      }
    });
}
