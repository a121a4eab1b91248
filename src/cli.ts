// The command line: builds the commander program from one module per command, and maps the forms
// nbd-client users type (`-d DEV`, `-c DEV`, `-l HOST`, `-name x`, `HOST PORT DEV`) onto it.

import { Command, CommanderError } from 'commander';
import { ExitCode, NbdError, exitCodeOf } from './errors.ts';
import { oneLine as printable } from './text.ts';
import { VERSION } from './version.ts';
import { writeErr, writeOut } from './output.ts';
import * as listCommand from './commands/list.ts';
import * as infoCommand from './commands/info.ts';
import * as serveCommand from './commands/serve.ts';
import * as attachCommand from './commands/attach.ts';
import * as detachCommand from './commands/detach.ts';
import * as checkCommand from './commands/check.ts';
import * as mknodCommand from './commands/mknod.ts';
import * as statusCommand from './commands/status.ts';
import * as bootArgsCommand from './commands/boot-args.ts';
import * as bootCommand from './commands/boot.ts';

/** Command modules, each `register(program)`, with the names (and aliases) it registers. Order is the order of `--help`. */
const COMMANDS: { names: readonly string[]; module: { register(program: Command): void } }[] = [
  { names: ['attach'], module: attachCommand },
  { names: ['detach', 'disconnect'], module: detachCommand },
  { names: ['check'], module: checkCommand },
  { names: ['status'], module: statusCommand },
  { names: ['list', 'ls'], module: listCommand },
  { names: ['info'], module: infoCommand },
  { names: ['serve'], module: serveCommand },
  { names: ['mknod'], module: mknodCommand },
  { names: ['boot-args'], module: bootArgsCommand },
  { names: ['boot'], module: bootCommand },
];
/** Every command name and alias (test/unit/address.test.ts checks it against what buildProgram registers). */
export const COMMAND_NAMES: readonly string[] = COMMANDS.flatMap((c) => c.names);

/** Top-level nbd-client switches that select a command, with the command they select. */
const COMPAT_COMMANDS: Record<string, string> = {
  '-d': 'detach',
  '--disconnect': 'detach',
  '-disconnect': 'detach',
  '-c': 'check',
  '--check': 'check',
  '-check': 'check',
  '-l': 'list',
  '--list': 'list',
  '-list': 'list',
};

/** nbd-client accepts single-dash long options (`-name x`, `-timeout 30`); commander wants `--`. */
const SINGLE_DASH_LONG = new Set([
  'name', 'block-size', 'size', 'timeout', 'dead-timeout', 'connections', 'persist', 'swap', 'readonly',
  'no-optgo', 'nonetlink', 'identifier', 'nofork', 'unix', 'systemd-mark', 'preinit',
  'enable-tls', 'certfile', 'keyfile', 'cacertfile', 'tlshostname',
]);
/** Long names nbd-client uses that we call differently. */
const RENAMED: Record<string, string> = { '--readonly': '--read-only', '--nonetlink': '--ioctl', '--nofork': '--foreground', '--enable-tls': '--tls' };

/** Pure: rewrite argv (without node and script) into the canonical `nbd-attach COMMAND …` form. */
export function normalizeArgv(args: readonly string[], commandNames: readonly string[]): string[] {
  let out = args.map((a) => {
    const m = /^-([a-z][a-z-]+)(=.*)?$/.exec(a);
    let b = m && SINGLE_DASH_LONG.has(m[1]!) ? `--${m[1]}${m[2] ?? ''}` : a;
    const eq = b.indexOf('=');
    const flag = eq > 0 ? b.slice(0, eq) : b;
    if (RENAMED[flag]) b = RENAMED[flag] + (eq > 0 ? b.slice(eq) : '');
    return b;
  });
  const first = out[0];
  if (first !== undefined && commandNames.includes(first)) return out;
  // `-d DEV`, `-c DEV`, `-l HOST` anywhere select their command, as with nbd-client.
  const compat = out.findIndex((a) => a in COMPAT_COMMANDS);
  if (compat >= 0) {
    const command = COMPAT_COMMANDS[out[compat]!]!;
    out = [command, ...out.slice(0, compat), ...out.slice(compat + 1)];
    return out;
  }
  if (first === undefined || ['-h', '--help', '-V', '--version', 'help'].includes(first)) return out;
  // Anything else is the main job: `nbd-attach HOST[:PORT] [PORT] [DEV]`.
  return commandNames.includes('attach') ? ['attach', ...out] : out;
}

/**
 * The program with every command, or with `only` the named one: a command that runs needs none of
 * the others' options, and declaring them all is work at every start (docs/decisions.md
 * "Start-up: output without stdio streams").
 */
export function buildProgram(only?: string): Command {
  const program = new Command('nbd-attach')
    .description('Attach a Network Block Device export to a Linux /dev/nbdN, and keep it attached.')
    .version(VERSION, '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ writeOut, writeErr, outputError: (str, write) => write(oneLine(str)) });
  for (const c of COMMANDS) if (only === undefined || c.names.includes(only)) c.module.register(program);
  return program;
}

function oneLine(str: string): string {
  return str.replace(/^error: /, 'nbd-attach: ');
}

/** Print an error as one line and return the exit code for it. */
export function reportError(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : ExitCode.USAGE;
  const message = err instanceof NbdError ? err.message : err instanceof Error ? err.message : String(err);
  // One line whatever it quotes (a server's text, a name): controls made visible (src/text.ts).
  writeErr(`nbd-attach: ${printable(message)}\n`);
  if (process.env.DEBUG && err instanceof Error && err.stack) writeErr(`${err.stack}\n`);
  return exitCodeOf(err);
}

export async function main(argv: readonly string[]): Promise<number> {
  const args = normalizeArgv(argv, COMMAND_NAMES);
  const program = buildProgram(args[0] !== undefined && COMMAND_NAMES.includes(args[0]) ? args[0] : undefined);
  program.exitOverride();
  for (const c of program.commands) c.exitOverride();
  try {
    await program.parseAsync(args, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    return reportError(err);
  }
}
