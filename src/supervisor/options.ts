// The attach options of the resident supervisor (added to `attach` by src/commands/attach.ts).

import { InvalidArgumentError, Option, type Command } from 'commander';
import { DEFAULT_DEAD_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S } from './policy.ts';

function intIn(what: string, min: number, max: number) {
  return (text: string): number => {
    if (!/^\d+$/.test(text) || Number(text) < min || Number(text) > max) throw new InvalidArgumentError(`'${text}' is not a valid ${what} (${min}..${max})`);
    return Number(text);
  };
}

export function addSupervisorOptions(cmd: Command): Command {
  return cmd
    .option('-n, --foreground', 'stay in the foreground and log to stderr (systemd); default: return once the device is usable, the supervisor logging to /var/log/nbd-attach/nbdN.log (or /run/nbd-attach/ when /var/log is read-only)')
    .addOption(
      new Option('-T, --dead-timeout <seconds>', `how long I/O waits in the kernel for a reconnect before failing with EIO (default ${DEFAULT_DEAD_TIMEOUT_S}; request timeout -t defaults to ${DEFAULT_REQUEST_TIMEOUT_S})`).argParser(
        intIn('dead timeout', 0, 0x7fffffff),
      ),
    )
    .addOption(new Option('-C, --connections <n>', 'open N connections to the server (needs the server\'s multi-conn support)').argParser(intIn('number of connections', 1, 16)))
    .option('--reattach <device>', 'supervise an attached device again (after the supervisor was killed or upgraded)')
    .addOption(new Option('--supervisor-child', 'internal: the background supervisor process').hideHelp());
}
